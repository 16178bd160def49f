// pack_mask / unpack_mask on the GPU. Packing: one warp per 32-bit word; lane l reads element
// 32 * word + l (coalesced) and __ballot_sync gathers the bits, lane l -> bit l (LSB first); bits past K
// are 0. Unpacking: one thread per element. Grid-stride loops, any shape. Torch-free.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.cuh"

namespace sparsebert {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) pack_mask_kernel(const uint8_t* mask, long long rows, long long K,
                                                               uint32_t* packed) {
  const long long words_per_row = (K + 31) / 32, total_words = rows * words_per_row;
  const long long warps_in_grid = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  // w is the same for the 32 lanes of a warp, so the loop condition is warp-uniform (ballot is safe)
  for (long long w = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w < total_words;
       w += warps_in_grid) {
    const long long row = w / words_per_row, k = (w % words_per_row) * 32 + lane;
    const bool bit = k < K && mask[row * K + k] != 0;
    const unsigned int word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) packed[w] = word;
  }
}

__global__ void __launch_bounds__(kThreads) unpack_mask_kernel(const uint32_t* packed, long long rows, long long K,
                                                                 uint8_t* mask) {
  const long long words_per_row = (K + 31) / 32, total = rows * K;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long row = i / K, k = i % K;
    mask[i] = static_cast<uint8_t>((packed[row * words_per_row + (k >> 5)] >> (k & 31)) & 1u);
  }
}

int grid_for(long long work_items) {
  const long long blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t pack_mask(const uint8_t* mask, int64_t rows, int64_t K, int32_t* packed, cudaStream_t stream) {
  if (rows < 0 || K < 0) return cudaErrorInvalidValue;
  const long long total_words = rows * ((K + 31) / 32);
  if (total_words == 0) return cudaSuccess;
  pack_mask_kernel<<<grid_for(total_words * 32), kThreads, 0, stream>>>(mask, rows, K,
                                                                         reinterpret_cast<uint32_t*>(packed));
  return cudaGetLastError();
}

cudaError_t unpack_mask(const int32_t* packed, int64_t rows, int64_t K, uint8_t* mask, cudaStream_t stream) {
  if (rows < 0 || K < 0) return cudaErrorInvalidValue;
  if (rows * K == 0) return cudaSuccess;
  unpack_mask_kernel<<<grid_for(rows * K), kThreads, 0, stream>>>(reinterpret_cast<const uint32_t*>(packed), rows, K,
                                                                   mask);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparsebert
