// Shared helpers of the C++ CPU kernels (sparsebert._C). Header-only, included by csrc/cpu/*.cpp.
//
// The kernels follow one plan: build the effective weight W ⊙ m in ONE parallel pass (unpacking mask
// bits or thresholding scores on the fly), then hand the dense GEMM to at::mm / at::addmm (MKL / oneDNN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEBERT_X86 1
#else
#define SPARSEBERT_X86 0
#endif

namespace sparsebert {

// --- SIMD: AVX2+FMA paths are compiled with function-level target attributes and chosen at run time ------
inline bool cpu_has_avx2_fma() {
#if SPARSEBERT_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#if SPARSEBERT_X86
__attribute__((target("avx2"))) inline uint32_t max_as_unsigned_avx2(const int32_t* v, int64_t len) {
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    m0 = _mm256_max_epu32(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)));
    m1 = _mm256_max_epu32(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j + 8)));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu32(m0, m1));
  uint32_t worst = 0;
  for (int i = 0; i < 8; ++i) worst = std::max(worst, lanes[i]);
  for (; j < len; ++j) worst = std::max(worst, static_cast<uint32_t>(v[j]));
  return worst;
}

__attribute__((target("avx2"))) inline uint32_t max_as_unsigned_avx2(const int16_t* v, int64_t len) {
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    m0 = _mm256_max_epu16(m0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)));
    m1 = _mm256_max_epu16(m1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j + 16)));
  }
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu16(m0, m1));
  uint32_t worst = 0;
  for (int i = 0; i < 16; ++i) worst = std::max<uint32_t>(worst, lanes[i]);
  for (; j < len; ++j) worst = std::max<uint32_t>(worst, static_cast<uint16_t>(v[j]));
  return worst;
}
#endif

// The largest of `len` int16 / int32 read as unsigned (a negative value reads as >= 2^15 / 2^31): one pass,
// for range checks of index arrays before any kernel reads through them (AVX2 when the CPU has it; the
// answer does not depend on the path, so the check ignores a kernel's simd switch).
template <typename idx_t>
inline uint32_t max_as_unsigned(const idx_t* v, int64_t len) {
  static_assert(std::is_same_v<idx_t, int16_t> || std::is_same_v<idx_t, int32_t>, "int16 or int32 indices");
#if SPARSEBERT_X86
  if (cpu_has_avx2_fma()) return max_as_unsigned_avx2(v, len);
#endif
  using uidx_t = std::make_unsigned_t<idx_t>;
  uint32_t worst = 0;
  for (int64_t j = 0; j < len; ++j) worst = std::max<uint32_t>(worst, static_cast<uidx_t>(v[j]));
  return worst;
}

// Rows handed to one at::parallel_for task: enough work per task to amortize the scheduling.
inline int64_t rows_per_task(int64_t row_len) {
  constexpr int64_t kElementsPerTask = 32768;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(row_len, 1));
}

inline int64_t packed_words(int64_t in_features) { return (in_features + 31) / 32; }

// --- input checks (the Python ops layer validates first; these are the last line of defense) -----------
inline void check_float_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// mask: uint8/bool (N, K) when !packed, int32 (N, ceil(K/32)) when packed.
inline void check_mask(const at::Tensor& mask, bool packed, int64_t N, int64_t K) {
  TORCH_CHECK(mask.dim() == 2, "mask must be 2-D, got ", mask.dim(), "-D");
  TORCH_CHECK(mask.device().is_cpu(), "mask must be a CPU tensor, got ", mask.device());
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
  if (packed) {
    TORCH_CHECK(mask.scalar_type() == at::kInt, "packed mask must be int32, got ", mask.scalar_type());
    TORCH_CHECK(mask.size(0) == N && mask.size(1) == packed_words(K), "packed mask must have shape (", N, ", ",
                packed_words(K), "), got ", mask.sizes());
  } else {
    TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool,
                "mask must be uint8 or bool, got ", mask.scalar_type());
    TORCH_CHECK(mask.size(0) == N && mask.size(1) == K, "mask must have shape (", N, ", ", K, "), got ",
                mask.sizes());
  }
}

inline void check_scores(const at::Tensor& scores, int64_t N, int64_t K) {
  check_float_2d(scores, "scores");
  TORCH_CHECK(scores.size(0) == N && scores.size(1) == K, "scores must have shape (", N, ", ", K, "), got ",
              scores.sizes());
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "bias must have shape (", N, "), got ", b.sizes());
  TORCH_CHECK(b.device().is_cpu(), "bias must be a CPU tensor, got ", b.device());
  check_same_dtype(b, "bias", x, "x");
}

// The threshold as torch's `scores >= threshold` sees it: a Python scalar is first rounded to the
// dtype of scores (a 0-dim tensor does not promote), then compared.
template <typename score_t>
inline float rounded_threshold(double threshold) {
  return static_cast<float>(static_cast<score_t>(static_cast<float>(threshold)));
}

