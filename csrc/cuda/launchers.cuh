// Host-side API of the torch-free CUDA kernels in csrc/cuda/*.cu. Plain C++ (only the CUDA runtime
// header), so both the .cu files and the torch bindings (*_bind.cpp, compiled by the host compiler)
// include it. All pointers are device pointers to contiguous row-major data; every launcher enqueues
// on `stream` and returns the launch error (cudaSuccess when nothing went wrong); none synchronizes.
//
// Shapes follow docs/ARCHITECTURE.md: x (M, K), weight (N, K), dy (M, N), bias (N,),
// mask (N, K) uint8/bool bytes, or packed int32 words (N, ceil(K / 32)), bit k % 32 of word k / 32,
// scores (N, K) of any float dtype. Accumulation is fp32; outputs are in the input dtype.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparsebert {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

enum class MaskKind : int {
  Bytes = 0,   // data: const uint8_t* (N, K), nonzero = keep
  Bits = 1,    // data: const int32_t* (N, ceil(K / 32)) packed words, LSB first
  Scores = 2,  // data: scores (N, K) of dtype scores_dtype; keep where float(score) >= threshold
};

struct MaskSpec {
  MaskKind kind;
  const void* data;
  DType scores_dtype;  // MaskKind::Scores only
  // MaskKind::Scores only: a DEVICE pointer to one fp32 threshold, read by the kernels (no host sync);
  // rounded to scores_dtype first, as torch's `scores >= t` does. Null for the other kinds.
  const float* threshold;
};

// y = x @ (weight ⊙ mask)ᵀ + bias   (bias may be null)
cudaError_t masked_linear_forward(DType dtype, const void* x, const void* weight, const void* bias, MaskSpec mask,
                                  void* y, int M, int N, int K, cudaStream_t stream);

// dx = dy @ (weight ⊙ mask)
cudaError_t masked_linear_input_grad(DType dtype, const void* dy, const void* weight, MaskSpec mask, void* dx, int M,
                                     int N, int K, cudaStream_t stream);

// G = dyᵀ @ x (one GEMM), then in its epilogue: dscores = G ⊙ weight (scores dtype; only for
// MaskKind::Scores, skipped when dscores is null) and dweight = G ⊙ mask (dtype; skipped when null).
cudaError_t masked_linear_weight_grad(DType dtype, const void* dy, const void* x, const void* weight, MaskSpec mask,
                                      void* dscores, void* dweight, int M, int N, int K, cudaStream_t stream);

// Radix select: *out = the value of rank k_prune (0-based, ascending) among values[0..n), found with
// four 8-bit histogram passes over the order-preserving uint32 key of each float (no sort).
// Requires 0 <= k_prune < n. `workspace` holds topk_threshold_workspace_elems() uint64 on the device.
int64_t topk_threshold_workspace_elems();
cudaError_t topk_threshold_select(const float* values, int64_t n, int64_t k_prune, unsigned long long* workspace,
                                  float* out, cudaStream_t stream);
// The same with the rank read on the device from `*k_prune` (one int64, no host sync): *out = -inf when
// *k_prune <= 0, +inf when *k_prune >= n, else the value of rank *k_prune.
cudaError_t topk_threshold_select_device_rank(const float* values, int64_t n, const int64_t* k_prune,
                                              unsigned long long* workspace, float* out, cudaStream_t stream);

// packed (rows, ceil(K/32)) int32 <- mask (rows, K) bytes; and back (mask bytes are 0/1, bool-compatible).
cudaError_t pack_mask(const uint8_t* mask, int64_t rows, int64_t K, int32_t* packed, cudaStream_t stream);
cudaError_t unpack_mask(const int32_t* packed, int64_t rows, int64_t K, uint8_t* mask, cudaStream_t stream);

