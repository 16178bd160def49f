// Bitmask SpMM on tensor cores ("load as sparse, compute as dense", after Flash-LLM and SpInfer's TCA-BME):
// y (M, N) = x (M, K) @ Wᵀ + bias, W (N, K) in the tc-bitmask format of sparsebert/ops/reference_formats.py.
//
// Format: W in 64 x 64 tiles, tile t = row_tile * KT + k_tile at data[tile_offsets[t] .. tile_offsets[t+1]):
// 64 uint64 words, one per 8 x 8 sub-tile in mma fragment order (word s = ((R*4 + S)*4 + Qc*2 + Qr) covers
// tile rows R*16 + Qr*8 + 0..7, columns S*16 + Qc*8 + 0..7, bit 8*row + col), then the nonzeros in word and
// bit order, zero-padded to 16 bytes. One tile is one contiguous, 16-byte aligned byte range, and so are
// the consecutive K tiles of a row tile.
//
// Kernel: one CTA of 4 warps per (64-row tile of W, K split, block of 8..64 tokens). Weights are the MMA
// M dimension (warp w owns tile rows 16w..16w+15), tokens the N dimension (TOKENS = 8 * N8 per CTA).
// Per K tile, cp.async copies the tile's words + values and the (TOKENS x 64) x slice into shared memory,
// double-buffered (tile i + 1 is in flight while tile i is computed). Decoding: each lane owns 2 sub-tiles'
// popcounts; one 5-step warp scan gives every sub-tile's value offset, a shuffle hands it to the lanes of
// the fragment, and a lane's two A elements (row g, columns 2t and 2t + 1 of an 8 x 8 sub-tile) sit at
// offset + popc(word & ((1 << (8g + 2t)) - 1)). No 2-D scans, no round trip of the decoded tile through
// shared memory: the fragments go straight into mma.sync.m16n8k16 with fp32 accumulators.
// Split-K inside the launch: every split stores its fp32 partial to `partials` (split, M, N); the last CTA
// of a (row tile, token block) to arrive (an atomic ticket per output tile) sums the partials in split
// order, adds the bias and writes y: deterministic, one launch. It resets its ticket to 0 for the next call.
// Supports fp16 and bf16 (tensor-core types); any M, N, K (edges are zero-padded in the format and masked
// in the kernel); x rows are copied with cp.async when K % 8 == 0 and x is 16-byte aligned, else by
// element loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launchers.cuh"

namespace sparsebert {
namespace cuda {
namespace {

constexpr int kTile = 64;                                  // weight rows and K columns per tile
constexpr int kThreads = 128;                              // 4 warps x 16 weight rows
constexpr int kHeaderBytes = 512;                          // 64 uint64 bitmask words
constexpr int kMaxTileBytes = kHeaderBytes + kTile * kTile * 2;  // all 4096 values of a 16-bit tile
constexpr int kXStride = kTile + 8;                        // x rows in shared memory: 144 B, conflict-free B loads

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TypeOps<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

template <typename T>
struct SpmmArgs {
  const T* x;
  const T* data;
  const int32_t* tile_offsets;
  const T* bias;
  T* y;
  float* partials;
  int32_t* tickets;
  int M, N, K, n_ktiles, ktiles_per_split, split;
  bool x_async;  // x rows may be copied in 16-byte chunks
};

template <typename T, int N8>
__global__ void __launch_bounds__(kThreads) bitmask_spmm_kernel(const SpmmArgs<T> p) {
  constexpr int kTokens = 8 * N8;
  __shared__ alignas(16) unsigned char w_s[2][kMaxTileBytes];
  __shared__ alignas(16) T x_s[2][kTokens][kXStride];
  __shared__ int last_flag;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_tile = blockIdx.x, split_idx = blockIdx.y, token0 = blockIdx.z * kTokens;
  const int kt_begin = split_idx * p.ktiles_per_split;
  const int kt_end = min(kt_begin + p.ktiles_per_split, p.n_ktiles);

  auto load_stage = [&](int kt, int buf) {
    const int t = row_tile * p.n_ktiles + kt;
    const int begin = __ldg(p.tile_offsets + t), end = __ldg(p.tile_offsets + t + 1);
    const int chunks = min(static_cast<int>((end - begin) * sizeof(T) / 16), kMaxTileBytes / 16);
    const unsigned char* src = reinterpret_cast<const unsigned char*>(p.data + begin);
    for (int c = tid; c < chunks; c += kThreads) cp_async16(&w_s[buf][16 * c], src + 16 * c);
    for (int c = tid; c < kTokens * (kTile / 8); c += kThreads) {
      const int r = c >> 3, col = (c & 7) * 8;
      const int gm = token0 + r, gk = kt * kTile + col;
      T* dst = &x_s[buf][r][col];
      if (p.x_async && gm < p.M && gk + 8 <= p.K) {
        cp_async16(dst, p.x + static_cast<size_t>(gm) * p.K + gk);
      } else {
        for (int e = 0; e < 8; ++e)
          dst[e] = (gm < p.M && gk + e < p.K) ? p.x[static_cast<size_t>(gm) * p.K + gk + e] : TypeOps<T>::from_float(0.f);
      }
    }
    cp_async_commit();
  };

  float acc[N8][4];
#pragma unroll
  for (int n = 0; n < N8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  const int g = lane >> 2, tq = lane & 3;
  const int bitpos = 8 * g + 2 * tq;
  const unsigned long long below = (1ull << bitpos) - 1ull;

  load_stage(kt_begin, 0);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int buf = (kt - kt_begin) & 1;
    if (kt + 1 < kt_end) {
      load_stage(kt + 1, buf ^ 1);
    } else {
      cp_async_commit();  // an empty group keeps "all but the newest group done" meaning "this stage done"
    }
    cp_async_wait_one();
    __syncthreads();

    const unsigned long long* words = reinterpret_cast<const unsigned long long*>(w_s[buf]);
    const uint16_t* vals = reinterpret_cast<const uint16_t*>(w_s[buf] + kHeaderBytes);
    // Value offsets of sub-tiles 2*lane and 2*lane + 1: an exclusive warp scan of the popcounts.
    const int c0 = __popcll(words[2 * lane]), c1 = __popcll(words[2 * lane + 1]);
    int incl = c0 + c1;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    const int off_even = incl - c0 - c1, off_odd = off_even + c0;

#pragma unroll
    for (int s = 0; s < 4; ++s) {  // k16 steps of the tile
      uint32_t a[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // A registers: (rows 0-7 | 8-15) x (columns 0-7 | 8-15) of the step
        const int sub = warp * 16 + s * 4 + q;
        const int off = __shfl_sync(0xffffffffu, (q & 1) ? off_odd : off_even, sub >> 1);
        const unsigned long long word = words[sub];
        const uint32_t b0 = static_cast<uint32_t>(word >> bitpos) & 1u;
        const uint32_t b1 = static_cast<uint32_t>(word >> (bitpos + 1)) & 1u;
        const int idx = off + __popcll(word & below);
        const uint32_t lo = b0 ? vals[idx] : 0u;
        const uint32_t hi = b1 ? vals[idx + b0] : 0u;
        a[q] = lo | (hi << 16);
      }
#pragma unroll
      for (int n = 0; n < N8; ++n) {
        const T* xr = &x_s[buf][n * 8 + g][s * 16 + 2 * tq];
        const uint32_t xb0 = *reinterpret_cast<const uint32_t*>(xr);
        const uint32_t xb1 = *reinterpret_cast<const uint32_t*>(xr + 8);
        TypeOps<T>::mma(acc[n], a, xb0, xb1);
      }
    }
    __syncthreads();  // buffer `buf` is overwritten by the load issued in the next iteration
  }

  // Epilogue. Accumulator c of n8 tile n: rows (weights) g, g + 8; columns (tokens) 2tq, 2tq + 1.
  const int row_base = row_tile * kTile + warp * 16 + g;
  const int tok_base = token0 + 2 * tq;
  if (p.split > 1) {
#pragma unroll
    for (int n = 0; n < N8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row_base + (e >> 1) * 8, tok = tok_base + n * 8 + (e & 1);
        if (row < p.N && tok < p.M)
          p.partials[(static_cast<size_t>(split_idx) * p.M + tok) * p.N + row] = acc[n][e];
      }
    __threadfence();
    __syncthreads();
    int32_t* ticket = p.tickets + blockIdx.z * gridDim.x + row_tile;
    if (tid == 0) last_flag = atomicAdd(ticket, 1) == p.split - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
    // Splits outermost, the thread's 4 * N8 outputs innermost: each split's loads are independent and in
    // flight together (one L2 round trip per split), where a per-output loop over the splits chained one
    // load after another. Every output still sums its splits in ascending order: bitwise reproducible.
#pragma unroll
    for (int n = 0; n < N8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int s = 0; s < p.split; ++s) {
      const float* slice = p.partials + static_cast<size_t>(s) * p.M * p.N;
#pragma unroll
      for (int n = 0; n < N8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_base + (e >> 1) * 8, tok = tok_base + n * 8 + (e & 1);
          if (row < p.N && tok < p.M) acc[n][e] += __ldcg(slice + static_cast<size_t>(tok) * p.N + row);
        }
    }
    if (tid == 0) *ticket = 0;
  }
#pragma unroll
  for (int n = 0; n < N8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row_base + (e >> 1) * 8, tok = tok_base + n * 8 + (e & 1);
      if (row < p.N && tok < p.M) {
        const float b = p.bias ? TypeOps<T>::to_float(p.bias[row]) : 0.f;
        p.y[static_cast<size_t>(tok) * p.N + row] = TypeOps<T>::from_float(acc[n][e] + b);
      }
    }
}

template <typename T, int N8>
cudaError_t launch(const BitmaskSpmmPlan& plan, const SpmmArgs<T>& args, cudaStream_t stream) {
  const dim3 grid(plan.row_tiles, plan.split, plan.token_blocks);
  bitmask_spmm_kernel<T, N8><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const BitmaskSpmmPlan& plan, const void* x, const void* data, const int32_t* tile_offsets,
                const void* bias, void* y, float* partials, int32_t* tickets, int M, int N, int K,
                cudaStream_t stream) {
  SpmmArgs<T> args{static_cast<const T*>(x), static_cast<const T*>(data), tile_offsets, static_cast<const T*>(bias),
                   static_cast<T*>(y), partials, tickets, M, N, K, plan.n_ktiles, plan.ktiles_per_split, plan.split,
                   K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0};
  switch (plan.tokens_per_cta) {
    case 8: return launch<T, 1>(plan, args, stream);
    case 16: return launch<T, 2>(plan, args, stream);
    case 32: return launch<T, 4>(plan, args, stream);
    default: return launch<T, 8>(plan, args, stream);
  }
}

}  // namespace

BitmaskSpmmPlan bitmask_spmm_plan(int M, int N, int K, int split_k, int num_sms) {
  BitmaskSpmmPlan plan{};
  plan.row_tiles = (N + kTile - 1) / kTile;
  plan.n_ktiles = (K + kTile - 1) / kTile;
  int tokens = 8;
  while (tokens < 64 && tokens < M) tokens *= 2;
  plan.tokens_per_cta = tokens;
  plan.token_blocks = std::max(1, (M + tokens - 1) / tokens);
  int want = split_k;
  if (want <= 0) {  // about two CTAs per SM, at least two K tiles per split (so the pipeline has depth)
    const int ctas = plan.row_tiles * plan.token_blocks;
    want = std::min((2 * std::max(num_sms, 1) + ctas - 1) / ctas, std::max(1, plan.n_ktiles / 2));
  }
  want = std::max(1, std::min(want, plan.n_ktiles));
  plan.ktiles_per_split = (plan.n_ktiles + want - 1) / want;
  plan.split = (plan.n_ktiles + plan.ktiles_per_split - 1) / plan.ktiles_per_split;  // no empty split
  return plan;
}

cudaError_t bitmask_spmm_forward(DType dtype, const BitmaskSpmmPlan& plan, const void* x, const void* data,
                                 const int32_t* tile_offsets, const void* bias, void* y, float* partials,
                                 int32_t* tickets, int M, int N, int K, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || reinterpret_cast<uintptr_t>(data) % 16 != 0 ||
      (plan.split > 1 && (partials == nullptr || tickets == nullptr)))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::BFloat16:
      return run<__nv_bfloat16>(plan, x, data, tile_offsets, bias, y, partials, tickets, M, N, K, stream);
    case DType::Float16:
      return run<__half>(plan, x, data, tile_offsets, bias, y, partials, tickets, M, N, K, stream);
    default:
      return cudaErrorInvalidValue;  // tensor-core kernel: 16-bit types only
  }
}

}  // namespace cuda
}  // namespace sparsebert
