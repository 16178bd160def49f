// The CUTLASS 3 sm90 GEMMs of cutlass_masked_gemm.cu as templates, and the macros that instantiate their
// entry points. Included by one compile unit per element type (cutlass_masked_gemm_{bf16,fp16,tf32}.cu), so a
// parallel build compiles the instantiations side by side: one unit of all eight kernels took ~9 minutes of
// one core. Only with -DSPARSEBERT_WITH_CUTLASS (the CUTLASS include dirs on the path).
#pragma once

#include <cuda_runtime_api.h>

#include "launchers.cuh"

#if !defined(SPARSEBERT_WITH_CUTLASS)
#error "cutlass_masked_gemm.cuh needs -DSPARSEBERT_WITH_CUTLASS and the CUTLASS include dirs"
#endif

// CUTLASS's device asserts are calls, and a call inside the wgmma pipeline makes ptxas serialize every
// wgmma (warning C7510): every unit including this header is built without them.
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

using ElementAcc = float;
using ClusterShape = Shape<_1, _1, _1>;
namespace fusion = cutlass::epilogue::fusion;
namespace epi_detail = cutlass::epilogue::collective::detail;
using EpiSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
using RoundNearest = std::integral_constant<cutlass::FloatRoundStyle, cutlass::FloatRoundStyle::round_to_nearest>;

// TMA needs 16-byte aligned rows: 8 bf16 / fp16 elements, 4 fp32 ones.
template <class Element>
inline constexpr int kAlignment = 16 / static_cast<int>(sizeof(Element));
// 128x128 output tiles, 128 bytes of K per stage (64 bf16 / fp16, 32 fp32: one 128-byte swizzle row).
template <class Element>
using TileShapeFor = Shape<_128, _128, Int<128 / static_cast<int>(sizeof(Element))>>;

// D (M, N) row-major = A · B, A an (M, K) tensor of layout LayoutA, B an (N, K) tensor of layout LayoutB.
template <class Element, class LayoutA, class LayoutB, class FusionOp>
struct Sm90Gemm {
  static constexpr int kAlign = kAlignment<Element>;
  using TileShape = TileShapeFor<Element>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
      void, cutlass::layout::RowMajor, kAlign,      // no C source
      Element, cutlass::layout::RowMajor, kAlign,   // D
      EpiSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA, kAlign,
      Element, LayoutB, kAlign,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// g where float(s) >= float(ScoresElement(tau)), else 0 (a select, as torch.where: no 0 * inf = nan). tau is
// rounded to the scores' element type first, as torch's `scores >= tau` does.
template <class ScoresElement>
struct KeepOrZero {
  template <class T>
  struct Fn {
    CUTLASS_HOST_DEVICE T operator()(T g, T s, T tau) const {
      return s >= static_cast<T>(ScoresElement(tau)) ? g : T(0);
    }
  };
  template <class T, int N>
  struct Fn<cutlass::Array<T, N>> {
    CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& g, cutlass::Array<T, N> const& s,
                                                        cutlass::Array<T, N> const& tau) const {
      const T t = static_cast<T>(ScoresElement(tau[0]));
      cutlass::Array<T, N> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < N; ++i) out[i] = s[i] >= t ? g[i] : T(0);
      return out;
    }
  };
};

// The forward and input-gradient GEMMs of one element type.
template <class Element>
struct MaskedLinearGemms {
  static constexpr int kAlign = kAlignment<Element>;
  using BiasOp = fusion::LinCombPerColBias<Element, ElementAcc, Element, void, ElementAcc, kAlign>;
  using PlainOp = fusion::LinearCombination<Element, ElementAcc, void, ElementAcc>;
  // forward: B(n, k) = Wm[n, k] (K contiguous: ColumnMajor B); input grad: B(k, n) = Wm[n, k] (RowMajor B)
  using Forward = typename Sm90Gemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, BiasOp>::Gemm;
  using InputGrad = typename Sm90Gemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor, PlainOp>::Gemm;
};

// The weight-gradient GEMM of one element type (bf16 and fp16 only: for fp32 the epilogue below, two fp32 aux
// loads of 4 stages and two stores, takes about 193 KiB of shared memory and leaves the mainloop under 2 stages).
template <class Element>
struct MaskedWeightGradGemm {
  static constexpr int kAlign = kAlignment<Element>;
  using TileShape = TileShapeFor<Element>;
  // ---- weight gradient: G (N, K) = dyᵀ · x, GEMM with m := N, n := K, k := M (the tokens) --------------------
  // A(n, m) = dy[m, n] (M-major: ColumnMajor A), B(k, m) = x[m, k] (N-major: RowMajor B). Its EVT:
  //   D   = dweight = G ⊙ [float(scores) >= float(Element(tau))]   (torch.where(scores >= tau, G, 0))
  //   aux = dscores = G · float(W)                                  (not stored when its pointer is null)
  // tau is a scalar broadcast read from a device pointer (no host sync); W is an aux load skipped (read as
  // zeros) when its pointer is null. W, scores, dweight and dscores are all of type Element.
  // The same epilogue tile and stage counts the collective builder derives (C void, D Element, cooperative).
  using EpiDesc = epi_detail::EpilogueDescriptor<TileShape, cutlass::epilogue::collective::EpilogueTileAuto, void,
                                                 Element, EpiSchedule>;
  using AuxLoadDesc = epi_detail::AuxLoadDescriptor<EpiDesc, cutlass::layout::RowMajor, Element>;
  using AuxStoreDesc = epi_detail::AuxStoreDescriptor<EpiDesc, cutlass::layout::RowMajor, Element>;
  using AuxLoadOp = fusion::Sm90AuxLoad<AuxLoadDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                        typename AuxLoadDesc::Stride, typename AuxLoadDesc::SmemLayoutAtom,
                                        typename AuxLoadDesc::CopyOpS2R, kAlign, /*EnableNullptr=*/true>;
  using AuxStoreOp = fusion::Sm90AuxStore<AuxStoreDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                          cutlass::FloatRoundStyle::round_to_nearest, typename AuxStoreDesc::Stride,
                                          typename AuxStoreDesc::SmemLayoutAtom, typename AuxStoreDesc::CopyOpR2S,
                                          kAlign, /*EnableNullptr=*/true>;
  using TauOp = fusion::Sm90ScalarBroadcast<ElementAcc>;
  using DweightTree = fusion::Sm90EVT<
      fusion::Sm90Compute<KeepOrZero<Element>::template Fn, ElementAcc, ElementAcc, RoundNearest::value>,
      fusion::Sm90AccFetch, AuxLoadOp /*scores*/, TauOp>;
  using DscoresTree = fusion::Sm90EVT<
      AuxStoreOp,
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, ElementAcc, ElementAcc, RoundNearest::value>,
                      fusion::Sm90AccFetch, AuxLoadOp /*W*/>>;
  // The accumulator feeds both trees; the aux tree (dscores) is visited before the output tree (D = dweight).
  using WeightGradEvt = fusion::Sm90SplitTreeVisitor<fusion::Sm90AccFetch, DweightTree, DscoresTree>;
  using Gemm =
      typename Sm90Gemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, WeightGradEvt>::Gemm;
};

cudaError_t device_check() {
  int dev = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return err;
  return (major == 9 && minor == 0) ? cudaSuccess : cudaErrorNotSupported;  // sm_90a code runs on 9.0 only
}

cutlass::KernelHardwareInfo hardware_info() {
  int dev = 0;
  cudaGetDevice(&dev);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = dev;
  hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  return hw_info;
}

template <class Gemm>
cudaError_t launch(typename Gemm::Arguments& args, cudaStream_t stream);

// Runs D (M, N) = A (M, K) · B; a_ptr / b_ptr / d_ptr device pointers of Element, strides from the layouts.
template <class Element, class Gemm>
cudaError_t run_gemm(const void* a_ptr, const void* b_ptr, const void* bias, void* d_ptr, int M, int N, int K,
                     cudaStream_t stream) {
  constexpr int kAlign = kAlignment<Element>;
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
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const Element*>(a_ptr), stride_a, static_cast<const Element*>(b_ptr), stride_b},
      {{}, nullptr, stride_c, static_cast<Element*>(d_ptr), stride_d},
      hardware_info()};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  if constexpr (std::is_same_v<Gemm, typename MaskedLinearGemms<Element>::Forward>) {
    args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);  // null: the row broadcast reads zeros
  }
  return launch<Gemm>(args, stream);
}

// G = dyᵀ · x with the EVT above; dy (M, N), x (M, K), weight / scores / dscores / dweight (N, K), all row-major
// and all of type Element.
template <class Element>
cudaError_t run_weight_grad(const void* dy, const void* x, const void* weight, const void* scores, const float* tau,
                            void* dscores, void* dweight, int M, int N, int K, cudaStream_t stream) {
  constexpr int kAlign = kAlignment<Element>;
  if (M <= 0 || N <= 0 || K <= 0 || N % kAlign || K % kAlign) return cudaErrorInvalidValue;
  if (dy == nullptr || x == nullptr || scores == nullptr || tau == nullptr || dweight == nullptr) return cudaErrorInvalidValue;
  if ((dscores == nullptr) != (weight == nullptr)) return cudaErrorInvalidValue;  // dscores = G ⊙ W needs W
  for (const void* p : {dy, x, weight, scores, static_cast<const void*>(dscores), static_cast<const void*>(dweight)})
    if (reinterpret_cast<uintptr_t>(p) % 16) return cudaErrorInvalidValue;  // TMA: 16-byte aligned bases
  if (reinterpret_cast<uintptr_t>(tau) % alignof(float)) return cudaErrorInvalidValue;
  cudaError_t err = device_check();
  if (err != cudaSuccess) return err;
  using Gemms = MaskedWeightGradGemm<Element>;
  using Gemm = typename Gemms::Gemm;
  using GK = typename Gemm::GemmKernel;
  // GEMM (m, n, k) = (N, K, M)
  auto stride_a = cutlass::make_cute_packed_stride(typename GK::StrideA{}, make_shape(N, M, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename GK::StrideB{}, make_shape(K, M, 1));
  auto stride_c = cutlass::make_cute_packed_stride(typename GK::StrideC{}, make_shape(N, K, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename GK::StrideD{}, make_shape(N, K, 1));
  auto stride_aux = cutlass::make_cute_packed_stride(typename Gemms::AuxLoadDesc::Stride{}, make_shape(N, K, 1));
  auto stride_aux_out = cutlass::make_cute_packed_stride(typename Gemms::AuxStoreDesc::Stride{}, make_shape(N, K, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {N, K, M, 1},
      {static_cast<const Element*>(dy), stride_a, static_cast<const Element*>(x), stride_b},
      {{}, nullptr, stride_c, static_cast<Element*>(dweight), stride_d},
      hardware_info()};
  // Sm90SplitTreeVisitor<Input, Output, Aux> takes its arguments in the order (Input, Aux, Output).
  args.epilogue.thread = {
      {},                                                                 // input tree: the accumulator G
      {                                                                   // aux tree: dscores = G · W
          {{}, {static_cast<const Element*>(weight), Element(0), stride_aux}, {}},  //   G · W (W null: zeros)
          {static_cast<Element*>(dscores), stride_aux_out}},              //   store (null: not stored)
      {                                                                   // output tree: D = keep ? G : 0
          {},                                                             //   G
          {static_cast<const Element*>(scores), Element(0), stride_aux},  //   scores
          {{0.0f}, {tau}, {}},                                            //   tau, read from *tau on the device
          {}}};                                                           //   KeepOrZero
  return launch<Gemm>(args, stream);
}

template <class Gemm>
cudaError_t launch(typename Gemm::Arguments& args, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // the data-parallel schedule needs none
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace

}  // namespace cuda
}  // namespace sparsebert

#define SPARSEBERT_CUTLASS_ENTRY_POINTS(SUFFIX, ELEMENT)                                                           \
  cudaError_t cutlass_masked_linear_forward_##SUFFIX(const void* x, const void* weight_masked, const void* bias,   \
                                                     void* y, int M, int N, int K, cudaStream_t stream) {          \
    return run_gemm<ELEMENT, MaskedLinearGemms<ELEMENT>::Forward>(x, weight_masked, bias, y, M, N, K, stream);     \
  }                                                                                                                \
  /* dx (M, K) = dy (M, N) · Wm (N, K): GEMM with n := K and k := N */                                             \
  cudaError_t cutlass_masked_linear_input_grad_##SUFFIX(const void* dy, const void* weight_masked, void* dx, int M, \
                                                        int N, int K, cudaStream_t stream) {                       \
    return run_gemm<ELEMENT, MaskedLinearGemms<ELEMENT>::InputGrad>(dy, weight_masked, nullptr, dx, M, K, N,       \
                                                                    stream);                                       \
  }
#define SPARSEBERT_CUTLASS_WEIGHT_GRAD_ENTRY_POINT(SUFFIX, ELEMENT)                                                \
  cudaError_t cutlass_masked_linear_weight_grad_##SUFFIX(const void* dy, const void* x, const void* weight,        \
                                                         const void* scores, const float* threshold,               \
                                                         void* dscores, void* dweight, int M, int N, int K,        \
                                                         cudaStream_t stream) {                                    \
    return run_weight_grad<ELEMENT>(dy, x, weight, scores, threshold, dscores, dweight, M, N, K, stream);          \
  }

