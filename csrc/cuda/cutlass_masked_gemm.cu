// CUTLASS 3 sm90 GEMMs on an already-masked weight Wm = W ⊙ m (the weight pass writes Wm):
//   forward:     y  = x @ Wmᵀ + bias   x (M, K) row-major, Wm (N, K) row-major, y (M, N), bias (N,) or null
//   input grad:  dx = dy @ Wm          dy (M, N), dx (M, K)
// and the weight gradient G = dyᵀ @ x (N, K) with an epilogue visitor tree (EVT) that reads W and the scores:
//   dweight = G ⊙ [scores >= tau]      dscores = G ⊙ W   (straight-through estimator)
// One element type in and out (every operand, the scores included), fp32 accumulation: bf16 and fp16 for all
// three, fp32 for the forward and input grad only (the `_tf32` entry points: fp32 data, tf32 tensor-core
// products, which keep 10 of the operands' 23 mantissa bits; why no fp32 weight grad: MaskedWeightGradGemm).
// Each is the TMA warp-specialized kernel from the collective builder (cooperative schedule: two consumer
// warpgroups per 128x128 tile, 128 bytes of K per stage; StageCountAuto); the forward bias is the
// LinCombPerColBias epilogue (a row broadcast in the epilogue visitor tree). Torch-free. Built only with
// -DSPARSEBERT_WITH_CUTLASS (the CUTLASS include dirs on the path) and for sm_90a; otherwise, and on a device
// that is not compute capability 9.0, every entry point returns cudaErrorNotSupported.
//
// Layout: the templates are in cutlass_masked_gemm.cuh, instantiated by cutlass_masked_gemm_{bf16,fp16,tf32}.cu
// (one compile unit per element type); this unit says whether they were built and, without CUTLASS, defines
// every entry point as returning cudaErrorNotSupported.
#include <cuda_runtime_api.h>

#include "launchers.cuh"

#if defined(SPARSEBERT_WITH_CUTLASS)

namespace sparsebert {
namespace cuda {

bool cutlass_sm90_built() { return true; }

}  // namespace cuda
}  // namespace sparsebert

#else  // !SPARSEBERT_WITH_CUTLASS

namespace sparsebert {
namespace cuda {

bool cutlass_sm90_built() { return false; }

#define SPARSEBERT_CUTLASS_ENTRY_POINTS(SUFFIX)                                                                     \
  cudaError_t cutlass_masked_linear_forward_##SUFFIX(const void*, const void*, const void*, void*, int, int, int,  \
                                                     cudaStream_t) {                                               \
    return cudaErrorNotSupported;                                                                                  \
  }                                                                                                                \
  cudaError_t cutlass_masked_linear_input_grad_##SUFFIX(const void*, const void*, void*, int, int, int,            \
                                                        cudaStream_t) {                                            \
    return cudaErrorNotSupported;                                                                                  \
  }
#define SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT(SUFFIX)                                                          \
  cudaError_t cutlass_masked_linear_weight_grad_##SUFFIX(const void*, const void*, const void*, const void*,       \
                                                         const float*, void*, void*, int, int, int, cudaStream_t) { \
    return cudaErrorNotSupported;                                                                                  \
  }

SPARSEBERT_CUTLASS_ENTRY_POINTS(bf16)
SPARSEBERT_CUTLASS_ENTRY_POINTS(fp16)
SPARSEBERT_CUTLASS_ENTRY_POINTS(tf32)
SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT(bf16)
SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT(fp16)
#undef SPARSEBERT_CUTLASS_ENTRY_POINTS
#undef SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT

}  // namespace cuda
}  // namespace sparsebert

#endif  // SPARSEBERT_WITH_CUTLASS
