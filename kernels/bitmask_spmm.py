"""Triton fallback of the tc-bitmask SpMM: y = x @ W.T + bias, W in the tile-contiguous bitmask format.

Format (sparsebert/ops/reference_formats.py, "tc-bitmask"): per 64 x 64 tile of W, 64 uint64 words (one
per 8 x 8 sub-tile, in mma fragment order) then the packed nonzeros, 16-byte aligned, located by
`tile_offsets`. The CUDA kernel (csrc/cuda/bitmask_spmm.cu) is the fast path; this one reads the same
bytes on any Triton device (and under the interpreter).

Each program owns a 64-row tile of W, a BLOCK_M block of tokens and a contiguous range of K tiles (its
split). Per K tile: the 64 words are loaded once; each sub-tile's value offset is a 1-D prefix sum of 64
popcounts; each element's position inside its sub-tile is popcount(word & ((1 << p) - 1)) (SWAR popcount,
no 2-D scan). The values are gathered in sub-tile order, permuted to the (row, column) tile and fed to
`tl.dot`. Split-K partials go to a (SPLIT_K, M, N) fp32 buffer that one reduction kernel sums in a
fixed order and rounds (`_gemm.reduce_split_k`: bitwise-reproducible, one launch where torch's sum and
cast took two), the bias is added by split 0.
"""
import torch
import triton
import triton.language as tl

from ._gemm import reduce_split_k
from ._interpreter import exact_dot

TILE = 64
HEADER_BYTES = 512


@triton.jit
def _popcount64(v):
    """Number of set bits of each int64 (two's complement); arithmetic shifts are masked off."""
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (v * 0x0101010101010101) >> 56


@triton.jit
def _bitmask_spmm_kernel(
    x_ptr, data_ptr, words_ptr, tile_offsets_ptr, bias_ptr, y_ptr,
    M, N, K, n_ktiles, ktiles_per_split, stride_xm,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, ELEM_BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HEADER: tl.constexpr = 512 // ELEM_BYTES
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = pid_n * 64 + tl.arange(0, 64)
    cols = tl.arange(0, 64)
    sub = tl.arange(0, 64)  # sub-tile index s
    pos = tl.arange(0, 64).to(tl.int64)  # bit position p inside a sub-tile
    below_mask = (tl.full((64,), 1, tl.int64) << pos) - 1  # bits under p
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    kt_begin = pid_k * ktiles_per_split
    kt_end = tl.minimum(kt_begin + ktiles_per_split, n_ktiles)
    for kt in range(kt_begin, kt_end):
        start = tl.load(tile_offsets_ptr + pid_n * n_ktiles + kt).to(tl.int64)
        words = tl.load(words_ptr + start * ELEM_BYTES // 8 + sub)  # (64,) int64
        counts = _popcount64(words).to(tl.int32)
        sub_start = tl.cumsum(counts, axis=0) - counts  # 1-D, 64 entries
        present = ((words[:, None] >> pos[None, :]) & 1) != 0  # (s, p)
        rank = _popcount64(words[:, None] & below_mask[None, :]).to(tl.int32)
        where = start + HEADER + (sub_start[:, None] + rank).to(tl.int64)
        vals = tl.load(data_ptr + where, mask=present, other=0.0)  # (s, p) in sub-tile order
        # s = ((R*4 + S)*4 + Qc*2 + Qr), p = ri*8 + ci  ->  row R*16 + Qr*8 + ri, column S*16 + Qc*8 + ci
        w = tl.reshape(tl.permute(tl.reshape(vals, (4, 4, 2, 2, 8, 8)), (0, 3, 4, 1, 2, 5)), (64, 64))
        offs_k = kt * 64 + cols
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if IEEE:  # fp32 inputs, or 16-bit under the interpreter (see kernels/_interpreter.py): exact fp32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    n_ok = rows < N
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + rows[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # y is (SPLIT_K, M, N) fp32: one slice per split
        tl.store(y_ptrs + pid_k.to(tl.int64) * M * N, acc, mask=y_mask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(m: int, n: int, n_ktiles: int, device: torch.device) -> int:
    """Split the K tiles until there are about two programs per SM (few tokens give few output tiles)."""
    tiles = triton.cdiv(n, TILE) * triton.cdiv(m, 64)
    want = triton.cdiv(2 * _num_sms(device), max(tiles, 1))
    return max(1, min(want, n_ktiles, 16))


def bitmask_spmm_fwd(x, data, tile_offsets, bias, out_features: int, in_features: int, split_k: int = 0):
    """x (M, K) contiguous -> y (M, N) in x's dtype. Inputs are validated by sparsebert.ops.bitmask_spmm.
    split_k = 0 picks it from the shape."""
    m, k = x.shape
    n = out_features
    n_ktiles = triton.cdiv(k, TILE)
    if split_k <= 0:
        split_k = choose_split_k(m, n, n_ktiles, x.device)
    per_split = triton.cdiv(n_ktiles, max(1, min(split_k, n_ktiles)))
    split_k = triton.cdiv(n_ktiles, per_split)  # no empty split
    if split_k == 1:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        y = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    block_m = min(64, max(16, triton.next_power_of_2(max(m, 1))))
    grid = (triton.cdiv(n, TILE), split_k, triton.cdiv(m, block_m))
    _bitmask_spmm_kernel[grid](
        x, data, data.view(torch.int64), tile_offsets, bias if bias is not None else x, y,
        m, n, k, n_ktiles, per_split, x.stride(0),
        HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype), SPLIT_K=split_k, ELEM_BYTES=x.element_size(),
        BLOCK_M=block_m, num_warps=4,
    )
    if split_k == 1:
        return y
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    reduce_split_k(y, None, out, split_k)  # bias already in split 0's partial
    return out
