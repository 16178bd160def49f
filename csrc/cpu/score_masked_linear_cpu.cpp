// score_masked_linear on CPU: y = x @ (W ⊙ [scores >= τ])ᵀ + b, the mask derived from learned scores.
// Forward / input backward: one parallel pass builds the effective weight, then at::addmm / at::mm.
// The weight pass (training): that effective weight exposed alone (`score_masked_weight`), and the
// epilogue on a given G (`score_masked_weight_grad`), so the forward and the input gradient share one.
// Weight+score backward: G = dyᵀ x once (fp32), then ONE fused parallel epilogue writes
// dscores = G ⊙ W (scores dtype) and, when asked, dweight = G ⊙ [scores >= τ] (weight dtype).
#include <torch/library.h>

#include <tuple>

#include "sparsebert_cpu.h"

namespace sparsebert {

at::Tensor score_masked_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                       double threshold) {
  check_float_2d(x, "x");
  check_float_2d(weight, "weight");
  check_same_dtype(x, "x", weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features but weight expects ", weight.size(1));
  check_scores(scores, weight.size(0), weight.size(1));
  check_bias(bias, x, weight.size(0));
  const at::Tensor w_eff = score_masked_weight(weight, scores, threshold);
  return bias.has_value() ? at::addmm(*bias, x, w_eff.t()) : at::mm(x, w_eff.t());
}

at::Tensor score_masked_linear_bwd_input_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& scores,
                                             double threshold) {
  check_float_2d(dy, "dy");
  check_float_2d(weight, "weight");
  check_same_dtype(dy, "dy", weight, "weight");
  TORCH_CHECK(dy.size(1) == weight.size(0), "dy has ", dy.size(1), " columns but weight has ", weight.size(0),
              " rows");
  check_scores(scores, weight.size(0), weight.size(1));
  return at::mm(dy, score_masked_weight(weight, scores, threshold));
}

// From G (N, K) fp32: dscores = G ⊙ W (scores dtype) and dweight = G ⊙ [scores >= τ] (weight dtype), each
// when asked: one branch-free pass over G for each.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> score_grad_epilogue(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores, double threshold, bool need_dscores,
    bool need_dweight) {
  const int64_t NK = weight.numel();
  at::Tensor dscores = need_dscores ? at::empty_like(scores) : at::Tensor();
  at::Tensor dweight = need_dweight ? at::empty_like(weight) : at::Tensor();
  const float* g = grad.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "score_grad_epilogue", [&] {
    using weight_t = scalar_t;
    const weight_t* w = weight.data_ptr<weight_t>();
    weight_t* dw = need_dweight ? dweight.data_ptr<weight_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "score_grad_epilogue", [&] {
      const scalar_t* s = scores.data_ptr<scalar_t>();
      scalar_t* ds = need_dscores ? dscores.data_ptr<scalar_t>() : nullptr;
      const float thr = rounded_threshold<scalar_t>(threshold);
      if (dw != nullptr) select_by_scores(g, dw, s, thr, NK);  // [s >= thr] ? g : +0, branch-free
      if (ds != nullptr) {
        at::parallel_for(0, NK, 32768, [&](int64_t i0, int64_t i1) {
          const float* __restrict gr = g;
          const weight_t* __restrict wr = w;
          scalar_t* __restrict dsr = ds;
          for (int64_t i = i0; i < i1; ++i) dsr[i] = static_cast<scalar_t>(gr[i] * static_cast<float>(wr[i]));
        });
      }
    });
  });
  return std::make_tuple(need_dscores ? std::optional<at::Tensor>(dscores) : std::nullopt,
                         need_dweight ? std::optional<at::Tensor>(dweight) : std::nullopt);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> score_masked_linear_bwd_weight_scores_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, double threshold,
    bool need_dweight) {
  check_float_2d(dy, "dy");
  check_float_2d(x, "x");
  check_float_2d(weight, "weight");
  check_same_dtype(dy, "dy", x, "x");
  TORCH_CHECK(dy.size(0) == x.size(0), "dy has ", dy.size(0), " rows but x has ", x.size(0));
  const int64_t N = dy.size(1), K = x.size(1);
  TORCH_CHECK(weight.size(0) == N && weight.size(1) == K, "weight must have shape (", N, ", ", K, "), got ",
              weight.sizes());
  check_scores(scores, N, K);

  const at::Tensor grad = weight_gradient_fp32(dy, x);  // (N, K) fp32, computed once for both outputs
  auto [dscores, dweight] = score_grad_epilogue(grad, weight, scores, threshold, true, need_dweight);
  return std::make_tuple(*dscores, dweight);
}

