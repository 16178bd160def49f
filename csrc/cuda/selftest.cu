// Torch-free self-test of the CUDA kernels: each launcher of launchers.cuh against a plain CPU loop on
// random data and odd shapes. Prints one line per case; exit code 1 on any mismatch, 2 when no GPU.
// Built by CMakeLists.txt as `sparsebert_cuda_selftest`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "launchers.cuh"

using sparsebert::cuda::DType;
using sparsebert::cuda::MaskKind;
using sparsebert::cuda::MaskSpec;

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    const cudaError_t err_ = (expr);                                                              \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

int g_failures = 0;
std::mt19937 g_rng(1234);

// Host-side storage of one dtype: values are kept as the float each element rounds to.
struct HostArray {
  DType dtype;
  std::vector<float> values;  // what the device sees, as float
  size_t elem_size() const { return dtype == DType::Float32 ? 4 : 2; }
  std::vector<unsigned char> bytes() const {
    std::vector<unsigned char> out(values.size() * elem_size());
    for (size_t i = 0; i < values.size(); ++i) {
      if (dtype == DType::Float32) {
        std::memcpy(&out[4 * i], &values[i], 4);
      } else if (dtype == DType::Float16) {
        const __half h = __float2half_rn(values[i]);
        std::memcpy(&out[2 * i], &h, 2);
      } else {
        const __nv_bfloat16 b = __float2bfloat16_rn(values[i]);
        std::memcpy(&out[2 * i], &b, 2);
      }
    }
    return out;
  }
};

float round_to(DType dtype, float v) {
  if (dtype == DType::Float16) return __half2float(__float2half_rn(v));
  if (dtype == DType::BFloat16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

HostArray random_array(DType dtype, size_t n) {
  std::normal_distribution<float> normal(0.f, 1.f);
  HostArray a{dtype, std::vector<float>(n)};
  for (float& v : a.values) v = round_to(dtype, normal(g_rng));
  return a;
}

std::vector<float> to_floats(DType dtype, const std::vector<unsigned char>& bytes, size_t n) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == DType::Float32) {
      std::memcpy(&out[i], &bytes[4 * i], 4);
    } else if (dtype == DType::Float16) {
      __half h;
      std::memcpy(&h, &bytes[2 * i], 2);
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 b;
      std::memcpy(&b, &bytes[2 * i], 2);
      out[i] = __bfloat162float(b);
    }
  }
  return out;
}

// Device buffer holding a copy of host bytes (or n zeroed bytes).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t size = 0;
  explicit DeviceBuffer(size_t n) : size(n) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1)));
    CHECK_CUDA(cudaMemset(ptr, 0, std::max<size_t>(n, 1)));
  }
  template <typename V>
  explicit DeviceBuffer(const std::vector<V>& host) : DeviceBuffer(host.size() * sizeof(V)) {
    if (size) CHECK_CUDA(cudaMemcpy(ptr, host.data(), size, cudaMemcpyHostToDevice));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> out(size);
    if (size) CHECK_CUDA(cudaMemcpy(out.data(), ptr, size, cudaMemcpyDeviceToHost));
    return out;
  }
};

const char* dtype_name(DType d) { return d == DType::Float32 ? "f32" : (d == DType::Float16 ? "f16" : "bf16"); }

// Relative tolerance of one output element: the output rounding of its dtype plus fp32 accumulation.
double tolerance(DType out_dtype) {
  return out_dtype == DType::Float32 ? 2e-5 : (out_dtype == DType::Float16 ? 2e-3 : 1.6e-2);
}

// G = dy^T x in double on the host: the weight-gradient reference, [N, K] row-major.
std::vector<double> host_weight_grad(const HostArray& dy, const HostArray& x, int M, int N, int K) {
  std::vector<double> grad(size_t(N) * K, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k)
        grad[size_t(n) * K + k] += double(dy.values[size_t(m) * N + n]) * x.values[size_t(m) * K + k];
  return grad;
}

// |got - want| <= tol * (|want| + scale) elementwise; scale ~ the size of the summands' noise.
void expect_close(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol,
                  double scale) {
  double worst = 0.0;
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    const double allowed = tol * (std::fabs(want[i]) + scale);
    worst = std::max(worst, err / allowed);
    if (!(err <= allowed)) ++bad;  // NaN counts as bad
  }
  std::printf("%-4s %-60s worst err/tol %.3f\n", bad ? "FAIL" : "ok", what, worst);
  if (bad) ++g_failures;
}

// The mask of one case, in the three device forms the kernels accept; keep[n*K+k] is the truth.
struct MaskCase {
  MaskKind kind;
  DType scores_dtype;
  std::vector<unsigned char> keep;     // (N, K) 0/1
  std::vector<unsigned char> bytes;    // device data for Bytes
  std::vector<uint32_t> words;         // device data for Bits
  HostArray scores{DType::Float32, {}};
  float threshold = 0.f;
};

MaskCase make_mask(MaskKind kind, DType scores_dtype, int N, int K) {
  MaskCase mc{kind, scores_dtype, std::vector<unsigned char>(size_t(N) * K)};
  std::bernoulli_distribution coin(0.5);
  if (kind == MaskKind::Scores) {
    mc.scores = random_array(scores_dtype, size_t(N) * K);
    mc.threshold = 0.1f;  // the kernel rounds it to scores_dtype, as torch does
    const float thr = round_to(scores_dtype, mc.threshold);
    for (size_t i = 0; i < mc.keep.size(); ++i) mc.keep[i] = mc.scores.values[i] >= thr;
    return mc;
  }
  for (auto& v : mc.keep) v = coin(g_rng);
  mc.bytes = mc.keep;
  const int W = (K + 31) / 32;
  mc.words.assign(size_t(N) * W, 0u);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      if (mc.keep[size_t(n) * K + k]) mc.words[size_t(n) * W + k / 32] |= 1u << (k % 32);
  return mc;
}

const char* mask_name(const MaskCase& mc) {
  if (mc.kind == MaskKind::Bytes) return "bytes";
  if (mc.kind == MaskKind::Bits) return "bits";
  return mc.scores_dtype == DType::Float32 ? "scores-f32" : (mc.scores_dtype == DType::Float16 ? "scores-f16" : "scores-bf16");
}

void run_gemm_case(DType dtype, const MaskCase& mc, int M, int N, int K) {
  const HostArray x = random_array(dtype, size_t(M) * K), w = random_array(dtype, size_t(N) * K),
                  bias = random_array(dtype, N), dy = random_array(dtype, size_t(M) * N);
  DeviceBuffer dx_in(x.bytes()), dw_in(w.bytes()), dbias(bias.bytes()), ddy(dy.bytes());
  DeviceBuffer dmask(mc.kind == MaskKind::Bytes ? mc.bytes.size()
                                                : (mc.kind == MaskKind::Bits ? mc.words.size() * 4 : 0));
  if (mc.kind == MaskKind::Bytes && !mc.bytes.empty())
    CHECK_CUDA(cudaMemcpy(dmask.ptr, mc.bytes.data(), mc.bytes.size(), cudaMemcpyHostToDevice));
  if (mc.kind == MaskKind::Bits && !mc.words.empty())
    CHECK_CUDA(cudaMemcpy(dmask.ptr, mc.words.data(), mc.words.size() * 4, cudaMemcpyHostToDevice));
  DeviceBuffer dscores_in(mc.kind == MaskKind::Scores ? mc.scores.bytes() : std::vector<unsigned char>{});
  DeviceBuffer dthreshold(std::vector<float>{mc.threshold});  // the kernels read the threshold on the device
  const MaskSpec spec{mc.kind, mc.kind == MaskKind::Scores ? dscores_in.ptr : dmask.ptr, mc.scores_dtype,
                      mc.kind == MaskKind::Scores ? static_cast<const float*>(dthreshold.ptr) : nullptr};
  const size_t es = x.elem_size();
  char label[160];

  // forward: y = x (W*m)^T + b
  {
    DeviceBuffer y(size_t(M) * N * es);
    CHECK_CUDA(sparsebert::cuda::masked_linear_forward(dtype, dx_in.ptr, dw_in.ptr, dbias.ptr, spec, y.ptr, M, N, K, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<double> want(size_t(M) * N);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = bias.values[n];
        for (int k = 0; k < K; ++k)
          if (mc.keep[size_t(n) * K + k]) acc += double(x.values[size_t(m) * K + k]) * w.values[size_t(n) * K + k];
        want[size_t(m) * N + n] = acc;
      }
    std::snprintf(label, sizeof label, "forward      %-4s %-11s M=%d N=%d K=%d", dtype_name(dtype), mask_name(mc), M, N, K);
    expect_close(label, to_floats(dtype, y.download(), want.size()), want, tolerance(dtype), std::sqrt(double(K)));
  }
  // input gradient: dx = dy (W*m)
  {
    DeviceBuffer dxo(size_t(M) * K * es);
    CHECK_CUDA(sparsebert::cuda::masked_linear_input_grad(dtype, ddy.ptr, dw_in.ptr, spec, dxo.ptr, M, N, K, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<double> want(size_t(M) * K, 0.0);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n)
        for (int k = 0; k < K; ++k)
          if (mc.keep[size_t(n) * K + k])
            want[size_t(m) * K + k] += double(dy.values[size_t(m) * N + n]) * w.values[size_t(n) * K + k];
    std::snprintf(label, sizeof label, "input grad   %-4s %-11s M=%d N=%d K=%d", dtype_name(dtype), mask_name(mc), M, N, K);
    expect_close(label, to_floats(dtype, dxo.download(), want.size()), want, tolerance(dtype), std::sqrt(double(N)));
  }
  // weight gradient: G = dy^T x; dweight = G*m; dscores = G*W (scores only)
  {
    const bool scores = mc.kind == MaskKind::Scores;
    const size_t ses = scores ? mc.scores.elem_size() : 4;
    DeviceBuffer dweight(size_t(N) * K * es), dscores(scores ? size_t(N) * K * ses : 0);
    CHECK_CUDA(sparsebert::cuda::masked_linear_weight_grad(dtype, ddy.ptr, dx_in.ptr, scores ? dw_in.ptr : nullptr, spec,
                                                           scores ? dscores.ptr : nullptr, dweight.ptr, M, N, K, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<double> grad = host_weight_grad(dy, x, M, N, K);
    std::vector<double> want_dw(grad.size()), want_ds(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) {
      want_dw[i] = mc.keep[i] ? grad[i] : 0.0;
      want_ds[i] = grad[i] * w.values[i];
    }
    std::snprintf(label, sizeof label, "weight grad  %-4s %-11s M=%d N=%d K=%d", dtype_name(dtype), mask_name(mc), M, N, K);
    expect_close(label, to_floats(dtype, dweight.download(), grad.size()), want_dw, tolerance(dtype), std::sqrt(double(M)));
    if (scores) {
      std::snprintf(label, sizeof label, "score grad   %-4s %-11s M=%d N=%d K=%d", dtype_name(dtype), mask_name(mc), M, N, K);
      expect_close(label, to_floats(mc.scores_dtype, dscores.download(), grad.size()), want_ds,
                   std::max(tolerance(dtype), tolerance(mc.scores_dtype)), std::sqrt(double(M)));
    }
  }
}

// The CUTLASS entry points of one dtype (Float32: the tf32 ones; no fp32 weight gradient).
cudaError_t cutlass_forward(DType dt, const void* x, const void* wm, const void* bias, void* y, int M, int N, int K) {
  if (dt == DType::BFloat16) return sparsebert::cuda::cutlass_masked_linear_forward_bf16(x, wm, bias, y, M, N, K, 0);
  if (dt == DType::Float16) return sparsebert::cuda::cutlass_masked_linear_forward_fp16(x, wm, bias, y, M, N, K, 0);
  return sparsebert::cuda::cutlass_masked_linear_forward_tf32(x, wm, bias, y, M, N, K, 0);
}
cudaError_t cutlass_input_grad(DType dt, const void* dy, const void* wm, void* dx, int M, int N, int K) {
  if (dt == DType::BFloat16) return sparsebert::cuda::cutlass_masked_linear_input_grad_bf16(dy, wm, dx, M, N, K, 0);
  if (dt == DType::Float16) return sparsebert::cuda::cutlass_masked_linear_input_grad_fp16(dy, wm, dx, M, N, K, 0);
  return sparsebert::cuda::cutlass_masked_linear_input_grad_tf32(dy, wm, dx, M, N, K, 0);
}
cudaError_t cutlass_weight_grad(DType dt, const void* dy, const void* x, const void* w, const void* scores,
                                const float* tau, void* dscores, void* dweight, int M, int N, int K) {
  if (dt == DType::BFloat16)
    return sparsebert::cuda::cutlass_masked_linear_weight_grad_bf16(dy, x, w, scores, tau, dscores, dweight, M, N, K, 0);
  return sparsebert::cuda::cutlass_masked_linear_weight_grad_fp16(dy, x, w, scores, tau, dscores, dweight, M, N, K, 0);
}

// Relative tolerance of one CUTLASS output element. bf16 / fp16: tolerance() (output rounding; the products
// are exact in the fp32 accumulator). fp32 runs on tf32 tensor cores, which keep 10 of each operand's 23
// mantissa bits: a product error of up to 2 * 2^-10 relative, random in sign across the K terms, so the sum's
// error grows as ~1.1 * 2^-10 * sqrt(K) (one sigma; the scale argument of expect_close is sqrt(K)); 8 * 2^-10
// keeps > 5 sigma of margin over the ~10^5 elements of a case.
double cutlass_tolerance(DType dt) { return dt == DType::Float32 ? 8.0 / 1024.0 : tolerance(dt); }

// CUTLASS sm90 GEMMs on an already-masked weight (cutlass_masked_gemm.cu): y = x Wm^T + b, dx = dy Wm, in dtype
// dt (Float32: tf32). Skipped (not failed) when the build has no CUTLASS or the device is not compute capability 9.0.
void run_cutlass_case(DType dt, int M, int N, int K, bool with_bias) {
  HostArray x = random_array(dt, size_t(M) * K), w = random_array(dt, size_t(N) * K), bias = random_array(dt, N),
            dy = random_array(dt, size_t(M) * N);
  std::bernoulli_distribution keep(0.6);
  for (float& v : w.values)
    if (!keep(g_rng)) v = 0.0f;  // the weight pass writes W*m; here the masked weight is the input
  const size_t es = x.elem_size();
  DeviceBuffer dx_in(x.bytes()), dw_in(w.bytes()), dbias(bias.bytes()), ddy(dy.bytes()), y(size_t(M) * N * es),
      dxo(size_t(M) * K * es);
  char label[160];
  cudaError_t err = cutlass_forward(dt, dx_in.ptr, dw_in.ptr, with_bias ? dbias.ptr : nullptr, y.ptr, M, N, K);
  if (err == cudaErrorNotSupported) {
    cudaGetLastError();
    std::printf("skip cutlass sm90 %s M=%d N=%d K=%d (not built with CUTLASS, or not a 9.0 device)\n", dtype_name(dt),
                M, N, K);
    return;
  }
  CHECK_CUDA(err);
  CHECK_CUDA(cutlass_input_grad(dt, ddy.ptr, dw_in.ptr, dxo.ptr, M, N, K));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> want_y(size_t(M) * N), want_dx(size_t(M) * K, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double acc = with_bias ? bias.values[n] : 0.0;
      for (int k = 0; k < K; ++k) {
        acc += double(x.values[size_t(m) * K + k]) * w.values[size_t(n) * K + k];
        want_dx[size_t(m) * K + k] += double(dy.values[size_t(m) * N + n]) * w.values[size_t(n) * K + k];
      }
      want_y[size_t(m) * N + n] = acc;
    }
  std::snprintf(label, sizeof label, "cutlass fwd  %-4s %-11s M=%d N=%d K=%d", dtype_name(dt),
                with_bias ? "bias" : "no bias", M, N, K);
  expect_close(label, to_floats(dt, y.download(), want_y.size()), want_y, cutlass_tolerance(dt), std::sqrt(double(K)));
  std::snprintf(label, sizeof label, "cutlass dx   %-4s %-11s M=%d N=%d K=%d", dtype_name(dt), "", M, N, K);
  expect_close(label, to_floats(dt, dxo.download(), want_dx.size()), want_dx, cutlass_tolerance(dt),
               std::sqrt(double(N)));
  // bad input is refused before any launch: K not a multiple of 16 bytes of elements
  const int align = 16 / int(es);
  const bool refused = cutlass_forward(dt, dx_in.ptr, dw_in.ptr, nullptr, y.ptr, M, N, K - align / 2) ==
                           cudaErrorInvalidValue &&
                       cutlass_input_grad(dt, ddy.ptr, dw_in.ptr, dxo.ptr, M, N + align / 2, K) == cudaErrorInvalidValue;
  std::printf("%-4s cutlass fwd/dx %-4s bad input refused M=%d N=%d K=%d\n", refused ? "ok" : "FAIL", dtype_name(dt), M,
              N, K);
  if (!refused) ++g_failures;
}

// CUTLASS sm90 weight gradient (cutlass_masked_gemm.cu), bf16 or fp16: G = dy^T x; dweight = G * [scores >= dt(tau)],
// dscores = G * W. with_scores = false runs the 0/1-mask form (the mask as scores of dtype dt, tau 0.5, no dscores).
// Skipped (not failed) when the build has no CUTLASS or the device is not compute capability 9.0.
void run_cutlass_weight_grad_case(DType dt, int M, int N, int K, bool with_scores) {
  HostArray x = random_array(dt, size_t(M) * K), w = random_array(dt, size_t(N) * K), dy = random_array(dt, size_t(M) * N),
            scores = random_array(dt, size_t(N) * K);
  // a tau that rounds DOWN in dt (bf16: 0.2995 -> 0.298828125, fp16: 0.2994 -> 0.29931640625): scores equal to
  // the rounded tau are kept only when tau is rounded first, as torch's `scores >= tau` does
  const float tau = with_scores ? (dt == DType::BFloat16 ? 0.2995f : 0.2994f) : 0.5f, tau_r = round_to(dt, tau);
  if (with_scores && !(tau_r < tau)) {
    std::printf("FAIL cutlass dW   %-4s tau %g does not round down\n", dtype_name(dt), tau);
    ++g_failures;
  }
  std::bernoulli_distribution keep(0.6);
  for (size_t i = 0; i < scores.values.size(); ++i) {
    if (!with_scores) scores.values[i] = keep(g_rng) ? 1.0f : 0.0f;
    else if (i % 7 == 0) scores.values[i] = tau_r;
  }
  const size_t es = x.elem_size();
  DeviceBuffer dx_in(x.bytes()), dw_in(w.bytes()), ddy(dy.bytes()), dscores_in(scores.bytes()),
      dtau(std::vector<float>{tau}), dweight(size_t(N) * K * es), dscores(size_t(N) * K * es);
  const float* dtau_ptr = static_cast<const float*>(dtau.ptr);
  cudaError_t err = cutlass_weight_grad(dt, ddy.ptr, dx_in.ptr, with_scores ? dw_in.ptr : nullptr, dscores_in.ptr,
                                        dtau_ptr, with_scores ? dscores.ptr : nullptr, dweight.ptr, M, N, K);
  if (err == cudaErrorNotSupported) {
    cudaGetLastError();
    std::printf("skip cutlass sm90 weight grad %s M=%d N=%d K=%d (not built with CUTLASS, or not a 9.0 device)\n",
                dtype_name(dt), M, N, K);
    return;
  }
  CHECK_CUDA(err);
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<double> grad = host_weight_grad(dy, x, M, N, K);
  std::vector<double> want_dw(grad.size()), want_ds(grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    want_dw[i] = scores.values[i] >= tau_r ? grad[i] : 0.0;
    want_ds[i] = grad[i] * w.values[i];
  }
  char label[160];
  std::snprintf(label, sizeof label, "cutlass dW   %-4s %-11s M=%d N=%d K=%d", dtype_name(dt),
                with_scores ? "scores" : "mask", M, N, K);
  expect_close(label, to_floats(dt, dweight.download(), grad.size()), want_dw, tolerance(dt), std::sqrt(double(M)));
  if (with_scores) {
    std::snprintf(label, sizeof label, "cutlass dS   %-4s %-11s M=%d N=%d K=%d", dtype_name(dt), "scores", M, N, K);
    expect_close(label, to_floats(dt, dscores.download(), grad.size()), want_ds, tolerance(dt), std::sqrt(double(M)));
  }
  // bad input is refused before any launch: K not a multiple of 8, dscores without weight
  const bool refused = cutlass_weight_grad(dt, ddy.ptr, dx_in.ptr, nullptr, dscores_in.ptr, dtau_ptr, nullptr,
                                           dweight.ptr, M, N, K - 1) == cudaErrorInvalidValue &&
                       cutlass_weight_grad(dt, ddy.ptr, dx_in.ptr, nullptr, dscores_in.ptr, dtau_ptr, dscores.ptr,
                                           dweight.ptr, M, N, K) == cudaErrorInvalidValue;
  std::printf("%-4s cutlass dW   %-4s bad input refused M=%d N=%d K=%d\n", refused ? "ok" : "FAIL", dtype_name(dt), M, N,
              K);
  if (!refused) ++g_failures;
}

uint32_t ordered_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

void run_topk_case(const char* what, const std::vector<float>& values, long long k) {
  DeviceBuffer dvalues(values), ws(size_t(sparsebert::cuda::topk_threshold_workspace_elems()) * 8), out(4);
  CHECK_CUDA(sparsebert::cuda::topk_threshold_select(static_cast<const float*>(dvalues.ptr), (long long)values.size(), k,
                                                     static_cast<unsigned long long*>(ws.ptr), static_cast<float*>(out.ptr), 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  float got;
  std::memcpy(&got, out.download().data(), 4);
  std::vector<uint32_t> keys(values.size());
  for (size_t i = 0; i < values.size(); ++i) keys[i] = ordered_key(values[i]);
  std::nth_element(keys.begin(), keys.begin() + k, keys.end());
  const bool ok = ordered_key(got) == keys[size_t(k)];
  std::printf("%-4s topk %-55s n=%zu k=%lld got %g\n", ok ? "ok" : "FAIL", what, values.size(), k, got);
  if (!ok) ++g_failures;
  // the same rank read from the device (and its edges: k = 0 gives -inf, k = n gives +inf)
  for (long long kd : {k, 0LL, (long long)values.size()}) {
    DeviceBuffer dk(std::vector<int64_t>{kd});
    CHECK_CUDA(sparsebert::cuda::topk_threshold_select_device_rank(
        static_cast<const float*>(dvalues.ptr), (long long)values.size(), static_cast<const int64_t*>(dk.ptr),
        static_cast<unsigned long long*>(ws.ptr), static_cast<float*>(out.ptr), 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    float got_d;
    std::memcpy(&got_d, out.download().data(), 4);
    const bool ok_d = kd == 0 ? got_d == -INFINITY
                              : (kd == (long long)values.size() ? got_d == INFINITY : ordered_key(got_d) == keys[size_t(k)]);
    std::printf("%-4s topk device rank %-43s n=%zu k=%lld got %g\n", ok_d ? "ok" : "FAIL", what, values.size(), kd,
                got_d);
    if (!ok_d) ++g_failures;
  }
}

void run_pack_case(int rows, int K) {
  std::bernoulli_distribution coin(0.3);
  std::vector<unsigned char> mask(size_t(rows) * K);
  for (auto& v : mask) v = coin(g_rng);
  const int W = (K + 31) / 32;
  std::vector<uint32_t> want(size_t(rows) * W, 0u);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < K; ++k)
      if (mask[size_t(r) * K + k]) want[size_t(r) * W + k / 32] |= 1u << (k % 32);
  DeviceBuffer dmask(mask), dpacked(want.size() * 4), dunpacked(mask.size());
  CHECK_CUDA(sparsebert::cuda::pack_mask(static_cast<const uint8_t*>(dmask.ptr), rows, K, static_cast<int32_t*>(dpacked.ptr), 0));
  CHECK_CUDA(sparsebert::cuda::unpack_mask(static_cast<const int32_t*>(dpacked.ptr), rows, K, static_cast<uint8_t*>(dunpacked.ptr), 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<unsigned char> packed = dpacked.download(), unpacked = dunpacked.download();
  const bool ok = std::memcmp(packed.data(), want.data(), packed.size()) == 0 && unpacked == mask;
  std::printf("%-4s pack/unpack rows=%d K=%d\n", ok ? "ok" : "FAIL", rows, K);
  if (!ok) ++g_failures;
}

}  // namespace

namespace {

// ---- bitmask SpMM (tc-bitmask format, see bitmask_spmm.cu) -------------------------------------------------
// Host encoder written from the format's specification, independent of the Python one: per 64 x 64 tile
// 64 words (sub-tile s = ((R*4 + S)*4 + Qc*2 + Qr), bit 8*row + col), values in word/bit order, 16-byte padding.
void encode_tc_bitmask(const HostArray& w, int N, int K, std::vector<unsigned char>& data, std::vector<int32_t>& offsets) {
  const int nt = (N + 63) / 64, kt = (K + 63) / 64;
  const size_t elem = w.elem_size();
  const HostArray one{w.dtype, {0.f}};
  data.clear();
  offsets.assign(1, 0);
  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < kt; ++j) {
      std::vector<uint64_t> words(64, 0);
      std::vector<float> vals;
      for (int s = 0; s < 64; ++s) {
        const int R = s / 16, S = (s / 4) % 4, Qc = (s / 2) % 2, Qr = s % 2;
        for (int p = 0; p < 64; ++p) {
          const int r = i * 64 + R * 16 + Qr * 8 + p / 8, c = j * 64 + S * 16 + Qc * 8 + p % 8;
          if (r < N && c < K && w.values[size_t(r) * K + c] != 0.f) {
            words[s] |= 1ull << p;
            vals.push_back(w.values[size_t(r) * K + c]);
          }
        }
      }
      const size_t start = data.size();
      data.resize(start + 512);
      std::memcpy(&data[start], words.data(), 512);
      const std::vector<unsigned char> vb = HostArray{w.dtype, vals}.bytes();
      data.insert(data.end(), vb.begin(), vb.end());
      while (data.size() % 16) data.push_back(0);
      offsets.push_back(static_cast<int32_t>(data.size() / elem));
    }
}

void run_spmm_case(DType dtype, int M, int N, int K, float density, int split_k) {
  HostArray w = random_array(dtype, size_t(N) * K);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (float& v : w.values)
    if (unit(g_rng) >= density) v = 0.f;
  const HostArray x = random_array(dtype, size_t(M) * K), bias = random_array(dtype, N);
  std::vector<unsigned char> data;
  std::vector<int32_t> offsets;
  encode_tc_bitmask(w, N, K, data, offsets);
  int num_sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  const sparsebert::cuda::BitmaskSpmmPlan plan = sparsebert::cuda::bitmask_spmm_plan(M, N, K, split_k, num_sms);
  DeviceBuffer d_x(x.bytes()), d_data(data), d_off(offsets), d_bias(bias.bytes());
  DeviceBuffer d_y(size_t(M) * N * 2), d_partials(size_t(plan.split) * M * N * 4),
      d_tickets(size_t(plan.token_blocks) * plan.row_tiles * 4);
  std::vector<unsigned char> first;
  for (int rep = 0; rep < 2; ++rep) {  // twice: the tickets must be back at zero, the result bitwise equal
    CHECK_CUDA(sparsebert::cuda::bitmask_spmm_forward(dtype, plan, d_x.ptr, d_data.ptr, static_cast<const int32_t*>(d_off.ptr),
                                                      d_bias.ptr, d_y.ptr, static_cast<float*>(d_partials.ptr),
                                                      static_cast<int32_t*>(d_tickets.ptr), M, N, K, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    if (rep == 0) first = d_y.download();
  }
  const std::vector<unsigned char> second = d_y.download();
  std::vector<double> want(size_t(M) * N);
  double scale = 0.0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double acc = bias.values[n], mag = std::fabs(bias.values[n]);
      for (int k = 0; k < K; ++k) {
        const double t = double(x.values[size_t(m) * K + k]) * w.values[size_t(n) * K + k];
        acc += t;
        mag += std::fabs(t);
      }
      want[size_t(m) * N + n] = acc;
      scale = std::max(scale, mag / std::sqrt(double(K) + 1.0));
    }
  char what[160];
  std::snprintf(what, sizeof what, "bitmask_spmm %s M=%d N=%d K=%d density=%.2f split=%d%s", dtype_name(dtype), M, N, K,
                density, plan.split, first == second ? "" : " NOT REPRODUCIBLE");
  if (first != second) ++g_failures;
  expect_close(what, to_floats(dtype, second, size_t(M) * N), want, tolerance(dtype), scale);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device visible: nothing tested\n");
    return 2;
  }
  const int shapes[][3] = {{1, 1, 1}, {77, 45, 61}, {130, 97, 200}};
  for (DType dtype : {DType::Float32, DType::Float16, DType::BFloat16})
    for (const auto& s : shapes) {
      const int M = s[0], N = s[1], K = s[2];
      for (const MaskCase& mc : {make_mask(MaskKind::Bytes, DType::Float32, N, K), make_mask(MaskKind::Bits, DType::Float32, N, K),
                                 make_mask(MaskKind::Scores, DType::Float32, N, K), make_mask(MaskKind::Scores, DType::BFloat16, N, K)})
        run_gemm_case(dtype, mc, M, N, K);
    }

  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> values(100003);
  for (float& v : values) v = normal(g_rng);
  for (long long k : {1LL, 50001LL, 100002LL}) run_topk_case("normal", values, k);
  std::uniform_int_distribution<int> small(-3, 3);  // heavy ties, negatives, +-0
  for (float& v : values) v = float(small(g_rng)) * 0.5f;
  values[7] = -0.0f;
  for (long long k : {0LL, 12345LL, 99999LL}) run_topk_case("ties", values, k);

  for (const auto& rk : {std::pair<int, int>{1, 1}, {3, 31}, {5, 32}, {7, 33}, {97, 61}, {64, 3072}}) run_pack_case(rk.first, rk.second);

  for (DType dtype : {DType::Float16, DType::BFloat16}) {
    const int spmm_shapes[][3] = {{1, 1, 1}, {13, 77, 200}, {64, 130, 96}, {8, 64, 768}, {100, 193, 333}};
    for (const auto& s : spmm_shapes)
      for (float density : {0.1f, 0.3f, 1.0f})
        for (int split : {0, 1, 3}) run_spmm_case(dtype, s[0], s[1], s[2], density, split);
  }

  // N, K multiples of 8 (16-byte TMA rows); M free; tiles are 128x128x64, so these cover partial tiles
  // (fp32 / tf32: multiples of 4, so 1x4x12 too)
  for (DType dt : {DType::BFloat16, DType::Float16, DType::Float32})
    for (const auto& s : {std::array<int, 3>{1, 8, 8}, {77, 200, 136}, {300, 264, 776}, {3, 4, 12}})
      if (dt == DType::Float32 || (s[1] % 8 == 0 && s[2] % 8 == 0))
        for (bool with_bias : {true, false}) run_cutlass_case(dt, s[0], s[1], s[2], with_bias);
  for (DType dt : {DType::BFloat16, DType::Float16})
    for (const auto& s : {std::array<int, 3>{1, 8, 8}, {77, 200, 136}, {333, 264, 776}})
      for (bool with_scores : {true, false}) run_cutlass_weight_grad_case(dt, s[0], s[1], s[2], with_scores);

  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
