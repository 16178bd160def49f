// Weight(/score)-gradient launcher of the masked GEMM: G = dyᵀ x computed once, with dscores = G ⊙ W
// and dweight = G ⊙ mask written by the epilogue (kernels in masked_gemm.cuh). Torch-free.
#include "masked_gemm.cuh"

namespace sparsebert {
namespace cuda {

cudaError_t masked_linear_weight_grad(DType dtype, const void* dy, const void* x, const void* weight, MaskSpec mask,
                                      void* dscores, void* dweight, int M, int N, int K, cudaStream_t stream) {
  if (dscores != nullptr && (mask.kind != MaskKind::Scores || weight == nullptr)) return cudaErrorInvalidValue;
  if (dscores == nullptr && dweight == nullptr) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_mask(mask, K, [&](auto policy) {
      using Mask = decltype(policy);
      GemmParams<T, Mask> p{static_cast<const T*>(dy), static_cast<const T*>(x), nullptr,
                            static_cast<const T*>(weight), static_cast<T*>(dweight),
                            static_cast<typename Mask::score_t*>(dscores), policy, M, N, K};
      return launch_masked_gemm<GemmMode::WeightGrad>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace sparsebert