// The `.tensor` overloads take the threshold as a 0-dim tensor (what the ops layer holds: a threshold
// computed by topk_threshold stays a tensor end to end). On the CPU reading it is free: no device sync.
double threshold_value(const at::Tensor& threshold) {
  TORCH_CHECK(threshold.numel() == 1, "threshold must be a 0-dim (one-element) tensor, got shape ",
              threshold.sizes());
  TORCH_CHECK(threshold.device().is_cpu(), "threshold must be a CPU tensor, got ", threshold.device());
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), "threshold must be a float tensor, got ",
              threshold.scalar_type());
  return threshold.item<double>();
}

at::Tensor score_masked_linear_fwd_cpu_t(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& scores,
                                         const at::Tensor& threshold) {
  return score_masked_linear_fwd_cpu(x, weight, bias, scores, threshold_value(threshold));
}

at::Tensor score_masked_linear_bwd_input_cpu_t(const at::Tensor& dy, const at::Tensor& weight,
                                               const at::Tensor& scores, const at::Tensor& threshold) {
  return score_masked_linear_bwd_input_cpu(dy, weight, scores, threshold_value(threshold));
}

std::tuple<at::Tensor, std::optional<at::Tensor>> score_masked_linear_bwd_weight_scores_cpu_t(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
    const at::Tensor& threshold, bool need_dweight) {
  return score_masked_linear_bwd_weight_scores_cpu(dy, x, weight, scores, threshold_value(threshold), need_dweight);
}

// The weight pass on the CPU (the ops layer's `pass_kernel="cpp"`): W ⊙ [scores >= τ] written once per
// step, shared by the forward GEMM and the input gradient, and the epilogue on autograd's G = dyᵀ x.
at::Tensor score_masked_weight_cpu(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& threshold) {
  check_float_2d(weight, "weight");
  check_scores(scores, weight.size(0), weight.size(1));
  return score_masked_weight(weight, scores, threshold_value(threshold));
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> score_masked_weight_grad_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& threshold,
    bool need_dscores, bool need_dweight) {
  check_float_2d(grad, "grad");
  check_float_2d(weight, "weight");
  TORCH_CHECK(grad.sizes() == weight.sizes(), "grad must have the weight's shape ", weight.sizes(), ", got ",
              grad.sizes());
  check_scores(scores, weight.size(0), weight.size(1));
  return score_grad_epilogue(grad.to(at::kFloat), weight, scores, threshold_value(threshold),
                             need_dscores, need_dweight);
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def("score_masked_weight(Tensor weight, Tensor scores, Tensor threshold) -> Tensor");
  m.def(
      "score_masked_weight_grad(Tensor grad, Tensor weight, Tensor scores, Tensor threshold, bool need_dscores, "
      "bool need_dweight) -> (Tensor?, Tensor?)");
  m.def("score_masked_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scores, float threshold) -> Tensor");
  m.def("score_masked_linear_bwd_input(Tensor dy, Tensor weight, Tensor scores, float threshold) -> Tensor");
  m.def(
      "score_masked_linear_bwd_weight_scores(Tensor dy, Tensor x, Tensor weight, Tensor scores, float threshold, "
      "bool need_dweight) -> (Tensor, Tensor?)");
  m.def(
      "score_masked_linear_fwd.tensor(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor threshold) -> "
      "Tensor");
  m.def("score_masked_linear_bwd_input.tensor(Tensor dy, Tensor weight, Tensor scores, Tensor threshold) -> Tensor");
  m.def(
      "score_masked_linear_bwd_weight_scores.tensor(Tensor dy, Tensor x, Tensor weight, Tensor scores, "
      "Tensor threshold, bool need_dweight) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) {
  m.impl("score_masked_weight", &sparsebert::score_masked_weight_cpu);
  m.impl("score_masked_weight_grad", &sparsebert::score_masked_weight_grad_cpu);
  m.impl("score_masked_linear_fwd", &sparsebert::score_masked_linear_fwd_cpu);
  m.impl("score_masked_linear_bwd_input", &sparsebert::score_masked_linear_bwd_input_cpu);
  m.impl("score_masked_linear_bwd_weight_scores", &sparsebert::score_masked_linear_bwd_weight_scores_cpu);
  m.impl("score_masked_linear_fwd.tensor", &sparsebert::score_masked_linear_fwd_cpu_t);
  m.impl("score_masked_linear_bwd_input.tensor", &sparsebert::score_masked_linear_bwd_input_cpu_t);
  m.impl("score_masked_linear_bwd_weight_scores.tensor", &sparsebert::score_masked_linear_bwd_weight_scores_cpu_t);
}