// Bitmask SpMM (bitmask_spmm.cu): y (M, N) = x (M, K) @ Wᵀ + bias with W (N, K) in the tc-bitmask format of
// sparsebert/ops/reference_formats.py (`data` in x's dtype, 16-byte aligned; `tile_offsets` int32,
// ceil(N/64) * ceil(K/64) + 1 entries). fp16/bf16 only (cudaErrorInvalidValue otherwise). The plan fixes the
// grid: split > 1 needs `partials` (split, M, N) fp32 and `tickets` (token_blocks * row_tiles) int32 that are
// zero on entry (the kernel leaves them zero). split_k <= 0 picks about two CTAs per SM.
struct BitmaskSpmmPlan {
  int row_tiles, n_ktiles, tokens_per_cta, token_blocks, ktiles_per_split, split;
};
BitmaskSpmmPlan bitmask_spmm_plan(int M, int N, int K, int split_k, int num_sms);
cudaError_t bitmask_spmm_forward(DType dtype, const BitmaskSpmmPlan& plan, const void* x, const void* data,
                                 const int32_t* tile_offsets, const void* bias, void* y, float* partials,
                                 int32_t* tickets, int M, int N, int K, cudaStream_t stream);

// CUTLASS sm90 GEMMs on an already-masked weight Wm (cutlass_masked_gemm.cu, docs/CUTLASS.md), one set per
// element type: _bf16 (bfloat16), _fp16 (float16) and _tf32 (float32 data, tf32 tensor-core products: less
// precise than an fp32 GEMM, for callers that allow tf32). Every operand, the scores included, has that type.
// Built only with CUTLASS for sm_90a: otherwise, or on a device that is not compute capability 9.0, they return
// cudaErrorNotSupported. M, N, K > 0; N and K multiples of 16 bytes of elements (8 for bf16 / fp16, 4 for fp32:
// TMA rows) and every pointer 16-byte aligned, else cudaErrorInvalidValue.
bool cutlass_sm90_built();
// y = x @ Wmᵀ + bias (bias may be null)
cudaError_t cutlass_masked_linear_forward_bf16(const void* x, const void* weight_masked, const void* bias, void* y,
                                               int M, int N, int K, cudaStream_t stream);
cudaError_t cutlass_masked_linear_forward_fp16(const void* x, const void* weight_masked, const void* bias, void* y,
                                               int M, int N, int K, cudaStream_t stream);
cudaError_t cutlass_masked_linear_forward_tf32(const void* x, const void* weight_masked, const void* bias, void* y,
                                               int M, int N, int K, cudaStream_t stream);
// dx = dy @ Wm
cudaError_t cutlass_masked_linear_input_grad_bf16(const void* dy, const void* weight_masked, void* dx, int M, int N,
                                                  int K, cudaStream_t stream);
cudaError_t cutlass_masked_linear_input_grad_fp16(const void* dy, const void* weight_masked, void* dx, int M, int N,
                                                  int K, cudaStream_t stream);
cudaError_t cutlass_masked_linear_input_grad_tf32(const void* dy, const void* weight_masked, void* dx, int M, int N,
                                                  int K, cudaStream_t stream);
// G = dyᵀ @ x (N, K), one GEMM over the M tokens, then in its epilogue visitor tree (bf16 and fp16 only):
//   dweight = G ⊙ [scores >= tau]  (a select; tau = *threshold rounded to the element type, read on the device)
//   dscores = G ⊙ weight           (weight and dscores both null: not computed)
// scores (N, K) and threshold (one fp32, device) are required; for a 0/1 mask pass it as scores of the element
// type with *threshold = 0.5. The bias gradient (column sums of dy) is not computed here (see docs/CUTLASS.md).
cudaError_t cutlass_masked_linear_weight_grad_bf16(const void* dy, const void* x, const void* weight,
                                                   const void* scores, const float* threshold, void* dscores,
                                                   void* dweight, int M, int N, int K, cudaStream_t stream);
cudaError_t cutlass_masked_linear_weight_grad_fp16(const void* dy, const void* x, const void* weight,
                                                   const void* scores, const float* threshold, void* dscores,
                                                   void* dweight, int M, int N, int K, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsebert
