// Torch bindings of the CUDA kernels: TORCH_LIBRARY_IMPL(sparsebert_ext, CUDA) for the ops whose schemas
// csrc/cpu/*.cpp define. Checks (the last line of defense; the Python ops layer validates first), picks
// the device and the current stream, allocates outputs, and calls the torch-free launchers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::getCurrentCUDAStream)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "launchers.cuh"

namespace sparsebert {
namespace {

using cuda::DType;
using cuda::MaskKind;
using cuda::MaskSpec;

DType device_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::Float32;  // unreachable
}

void check_2d(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the inputs are on ", ref.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.size(0) <= std::numeric_limits<int>::max() && t.size(1) <= std::numeric_limits<int>::max(), name,
              " is too large for the CUDA kernels (dims must fit in int32)");
}

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

MaskSpec mask_spec(const at::Tensor& mask, bool packed, int64_t N, int64_t K, const at::Tensor& ref) {
  check_2d(mask, "mask", ref);
  if (packed) {
    TORCH_CHECK(mask.scalar_type() == at::kInt, "packed mask must be int32, got ", mask.scalar_type());
    TORCH_CHECK(mask.size(0) == N && mask.size(1) == (K + 31) / 32, "packed mask must have shape (", N, ", ",
                (K + 31) / 32, "), got ", mask.sizes());
    return MaskSpec{MaskKind::Bits, mask.data_ptr(), DType::Float32, nullptr};
  }
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool, "mask must be uint8 or bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.size(0) == N && mask.size(1) == K, "mask must have shape (", N, ", ", K, "), got ", mask.sizes());
  return MaskSpec{MaskKind::Bytes, mask.data_ptr(), DType::Float32, nullptr};
}

// The threshold as the kernels read it: one fp32 on the inputs' device (a no-op for the fp32 0-dim tensor the
// ops layer passes). The returned tensor must stay alive until the launch is enqueued.
at::Tensor device_threshold(const at::Tensor& threshold, const at::Tensor& ref) {
  TORCH_CHECK(threshold.numel() == 1, "threshold must be a 0-dim (one-element) tensor, got shape ", threshold.sizes());
  TORCH_CHECK(threshold.device() == ref.device(), "threshold is on ", threshold.device(), " but the inputs are on ",
              ref.device());
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), "threshold must be a float tensor, got ",
              threshold.scalar_type());
  return threshold.reshape({}).to(at::kFloat).contiguous();
}

MaskSpec score_spec(const at::Tensor& scores, const at::Tensor& threshold_f32, int64_t N, int64_t K,
                    const at::Tensor& ref) {
  check_2d(scores, "scores", ref);
  TORCH_CHECK(scores.size(0) == N && scores.size(1) == K, "scores must have shape (", N, ", ", K, "), got ",
              scores.sizes());
  return MaskSpec{MaskKind::Scores, scores.data_ptr(), device_dtype(scores, "scores"),
                  threshold_f32.data_ptr<float>()};
}

// A float threshold (the default overloads) becomes a device scalar by a fill kernel, not a copy: no sync.
at::Tensor fill_threshold(double threshold, const at::Tensor& ref) {
  return at::full({}, threshold, ref.options().dtype(at::kFloat));
}

// ---- CUTLASS sm90 path (csrc/cuda/cutlass_masked_gemm.cu, docs/CUTLASS.md) --------------------------------
// Taken when the extension has the CUTLASS GEMMs (built for sm_90a), the device is compute capability 9.0,
// M, N, K > 0, and every operand (the scores included) has one dtype the op is instantiated for:
//   bf16, fp16   all three GEMMs; N and K multiples of 8 (16-byte TMA rows)
//   fp32         forward and input grad only, and only when the caller allows tf32 matmuls
//                (torch.backends.cuda.matmul.allow_tf32 = True, or set_float32_matmul_precision("high")):
//                the CUTLASS fp32 GEMMs use tf32 tensor cores, less precise than torch's default fp32 matmul;
//                N and K multiples of 4
// and every operand pointer is 16-byte aligned (TMA); otherwise (mixed dtypes, e.g. fp32 scores with bf16
// weights, included) the WMMA kernels run. SPARSEBERT_CUTLASS_DISPATCH=0 in the environment (read at each
// call) turns it off, to compare the two.
bool cutlass_dispatch_enabled() {
  const char* v = std::getenv("SPARSEBERT_CUTLASS_DISPATCH");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

enum class CutlassOp { Linear, WeightGrad };  // Linear: forward and input grad

// The dtype the CUTLASS kernels run the call in, or nullopt when the WMMA kernels must run (rules above).
std::optional<DType> cutlass_dtype(CutlassOp op, int64_t M, int64_t N, int64_t K,
                                   std::initializer_list<const at::Tensor*> operands) {
  if (!cuda::cutlass_sm90_built() || !cutlass_dispatch_enabled()) return std::nullopt;
  const at::ScalarType st = (*operands.begin())->scalar_type();
  DType dtype;
  switch (st) {
    case at::kBFloat16: dtype = DType::BFloat16; break;
    case at::kHalf: dtype = DType::Float16; break;
    case at::kFloat:
      if (op != CutlassOp::Linear || !at::globalContext().allowTF32CuBLAS()) return std::nullopt;
      dtype = DType::Float32;
      break;
    default: return std::nullopt;
  }
  const int64_t align = 16 / static_cast<int64_t>(c10::elementSize(st));  // elements per 16-byte TMA row unit
  if (M <= 0 || N <= 0 || K <= 0 || N % align != 0 || K % align != 0) return std::nullopt;
  for (const at::Tensor* t : operands) {
    if (t == nullptr) continue;
    if (t->scalar_type() != st || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return std::nullopt;
  }
  const int device = (*operands.begin())->get_device();
  int major = 0, minor = 0;  // attribute queries, no synchronization
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) return std::nullopt;
  return dtype;
}

// The CUTLASS entry points of `dtype` (one cutlass_dtype returned for the op).
cudaError_t cutlass_forward(DType dtype, const void* x, const void* wm, const void* bias, void* y, int M, int N, int K,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::BFloat16: return cuda::cutlass_masked_linear_forward_bf16(x, wm, bias, y, M, N, K, stream);
    case DType::Float16: return cuda::cutlass_masked_linear_forward_fp16(x, wm, bias, y, M, N, K, stream);
    case DType::Float32: return cuda::cutlass_masked_linear_forward_tf32(x, wm, bias, y, M, N, K, stream);
  }
  TORCH_CHECK(false, "CUTLASS forward: unknown dtype");
  return cudaErrorInvalidValue;  // unreachable
}

cudaError_t cutlass_input_grad(DType dtype, const void* dy, const void* wm, void* dx, int M, int N, int K,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::BFloat16: return cuda::cutlass_masked_linear_input_grad_bf16(dy, wm, dx, M, N, K, stream);
    case DType::Float16: return cuda::cutlass_masked_linear_input_grad_fp16(dy, wm, dx, M, N, K, stream);
    case DType::Float32: return cuda::cutlass_masked_linear_input_grad_tf32(dy, wm, dx, M, N, K, stream);
  }
  TORCH_CHECK(false, "CUTLASS input grad: unknown dtype");
  return cudaErrorInvalidValue;  // unreachable
}

cudaError_t cutlass_weight_grad(DType dtype, const void* dy, const void* x, const void* weight, const void* scores,
                                const float* threshold, void* dscores, void* dweight, int M, int N, int K,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::BFloat16:
      return cuda::cutlass_masked_linear_weight_grad_bf16(dy, x, weight, scores, threshold, dscores, dweight, M, N, K,
                                                          stream);
    case DType::Float16:
      return cuda::cutlass_masked_linear_weight_grad_fp16(dy, x, weight, scores, threshold, dscores, dweight, M, N, K,
                                                          stream);
    case DType::Float32: break;
  }
  TORCH_CHECK(false, "the CUTLASS weight gradient is bf16 / fp16 only (no float32 instantiation)");
  return cudaErrorInvalidValue;  // unreachable: cutlass_dtype never picks fp32 for the weight gradient
}

// The keep-mask (N, K) as a bool tensor: bytes != 0, unpacked bits, or scores >= threshold (a 0-dim fp32 tensor:
// torch rounds it to the scores' dtype first, as the kernels do). Elementwise device ops only, no sync.
at::Tensor keep_mask(const MaskSpec& spec, const at::Tensor& mask_or_scores, const at::Tensor* threshold, int64_t N,
                     int64_t K) {
  switch (spec.kind) {
    case MaskKind::Bytes: return mask_or_scores.to(at::kBool);
    case MaskKind::Bits: {
      at::Tensor keep = at::empty({N, K}, mask_or_scores.options().dtype(at::kBool));
      C10_CUDA_CHECK(cuda::unpack_mask(mask_or_scores.data_ptr<int32_t>(), N, K, static_cast<uint8_t*>(keep.data_ptr()),
                                       c10::cuda::getCurrentCUDAStream()));
      return keep;
    }
    case MaskKind::Scores: return at::ge(mask_or_scores, *threshold);
  }
  TORCH_CHECK(false, "unknown mask kind");
  return at::Tensor();  // unreachable
}

// The masked weight Wm = where(keep, W, 0) the CUTLASS forward and input-gradient GEMMs read.
at::Tensor masked_weight(const at::Tensor& weight, const MaskSpec& spec, const at::Tensor& mask_or_scores,
                         const at::Tensor* threshold) {
  return at::where(keep_mask(spec, mask_or_scores, threshold, weight.size(0), weight.size(1)), weight, 0.0)
      .contiguous();
}

// y = x @ (W ⊙ m)ᵀ + b for either mask kind.
// `mask_or_scores` is the tensor `spec` points into, `threshold` the fp32 0-dim threshold (scores only, else null).
at::Tensor linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const MaskSpec& spec, const at::Tensor& mask_or_scores, const at::Tensor* threshold) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device(), "bias must be on ", x.device(), ", got ",
                bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, "), got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
    check_same_dtype(*bias, "bias", x, "x");
    bias_ptr = bias->data_ptr();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor* bias_t = bias.has_value() ? &*bias : nullptr;
  if (const auto dtype = cutlass_dtype(CutlassOp::Linear, M, N, K, {&x, &weight, bias_t})) {
    const at::Tensor wm = masked_weight(weight, spec, mask_or_scores, threshold);
    C10_CUDA_CHECK(cutlass_forward(*dtype, x.data_ptr(), wm.data_ptr(), bias_ptr, y.data_ptr(), static_cast<int>(M),
                                   static_cast<int>(N), static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
    return y;
  }
  C10_CUDA_CHECK(cuda::masked_linear_forward(device_dtype(x, "x"), x.data_ptr(), weight.data_ptr(), bias_ptr, spec,
                                             y.data_ptr(), static_cast<int>(M), static_cast<int>(N),
                                             static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
  return y;
}

void check_fwd_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_2d(x, "x", x);
  check_2d(weight, "weight", x);
  check_same_dtype(x, "x", weight, "weight");
  device_dtype(x, "x");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features but weight expects ", weight.size(1));
}

void check_bwd_input_inputs(const at::Tensor& dy, const at::Tensor& weight) {
  check_2d(dy, "dy", dy);
  check_2d(weight, "weight", dy);
  check_same_dtype(dy, "dy", weight, "weight");
  device_dtype(dy, "dy");
  TORCH_CHECK(dy.size(1) == weight.size(0), "dy has ", dy.size(1), " columns but weight has ", weight.size(0), " rows");
}

at::Tensor linear_bwd_input(const at::Tensor& dy, const at::Tensor& weight, const MaskSpec& spec,
                            const at::Tensor& mask_or_scores, const at::Tensor* threshold) {
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (const auto dtype = cutlass_dtype(CutlassOp::Linear, M, N, K, {&dy, &weight})) {
    const at::Tensor wm = masked_weight(weight, spec, mask_or_scores, threshold);
    C10_CUDA_CHECK(cutlass_input_grad(*dtype, dy.data_ptr(), wm.data_ptr(), dx.data_ptr(), static_cast<int>(M),
                                      static_cast<int>(N), static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
    return dx;
  }
  C10_CUDA_CHECK(cuda::masked_linear_input_grad(device_dtype(dy, "dy"), dy.data_ptr(), weight.data_ptr(), spec,
                                                dx.data_ptr(), static_cast<int>(M), static_cast<int>(N),
                                                static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
  return dx;
}

void check_bwd_weight_inputs(const at::Tensor& dy, const at::Tensor& x) {
  check_2d(dy, "dy", dy);
  check_2d(x, "x", dy);
  check_same_dtype(dy, "dy", x, "x");
  device_dtype(x, "x");
  TORCH_CHECK(dy.size(0) == x.size(0), "dy has ", dy.size(0), " rows but x has ", x.size(0));
}

// ---- the ops ----------------------------------------------------------------------------------------------
at::Tensor masked_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& mask, bool packed) {
  check_fwd_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_fwd(x, weight, bias, mask_spec(mask, packed, weight.size(0), weight.size(1), x), mask, nullptr);
}

at::Tensor masked_linear_bwd_input_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& mask,
                                        bool packed) {
  check_bwd_input_inputs(dy, weight);
  const c10::cuda::CUDAGuard guard(dy.device());
  return linear_bwd_input(dy, weight, mask_spec(mask, packed, weight.size(0), weight.size(1), dy), mask, nullptr);
}

at::Tensor masked_linear_bwd_weight_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                                         bool packed) {
  check_bwd_weight_inputs(dy, x);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  const MaskSpec spec = mask_spec(mask, packed, N, K, dy);
  at::Tensor dweight = at::empty({N, K}, x.options());
  if (const auto dtype = cutlass_dtype(CutlassOp::WeightGrad, M, N, K, {&dy, &x})) {
    // the CUTLASS EVT's 0/1-mask form: the keep-mask as "scores" of x's dtype, threshold 0.5, no dscores
    const at::Tensor keep = keep_mask(spec, mask, nullptr, N, K).to(x.scalar_type());
    const at::Tensor half = at::full({}, 0.5, dy.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cutlass_weight_grad(
        *dtype, dy.data_ptr(), x.data_ptr(), nullptr, keep.data_ptr(), half.data_ptr<float>(), nullptr,
        dweight.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
    return dweight;
  }
  C10_CUDA_CHECK(cuda::masked_linear_weight_grad(device_dtype(x, "x"), dy.data_ptr(), x.data_ptr(), nullptr, spec,
                                                 nullptr, dweight.data_ptr(), static_cast<int>(M), static_cast<int>(N),
                                                 static_cast<int>(K), c10::cuda::getCurrentCUDAStream()));
  return dweight;
}

at::Tensor score_masked_linear_fwd_cuda_t(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                          const at::Tensor& threshold) {
  check_fwd_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor thr = device_threshold(threshold, x);
  return linear_fwd(x, weight, bias, score_spec(scores, thr, weight.size(0), weight.size(1), x), scores, &thr);
}

at::Tensor score_masked_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                        double threshold) {
  const c10::cuda::CUDAGuard guard(x.device());
  return score_masked_linear_fwd_cuda_t(x, weight, bias, scores, fill_threshold(threshold, x));
}

at::Tensor score_masked_linear_bwd_input_cuda_t(const at::Tensor& dy, const at::Tensor& weight,
                                                const at::Tensor& scores, const at::Tensor& threshold) {
  check_bwd_input_inputs(dy, weight);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor thr = device_threshold(threshold, dy);
  return linear_bwd_input(dy, weight, score_spec(scores, thr, weight.size(0), weight.size(1), dy), scores, &thr);
}

at::Tensor score_masked_linear_bwd_input_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& scores,
                                              double threshold) {
  const c10::cuda::CUDAGuard guard(dy.device());
  return score_masked_linear_bwd_input_cuda_t(dy, weight, scores, fill_threshold(threshold, dy));
}

std::tuple<at::Tensor, std::optional<at::Tensor>> score_masked_linear_bwd_weight_scores_cuda_t(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
    const at::Tensor& threshold, bool need_dweight) {
  check_bwd_weight_inputs(dy, x);
  check_2d(weight, "weight", dy);
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  TORCH_CHECK(weight.size(0) == N && weight.size(1) == K, "weight must have shape (", N, ", ", K, "), got ",
              weight.sizes());
  check_same_dtype(weight, "weight", x, "x");
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor thr = device_threshold(threshold, dy);
  const MaskSpec spec = score_spec(scores, thr, N, K, dy);
  at::Tensor dscores = at::empty({N, K}, scores.options());
  at::Tensor dweight = need_dweight ? at::empty({N, K}, weight.options()) : at::Tensor();
  if (const auto dtype = cutlass_dtype(CutlassOp::WeightGrad, M, N, K, {&dy, &x, &weight, &scores})) {
    // the EVT always stores dweight (its D): without need_dweight it goes to a scratch tensor
    if (!need_dweight) dweight = at::empty({N, K}, weight.options());
    C10_CUDA_CHECK(cutlass_weight_grad(
        *dtype, dy.data_ptr(), x.data_ptr(), weight.data_ptr(), scores.data_ptr(), thr.data_ptr<float>(),
        dscores.data_ptr(), dweight.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
        c10::cuda::getCurrentCUDAStream()));
    return std::make_tuple(dscores, need_dweight ? std::optional<at::Tensor>(dweight) : std::nullopt);
  }
  C10_CUDA_CHECK(cuda::masked_linear_weight_grad(device_dtype(x, "x"), dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                                 spec, dscores.data_ptr(), need_dweight ? dweight.data_ptr() : nullptr,
                                                 static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                                 c10::cuda::getCurrentCUDAStream()));
  return std::make_tuple(dscores, need_dweight ? std::optional<at::Tensor>(dweight) : std::nullopt);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> score_masked_linear_bwd_weight_scores_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, double threshold,
    bool need_dweight) {
  const c10::cuda::CUDAGuard guard(dy.device());
  return score_masked_linear_bwd_weight_scores_cuda_t(dy, x, weight, scores, fill_threshold(threshold, dy),
                                                       need_dweight);
}

// Every scores tensor checked (one CUDA device, a supported dtype) and flattened to fp32; `n` = their total size.
static std::vector<at::Tensor> flat_fp32_scores(at::TensorList scores, int64_t& n) {
  std::vector<at::Tensor> flat;
  n = 0;
  for (const at::Tensor& s : scores) {
    TORCH_CHECK(s.is_cuda() && s.device() == scores[0].device(), "scores must all be on ", scores[0].device(),
                ", got ", s.device());
    device_dtype(s, "scores");
    flat.push_back(s.reshape({-1}).to(at::kFloat));
    n += s.numel();
  }
  return flat;
}

at::Tensor topk_threshold_cuda(at::TensorList scores, int64_t k_prune) {
  TORCH_CHECK(!scores.empty(), "topk_threshold needs at least one scores tensor");
  int64_t n = 0;
  const std::vector<at::Tensor> flat = flat_fp32_scores(scores, n);
  TORCH_CHECK(k_prune >= 0 && k_prune <= n, "k_prune must lie in [0, ", n, "], got ", k_prune);
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const auto out_options = scores[0].options().dtype(at::kFloat);
  if (k_prune == 0) return at::full({}, -std::numeric_limits<float>::infinity(), out_options);
  if (k_prune == n) return at::full({}, std::numeric_limits<float>::infinity(), out_options);
  const at::Tensor values = flat.size() == 1 ? flat[0].contiguous() : at::cat(flat);
  at::Tensor workspace = at::empty({cuda::topk_threshold_workspace_elems()}, out_options.dtype(at::kLong));
  at::Tensor out = at::empty({}, out_options);
  C10_CUDA_CHECK(cuda::topk_threshold_select(values.data_ptr<float>(), n, k_prune,
                                             reinterpret_cast<unsigned long long*>(workspace.data_ptr<int64_t>()),
                                             out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// k_prune as a 0-dim integer tensor on the scores' device, read by the kernels (no host sync).
at::Tensor topk_threshold_cuda_t(at::TensorList scores, const at::Tensor& k_prune) {
  TORCH_CHECK(!scores.empty(), "topk_threshold needs at least one scores tensor");
  TORCH_CHECK(k_prune.numel() == 1, "k_prune must be a 0-dim (one-element) tensor, got shape ", k_prune.sizes());
  TORCH_CHECK(k_prune.device() == scores[0].device(), "k_prune is on ", k_prune.device(), " but the scores are on ",
              scores[0].device());
  TORCH_CHECK(!at::isFloatingType(k_prune.scalar_type()) && k_prune.scalar_type() != at::kBool,
              "k_prune must be an integer tensor, got ", k_prune.scalar_type());
  int64_t n = 0;
  const std::vector<at::Tensor> flat = flat_fp32_scores(scores, n);
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const auto out_options = scores[0].options().dtype(at::kFloat);
  const at::Tensor values = flat.size() == 1 ? flat[0].contiguous() : at::cat(flat);
  const at::Tensor k = k_prune.reshape({}).to(at::kLong).contiguous();
  at::Tensor workspace = at::empty({cuda::topk_threshold_workspace_elems()}, out_options.dtype(at::kLong));
  at::Tensor out = at::empty({}, out_options);
  C10_CUDA_CHECK(cuda::topk_threshold_select_device_rank(
      values.data_ptr<float>(), n, k.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(workspace.data_ptr<int64_t>()),
      out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.is_cuda(), "mask must be a CUDA tensor, got ", mask.device());
  TORCH_CHECK(mask.dim() >= 1, "mask must have at least one dimension");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, "mask must be bool or uint8, got ",
              mask.scalar_type());
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  const int64_t K = m.size(-1), rows = K == 0 ? 0 : m.numel() / K;
  std::vector<int64_t> shape(m.sizes().begin(), m.sizes().end());
  shape.back() = (K + 31) / 32;
  at::Tensor packed = at::empty(shape, m.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::pack_mask(static_cast<const uint8_t*>(m.data_ptr()), rows, K, packed.data_ptr<int32_t>(),
                                 c10::cuda::getCurrentCUDAStream()));
  return packed;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, int64_t in_features) {
  TORCH_CHECK(packed.is_cuda(), "packed must be a CUDA tensor, got ", packed.device());
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least one dimension");
  TORCH_CHECK(packed.scalar_type() == at::kInt, "packed must be int32, got ", packed.scalar_type());
  TORCH_CHECK(in_features >= 0, "in_features must be >= 0, got ", in_features);
  const int64_t words = (in_features + 31) / 32;
  TORCH_CHECK(packed.size(-1) == words, "packed must have ceil(in_features / 32) = ", words, " words per row, got ",
              packed.size(-1));
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const int64_t rows = words == 0 ? 0 : p.numel() / words;
  std::vector<int64_t> shape(p.sizes().begin(), p.sizes().end());
  shape.back() = in_features;
  at::Tensor mask = at::empty(shape, p.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::unpack_mask(p.data_ptr<int32_t>(), rows, in_features, static_cast<uint8_t*>(mask.data_ptr()),
                                   c10::cuda::getCurrentCUDAStream()));
  return mask;
}

// y = x @ Wᵀ + bias, W in the tc-bitmask format (csrc/cuda/bitmask_spmm.cu); fp16/bf16.
at::Tensor bitmask_spmm_cuda(const at::Tensor& x, const at::Tensor& data, const at::Tensor& tile_offsets,
                             const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features,
                             int64_t split_k) {
  check_2d(x, "x", x);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "bitmask_spmm (CUDA) takes float16 or bfloat16 x, got ", x.scalar_type());
  check_same_dtype(data, "data", x, "x");
  TORCH_CHECK(data.is_cuda() && data.device() == x.device(), "data must be on ", x.device(), ", got ", data.device());
  TORCH_CHECK(data.dim() == 1 && data.is_contiguous(), "data must be 1-D and contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(data.data_ptr()) % 16 == 0, "data must be 16-byte aligned");
  TORCH_CHECK(tile_offsets.is_cuda() && tile_offsets.device() == x.device(), "tile_offsets must be on ", x.device());
  TORCH_CHECK(tile_offsets.scalar_type() == at::kInt && tile_offsets.dim() == 1 && tile_offsets.is_contiguous(),
              "tile_offsets must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(out_features >= 1 && out_features <= std::numeric_limits<int>::max(), "out_features out of range: ",
              out_features);
  TORCH_CHECK(in_features == x.size(1), "x has ", x.size(1), " features but in_features is ", in_features);
  const int64_t tiles = ((out_features + 63) / 64) * ((in_features + 63) / 64);
  TORCH_CHECK(tile_offsets.size(0) == tiles + 1, "tile_offsets must have ", tiles + 1, " entries, got ",
              tile_offsets.size(0));
  TORCH_CHECK(split_k >= 0, "split_k must be >= 0, got ", split_k);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device(), "bias must be on ", x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous(),
                "bias must be contiguous with shape (", out_features, ")");
    check_same_dtype(*bias, "bias", x, "x");
    bias_ptr = bias->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(out_features), K = static_cast<int>(in_features);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const cuda::BitmaskSpmmPlan plan = cuda::bitmask_spmm_plan(M, N, K, static_cast<int>(split_k), num_sms);
  at::Tensor partials, tickets;
  if (plan.split > 1) {
    partials = at::empty({plan.split, M, N}, x.options().dtype(at::kFloat));
    tickets = at::zeros({plan.token_blocks * plan.row_tiles}, x.options().dtype(at::kInt));
  }
  C10_CUDA_CHECK(cuda::bitmask_spmm_forward(
      device_dtype(x, "x"), plan, x.data_ptr(), data.data_ptr(), tile_offsets.data_ptr<int32_t>(), bias_ptr,
      y.data_ptr(), plan.split > 1 ? partials.data_ptr<float>() : nullptr,
      plan.split > 1 ? tickets.data_ptr<int32_t>() : nullptr, M, N, K, c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace sparsebert

TORCH_LIBRARY_IMPL(sparsebert_ext, CUDA, m) {
  m.impl("masked_linear_fwd", &sparsebert::masked_linear_fwd_cuda);
  m.impl("masked_linear_bwd_input", &sparsebert::masked_linear_bwd_input_cuda);
  m.impl("masked_linear_bwd_weight", &sparsebert::masked_linear_bwd_weight_cuda);
  m.impl("score_masked_linear_fwd", &sparsebert::score_masked_linear_fwd_cuda);
  m.impl("score_masked_linear_bwd_input", &sparsebert::score_masked_linear_bwd_input_cuda);
  m.impl("score_masked_linear_bwd_weight_scores", &sparsebert::score_masked_linear_bwd_weight_scores_cuda);
  m.impl("topk_threshold", &sparsebert::topk_threshold_cuda);
  m.impl("score_masked_linear_fwd.tensor", &sparsebert::score_masked_linear_fwd_cuda_t);
  m.impl("score_masked_linear_bwd_input.tensor", &sparsebert::score_masked_linear_bwd_input_cuda_t);
  m.impl("score_masked_linear_bwd_weight_scores.tensor", &sparsebert::score_masked_linear_bwd_weight_scores_cuda_t);
  m.impl("topk_threshold.tensor", &sparsebert::topk_threshold_cuda_t);
  m.impl("pack_mask", &sparsebert::pack_mask_cuda);
  m.impl("unpack_mask", &sparsebert::unpack_mask_cuda);
  m.impl("bitmask_spmm", &sparsebert::bitmask_spmm_cuda);
}

// CUDA-only op: its schema lives here (a CPU build has no bitmask_spmm; the ops layer then offers triton/torch).
TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def("bitmask_spmm(Tensor x, Tensor data, Tensor tile_offsets, Tensor? bias, int out_features, int in_features, "
        "int split_k=0) -> Tensor");
}
