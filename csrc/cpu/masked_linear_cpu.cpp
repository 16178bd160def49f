// masked_linear on CPU: y = x @ (W ⊙ m)ᵀ + b with a fixed mask m (uint8 bytes or packed int32 bits).
// Forward and input backward build W ⊙ m once in one parallel pass and call MKL/oneDNN through at::addmm;
// the weight backward computes G = dyᵀ x once (fp32) and applies the mask in a fused parallel epilogue.
#include <torch/library.h>

#include "sparsebert_cpu.h"

namespace sparsebert {

at::Tensor masked_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& mask, bool packed) {
  check_float_2d(x, "x");
  check_float_2d(weight, "weight");
  check_same_dtype(x, "x", weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features but weight expects ", weight.size(1));
  check_mask(mask, packed, weight.size(0), weight.size(1));
  check_bias(bias, x, weight.size(0));
  const at::Tensor w_eff = masked_weight(weight, mask, packed);
  return bias.has_value() ? at::addmm(*bias, x, w_eff.t()) : at::mm(x, w_eff.t());
}

at::Tensor masked_linear_bwd_input_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& mask,
                                       bool packed) {
  check_float_2d(dy, "dy");
  check_float_2d(weight, "weight");
  check_same_dtype(dy, "dy", weight, "weight");
  TORCH_CHECK(dy.size(1) == weight.size(0), "dy has ", dy.size(1), " columns but weight has ", weight.size(0),
              " rows");
  check_mask(mask, packed, weight.size(0), weight.size(1));
  return at::mm(dy, masked_weight(weight, mask, packed));
}

at::Tensor masked_linear_bwd_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                                        bool packed) {
  check_float_2d(dy, "dy");
  check_float_2d(x, "x");
  check_same_dtype(dy, "dy", x, "x");
  TORCH_CHECK(dy.size(0) == x.size(0), "dy has ", dy.size(0), " rows but x has ", x.size(0));
  const int64_t N = dy.size(1), K = x.size(1);
  check_mask(mask, packed, N, K);
  const at::Tensor grad = weight_gradient_fp32(dy, x);  // (N, K) fp32
  at::Tensor dweight = at::empty({N, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_linear_bwd_weight", [&] {
    select_by_mask(grad.data_ptr<float>(), dweight.data_ptr<scalar_t>(), mask, packed, N, K);
  });
  return dweight;
}

// The weight pass on the CPU (the ops layer's `pass_kernel="cpp"`): W ⊙ m once per step (also the mask
// applied to autograd's gradient of W ⊙ m).
at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& mask, bool packed) {
  check_float_2d(weight, "weight");
  check_mask(mask, packed, weight.size(0), weight.size(1));
  return masked_weight(weight, mask, packed);
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def("masked_weight(Tensor weight, Tensor mask, bool packed) -> Tensor");
  m.def("masked_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor mask, bool packed) -> Tensor");
  m.def("masked_linear_bwd_input(Tensor dy, Tensor weight, Tensor mask, bool packed) -> Tensor");
  m.def("masked_linear_bwd_weight(Tensor dy, Tensor x, Tensor mask, bool packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) {
  m.impl("masked_weight", &sparsebert::masked_weight_cpu);
  m.impl("masked_linear_fwd", &sparsebert::masked_linear_fwd_cpu);
  m.impl("masked_linear_bwd_input", &sparsebert::masked_linear_bwd_input_cpu);
  m.impl("masked_linear_bwd_weight", &sparsebert::masked_linear_bwd_weight_cpu);
}
