"""Bitmask-compressed linear, "load as sparse, compute as dense": y = x @ W.T + bias.

W (N, K) is stored as its nonzero `values` (tile by tile, row-major inside a TILE_N x TILE_K tile), a
`bitmask` (N, ceil(K/32)) int32 (bit k % 32 of word k // 32) and `tile_offsets` (N tiles, K tiles) int32,
the index of each tile's first nonzero in `values` (see sparsebert/ops/reference_formats.py).

Each program owns a BLOCK_M x TILE_N output tile and walks a contiguous range of K tiles (its split).
Per K tile it loads the tile's TILE_K / 32 bitmask words of each row once, as (TILE_N, 1) columns, and
finds each nonzero's position in `values` without a 2-D scan:

    tile start + (nonzeros of earlier rows: one 1-D prefix sum over the TILE_N row counts)
               + (nonzeros of earlier words of the row: popcounts of those words)
               + popcount(word & ((1 << bit) - 1))

(hardware popc on the GPU, a SWAR popcount under the interpreter), gathers the values into a dense
TILE_N x TILE_K tile in registers and feeds it to `tl.dot` with the activations. Tokens are the small
dimension (1 to 64), so the bytes of W decide the time: at density d a bf16 weight costs 2d + 1/8 bytes
instead of 2.

Split-K (few tokens leave too few output tiles for the GPU): each split stores its fp32 partial tile in a
(SPLIT_K, M, N) workspace and one reduction kernel (`_gemm.reduce_split_k`) sums the splits in
a fixed order, adds the bias and rounds: two launches, bitwise-reproducible. (The first version used a
zero-filled output, relaxed atomic adds and a cast: three launches and run-to-run differences in the last
bits; the first H200 run timed it at 8-21 us of GPU time for <= 64 tokens, flat in density, against
3.5-6.7 us for cuBLAS: bench/results/README.md.)
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._gemm import reduce_split_k
from ._interpreter import INTERPRET, exact_dot
from ._autotune import select


def _configs():
    # quick: BLOCK_M 16 (4 warps, 2 stages) and 64 (4 warps, 3 stages)
    return select("bitmask_linear", [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64) for w in (4, 8) for s in (2, 3, 4)
    ], [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)], quick=(0, 13))


def _prune_configs(configs, named_args, **kwargs):
    """Keep BLOCK_M no larger than needed for the token count (but keep at least one config)."""
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs[:1]


@triton.jit
def popcount32(v, HW_POPC: tl.constexpr):
    """Set bits of each int32 (as unsigned): the popc instruction, or SWAR arithmetic (the interpreter has no
    libdevice popc)."""
    if HW_POPC:
        return libdevice.popc(v)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32, bitcast=True)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "TILE_N", "TILE_K", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _bitmask_linear_kernel(
    x_ptr, values_ptr, bitmask_ptr, tile_offsets_ptr, bias_ptr, y_ptr,
    M, N, K, n_words, n_ktiles, ktiles_per_split, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, HW_POPC: tl.constexpr,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    WORDS: tl.constexpr = TILE_K // 32  # bitmask words per row of a tile
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    cols = tl.arange(0, TILE_K)
    col_word = (cols // 32)[None, :]
    col_bit = (cols % 32)[None, :]
    below = ((tl.full([1, TILE_K], 1, tl.uint32) << col_bit.to(tl.uint32)) - 1).to(tl.int32, bitcast=True)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    word_rows = bitmask_ptr + offs_n.to(tl.int64)[:, None] * n_words  # (TILE_N, 1)

    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    kt_begin = pid_k * ktiles_per_split
    kt_end = tl.minimum(kt_begin + ktiles_per_split, n_ktiles)
    for kt in range(kt_begin, kt_end):
        offs_k = kt * TILE_K + cols
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        # Each row's words of this tile, loaded once as (TILE_N, 1) columns and broadcast to their 32 columns.
        word = tl.zeros((TILE_N, TILE_K), dtype=tl.int32)
        before_word = tl.zeros((TILE_N, TILE_K), dtype=tl.int32)  # nonzeros of the row's earlier words
        row_count = tl.zeros((TILE_N, 1), dtype=tl.int32)
        for j in tl.static_range(WORDS):
            word_j = kt * WORDS + j + tl.zeros((1, 1), dtype=tl.int32)  # a tensor, so the mask is one too
            wj = tl.load(word_rows + word_j, mask=n_ok[:, None] & (word_j < n_words), other=0)
            cj = popcount32(wj, HW_POPC)
            word = tl.where(col_word == j, wj, word)
            before_word += tl.where(col_word > j, cj, 0)
            row_count += cj
        before_row = tl.cumsum(row_count, axis=0) - row_count  # (TILE_N, 1): one short 1-D scan
        present = ((word >> col_bit) & 1) != 0
        start = tl.load(tile_offsets_ptr + pid_n * n_ktiles + kt)
        where = start + before_row + before_word + popcount32(word & below, HW_POPC)
        w = tl.load(values_ptr + where, mask=present, other=0.0)
        if IEEE:  # fp32 inputs, or bf16 under the interpreter (whose bf16 tl.dot is wrong): exact fp32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # y is the (SPLIT_K, M, N) fp32 workspace: one slice per split, summed by the reduction kernel
        part = y_ptr + (pid_k.to(tl.int64) * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=y_mask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(m: int, n: int, n_ktiles: int, tile_n: int, device: torch.device) -> int:
    """Split K until there are about two programs per SM (few tokens leave too few output tiles)."""
    if m > 256:
        return 1
    tiles = triton.cdiv(n, tile_n) * triton.cdiv(m, 64)
    split = 1
    while split * 2 <= n_ktiles and tiles * split < 2 * _num_sms(device):
        split *= 2
    return split


def bitmask_linear_fwd(x, values, bitmask, tile_offsets, bias, in_features: int, tile_n: int, tile_k: int,
                       split_k: int = 0):
    """x (M, K) contiguous -> y (M, N) in x's dtype. Inputs are validated by sparsebert.ops.
    split_k = 0 picks it from the shape (see `choose_split_k`); the splits are reduced in a fixed order, so
    the result does not depend on the run (nor on `torch.use_deterministic_algorithms`)."""
    m, k = x.shape
    n = bitmask.shape[0]
    n_ktiles = triton.cdiv(k, tile_k)
    if split_k <= 0:
        split_k = choose_split_k(m, n, n_ktiles, tile_n, x.device)
    per_split = triton.cdiv(n_ktiles, max(1, min(split_k, n_ktiles)))
    split_k = triton.cdiv(n_ktiles, per_split)  # no empty split
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    out = y if split_k == 1 else torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, tile_n), split_k)  # noqa: E731
    _bitmask_linear_kernel[grid](
        x, values, bitmask, tile_offsets, bias if bias is not None else x, out,
        m, n, k, bitmask.shape[1], n_ktiles, per_split, x.stride(0), n, triton.next_power_of_2(max(m, 1)),
        HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype), SPLIT_K=split_k, HW_POPC=not INTERPRET,
        TILE_N=tile_n, TILE_K=tile_k,
    )
    if split_k > 1:
        reduce_split_k(out, bias, y, split_k)
    return y
