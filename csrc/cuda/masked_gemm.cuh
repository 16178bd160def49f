// One tiled GEMM for every masked-linear product, device code only (included by the .cu files).
//
//   mode         output (P x Q)   reduction R   A(p, r)          B(r, q)                    epilogue
//   Forward      y  (M x N)        K            x[p, r]          weight[q, r] * keep(q, r)  + bias[q]
//   InputGrad    dx (M x K)        N            dy[p, r]         weight[r, q] * keep(r, q)  -
//   WeightGrad   G  (N x K)        M            dy[r, p]         x[r, q]                    dscores = G*W, dweight = G*keep
//
// The mask policy (bytes / packed bits / scores >= threshold) is applied by the B-tile loader while
// the weight tile is staged into shared memory, so W ⊙ m never exists in global memory; for the
// weight gradient it is applied in the epilogue instead. Half and bfloat16 use tensor cores
// (nvcuda::wmma 16x16x16, fp32 accumulators, sm_80+); float uses a SIMT 4x4-per-thread micro-tile
// with fp32 FMAs (exact fp32, no TF32). Every global access is bound-checked: any M, N, K works.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "launchers.cuh"

namespace sparsebert {
namespace cuda {

// --- scalar conversions ------------------------------------------------------------------------------
template <typename T>
__host__ __device__ __forceinline__ float to_float(T v);
template <>
__host__ __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__host__ __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// --- mask policies: keep(n, k) for an in-bounds weight element -------------------------------------------
struct ByteMask {
  using score_t = float;  // no scores: the dscores output is never written
  const uint8_t* mask;
  int K;
  __device__ __forceinline__ bool keep(int n, int k) const { return mask[int64_t(n) * K + k] != 0; }
};

struct BitMask {
  using score_t = float;
  const uint32_t* words;
  int words_per_row;
  __device__ __forceinline__ bool keep(int n, int k) const {
    return (words[int64_t(n) * words_per_row + (k >> 5)] >> (k & 31)) & 1u;
  }
};

template <typename S>
struct ScoreMask {
  using score_t = S;
  const S* scores;
  int K;
  const float* threshold;  // device pointer (one fp32), rounded to S as torch compares it
  __device__ __forceinline__ bool keep(int n, int k) const {
    return to_float(scores[int64_t(n) * K + k]) >= to_float(from_float<S>(__ldg(threshold)));
  }
};

enum class GemmMode { Forward, InputGrad, WeightGrad };

template <typename T, typename Mask>
struct GemmParams {
  const T* a;        // Forward: x (M, K); InputGrad and WeightGrad: dy (M, N)
  const T* b;        // Forward and InputGrad: weight (N, K); WeightGrad: x (M, K)
  const T* bias;     // Forward: (N,) or null
  const T* weight;   // WeightGrad with dscores: weight (N, K)
  T* out;            // Forward: y (M, N); InputGrad: dx (M, K); WeightGrad: dweight (N, K) or null
  typename Mask::score_t* dscores;  // WeightGrad: (N, K) or null
  Mask mask;
  int M, N, K;
};

template <GemmMode mode, typename Params>
__host__ __device__ __forceinline__ int out_rows(const Params& p) { return mode == GemmMode::WeightGrad ? p.N : p.M; }
template <GemmMode mode, typename Params>
__host__ __device__ __forceinline__ int out_cols(const Params& p) { return mode == GemmMode::Forward ? p.N : p.K; }
template <GemmMode mode, typename Params>
__host__ __device__ __forceinline__ int reduce_len(const Params& p) {
  return mode == GemmMode::Forward ? p.K : (mode == GemmMode::InputGrad ? p.N : p.M);
}

// Which tile dimension is contiguous in global memory (the loaders walk it fastest, for coalescing).
template <GemmMode mode>
__host__ __device__ constexpr bool a_contiguous_in_r() { return mode != GemmMode::WeightGrad; }
template <GemmMode mode>
__host__ __device__ constexpr bool b_contiguous_in_q() { return mode != GemmMode::Forward; }

// A(p, r) and B(r, q) of the table above, for in-bounds indices.
template <GemmMode mode, typename T, typename Mask>
__device__ __forceinline__ T load_a(const GemmParams<T, Mask>& p, int pi, int r) {
  if (mode == GemmMode::Forward) return p.a[int64_t(pi) * p.K + r];
  if (mode == GemmMode::InputGrad) return p.a[int64_t(pi) * p.N + r];
  return p.a[int64_t(r) * p.N + pi];
}

template <GemmMode mode, typename T, typename Mask>
__device__ __forceinline__ T load_b(const GemmParams<T, Mask>& p, int r, int q) {
  if (mode == GemmMode::Forward) return p.mask.keep(q, r) ? p.b[int64_t(q) * p.K + r] : from_float<T>(0.f);
  if (mode == GemmMode::InputGrad) return p.mask.keep(r, q) ? p.b[int64_t(r) * p.K + q] : from_float<T>(0.f);
  return p.b[int64_t(r) * p.K + q];
}

// Copy a ROWS x COLS tile into shared memory (row stride ld), zero outside the matrix; fetch(i, j)
// reads element (i, j) of the tile. The contiguous global dimension varies fastest across threads.
template <int ROWS, int COLS, bool kColsContiguous, int kThreads, typename S, typename Fetch>
__device__ __forceinline__ void stage_tile(S* tile, int ld, Fetch fetch) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int i = kColsContiguous ? e / COLS : e % ROWS;
    const int j = kColsContiguous ? e % COLS : e / ROWS;
    tile[i * ld + j] = fetch(i, j);
  }
}

template <GemmMode mode, int BM, int BN, int BK, int kThreads, typename S, typename T, typename Mask>
__device__ __forceinline__ void stage_a_b(const GemmParams<T, Mask>& p, S* As, int lda, S* Bs, int ldb, int p0, int q0,
                                          int r0) {
  const int P = out_rows<mode>(p), Q = out_cols<mode>(p), R = reduce_len<mode>(p);
  stage_tile<BM, BK, a_contiguous_in_r<mode>(), kThreads>(As, lda, [&](int i, int j) {
    const int pi = p0 + i, r = r0 + j;
    return (pi < P && r < R) ? static_cast<S>(load_a<mode>(p, pi, r)) : static_cast<S>(from_float<T>(0.f));
  });
  stage_tile<BK, BN, b_contiguous_in_q<mode>(), kThreads>(Bs, ldb, [&](int i, int j) {
    const int r = r0 + i, q = q0 + j;
    return (r < R && q < Q) ? static_cast<S>(load_b<mode>(p, r, q)) : static_cast<S>(from_float<T>(0.f));
  });
}

// Output element (pi, q), in bounds, from its fp32 accumulator.
template <GemmMode mode, typename T, typename Mask>
__device__ __forceinline__ void epilogue(const GemmParams<T, Mask>& p, int pi, int q, float acc) {
  if (mode == GemmMode::Forward) {
    if (p.bias != nullptr) acc += to_float(p.bias[q]);
    p.out[int64_t(pi) * p.N + q] = from_float<T>(acc);
  } else if (mode == GemmMode::InputGrad) {
    p.out[int64_t(pi) * p.K + q] = from_float<T>(acc);
  } else {  // (pi, q) = (n, k)
    const int64_t idx = int64_t(pi) * p.K + q;
    if (p.dscores != nullptr)
      p.dscores[idx] = from_float<typename Mask::score_t>(acc * to_float(p.weight[idx]));
    if (p.out != nullptr) p.out[idx] = from_float<T>(p.mask.keep(pi, q) ? acc : 0.f);
  }
}

// --- tensor-core kernel (half / bfloat16): 64x64 block tile, BK = 32, 4 warps each owning 32x32 -------
constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32, kTcThreads = 128;

template <GemmMode mode, typename T, typename Mask>
__global__ void __launch_bounds__(kTcThreads) masked_gemm_tc_kernel(GemmParams<T, Mask> p) {
  using namespace nvcuda;
  constexpr int BM = kTcBM, BN = kTcBN, BK = kTcBK;
  constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded; keeps wmma's 32-byte alignment
  __shared__ __align__(32) T As[BM * LDA];
  __shared__ __align__(32) T Bs[BK * LDB];
  __shared__ __align__(32) float Cs[BM * LDC];

  const int P = out_rows<mode>(p), Q = out_cols<mode>(p), R = reduce_len<mode>(p);
  const int p0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32;
  const int wp = (warp / 2) * 32, wq = (warp % 2) * 32;  // this warp's 32x32 corner in the block tile

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int r0 = 0; r0 < R; r0 += BK) {
    stage_a_b<mode, BM, BN, BK, kTcThreads>(p, As, LDA, Bs, LDB, p0, q0, r0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wp + 16 * i) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * LDB + wq + 16 * j, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wp + 16 * i) * LDC + wq + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kTcThreads) {
    const int i = e / BN, j = e % BN;
    if (p0 + i < P && q0 + j < Q) epilogue<mode>(p, p0 + i, q0 + j, Cs[i * LDC + j]);
  }
}

// --- SIMT kernel (float): 64x64 block tile, BK = 16, 256 threads each owning a strided 4x4 ---------------
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

template <GemmMode mode, typename Mask>
__global__ void __launch_bounds__(kSimtThreads) masked_gemm_simt_kernel(GemmParams<float, Mask> p) {
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK;
  constexpr int LDA = BK + 1, LDB = BN + 1;
  __shared__ float As[BM * LDA];
  __shared__ float Bs[BK * LDB];

  const int P = out_rows<mode>(p), Q = out_cols<mode>(p), R = reduce_len<mode>(p);
  const int p0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // thread owns rows ty + 16i, cols tx + 16j

  float acc[4][4] = {};
  for (int r0 = 0; r0 < R; r0 += BK) {
    stage_a_b<mode, BM, BN, BK, kSimtThreads>(p, As, LDA, Bs, LDB, p0, q0, r0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < BK; ++r) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * LDA + r];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[r * LDB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int pi = p0 + ty + 16 * i, q = q0 + tx + 16 * j;
      if (pi < P && q < Q) epilogue<mode>(p, pi, q, acc[i][j]);
    }
}

// --- launch ---------------------------------------------------------------------------------------------
template <GemmMode mode, typename T, typename Mask>
cudaError_t launch_masked_gemm(const GemmParams<T, Mask>& p, cudaStream_t stream) {
  const int P = out_rows<mode>(p), Q = out_cols<mode>(p);
  if (P <= 0 || Q <= 0) return cudaSuccess;
  if (p.M < 0 || p.N < 0 || p.K < 0) return cudaErrorInvalidValue;
  if constexpr (std::is_same<T, float>::value) {
    const dim3 grid((P + kSimtBM - 1) / kSimtBM, (Q + kSimtBN - 1) / kSimtBN);
    if (grid.y > 65535u) return cudaErrorInvalidValue;
    masked_gemm_simt_kernel<mode, Mask><<<grid, kSimtThreads, 0, stream>>>(p);
  } else {
    const dim3 grid((P + kTcBM - 1) / kTcBM, (Q + kTcBN - 1) / kTcBN);
    if (grid.y > 65535u) return cudaErrorInvalidValue;
    masked_gemm_tc_kernel<mode, T, Mask><<<grid, kTcThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
struct DeviceType;
template <>
struct DeviceType<float> {
  static constexpr DType value = DType::Float32;
};
template <>
struct DeviceType<__half> {
  static constexpr DType value = DType::Float16;
};
template <>
struct DeviceType<__nv_bfloat16> {
  static constexpr DType value = DType::BFloat16;
};

// Call f(T{}) with T the device type of `dtype`; cudaErrorInvalidValue for an unknown dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Call f(mask_policy) with the policy described by `spec` for an (N, K) weight.
template <typename F>
cudaError_t dispatch_mask(const MaskSpec& spec, int K, F&& f) {
  switch (spec.kind) {
    case MaskKind::Bytes: return f(ByteMask{static_cast<const uint8_t*>(spec.data), K});
    case MaskKind::Bits: return f(BitMask{static_cast<const uint32_t*>(spec.data), (K + 31) / 32});
    case MaskKind::Scores:
      return dispatch_dtype(spec.scores_dtype, [&](auto s) {
        using S = decltype(s);
        return f(ScoreMask<S>{static_cast<const S*>(spec.data), K, spec.threshold});
      });
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsebert
