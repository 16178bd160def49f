// bitmask_linear on CPU: y = x @ Wᵀ + b with W in the tiled bitmask format (see
// sparsebert/ops/reference_formats.py): values (nnz,) in tile-major order (TILE_N x TILE_K tiles, row-major
// grid, row-major inside a tile), bitmask (N, ceil(K/32)) int32 (bit k%32 of word k/32, LSB first),
// tile_offsets (ceil(N/TILE_N), ceil(K/TILE_K)) int32 = index of each tile's first nonzero.
//
// One parallel task per tile row. It walks the tiles in storage order, finds each nonzero's column by
// count-trailing-zeros over the bitmask words, reads its value in order and accumulates
// acc[r][m] += v * xᵀ[k][m]: contiguous over the tokens (vectorizes), work M * nnz instead of M * N * K,
// W never densified. Each tile's value range is checked against `values` before it is read.
#include <torch/library.h>

#include <vector>

#include "sparsebert_cpu.h"

namespace sparsebert {

at::Tensor bitmask_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                  const at::Tensor& tile_offsets, int64_t in_features, int64_t tile_n,
                                  int64_t tile_k, const std::optional<at::Tensor>& bias) {
  check_float_2d(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K == in_features, "x has ", K, " features but the weight has in_features = ", in_features);
  TORCH_CHECK(tile_n > 0 && tile_k > 0 && tile_k % 32 == 0, "tile_k must be a positive multiple of 32, got ",
              tile_k, " (tile_n ", tile_n, ")");
  TORCH_CHECK(values.dim() == 1 && values.device().is_cpu() && values.is_contiguous(),
              "values must be a contiguous 1-D CPU tensor, got shape ", values.sizes());
  check_same_dtype(values, "values", x, "x");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() &&
                  bitmask.device().is_cpu(),
              "bitmask must be a contiguous 2-D int32 CPU tensor, got ", bitmask.scalar_type(), " ", bitmask.sizes());
  const int64_t N = bitmask.size(0), n_words = packed_words(K);
  TORCH_CHECK(bitmask.size(1) == n_words, "bitmask must have ", n_words, " words per row for ", K,
              " in_features, got ", bitmask.size(1));
  const int64_t n_ntiles = (N + tile_n - 1) / tile_n, n_ktiles = (K + tile_k - 1) / tile_k;
  TORCH_CHECK(tile_offsets.dim() == 2 && tile_offsets.scalar_type() == at::kInt && tile_offsets.is_contiguous() &&
                  tile_offsets.size(0) == n_ntiles && tile_offsets.size(1) == n_ktiles,
              "tile_offsets must be a contiguous int32 tensor of shape (", n_ntiles, ", ", n_ktiles, "), got ",
              tile_offsets.scalar_type(), " ", tile_offsets.sizes());
  check_bias(bias, x, N);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xt = x.t().to(at::kFloat).contiguous();  // (K, M): tokens contiguous for the axpy
  const float* xt_p = xt.data_ptr<float>();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int32_t* offsets = tile_offsets.data_ptr<int32_t>();
  const int64_t nnz = values.numel();
  const int64_t words_per_tile = tile_k / 32;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitmask_linear_fwd_cpu", [&] {
    const scalar_t* vals = values.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, n_ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(tile_n * M);  // the tile row's outputs, tokens contiguous per row
      for (int64_t tn = t0; tn < t1; ++tn) {
        const int64_t n0 = tn * tile_n, rows = std::min(tile_n, N - n0);
        for (int64_t r = 0; r < rows; ++r) {
          const float init = b ? static_cast<float>(b[n0 + r]) : 0.f;
          std::fill(acc.begin() + r * M, acc.begin() + (r + 1) * M, init);
        }
        for (int64_t kt = 0; kt < n_ktiles; ++kt) {
          const int64_t w0 = kt * words_per_tile, w1 = std::min(w0 + words_per_tile, n_words);
          int64_t pos = offsets[tn * n_ktiles + kt], count = 0;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t w = w0; w < w1; ++w) count += __builtin_popcount(words[(n0 + r) * n_words + w]);
          TORCH_CHECK(pos >= 0 && pos + count <= nnz, "tile (", tn, ", ", kt, ") needs values[", pos, ":",
                      pos + count, "] but values has ", nnz, " entries: bitmask, tile_offsets and values disagree");
          // Row-major inside the tile: the storage order of `values`.
          for (int64_t r = 0; r < rows; ++r) {
            float* a = acc.data() + r * M;
            for (int64_t w = w0; w < w1; ++w) {
              uint32_t word = words[(n0 + r) * n_words + w];
              while (word) {
                const int64_t k = w * 32 + __builtin_ctz(word);
                word &= word - 1;
                const float v = static_cast<float>(vals[pos++]);
                const float* xk = xt_p + k * M;
                for (int64_t m = 0; m < M; ++m) a[m] += v * xk[m];
              }
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t m = 0; m < M; ++m) out[m * N + n0 + r] = static_cast<scalar_t>(acc[r * M + m]);
      }
    });
  });
  return y;
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def(
      "bitmask_linear_fwd(Tensor x, Tensor values, Tensor bitmask, Tensor tile_offsets, int in_features, "
      "int tile_n, int tile_k, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) { m.impl("bitmask_linear_fwd", &sparsebert::bitmask_linear_fwd_cpu); }