// --- branch-free selects --------------------------------------------------------------------------------
// keep ? v : +0 as the value's bits ANDed with an all-ones or all-zeros word. A pruned entry is +0 whatever
// it held (NaN, inf), as before. Written as `m[i] ? w[i] : 0`, the load of w[i] is conditional, so GCC emits
// a branch per element, mispredicted at about half the elements of a mask: ~2.2 ns an element on the 2-core
// CI machine, 10x a memory-bound pass (`w * m`). Loaded unconditionally and masked by bits, the loops below
// vectorize (tests/test_cpp_elementwise.py checks the values, bench/test_bench_cpp_elementwise.py times them).
template <size_t Bytes>
struct bits_of;
template <>
struct bits_of<2> {
  using type = uint16_t;
};
template <>
struct bits_of<4> {
  using type = uint32_t;
};
template <>
struct bits_of<8> {  // float64: the dispatch macros instantiate it
  using type = uint64_t;
};

template <typename T>
inline T keep_or_zero(T v, bool keep) {
  using U = typename bits_of<sizeof(T)>::type;
  U b;
  std::memcpy(&b, &v, sizeof(U));
  b &= static_cast<U>(U(0) - static_cast<U>(keep));
  std::memcpy(&v, &b, sizeof(U));
  return v;
}

// o[i] = keep(i) ? in[i] : +0 for i in [i0, i1), `keep(i)` a branch-free predicate; in_t -> out_t by a cast
// (fp32 gradients into a half/bf16 weight gradient), done after the select so that a pruned entry is +0.
template <typename in_t, typename out_t, typename Keep>
inline void select_range(const in_t* __restrict in, out_t* __restrict o, int64_t i0, int64_t i1, Keep keep) {
  for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<out_t>(keep_or_zero(in[i], keep(i)));
}

// bytes_of_bits()[b]: the 8 bits of b as 8 bytes 0/1 (bit j -> byte j).
using ByteExpansion = std::array<std::array<uint8_t, 8>, 256>;
inline const ByteExpansion& bytes_of_bits() {
  static const ByteExpansion table = [] {
    ByteExpansion t{};
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) t[b][j] = static_cast<uint8_t>((b >> j) & 1);
    return t;
  }();
  return table;
}

// The same over a whole (N, K) matrix whose mask is bytes (nonzero keeps), packed int32 words (bit k%32 of
// word k/32, LSB first) or scores compared with a threshold; one parallel pass.
template <typename in_t, typename out_t>
inline void select_by_mask(const in_t* in, out_t* o, const at::Tensor& mask, bool packed, int64_t N, int64_t K) {
  if (packed) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    const int64_t W = packed_words(K);
    at::parallel_for(0, N, rows_per_task(K), [&](int64_t n0, int64_t n1) {
      // Each row's words expanded to one byte per element (a 256-entry table: 8 bytes per mask byte), then
      // the byte-mask select, which vectorizes for every dtype (a per-element bit test did not for 16-bit
      // values: 2.5 GB/s in bf16 on one thread)
      std::vector<uint8_t> keep(static_cast<size_t>(W * 32));
      const ByteExpansion& table = bytes_of_bits();
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t w = 0; w < W; ++w) {
          const uint32_t word = words[n * W + w];
          for (int b = 0; b < 4; ++b)
            std::memcpy(keep.data() + w * 32 + b * 8, table[(word >> (8 * b)) & 0xffu].data(), 8);
        }
        const uint8_t* __restrict kp = keep.data();
        select_range(in + n * K, o + n * K, 0, K, [kp](int64_t k) { return kp[k] != 0; });
      }
    });
  } else {
    const uint8_t* __restrict m = static_cast<const uint8_t*>(mask.data_ptr());  // bool and uint8 share a layout
    at::parallel_for(0, N * K, 32768, [&](int64_t i0, int64_t i1) {
      select_range(in, o, i0, i1, [m](int64_t i) { return m[i] != 0; });
    });
  }
}

template <typename in_t, typename out_t, typename score_t>
inline void select_by_scores(const in_t* in, out_t* o, const score_t* __restrict s, float thr, int64_t NK) {
  at::parallel_for(0, NK, 32768, [&](int64_t i0, int64_t i1) {
    select_range(in, o, i0, i1, [s, thr](int64_t i) { return static_cast<float>(s[i]) >= thr; });
  });
}

// --- effective weights: one parallel pass --------------------------------------------------------------
// W ⊙ mask, mask as bytes (nonzero = keep) or as packed int32 words (bit k%32 of word k/32, LSB first).
inline at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask, bool packed) {
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_weight", [&] {
    select_by_mask(weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask, packed, weight.size(0),
                   weight.size(1));
  });
  return out;
}

// W ⊙ (scores >= threshold); scores may have another float dtype than W.
inline at::Tensor score_masked_weight(const at::Tensor& weight, const at::Tensor& scores, double threshold) {
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "score_masked_weight", [&] {
    using weight_t = scalar_t;
    const weight_t* w = weight.data_ptr<weight_t>();
    weight_t* o = out.data_ptr<weight_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "score_masked_weight", [&] {
      select_by_scores(w, o, scores.data_ptr<scalar_t>(), rounded_threshold<scalar_t>(threshold), weight.numel());
    });
  });
  return out;
}

// G = dyᵀ x with fp32 accumulation AND an fp32 result (the epilogues round once, into their own dtype).
inline at::Tensor weight_gradient_fp32(const at::Tensor& dy, const at::Tensor& x) {
  if (dy.scalar_type() == at::kFloat) return at::mm(dy.t(), x);
  return at::mm(dy.t().to(at::kFloat), x.to(at::kFloat));
}

}  // namespace sparsebert
