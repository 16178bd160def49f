// topk_threshold on CPU: τ = the (k_prune+1)-th smallest score over all given tensors, exactly, so that
// `scores >= τ` keeps n - k_prune entries when there are no ties. Selection, not a sort: every score maps to
// its order-preserving uint32 key (a total order: -0 < +0, NaN above +inf, the one the CUDA radix select
// uses). One radix digit first: a parallel histogram of the keys' top 12 bits finds the bin holding rank
// k_prune, a second parallel pass gathers that bin's keys, and std::nth_element finishes on them alone.
// Two streaming passes over the scores and no n-sized key array: for 590k normal scores the bin holds
// ~1% of them (the old single std::nth_element over all n keys cost ~9.5 ns a key, mostly mispredicted
// partition branches); at worst (every key in one bin: ties, a constant init) the finish is that same
// nth_element over n keys.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
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

  // Every tensor's keys, streamed in parallel chunks: on_chunk(keys_of_chunk) runs once per chunk, where
  // keys_of_chunk(fn) calls fn(key) for each of the chunk's keys; on_chunk merges its result under `merge`.
  std::vector<at::Tensor> flats;
  flats.reserve(scores.size());
  for (const at::Tensor& s : scores) flats.push_back(s.contiguous());
  std::mutex merge;
  const auto for_each_chunk = [&](auto&& on_chunk) {
    for (const at::Tensor& flat : flats) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "topk_threshold_keys", [&] {
        const scalar_t* src = flat.data_ptr<scalar_t>();
        at::parallel_for(0, flat.numel(), 65536, [&](int64_t i0, int64_t i1) {
          on_chunk([&](auto&& fn) {
            for (int64_t i = i0; i < i1; ++i) fn(float_to_ordered_key(static_cast<float>(src[i])));
          });
        });
      });
    }
  };
  constexpr int kShift = 20;  // the top 12 bits: 4096 bins
  constexpr size_t kBins = size_t{1} << (32 - kShift);
  std::vector<int64_t> hist(kBins, 0);
  for_each_chunk([&](auto&& keys_of_chunk) {
    std::vector<int64_t> local(kBins, 0);
    keys_of_chunk([&](uint32_t key) { ++local[key >> kShift]; });
    std::lock_guard<std::mutex> lock(merge);
    for (size_t b = 0; b < kBins; ++b) hist[b] += local[b];
  });
  int64_t below = 0;  // keys in the bins under the one holding rank k_prune
  uint32_t bin = 0;
  for (size_t b = 0; b < kBins; ++b) {
    if (below + hist[b] > k_prune) {
      bin = static_cast<uint32_t>(b);
      break;
    }
    below += hist[b];
  }
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(hist[bin]));
  for_each_chunk([&](auto&& keys_of_chunk) {
    std::vector<uint32_t> local;
    keys_of_chunk([&](uint32_t key) {
      if ((key >> kShift) == bin) local.push_back(key);
    });
    std::lock_guard<std::mutex> lock(merge);
    keys.insert(keys.end(), local.begin(), local.end());
  });
  const int64_t rank = k_prune - below;
  TORCH_CHECK(rank >= 0 && rank < static_cast<int64_t>(keys.size()),
              "topk_threshold: the scores changed while being read");  // two passes must agree
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end());
  return at::full({}, ordered_key_to_float(keys[static_cast<size_t>(rank)]), out_options);
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
