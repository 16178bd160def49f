// CUTLASS 3 sm90 GEMMs on an already-masked weight Wm = W ⊙ m (the weight pass writes Wm):
//   forward:     y  = x @ Wmᵀ + bias   x (M, K) row-major, Wm (N, K) row-major, y (M, N), bias (N,) or null
//   input grad:  dx = dy @ Wm          dy (M, N), dx (M, K)
// bf16 in and out, fp32 accumulation. Each is the TMA warp-specialized kernel from the collective builder
// (cooperative schedule: two consumer warpgroups per 128x128 tile; StageCountAuto); the forward bias is
// the LinCombPerColBias epilogue (a row broadcast in the epilogue visitor tree). Torch-free. Built only
// with -DSPARSEBERT_WITH_CUTLASS (the CUTLASS include dirs on the path) and for sm_90a; otherwise, and on a
// device that is not compute capability 9.0, every entry point returns cudaErrorNotSupported.
#include <cuda_runtime_api.h>

#include "launchers.cuh"

#if defined(SPARSEBERT_WITH_CUTLASS)

// CUTLASS's device asserts are calls, and a call inside the wgmma pipeline makes ptxas serialize every
// wgmma (warning C7510): this file is always built without them.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <cassert>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

#include <cstdint>
#include <type_traits>

namespace sparsebert {
namespace cuda {
namespace {

using namespace cute;

using Element = cutlass::bfloat16_t;
using ElementAcc = float;
constexpr int kAlign = 16 / sizeof(Element);  // 8 elements: TMA needs 16-byte aligned rows
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;

// D (M, N) row-major = A (M, K) · B, with B given as an (N, K) tensor of layout LayoutB.
template <class LayoutB, class FusionOp>
struct Sm90Gemm {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
      void, cutlass::layout::RowMajor, kAlign,      // no C source
      Element, cutlass::layout::RowMajor, kAlign,   // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,
      Element, LayoutB, kAlign,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using BiasOp = cutlass::epilogue::fusion::LinCombPerColBias<Element, ElementAcc, Element, void, ElementAcc, kAlign>;
using PlainOp = cutlass::epilogue::fusion::LinearCombination<Element, ElementAcc, void, ElementAcc>;
// forward: B(n, k) = Wm[n, k] (K contiguous: ColumnMajor B); input grad: B(k, n) = Wm[n, k] (RowMajor B)
using ForwardGemm = Sm90Gemm<cutlass::layout::ColumnMajor, BiasOp>::Gemm;
using InputGradGemm = Sm90Gemm<cutlass::layout::RowMajor, PlainOp>::Gemm;

cudaError_t device_check() {
  int dev = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return err;
  return (major == 9 && minor == 0) ? cudaSuccess : cudaErrorNotSupported;  // sm_90a code runs on 9.0 only
}

// Runs D (M, N) = A (M, K) · B; a_ptr / b_ptr / d_ptr device pointers, strides from the layouts.
template <class Gemm>
cudaError_t run_gemm(const void* a_ptr, const void* b_ptr, const void* bias, void* d_ptr, int M, int N, int K,
                     cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || N % kAlign || K % kAlign) return cudaErrorInvalidValue;
  for (const void* p : {a_ptr, b_ptr, bias, static_cast<const void*>(d_ptr)})
    if (reinterpret_cast<uintptr_t>(p) % 16) return cudaErrorInvalidValue;  // TMA: 16-byte aligned bases
  cudaError_t err = device_check();
  if (err != cudaSuccess) return err;
  using GK = typename Gemm::GemmKernel;
  auto stride_a = cutlass::make_cute_packed_stride(typename GK::StrideA{}, make_shape(M, K, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename GK::StrideB{}, make_shape(N, K, 1));
  auto stride_c = cutlass::make_cute_packed_stride(typename GK::StrideC{}, make_shape(M, N, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename GK::StrideD{}, make_shape(M, N, 1));
  int dev = 0;
  cudaGetDevice(&dev);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = dev;
  hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Element*>(a_ptr), stride_a, static_cast<const Element*>(b_ptr), stride_b},
      {{}, nullptr, stride_c, static_cast<Element*>(d_ptr), stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  if constexpr (std::is_same_v<Gemm, ForwardGemm>) {
    args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);  // null: the row broadcast reads zeros
  }
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // the data-parallel schedule needs none
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace

bool cutlass_sm90_built() { return true; }

cudaError_t cutlass_masked_linear_forward_bf16(const void* x, const void* weight_masked, const void* bias, void* y,
                                               int M, int N, int K, cudaStream_t stream) {
  return run_gemm<ForwardGemm>(x, weight_masked, bias, y, M, N, K, stream);
}

cudaError_t cutlass_masked_linear_input_grad_bf16(const void* dy, const void* weight_masked, void* dx, int M, int N,
                                                  int K, cudaStream_t stream) {
  // dx (M, K) = dy (M, N) · Wm (N, K): GEMM with n := K and k := N
  return run_gemm<InputGradGemm>(dy, weight_masked, nullptr, dx, M, K, N, stream);
}

}  // namespace cuda
}  // namespace sparsebert

#else  // !SPARSEBERT_WITH_CUTLASS

namespace sparsebert {
namespace cuda {

bool cutlass_sm90_built() { return false; }

cudaError_t cutlass_masked_linear_forward_bf16(const void*, const void*, const void*, void*, int, int, int,
                                               cudaStream_t) {
  return cudaErrorNotSupported;
}

cudaError_t cutlass_masked_linear_input_grad_bf16(const void*, const void*, void*, int, int, int, cudaStream_t) {
  return cudaErrorNotSupported;
}

}  // namespace cuda
}  // namespace sparsebert

#endif  // SPARSEBERT_WITH_CUTLASS
