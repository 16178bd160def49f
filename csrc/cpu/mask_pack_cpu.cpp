// pack_mask / unpack_mask on CPU. Packed format (docs/ARCHITECTURE.md): int32 words, shape
// (..., ceil(K / 32)); bit k % 32 (LSB first) of word k / 32 is mask[..., k]; padding bits are 0.
// Leading dimensions are flattened into rows; one parallel pass over rows.
#include <torch/library.h>

#include "sparsebert_cpu.h"

namespace sparsebert {

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "mask must be a CPU tensor, got ", mask.device());
  TORCH_CHECK(mask.dim() >= 1, "mask must have at least one dimension");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, "mask must be bool or uint8, got ",
              mask.scalar_type());
  const at::Tensor m = mask.contiguous();
  const int64_t K = m.size(-1), W = packed_words(K), rows = K == 0 ? 0 : m.numel() / K;
  std::vector<int64_t> out_shape(m.sizes().begin(), m.sizes().end());
  out_shape.back() = W;
  at::Tensor packed = at::empty(out_shape, m.options().dtype(at::kInt));
  const uint8_t* src = static_cast<const uint8_t*>(m.data_ptr());
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  at::parallel_for(0, rows, rows_per_task(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t k0 = w * 32, k1 = std::min<int64_t>(k0 + 32, K);
        uint32_t word = 0;
        for (int64_t k = k0; k < k1; ++k) word |= static_cast<uint32_t>(src[r * K + k] != 0) << (k - k0);
        dst[r * W + w] = word;
      }
    }
  });
  return packed;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, int64_t in_features) {
  TORCH_CHECK(packed.device().is_cpu(), "packed must be a CPU tensor, got ", packed.device());
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least one dimension");
  TORCH_CHECK(packed.scalar_type() == at::kInt, "packed must be int32, got ", packed.scalar_type());
  TORCH_CHECK(in_features >= 0, "in_features must be >= 0, got ", in_features);
  const int64_t K = in_features, W = packed_words(K);
  TORCH_CHECK(packed.size(-1) == W, "packed must have ceil(in_features / 32) = ", W, " words per row, got ",
              packed.size(-1));
  const at::Tensor p = packed.contiguous();
  const int64_t rows = W == 0 ? 0 : p.numel() / W;
  std::vector<int64_t> out_shape(p.sizes().begin(), p.sizes().end());
  out_shape.back() = K;
  at::Tensor mask = at::empty(out_shape, p.options().dtype(at::kBool));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  bool* dst = mask.data_ptr<bool>();
  at::parallel_for(0, rows, rows_per_task(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k) dst[r * K + k] = (src[r * W + (k >> 5)] >> (k & 31)) & 1u;
  });
  return mask;
}

}  // namespace sparsebert

TORCH_LIBRARY_FRAGMENT(sparsebert_ext, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor packed, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsebert_ext, CPU, m) {
  m.impl("pack_mask", &sparsebert::pack_mask_cpu);
  m.impl("unpack_mask", &sparsebert::unpack_mask_cpu);
}
