// Forward and input-gradient launchers of the masked GEMM (kernels in masked_gemm.cuh). Torch-free.
#include "masked_gemm.cuh"

namespace sparsebert {
namespace cuda {

cudaError_t masked_linear_forward(DType dtype, const void* x, const void* weight, const void* bias, MaskSpec mask,
                                  void* y, int M, int N, int K, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_mask(mask, K, [&](auto policy) {
      using Mask = decltype(policy);
      GemmParams<T, Mask> p{static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                            nullptr, static_cast<T*>(y), nullptr, policy, M, N, K};
      return launch_masked_gemm<GemmMode::Forward>(p, stream);
    });
  });
}

cudaError_t masked_linear_input_grad(DType dtype, const void* dy, const void* weight, MaskSpec mask, void* dx, int M,
                                     int N, int K, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_mask(mask, K, [&](auto policy) {
      using Mask = decltype(policy);
      GemmParams<T, Mask> p{static_cast<const T*>(dy), static_cast<const T*>(weight), nullptr, nullptr,
                            static_cast<T*>(dx), nullptr, policy, M, N, K};
      return launch_masked_gemm<GemmMode::InputGrad>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace sparsebert
