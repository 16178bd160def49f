// sparse_rows_linear on CPU: y = x @ Wᵀ + b with an unstructured W stored row by row (see
// sparsebert/ops/reference_formats.py, "sparse-rows"): values (nnz,) fp32, col_indices (nnz,) int16 or int32
// (ascending inside a row), row_offsets (N + 1,) int32 with row n's nonzeros at [row_offsets[n],
// row_offsets[n + 1]).
//
// Plan (after the SpMM kernels of XNNPACK / LIBXSMM / sparse-inference runtimes):
//  * T = 1 token: a gather-dot per row (8 nonzeros per AVX2 gather + FMA, two accumulators).
//  * T > 1: x is packed once into token blocks of up to 32 (zero-padded to a multiple of 8), each block
//    stored (K, width) so that for a nonzero w[n, k] the block's tokens x[t0:t0+width, k] are one contiguous
//    run: acc[0:width] += w * xp[k, 0:width] with `width / 8` AVX2 FMAs, several nonzeros in flight
//    (independent accumulators) to cover the FMA latency. Bias initializes the accumulators.
//  * One at::parallel_for over output rows (torch's thread count); inside a task the token blocks are the
//    outer loop so a block of packed x stays in L2 while the task's rows stream past.
// The column indices are range-checked in one pass over all of them before any row is used
// (max_as_unsigned, sparsebert_cpu.h: AVX2 unsigned max per 16 int16 / 8 int32 indices); a bad index stops the op with an error naming col_indices,
// and nothing is computed. The per-row checks this replaced cost 3-13% of a T = 1 call (paired
// whole-process runs, 60k calls each: 768x768 at 80/90% sparsity and 3072x768 at 90%, one thread).
// row_offsets is checked up front too.
// The AVX2+FMA path is compiled with function-level target attributes and chosen at run time; a portable
// scalar path (simd=false, or a CPU without AVX2/FMA) computes the same product.
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "sparsebert_cpu.h"

namespace sparsebert {
namespace {

constexpr int64_t kBlockTokens = 32;  // tokens per packed block: 4 AVX2 vectors

template <typename idx_t>
using uidx_t = std::make_unsigned_t<idx_t>;

struct Problem {
  const float* vals;
  const int32_t* offs;
  const float* bias;  // nullptr when none
  float* y;           // (T, N)
  int64_t N;
  uint32_t K;
};

// ---------------------------------------------------------------------------------------- scalar path
template <typename idx_t>
void rows_t1_scalar(const Problem& p, const idx_t* cols, const float* x, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = p.offs[n], e = p.offs[n + 1];
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains: the adds' latency overlaps
    int64_t j = s;
    for (; j + 4 <= e; j += 4) {
      a0 += p.vals[j] * x[static_cast<uidx_t<idx_t>>(cols[j])];
      a1 += p.vals[j + 1] * x[static_cast<uidx_t<idx_t>>(cols[j + 1])];
      a2 += p.vals[j + 2] * x[static_cast<uidx_t<idx_t>>(cols[j + 2])];
      a3 += p.vals[j + 3] * x[static_cast<uidx_t<idx_t>>(cols[j + 3])];
    }
    for (; j < e; ++j) a0 += p.vals[j] * x[static_cast<uidx_t<idx_t>>(cols[j])];
    p.y[n] = ((a0 + a1) + (a2 + a3)) + (p.bias ? p.bias[n] : 0.f);
  }
}

template <typename idx_t>
void rows_block_scalar(const Problem& p, const idx_t* cols, const float* xb, int64_t width, int64_t t0,
                       int64_t tcount, int64_t n0, int64_t n1) {
  float acc[kBlockTokens];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = p.offs[n], e = p.offs[n + 1];
    const float init = p.bias ? p.bias[n] : 0.f;
    for (int64_t i = 0; i < width; ++i) acc[i] = init;
    for (int64_t j = s; j < e; ++j) {
      const float w = p.vals[j];
      const float* xk = xb + static_cast<int64_t>(static_cast<uidx_t<idx_t>>(cols[j])) * width;
      for (int64_t i = 0; i < width; ++i) acc[i] += w * xk[i];
    }
    for (int64_t i = 0; i < tcount; ++i) p.y[(t0 + i) * p.N + n] = acc[i];
  }
}

// ------------------------------------------------------------------------------------------ AVX2 path
#if SPARSEBERT_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename idx_t>
__attribute__((target("avx2,fma"))) inline __m256i load8_indices(const idx_t* c) {
  if constexpr (sizeof(idx_t) == 2) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  }
}

template <typename idx_t>
__attribute__((target("avx2,fma"))) void rows_t1_avx2(const Problem& p, const idx_t* cols, const float* x,
                                                      int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = p.offs[n], e = p.offs[n + 1];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = s;
    for (; j + 16 <= e; j += 16) {
      const __m256 g0 = _mm256_i32gather_ps(x, load8_indices(cols + j), 4);
      const __m256 g1 = _mm256_i32gather_ps(x, load8_indices(cols + j + 8), 4);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p.vals + j), g0, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p.vals + j + 8), g1, a1);
    }
    if (j + 8 <= e) {
      const __m256 g0 = _mm256_i32gather_ps(x, load8_indices(cols + j), 4);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p.vals + j), g0, a0);
      j += 8;
    }
    float acc = hsum256(_mm256_add_ps(a0, a1));
    for (; j < e; ++j) acc += p.vals[j] * x[static_cast<uidx_t<idx_t>>(cols[j])];
    p.y[n] = acc + (p.bias ? p.bias[n] : 0.f);
  }
}

// V vectors of 8 tokens per row; U nonzeros in flight (U * V independent accumulator chains).
template <int V, int U, typename idx_t>
__attribute__((target("avx2,fma"))) void rows_block_avx2(const Problem& p, const idx_t* cols, const float* xb,
                                                         int64_t t0, int64_t tcount, int64_t n0, int64_t n1) {
  constexpr int64_t width = 8 * V;
  alignas(32) float out[width];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = p.offs[n], e = p.offs[n + 1];
    __m256 acc[U][V];
    const __m256 init = _mm256_set1_ps(p.bias ? p.bias[n] : 0.f);
    for (int v = 0; v < V; ++v) {
      acc[0][v] = init;
      for (int u = 1; u < U; ++u) acc[u][v] = _mm256_setzero_ps();
    }
    int64_t j = s;
    for (; j + U <= e; j += U) {
      for (int u = 0; u < U; ++u) {
        const __m256 w = _mm256_broadcast_ss(p.vals + j + u);
        const float* xk = xb + static_cast<int64_t>(static_cast<uidx_t<idx_t>>(cols[j + u])) * width;
        for (int v = 0; v < V; ++v) acc[u][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8 * v), acc[u][v]);
      }
    }
    for (; j < e; ++j) {
      const __m256 w = _mm256_broadcast_ss(p.vals + j);
      const float* xk = xb + static_cast<int64_t>(static_cast<uidx_t<idx_t>>(cols[j])) * width;
      for (int v = 0; v < V; ++v) acc[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + 8 * v), acc[0][v]);
    }
    for (int v = 0; v < V; ++v) {
      __m256 sum = acc[0][v];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][v]);
      _mm256_store_ps(out + 8 * v, sum);
    }
    for (int64_t i = 0; i < tcount; ++i) p.y[(t0 + i) * p.N + n] = out[i];
  }
}

template <typename idx_t>
void rows_block_avx2_dispatch(const Problem& p, const idx_t* cols, const float* xb, int64_t width, int64_t t0,
                              int64_t tcount, int64_t n0, int64_t n1) {
  switch (width / 8) {
    case 1: return rows_block_avx2<1, 4>(p, cols, xb, t0, tcount, n0, n1);
    case 2: return rows_block_avx2<2, 4>(p, cols, xb, t0, tcount, n0, n1);
    case 3: return rows_block_avx2<3, 2>(p, cols, xb, t0, tcount, n0, n1);
    default: return rows_block_avx2<4, 2>(p, cols, xb, t0, tcount, n0, n1);
  }
}

#endif

// x (T, K) any strides -> token blocks: block b holds tokens [32 b, 32 b + width_b) as (K, width_b), width_b
// = the block's token count rounded up to 8, zero-padded; blocks are stored one after another.
at::Tensor pack_token_blocks(const at::Tensor& x, int64_t T, int64_t K) {
  const int64_t full = T / kBlockTokens, rest = T % kBlockTokens;
  const int64_t padded = full * kBlockTokens + (rest + 7) / 8 * 8;
  at::Tensor xp = at::empty({padded * K}, x.options());
  const float* src = x.data_ptr<float>();
  const int64_t st = x.stride(0), sk = x.stride(1);
  float* dst = xp.data_ptr<float>();
  const int64_t n_blocks = full + (rest ? 1 : 0);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * kBlockTokens, tcount = std::min(kBlockTokens, T - t0);
      const int64_t width = (tcount + 7) / 8 * 8;
      float* blk = dst + t0 * K;
      for (int64_t k = 0; k < K; ++k) {
        float* row = blk + k * width;
        for (int64_t i = 0; i < tcount; ++i) row[i] = src[(t0 + i) * st + k * sk];
        for (int64_t i = tcount; i < width; ++i) row[i] = 0.f;
      }
    }
  });
  return xp;
}

// False (nothing computed) when a column index is outside [0, K).
template <typename idx_t>
bool run(const Problem& p, const idx_t* cols, const at::Tensor& x, int64_t T, int64_t K, int64_t nnz, bool simd) {
  const int64_t N = p.N;
  // Rows per task: about 64k multiply-adds, so that small layers do not pay for threads.
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(N, 1)) * std::max<int64_t>(T, 8);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_row);
  const bool use_avx2 = simd && cpu_has_avx2_fma();  // false off x86
  if (nnz > 0 && max_as_unsigned(cols, nnz) >= p.K) return false;
  if (T == 1) {
    at::Tensor xc = x.reshape({K}).contiguous();
    const float* xv = xc.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if SPARSEBERT_X86
      if (use_avx2) return rows_t1_avx2(p, cols, xv, n0, n1);
#endif
      rows_t1_scalar(p, cols, xv, n0, n1);
    });
    return true;
  }
  const at::Tensor xp = pack_token_blocks(x, T, K);
  const float* xpp = xp.data_ptr<float>();
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < T; t0 += kBlockTokens) {
      const int64_t tcount = std::min(kBlockTokens, T - t0), width = (tcount + 7) / 8 * 8;
      const float* xb = xpp + t0 * K;
#if SPARSEBERT_X86
      if (use_avx2) {
        rows_block_avx2_dispatch(p, cols, xb, width, t0, tcount, n0, n1);
        continue;
      }
#endif
      rows_block_scalar(p, cols, xb, width, t0, tcount, n0, n1);
    }
  });
  return true;
}

}  // namespace

at::Tensor sparse_rows_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_indices,
                                      const at::Tensor& row_offsets, int64_t in_features,
                                      const std::optional<at::Tensor>& bias, bool simd) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor, got ", x.dim(), "-D on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 (the sparse-rows CPU kernel is fp32 only), got ",
              x.scalar_type());
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K == in_features, "x has ", K, " features but the weight has in_features = ", in_features);
  TORCH_CHECK(in_features >= 1 && in_features <= INT32_MAX, "in_features must be in [1, 2^31), got ", in_features);
  TORCH_CHECK(values.dim() == 1 && values.device().is_cpu() && values.is_contiguous() &&
                  values.scalar_type() == at::kFloat,
              "values must be a contiguous 1-D float32 CPU tensor, got ", values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(col_indices.dim() == 1 && col_indices.device().is_cpu() && col_indices.is_contiguous() &&
                  (col_indices.scalar_type() == at::kShort || col_indices.scalar_type() == at::kInt),
              "col_indices must be a contiguous 1-D int16 or int32 CPU tensor, got ", col_indices.scalar_type(), " ",
              col_indices.sizes());
  TORCH_CHECK(col_indices.scalar_type() == at::kInt || in_features <= 32768,
              "col_indices is int16 but in_features = ", in_features, " needs int32 indices (int16 holds < 32768)");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) >= 1 && row_offsets.device().is_cpu() &&
                  row_offsets.is_contiguous() && row_offsets.scalar_type() == at::kInt,
              "row_offsets must be a contiguous 1-D int32 CPU tensor of out_features + 1 entries, got ",
              row_offsets.scalar_type(), " ", row_offsets.sizes());
  const int64_t nnz = values.numel(), N = row_offsets.size(0) - 1;
  TORCH_CHECK(col_indices.numel() == nnz, "col_indices has ", col_indices.numel(), " entries but values has ", nnz);
  const int32_t* offs = row_offsets.data_ptr<int32_t>();
  TORCH_CHECK(offs[0] == 0 && offs[N] == nnz, "row_offsets must start at 0 and end at nnz = ", nnz, ", got ",
              offs[0], " and ", offs[N]);
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(offs[n] <= offs[n + 1], "row_offsets decreases at row ", n, " (", offs[n], " -> ", offs[n + 1], ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu() &&
                    bias->scalar_type() == at::kFloat,
                "bias must be a float32 CPU tensor of shape (", N, "), got ", bias->scalar_type(), " ", bias->sizes());
  }
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Problem p{values.data_ptr<float>(), offs, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N,
            static_cast<uint32_t>(K)};
  const bool ok = col_indices.scalar_type() == at::kShort ? run(p, col_indices.data_ptr<int16_t>(), x, T, K, nnz, simd)
                                                         : run(p, col_indices.data_ptr<int32_t>(), x, T, K, nnz, simd);
  TORCH_CHECK(ok, "col_indices holds an index outside [0, in_features = ", in_features, ")");
  return y;
}

bool sparse_rows_linear_has_simd() {
#if SPARSEBERT_X86
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def(
      "sparse_rows_linear_fwd(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets, int in_features, "
      "Tensor? bias, bool simd=True) -> Tensor");
  m.def("sparse_rows_linear_has_simd() -> bool", &sparsebert::sparse_rows_linear_has_simd);
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) { m.impl("sparse_rows_linear_fwd", &sparsebert::sparse_rows_linear_fwd_cpu); }
