// Exact k-th smallest value by radix select (no sort). Each float maps to an order-preserving uint32
// key (flip all bits of negatives, set the sign bit of non-negatives); four passes each histogram one
// 8-bit digit (most significant first) of the keys that still match the prefix chosen so far, and a
// one-thread kernel picks the digit holding rank k. Everything stays on the device (no host sync).
// Torch-free.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.cuh"

namespace sparsebert {
namespace cuda {
namespace {

constexpr int kRadixBins = 256;
constexpr int kHistThreads = 256;
// workspace (uint64): [0, 256) histogram, then the state of the select
constexpr int kRank = kRadixBins, kPrefix = kRadixBins + 1, kPrefixMask = kRadixBins + 2, kWorkspaceElems = kRadixBins + 3;

__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__global__ void radix_init_kernel(unsigned long long* ws, long long k) {
  ws[threadIdx.x] = 0ull;
  if (threadIdx.x == 0) {
    ws[kRank] = static_cast<unsigned long long>(k);
    ws[kPrefix] = 0ull;
    ws[kPrefixMask] = 0ull;
  }
}

// The rank read on the device: clamped into [0, n - 1] (the edges are written by radix_finish_edges_kernel).
__global__ void radix_init_device_rank_kernel(unsigned long long* ws, const int64_t* k, long long n) {
  ws[threadIdx.x] = 0ull;
  if (threadIdx.x == 0) {
    const long long kk = static_cast<long long>(*k);
    ws[kRank] = static_cast<unsigned long long>(kk < 0 ? 0 : (kk >= n ? n - 1 : kk));
    ws[kPrefix] = 0ull;
    ws[kPrefixMask] = 0ull;
  }
}

// Histogram of digit (key >> shift) & 255 over keys whose already-chosen high digits match the prefix.
__global__ void __launch_bounds__(kHistThreads) radix_histogram_kernel(const float* values, long long n,
                                                                       unsigned long long* ws, int shift) {
  __shared__ unsigned int hist[kRadixBins];
  hist[threadIdx.x] = 0u;
  __syncthreads();
  const uint32_t prefix = static_cast<uint32_t>(ws[kPrefix]), prefix_mask = static_cast<uint32_t>(ws[kPrefixMask]);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = ordered_key(values[i]);
    if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  if (hist[threadIdx.x] != 0u) atomicAdd(&ws[threadIdx.x], static_cast<unsigned long long>(hist[threadIdx.x]));
}

// One thread: find the digit whose bin holds rank k, narrow the prefix, make k relative, clear the bins.
__global__ void radix_select_digit_kernel(unsigned long long* ws, int shift) {
  unsigned long long rank = ws[kRank], below = 0ull;
  int digit = kRadixBins - 1;
  for (int d = 0; d < kRadixBins; ++d) {
    if (rank < below + ws[d]) {
      digit = d;
      break;
    }
    below += ws[d];
  }
  ws[kRank] = rank - below;
  ws[kPrefix] |= static_cast<unsigned long long>(digit) << shift;
  ws[kPrefixMask] |= 0xffull << shift;
  for (int d = 0; d < kRadixBins; ++d) ws[d] = 0ull;
}

__global__ void radix_finish_kernel(const unsigned long long* ws, float* out) {
  out[0] = key_to_float(static_cast<uint32_t>(ws[kPrefix]));
}

// -inf when nothing is pruned, +inf when everything is (the host launcher's edges), else the selected value.
__global__ void radix_finish_edges_kernel(const unsigned long long* ws, const int64_t* k, long long n, float* out) {
  const long long kk = static_cast<long long>(*k);
  out[0] = kk <= 0 ? -__int_as_float(0x7f800000) : (kk >= n ? __int_as_float(0x7f800000)
                                                             : key_to_float(static_cast<uint32_t>(ws[kPrefix])));
}

int hist_blocks(int64_t n) {
  const long long blocks_needed = (n + kHistThreads * 8 - 1) / (kHistThreads * 8);  // ~8 elements per thread
  return static_cast<int>(blocks_needed < 1024 ? blocks_needed : 1024);
}

}  // namespace

int64_t topk_threshold_workspace_elems() { return kWorkspaceElems; }

cudaError_t topk_threshold_select(const float* values, int64_t n, int64_t k_prune, unsigned long long* workspace,
                                  float* out, cudaStream_t stream) {
  if (n <= 0 || k_prune < 0 || k_prune >= n) return cudaErrorInvalidValue;
  const int blocks = hist_blocks(n);
  radix_init_kernel<<<1, kRadixBins, 0, stream>>>(workspace, k_prune);
  for (int shift = 24; shift >= 0; shift -= 8) {
    radix_histogram_kernel<<<blocks, kHistThreads, 0, stream>>>(values, n, workspace, shift);
    radix_select_digit_kernel<<<1, 1, 0, stream>>>(workspace, shift);
  }
  radix_finish_kernel<<<1, 1, 0, stream>>>(workspace, out);
  return cudaGetLastError();
}

cudaError_t topk_threshold_select_device_rank(const float* values, int64_t n, const int64_t* k_prune,
                                              unsigned long long* workspace, float* out, cudaStream_t stream) {
  if (n <= 0 || k_prune == nullptr) return cudaErrorInvalidValue;
  const int blocks = hist_blocks(n);
  radix_init_device_rank_kernel<<<1, kRadixBins, 0, stream>>>(workspace, k_prune, n);
  for (int shift = 24; shift >= 0; shift -= 8) {
    radix_histogram_kernel<<<blocks, kHistThreads, 0, stream>>>(values, n, workspace, shift);
    radix_select_digit_kernel<<<1, 1, 0, stream>>>(workspace, shift);
  }
  radix_finish_edges_kernel<<<1, 1, 0, stream>>>(workspace, k_prune, n, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparsebert
