// topk_threshold on CPU: τ = the (k_prune+1)-th smallest score over all given tensors, exactly, so that
// `scores >= τ` keeps n - k_prune entries when there are no ties. Selection, not a sort: every score is
// mapped (in parallel) to its order-preserving uint32 key, then std::nth_element finds rank k_prune in
// O(n). The key order is a total order (-0 < +0, NaN above +inf), the same one the CUDA radix select uses.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "sparsebert_cpu.h"

namespace sparsebert {

inline uint32_t float_to_ordered_key(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float ordered_key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

at::Tensor topk_threshold_cpu(at::TensorList scores, int64_t k_prune) {
  TORCH_CHECK(!scores.empty(), "topk_threshold needs at least one scores tensor");
  int64_t n = 0;
  for (const at::Tensor& s : scores) {
    TORCH_CHECK(s.device().is_cpu(), "scores must be CPU tensors, got ", s.device());
    const auto dt = s.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "scores must be float32, float16 or bfloat16, got ", dt);
    n += s.numel();
  }
  TORCH_CHECK(k_prune >= 0 && k_prune <= n, "k_prune must lie in [0, ", n, "], got ", k_prune);
  const auto out_options = at::TensorOptions().dtype(at::kFloat);
  if (k_prune == 0) return at::full({}, -std::numeric_limits<float>::infinity(), out_options);
  if (k_prune == n) return at::full({}, std::numeric_limits<float>::infinity(), out_options);

  std::vector<uint32_t> keys(static_cast<size_t>(n));
  int64_t offset = 0;
  for (const at::Tensor& s : scores) {
    const at::Tensor flat = s.contiguous();
    uint32_t* dst = keys.data() + offset;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "topk_threshold_keys", [&] {
      const scalar_t* src = flat.data_ptr<scalar_t>();
      at::parallel_for(0, flat.numel(), 32768, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dst[i] = float_to_ordered_key(static_cast<float>(src[i]));
      });
    });
    offset += flat.numel();
  }
  std::nth_element(keys.begin(), keys.begin() + k_prune, keys.end());
  return at::full({}, ordered_key_to_float(keys[static_cast<size_t>(k_prune)]), out_options);
}

// The `.tensor` overload: k_prune as a 0-dim integer tensor (computed on the device from a sparsity tensor,
// so that a changing sparsity is data, not a constant baked into a compiled graph). On the CPU reading it is
// free: no device sync.
at::Tensor topk_threshold_cpu_t(at::TensorList scores, const at::Tensor& k_prune) {
  TORCH_CHECK(k_prune.numel() == 1, "k_prune must be a 0-dim (one-element) tensor, got shape ", k_prune.sizes());
  TORCH_CHECK(k_prune.device().is_cpu(), "k_prune must be a CPU tensor, got ", k_prune.device());
  TORCH_CHECK(!at::isFloatingType(k_prune.scalar_type()) && k_prune.scalar_type() != at::kBool,
              "k_prune must be an integer tensor, got ", k_prune.scalar_type());
  return topk_threshold_cpu(scores, k_prune.item<int64_t>());
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def("topk_threshold(Tensor[] scores, int k_prune) -> Tensor");
  m.def("topk_threshold.tensor(Tensor[] scores, Tensor k_prune) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) {
  m.impl("topk_threshold", &sparsebert::topk_threshold_cpu);
  m.impl("topk_threshold.tensor", &sparsebert::topk_threshold_cpu_t);
}
