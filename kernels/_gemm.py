"""The three GEMMs shared by `masked_linear` and `score_masked_linear`, with their tile helpers.

Both ops are "a linear layer whose weight is multiplied by a 0/1 keep-mask"; they differ only in where
the mask comes from (`MASK_KIND`):

    MASK_UINT8   (N, K) uint8, nonzero = keep
    MASK_PACKED  (N, ceil(K/32)) int32, bit k % 32 of word k // 32 (LSB first) = keep
    MASK_SCORES  (N, K) scores of any float dtype, keep = scores >= threshold

The mask is always built in registers from its source, right after the weight tile is loaded (forward
and input-gradient GEMMs) or in the epilogue (weight-gradient GEMM); W * m is never written to memory.

Kernels (block names: BLOCK_M x BLOCK_N is the output tile, BLOCK_K the reduction step):
    linear_fwd_kernel          y  = x @ (W * m)^T + bias       (M, N), reduce over K  (tile of y^T)
    linear_fwd_persistent_kernel  the same on a persistent grid (programs loop over tiles), x and W
                               optionally through TMA tensor descriptors (`fwd(schedule=, tma=)`)
    linear_fwd_streamk_kernel  the same on a stream-K grid (programs share all tiles' K-iterations evenly;
                               `fwd(schedule="streamk")`), with linear_fwd_streamk_fixup_kernel summing
                               the tiles shared by several programs in a fixed order
    linear_bwd_input_kernel    dx = dy @ (W * m)                (M, K), reduce over N  (tile of dx^T)
    linear_bwd_weight_kernel   G  = dy^T @ x                    (N, K), reduce over M (optionally split),
                               epilogue: dweight = G * m and/or dscores = G * W; optionally
                               dbias = sum over M of dy, from the dy tiles the GEMM already streams
    weight_grad_finalize_kernel  sums the split-M partials of G (and of dbias) and runs the same epilogue

Offsets along the tokens (M * N, M * K, split * N * K) are int64, so outputs may pass 2**31 elements;
weight-side offsets (N * K) are int32, which `check_matrix` guarantees by refusing inputs of 2**31 or more
elements. Accumulation is fp32; fp32 inputs use an exact fp32 dot (input_precision="ieee"). Tiles are visited in
grouped order (GROUP_M rows of tiles at a time) so that the operand tiles stay in L2.
"""

import torch
import triton
import triton.language as tl

MASK_UINT8 = 1
MASK_PACKED = 2
MASK_SCORES = 3

from ._interpreter import INTERPRET
from ._autotune import FWD_SCHEDULE, FWD_SCHEDULES, select

try:  # host-side TMA tensor descriptors (Triton >= 3.4); without them the persistent forward uses pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen for H100/H200 (228 KB shared memory / SM).
_GPU_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 3),
    (32, 64, 128, 4, 4),
]
_SHARED_MEMORY_BUDGET = 227 * 1024  # H100/H200 per-block maximum


def _configs():
    # interpreter: one small config (it runs every program in Python); quick: 128x128x64 and 64x64x64
    return select("_gemm", [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _GPU_TILES
    ], [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3}, num_warps=1, num_stages=1)],
        quick=(2, 6))


def _pruner(rows_arg, cols_arg, operand_arg, mask_arg):
    """early_config_prune: drop configs whose pipelined tiles overflow shared memory (operands over
    num_stages buffers, the mask/scores tile, when read in the K loop, over num_stages - 1; a packed mask
    tile is BLOCK_N * BLOCK_K / 32 int32 words), and tiles much larger than the output (they only
    waste work at small token counts)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        rows, cols = args[rows_arg], args[cols_arg]
        elem = args[operand_arg].element_size()
        mask = args[mask_arg] if mask_arg else None
        packed = mask is not None and mask.dtype == torch.int32
        mask_elem = 0 if mask is None else (1 / 8 if packed else mask.element_size())
        kept = []
        for cfg in configs:
            bm, bn, bk, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], max(cfg.num_stages, 2)
            smem = (bm + bn) * bk * elem * stages + int(bn * bk * mask_elem) * (stages - 1)
            if smem > _SHARED_MEMORY_BUDGET:
                continue
            if bm > max(32, triton.next_power_of_2(rows)) or bn > max(64, triton.next_power_of_2(cols)):
                continue
            kept.append(cfg)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def _autotune(key, rows_arg, cols_arg, operand_arg, mask_arg=None):
    prune = None if INTERPRET else {"early_config_prune": _pruner(rows_arg, cols_arg, operand_arg, mask_arg)}
    return triton.autotune(configs=_configs(), key=key, prune_configs_by=prune)


def bucket(n: int) -> int:
    """Autotuning key for the token count: next power of two, so varying batch sizes share a tuning."""
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile col) of program `pid`, walking GROUP_M tile rows column by column (L2 reuse)."""
    num_pid_m = tl.cdiv(rows, BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def load_threshold(threshold, threshold_ptr, scores_ptr, THRESHOLD_FROM_PTR: tl.constexpr):
    """The threshold as fp32, rounded to the scores' dtype first (torch's `scores >= tau` semantics).

    From a Python float it arrives already rounded (the launcher does it); from a 0-dim fp32 tensor it is
    read and rounded here, so the host never waits for the device."""
    if THRESHOLD_FROM_PTR:
        tau = tl.load(threshold_ptr).to(tl.float32).to(scores_ptr.dtype.element_ty).to(tl.float32)
    else:
        tau = threshold
    return tau


@triton.jit
def load_keep(mask_ptr, n, k, N, K, words_per_row, tau, MASK_KIND: tl.constexpr):
    """Boolean keep-mask at weight coordinates (n, k) (broadcastable int tensors); False out of bounds."""
    in_bounds = (n < N) & (k < K)
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + n * K + k, mask=in_bounds, other=0) != 0
    elif MASK_KIND == 2:
        word = tl.load(mask_ptr + n * words_per_row + k // 32, mask=in_bounds, other=0)
        keep = ((word >> (k % 32)) & 1) != 0
    else:
        scores = tl.load(mask_ptr + n * K + k, mask=in_bounds, other=0.0).to(tl.float32)
        keep = (scores >= tau) & in_bounds
    return keep


@triton.jit
def load_packed_keep(mask_ptr, rows, col0, N, words_per_row,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLS_FIRST: tl.constexpr):
    """Keep-mask of weight rows `rows` (BLOCK_R,) x columns col0 + [0, BLOCK_C) from a packed mask, loading
    each of the tile's BLOCK_R * BLOCK_C / 32 int32 words once and expanding the bits in registers
    (shift + and, broadcast over the 32 bit positions, reshape). col0 must be a multiple of 32 and
    BLOCK_C of 32. Shape (BLOCK_R, BLOCK_C), or (BLOCK_C, BLOCK_R) with COLS_FIRST. Padding bits past K
    come back as stored: callers zero out-of-range weights themselves."""
    WORDS: tl.constexpr = BLOCK_C // 32
    w = col0 // 32 + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    if COLS_FIRST:
        ok = (w[:, None] < words_per_row) & (rows[None, :] < N)
        word = tl.load(mask_ptr + rows[None, :] * words_per_row + w[:, None], mask=ok, other=0)  # (WORDS, R)
        bits = (word[:, None, :] >> bit[None, :, None]) & 1  # (WORDS, 32, R)
        keep = tl.reshape(bits, (BLOCK_C, BLOCK_R)) != 0
    else:
        ok = (rows[:, None] < N) & (w[None, :] < words_per_row)
        word = tl.load(mask_ptr + rows[:, None] * words_per_row + w[None, :], mask=ok, other=0)  # (R, WORDS)
        bits = (word[:, :, None] >> bit[None, None, :]) & 1  # (R, WORDS, 32)
        keep = tl.reshape(bits, (BLOCK_R, BLOCK_C)) != 0
    return keep


@triton.jit
def mma(a, b, acc, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += a @ b. IEEE_DOT: exact fp32 products (fp32 inputs). UPCAST_DOT: the interpreter's 16-bit dot
    is wrong, so it multiplies the (exactly) upcast fp32 values instead; same math as the tensor cores."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE_DOT:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------------------------------
# y = x @ (W * m)^T + bias, computed as y^T = (W * m) @ x^T: the masked weight tile is the dot's first
# operand, which Hopper's wgmma reads from registers, so masking it costs no extra shared-memory trip.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def fwd_tile_acc(
    x_ptr, w_ptr, x_desc, w_desc, mask_ptr, pid_m, pid_n, k_start, k_end, M, N, K, words_per_row, tau,
    MASK_KIND: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The masked K loop of output tile (pid_m, pid_n) over K in [k_start, k_end) (k_start a multiple of
    BLOCK_K, k_end <= K): its fp32 y^T tile (BLOCK_N, BLOCK_M). USE_TMA: the x and W tiles come through the
    tensor descriptors x_desc (M, K) and w_desc (N, K) (TMA on sm_90; out-of-range rows and columns read as
    zeros), else through pointers."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens; int64: M * N may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k  # chunks are BLOCK_K-aligned: ks < K is the only bound needed
        if USE_TMA:
            w = w_desc.load([pid_n * BLOCK_N, k0])
        else:
            w = tl.load(w_ptr + offs_n[:, None] * K + ks[None, :], mask=(offs_n[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
        if MASK_KIND == 2:
            keep = load_packed_keep(mask_ptr, offs_n, k0, N, words_per_row, BLOCK_N, BLOCK_K, False)
        else:
            keep = load_keep(mask_ptr, offs_n[:, None], ks[None, :], N, K, words_per_row, tau, MASK_KIND)
        # x^T tile (BLOCK_K, BLOCK_M): element [k, m] = x[m, k]
        if USE_TMA:
            xt = tl.trans(x_desc.load([pid_m * BLOCK_M, k0]))
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * K + ks[:, None], mask=(ks[:, None] < K) & (offs_m[None, :] < M),
                         other=0.0)
        acc = mma(tl.where(keep, w, 0.0).to(xt.dtype), xt, acc, IEEE_DOT, UPCAST_DOT)
    return acc


@triton.jit
def store_tile(acc, pid_m, pid_n, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's epilogue: y tile (pid_m, pid_n) = acc (the fp32 y^T tile) + bias, rounded to y's dtype."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def fwd_tile(
    x_ptr, w_ptr, x_desc, w_desc, bias_ptr, mask_ptr, y_ptr, partial_ptr,
    pid_m, pid_n, split, M, N, K, words_per_row, tau,
    MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Output tile (pid_m, pid_n) over K chunk `split`: the masked K loop (`fwd_tile_acc`) and its epilogue
    (see linear_fwd_kernel)."""
    if SPLIT_K == 1:
        k_start = 0
        k_end = K
    else:
        chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = split * chunk
        k_end = min(k_start + chunk, K)
    acc = fwd_tile_acc(x_ptr, w_ptr, x_desc, w_desc, mask_ptr, pid_m, pid_n, k_start, k_end, M, N, K,
                       words_per_row, tau, MASK_KIND, IEEE_DOT, UPCAST_DOT, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    if SPLIT_K == 1:
        store_tile(acc, pid_m, pid_n, bias_ptr, y_ptr, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        split_base = partial_ptr + split.to(tl.int64) * M * N
        tl.store(split_base + offs_m[None, :] * N + offs_n[:, None], acc, mask=y_mask)


@_autotune(key=["M_BUCKET", "N", "K", "SPLIT_K"], rows_arg="M", cols_arg="N", operand_arg="x_ptr", mask_arg="mask_ptr")
@triton.jit
def linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, y_ptr, partial_ptr,
    M, N, K, M_BUCKET, words_per_row, threshold, threshold_ptr,
    MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program (tile, split). SPLIT_K == 1: the whole K loop, bias, store y. SPLIT_K > 1: split s reduces
    K in [s * chunk, (s + 1) * chunk) (chunk a multiple of BLOCK_K) and stores its fp32 partial in
    partial_ptr[s] (M, N); linear_fwd_reduce_kernel sums the splits in order 0..SPLIT_K-1 (deterministic,
    no atomics), adds the bias and rounds.

    Predicted effect (issue 10 item 2; not timed: no GPU here):
    * packed mask: before, one int32 word gathered per weight element = 4 * BLOCK_N * BLOCK_K bytes per
      tile per K step (32 KB for 128x64; 3 pipeline stages of it in shared memory); now the tile's
      BLOCK_N * BLOCK_K / 32 words once = BLOCK_N * BLOCK_K / 8 bytes (1 KB for 128x64), 32x less.
    * split-K (split_k_for, 132 SMs, K -> N, tiles estimated at BLOCK_M = pow2(M) in [32, 128], BLOCK_N 128):
        K=768  N=768 : 16/64 tokens  6 tiles (5% of SMs) -> split 4, 24 CTAs (18%); 512: 24 (18%) -> split 4, 96 (73%)
        K=768  N=3072: 16/64 tokens 24 tiles (18%) -> split 4, 96 (73%); 512: 96 tiles (73%), no split
        K=3072 N=768 : 16/64 tokens  6 tiles (5%)  -> split 16, 96 (73%); 512: 24 (18%) -> split 4, 96 (73%)
      at the price of SPLIT_K * M * N * 4 bytes of fp32 partials written and read once more.
    """
    tau = 0.0
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    fwd_tile(x_ptr, w_ptr, x_ptr, w_ptr, bias_ptr, mask_ptr, y_ptr, partial_ptr,
             pid_m, pid_n, tl.program_id(1), M, N, K, words_per_row, tau,
             MASK_KIND, HAS_BIAS, SPLIT_K, IEEE_DOT, UPCAST_DOT, False, BLOCK_M, BLOCK_N, BLOCK_K)


def _set_tma_blocks(nargs):
    """Config pre-hook of the persistent forward: the tensor descriptors' block shapes follow the config's
    tiles (x: BLOCK_M x BLOCK_K, W: BLOCK_N x BLOCK_K); a no-op on the pointer path."""
    if TensorDescriptor is not None and isinstance(nargs["x_desc"], TensorDescriptor):
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


# The persistent and stream-K forwards loop over several tiles per program. On the first GPU run (H200,
# triton 3.6, bench/results/nvidia-h200-2026-11-30-d88f34ee54*, tests/test_gpu_kernels.py::
# test_every_autotune_config_on_a_tail_shape) their 8-warp configs gave wrong tiles (128x256x64 w8 in the
# persistent forward: max error 11.7 on values ~17; 256x128x64 w8 in the stream-K forward: 30.1), while the
# one-program-per-tile forward passed every config of the same list. Two warpgroups sharing one wgmma
# pipeline across the items of a persistent loop is the lead (a cross-warpgroup barrier missing after the
# wgmma wait has been reported in a Triton fork), not an established cause. Until a GPU sweep clears them,
# these two kernels keep the one-warpgroup (4-warp) tiles only.
_LOOPING_TILES = [t for t in _GPU_TILES if t[3] == 4]


def _tma_tile_configs(kernel_name):
    # the 4-warp tiles of linear_fwd_kernel, each setting its TMA block shapes (the persistent and stream-K
    # forwards). Quick: 128x64x64 and 64x64x64; 128x128x64 on one warpgroup holds a 128-register fp32
    # accumulator per thread and spills (bench/results/compiled-sm90a.txt), so it is left to full tuning.
    return select(kernel_name, [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_blocks)
        for bm, bn, bk, w, s in _LOOPING_TILES
    ], [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3}, num_warps=1, num_stages=1,
                      pre_hook=_set_tma_blocks)], quick=(1, 3))


@triton.autotune(configs=_tma_tile_configs("_gemm.linear_fwd_persistent_kernel"), key=["M_BUCKET", "N", "K", "SPLIT_K", "USE_TMA"],
                 prune_configs_by=None if INTERPRET else {
                     "early_config_prune": _pruner("M", "N", "x_ptr", "mask_ptr")})
@triton.jit
def linear_fwd_persistent_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, y_ptr, partial_ptr, x_desc, w_desc,
    M, N, K, M_BUCKET, words_per_row, threshold, threshold_ptr, NUM_PROGRAMS,
    MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The forward of linear_fwd_kernel on a persistent grid: min(#tiles * SPLIT_K, NUM_PROGRAMS) programs,
    program p doing work items p, p + NUM_PROGRAMS, ... (item = split * #tiles + tile, tiles in grouped
    order), each the same tile computation and epilogue as linear_fwd_kernel's (`fwd_tile`; split-K
    partials reduced by linear_fwd_reduce_kernel in the same fixed order). USE_TMA: x and W tiles via TMA
    tensor descriptors (launcher: `fwd(..., tma=...)`).

    Predicted effect on an H200 (132 SMs; not timed: no GPU here), bf16, quick-autotune tile 64x64x64
    (the only quick config a <= 64-token launch keeps), split_k_for's choice, K=768:
        M=8 or 64, N=768 : 12 tiles x split 4 = 48 items: 48 CTAs either way (36% of the SMs)
        M=8 or 64, N=3072: 48 tiles x split 4 = 192 items: tiles grid 192 CTAs (1.45 waves), persistent
                           132 programs (60 of them take a second item): 31% fewer CTA launches
      Launches per forward: unchanged (the GEMM, plus the split-K reduction when split > 1: 2).
      DRAM bytes: unchanged (W once: 1.18 MB at N=768, 4.7 MB at N=3072; packed mask 1/16 of W's bytes;
      x M*K*2 = 12 KB / 98 KB, re-read from L2 by each N tile; fp32 partials 4 * M * N * 4 written and
      read: 98 KB / 786 KB at M=8 / 64, N=768). So at these sizes the persistent grid alone predicts no
      gain beyond the CTA count at N=3072 (the second wave is the same 60 items either way); what TMA
      changes is the mainloop's issue cost: one thread's cp.async.bulk.tensor per operand tile instead of
      every thread computing addresses and issuing 16-byte cp.async copies (compiled for sm_90a, 64x64
      packed mask: 36 static LDGSTS without TMA, 4 with it, the mask words'; bench/results/
      compiled-sm90a.txt), freeing issue slots. The persistent grid pays off where items exceed the SMs
      several times (e.g. 4096 tokens, N=3072, 64x64 tiles: 3072 items, 23 waves of CTAs otherwise).
    """
    tau = 0.0
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for item in range(tl.program_id(0), num_tiles * SPLIT_K, NUM_PROGRAMS):
        split = item // num_tiles
        pid_m, pid_n = grouped_tile(item % num_tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        fwd_tile(x_ptr, w_ptr, x_desc, w_desc, bias_ptr, mask_ptr, y_ptr, partial_ptr,
                 pid_m, pid_n, split, M, N, K, words_per_row, tau,
                 MASK_KIND, HAS_BIAS, SPLIT_K, IEEE_DOT, UPCAST_DOT, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def linear_fwd_reduce_kernel(partial_ptr, bias_ptr, y_ptr, M, N,
                             HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = sum over splits 0..SPLIT_K-1 (in that order) of the fp32 partials (SPLIT_K, M, N) + bias."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    partial = partial_ptr + idx
    for _ in range(SPLIT_K):
        acc += tl.load(partial, mask=out_mask, other=0.0)
        partial += M * N  # 64-bit pointer walk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _streamk_fixup_in_bench(nargs, exception=None):
    """Autotuner post-hook of linear_fwd_streamk_kernel (called only while it benchmarks configs, after each
    timed launch): the fixup launch that config needs, so each config is timed as the forward runs it,
    main kernel plus fixup (a config with more shared tiles pays a larger fixup)."""
    if exception is None:
        launch_streamk_fixup(nargs["partial_ptr"], nargs["bias_ptr"], nargs["y_ptr"], nargs["M"], nargs["N"],
                             nargs["K"], nargs["HAS_BIAS"], nargs, nargs["PROGRAMS_CAP"])


@triton.autotune(configs=_tma_tile_configs("_gemm.linear_fwd_streamk_kernel"), key=["M_BUCKET", "N", "K", "USE_TMA"],
                 prune_configs_by=None if INTERPRET else {
                     "early_config_prune": _pruner("M", "N", "x_ptr", "mask_ptr")},
                 post_hook=_streamk_fixup_in_bench)
@triton.jit
def linear_fwd_streamk_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, y_ptr, partial_ptr, x_desc, w_desc,
    M, N, K, M_BUCKET, words_per_row, threshold, threshold_ptr, PROGRAMS_CAP,
    MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The forward on a stream-K grid, the variant with a separate fixup reduction (no atomics, no flags).

    The P = tl.num_programs(0) programs share the I = #tiles * cdiv(K, BLOCK_K) K-iterations (tiles in
    grouped order, each tile's iterations consecutive): program p runs [p * I // P, (p + 1) * I // P), which
    may start and end inside tiles, so it touches at most two partial tiles (its first and its last). A
    tile whose iterations all lie in one program is finished there (`store_tile`: bias, rounding, y);
    otherwise the program stores its fp32 partial tile, valid elements only, in workspace slot 2 * p (the
    program's first tile) or 2 * p + 1 (its last), and linear_fwd_streamk_fixup_kernel later sums the
    tile's slots in program order (deterministic). The launcher `fwd(schedule="streamk")` caps P at I.
    PROGRAMS_CAP (the launcher's cap on P, unused by the kernel) lets the autotuner's post-hook launch the
    fixup of the config it is timing (`_streamk_fixup_in_bench`).

    Worked example (H200: 132 SMs; quick tile 64x64x64, the one a <= 64-token launch keeps), bf16, K=768,
    M=8 or 64, N=3072: 48 tiles x 12 iterations = 576 iterations over 132 programs: 4 or 5 each (4.36);
    every tile is shared by 3 or 4 programs (168 partial slots in all, no tile finished in place).
    Predicted against the other schedules (not timed: no GPU here), mainloop critical path in K-iterations
    of one 64x64x64 tile per SM, and the extra fp32 traffic (written once, read once):
        N=3072, K=768 : tiles, split 1: 48 CTAs x 12 = 12 on 36% of the SMs; split-K 4 (split_k_for):
                        192 CTAs x 3 in 1.45 waves = 6, partials 4 * M * N * 4 B = 3.1 MB at M=64;
                        stream-K: 5, 168 slots x M_valid * 64 * 4 B = 2.8 MB at M=64, 0.34 MB at M=8.
        N=768,  K=768 : split-K 4: 48 CTAs x 3 = 3 (36% of the SMs), 0.79 MB; stream-K: 144 iterations
                        over 132 programs = 2, but 132 slots = 2.2 MB at M=64 (0.27 MB at M=8).
        N=768,  K=3072: split-K 16: 192 CTAs x 3, 1.45 waves = 6, 3.1 MB; stream-K: 576 over 132 = 5,
                        132 slots = 2.2 MB.
      W (the dominant DRAM stream: 1.2 MB at N=K=768, 4.7 MB at N=3072 or K=3072) is read once by every
      schedule; all partials fit in the 50 MB L2. So stream-K predicts ~1/6 fewer mainloop steps on the
      critical path than split-K where split-K's CTAs spill into a second wave, and 1/3 fewer at N=K=768 at
      three times split-K's partial bytes; both pay a second launch (split-K's reduction, stream-K's fixup
      of #tiles programs), which at these sizes (a few microseconds of GEMM) can eat the gain: a GPU run
      must decide, so "tiles" stays the default.
    """
    tau = 0.0
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
    iters_per_tile = tl.cdiv(K, BLOCK_K).to(tl.int64)  # int64: #tiles * iterations * P may pass 2**31
    total = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) * iters_per_tile
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * total // tl.num_programs(0)
    end = (pid + 1).to(tl.int64) * total // tl.num_programs(0)
    first_tile = (start // iters_per_tile).to(tl.int32)
    for tile in range(first_tile, ((end - 1) // iters_per_tile).to(tl.int32) + 1):
        tile_start = tile * iters_per_tile  # (a plain int under the interpreter: no .to on loop indices)
        lo = (max(start, tile_start) - tile_start).to(tl.int32)  # this program's iterations of the tile
        hi = (min(end, tile_start + iters_per_tile) - tile_start).to(tl.int32)
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = fwd_tile_acc(x_ptr, w_ptr, x_desc, w_desc, mask_ptr, pid_m, pid_n, lo * BLOCK_K,
                           min(hi * BLOCK_K, K), M, N, K, words_per_row, tau,
                           MASK_KIND, IEEE_DOT, UPCAST_DOT, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
        if (lo == 0) & (hi == iters_per_tile):
            store_tile(acc, pid_m, pid_n, bias_ptr, y_ptr, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)
        else:
            slot = (tile != first_tile).to(tl.int64) + 2 * pid
            streamk_slot_store(partial_ptr, slot, acc, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton.jit
def streamk_slot_offsets(slot, pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets of a y^T tile (BLOCK_N, BLOCK_M) in stream-K workspace slot `slot`, and its valid elements."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    return slot * (BLOCK_M * BLOCK_N) + local, (offs_n[:, None] < N) & (offs_m[None, :] < M)


@triton.jit
def streamk_slot_store(partial_ptr, slot, acc, pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores the valid elements of a partial y^T tile in stream-K workspace slot `slot` (fp32)."""
    offs, valid = streamk_slot_offsets(slot, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    tl.store(partial_ptr + offs, acc, mask=valid)


@triton.jit
def linear_fwd_streamk_fixup_kernel(partial_ptr, bias_ptr, y_ptr, M, N, K, NUM_PROGRAMS,
                                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Program = tile (linear_fwd_streamk_kernel's order; NUM_PROGRAMS and the blocks as in its launch).
    A tile shared by programs p0 < ... < p1 gets y = (slot of p0 + ... + slot of p1, in that order) + bias;
    a tile finished in place is left alone. Program p of iteration i is the largest p with
    p * I // P <= i, i.e. ((i + 1) * P - 1) // I."""
    tile = tl.program_id(0)
    iters_per_tile = tl.cdiv(K, BLOCK_K).to(tl.int64)
    total = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) * iters_per_tile
    tile_start = tile * iters_per_tile
    p_first = ((tile_start + 1) * NUM_PROGRAMS - 1) // total
    p_last = ((tile_start + iters_per_tile) * NUM_PROGRAMS - 1) // total
    if p_first != p_last:
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for p in range(p_first.to(tl.int32), p_last.to(tl.int32) + 1):
            # slot 2p: the tile is p's first; 2p + 1: p started in an earlier tile
            p_start = p * total // NUM_PROGRAMS
            slot = (p_start < tile_start).to(tl.int64) + 2 * p
            offs, valid = streamk_slot_offsets(slot, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
            acc += tl.load(partial_ptr + offs, mask=valid, other=0.0)
        store_tile(acc, pid_m, pid_n, bias_ptr, y_ptr, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------------
# dx = dy @ (W * m), computed as dx^T = (W * m)^T @ dy^T (masked weight again the register operand)
# ----------------------------------------------------------------------------------------------------
@_autotune(key=["M_BUCKET", "N", "K"], rows_arg="M", cols_arg="K", operand_arg="dy_ptr", mask_arg="mask_ptr")
@triton.jit
def linear_bwd_input_kernel(
    dy_ptr, w_ptr, mask_ptr, dx_ptr,
    M, N, K, M_BUCKET, words_per_row, threshold, threshold_ptr,
    MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # output tile: tokens offs_m x input features offs_c; reduction over output features r
    pid_m, pid_c = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N and M * K may pass 2**31
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    tau = 0.0
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # dx^T tile
    for n0 in range(0, N, BLOCK_K):
        rs = n0 + offs_r
        # W^T tile (BLOCK_N, BLOCK_K): element [c, r] = W[r, c]
        w_mask = (offs_c[:, None] < K) & (rs[None, :] < N)
        wt = tl.load(w_ptr + rs[None, :] * K + offs_c[:, None], mask=w_mask, other=0.0)
        if MASK_KIND == 2:
            keep = load_packed_keep(mask_ptr, rs, pid_c * BLOCK_N, N, words_per_row, BLOCK_K, BLOCK_N, True)
        else:
            keep = load_keep(mask_ptr, rs[None, :], offs_c[:, None], N, K, words_per_row, tau, MASK_KIND)
        # dy^T tile (BLOCK_K, BLOCK_M): element [r, m] = dy[m, r]
        dyt = tl.load(dy_ptr + offs_m[None, :] * N + rs[:, None], mask=(rs[:, None] < N) & (offs_m[None, :] < M), other=0.0)
        acc = mma(tl.where(keep, wt, 0.0).to(dyt.dtype), dyt, acc, IEEE_DOT, UPCAST_DOT)

    dx_mask = (offs_c[:, None] < K) & (offs_m[None, :] < M)
    tl.store(dx_ptr + offs_m[None, :] * K + offs_c[:, None], acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


# ----------------------------------------------------------------------------------------------------
# G = dy^T @ x;  dweight = G * m,  dscores = G * W
# ----------------------------------------------------------------------------------------------------
@triton.jit
def weight_grad_epilogue(
    g, offs_n, offs_k, N, K, w_ptr, mask_ptr, dweight_ptr, dscores_ptr, words_per_row, tau,
    MASK_KIND: tl.constexpr, WRITE_DWEIGHT: tl.constexpr, WRITE_DSCORES: tl.constexpr,
):
    """Writes the requested outputs of the fp32 tile g = G[offs_n, offs_k]."""
    out_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n[:, None] * K + offs_k[None, :]
    if WRITE_DWEIGHT:
        keep = load_keep(mask_ptr, offs_n[:, None], offs_k[None, :], N, K, words_per_row, tau, MASK_KIND)
        tl.store(dweight_ptr + idx, tl.where(keep, g, 0.0).to(dweight_ptr.dtype.element_ty), mask=out_mask)
    if WRITE_DSCORES:
        w = tl.load(w_ptr + idx, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(dscores_ptr + idx, (g * w).to(dscores_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def weight_grad_mainloop(dy_ptr, x_ptr, offs_n, offs_k, m_start, m_end, N, K,
                         SUM_DY: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(G[offs_n, offs_k] over tokens [m_start, m_end), fp32; with SUM_DY also the fp32 sum over those
    tokens of dy[:, offs_n], taken from the dy tiles loaded for the GEMM; zeros otherwise)."""
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dy_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        ms = m0 + offs_r.to(tl.int64)  # int64: M * N and M * K may pass 2**31
        # dy^T tile (BLOCK_M, BLOCK_K): element [n, m] = dy[m, n]
        dyt = tl.load(dy_ptr + ms[None, :] * N + offs_n[:, None], mask=(offs_n[:, None] < N) & (ms[None, :] < m_end), other=0.0)
        x = tl.load(x_ptr + ms[:, None] * K + offs_k[None, :], mask=(ms[:, None] < m_end) & (offs_k[None, :] < K), other=0.0)
        acc = mma(dyt, x, acc, IEEE_DOT, UPCAST_DOT)
        if SUM_DY:
            dy_sum += tl.sum(dyt.to(tl.float32), axis=1)
    return acc, dy_sum


@_autotune(key=["M_BUCKET", "N", "K", "SPLIT_M", "WRITE_DBIAS"], rows_arg="N", cols_arg="K", operand_arg="x_ptr")
@triton.jit
def linear_bwd_weight_kernel(
    dy_ptr, x_ptr, w_ptr, mask_ptr, dweight_ptr, dscores_ptr, partial_ptr, dbias_ptr, dbias_partial_ptr,
    M, N, K, M_BUCKET, words_per_row, threshold, threshold_ptr,
    MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr,
    WRITE_DWEIGHT: tl.constexpr, WRITE_DSCORES: tl.constexpr, WRITE_DBIAS: tl.constexpr, SPLIT_M: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program (tile, split): reduces tokens [split * chunk, (split + 1) * chunk). With SPLIT_M == 1 it runs
    the epilogue itself; otherwise it writes its fp32 partial to partial_ptr[split] (deterministic, no
    atomics) and weight_grad_finalize_kernel finishes.

    WRITE_DBIAS: the programs of the first K tile column (pid_k == 0; one per row tile and split) also sum
    the dy tiles they stream for the GEMM over the tokens, in fp32, and write dbias[offs_n] (SPLIT_M == 1,
    in dbias_ptr's dtype) or their fp32 partial to dbias_partial_ptr[split] (SPLIT_M > 1, summed in order
    by weight_grad_finalize_kernel): each element written by one program, no atomics, deterministic. The
    other programs run the plain GEMM loop.

    Predicted effect (issue 10 item 1; not timed: no GPU here): saves the separate `dy.sum(0)` pass, one
    read of M * N * sizeof(dy) bytes plus two launches (the fp32 sum and its cast): 25 MB at 4096 tokens x
    3072 features in bf16, ~6 us at 4.3 TB/s beside a ~30 us weight-gradient GEMM (19 GFLOP). Cost: only
    the pid_k == 0 programs (1 in cdiv(K, BLOCK_N): 1/6 at K = 768, 1/24 at K = 3072 with BLOCK_N 128)
    read each dy tile from shared memory into registers once more and add BLOCK_M * BLOCK_K values per
    step (0.4% of the step's 2 * BLOCK_M * BLOCK_N * BLOCK_K MMA FLOPs at 128x128x64), holding BLOCK_M
    more fp32 accumulators per CTA; that column of programs finishes slightly later than the others.
    """
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_K) * BLOCK_K
    m_start = split * chunk
    m_end = min(m_start + chunk, M)

    if WRITE_DBIAS:
        if pid_k == 0:
            acc, dy_sum = weight_grad_mainloop(dy_ptr, x_ptr, offs_n, offs_k, m_start, m_end, N, K, True,
                                               IEEE_DOT, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            if SPLIT_M == 1:
                tl.store(dbias_ptr + offs_n, dy_sum.to(dbias_ptr.dtype.element_ty), mask=offs_n < N)
            else:
                tl.store(dbias_partial_ptr + split.to(tl.int64) * N + offs_n, dy_sum, mask=offs_n < N)
        else:
            acc, dy_sum = weight_grad_mainloop(dy_ptr, x_ptr, offs_n, offs_k, m_start, m_end, N, K, False,
                                               IEEE_DOT, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc, dy_sum = weight_grad_mainloop(dy_ptr, x_ptr, offs_n, offs_k, m_start, m_end, N, K, False,
                                           IEEE_DOT, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)

    if SPLIT_M == 1:
        tau = 0.0
        if MASK_KIND == 3:
            tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
        weight_grad_epilogue(acc, offs_n, offs_k, N, K, w_ptr, mask_ptr, dweight_ptr, dscores_ptr,
                             words_per_row, tau, MASK_KIND, WRITE_DWEIGHT, WRITE_DSCORES)
    else:
        out_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(partial_ptr + split.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :], acc, mask=out_mask)


@triton.jit
def weight_grad_finalize_kernel(
    partial_ptr, w_ptr, mask_ptr, dweight_ptr, dscores_ptr, dbias_ptr, dbias_partial_ptr,
    N, K, words_per_row, threshold, threshold_ptr,
    MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr,
    WRITE_DWEIGHT: tl.constexpr, WRITE_DSCORES: tl.constexpr, WRITE_DBIAS: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Sums the SPLIT_M fp32 partials of G in order 0..SPLIT_M-1 and runs the epilogue; with WRITE_DBIAS the
    programs of the first K tile column also sum the dbias partials (SPLIT_M, N) in the same order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if WRITE_DBIAS:
        if tl.program_id(1) == 0:
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            db_partial = dbias_partial_ptr + offs_n
            for _ in range(SPLIT_M):
                db += tl.load(db_partial, mask=offs_n < N, other=0.0)
                db_partial += N
            tl.store(dbias_ptr + offs_n, db.to(dbias_ptr.dtype.element_ty), mask=offs_n < N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n[:, None] * K + offs_k[None, :]
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    partial = partial_ptr + idx
    for split in range(SPLIT_M):
        g += tl.load(partial, mask=out_mask, other=0.0)
        partial += N * K  # a 64-bit pointer walk: split * N * K may pass 2**31
    tau = 0.0
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
    weight_grad_epilogue(g, offs_n, offs_k, N, K, w_ptr, mask_ptr, dweight_ptr, dscores_ptr,
                         words_per_row, tau, MASK_KIND, WRITE_DWEIGHT, WRITE_DSCORES)


# ----------------------------------------------------------------------------------------------------
# launch helpers shared by the two op files
# ----------------------------------------------------------------------------------------------------
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def check_device(*tensors):
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on one device; got {dev} and {t.device}")
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {dev}")


def check_matrix(name, t, shape=None, dtypes=FLOATS):
    """t must be a contiguous 2-D tensor of one of `dtypes` (and `shape` where given, None = any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and any(want is not None and want != got for want, got in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {tuple('*' if s is None else s for s in shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() >= _INT32_LIMIT:
        raise ValueError(f"{name} has {t.numel()} elements; the kernels index with int32 (limit 2**31 - 1)")


def check_mask(mask, packed, n, k):
    """Validates a dense uint8/bool (N, K) or packed int32 (N, ceil(K/32)) mask; returns (tensor, kind, words)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    if packed:
        words = (k + 31) // 32
        check_matrix("mask", mask, (n, words), (torch.int32,))
        return mask, MASK_PACKED, words
    check_matrix("mask", mask, (n, k), (torch.uint8, torch.bool))
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask), MASK_UINT8, 0


def threshold_args(threshold, scores):
    """(value, pointer tensor or None) for the kernels' (threshold, threshold_ptr, THRESHOLD_FROM_PTR).

    A Python number is rounded to the scores' dtype here (as `scores >= threshold` does in torch); a 0-dim
    tensor stays on the device and is rounded in the kernel."""
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1 or not threshold.dtype.is_floating_point:
            raise ValueError(f"threshold tensor must be a single float value, got shape {tuple(threshold.shape)} {threshold.dtype}")
        if threshold.device != scores.device:
            raise ValueError(f"threshold must be on the scores' device {scores.device}, got {threshold.device}")
        return 0.0, threshold.reshape(()).to(torch.float32)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a 0-dim tensor, got {type(threshold).__name__}")
    return float(torch.tensor(float(threshold), dtype=scores.dtype).float()), None


def dot_flags(dtype):
    """(IEEE_DOT, UPCAST_DOT) for operands of `dtype`."""
    return dtype == torch.float32, INTERPRET


def split_m_for(m, n, k, device):
    """How many token chunks the weight-gradient GEMM reduces separately: enough to fill the GPU when the
    (N, K) output alone has too few 128x128 tiles (e.g. 768x768 at 16k tokens) and M is long."""
    if INTERPRET or device.type != "cuda":
        return 1
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), m // 2048, 16))


_SPLIT_K_MIN_CHUNK = 192  # K per split: at least 3 BLOCK_K=64 steps, so the operand pipeline still fills
_SPLIT_K_MAX = 16


def split_k_for(m, n, k, device):
    """How many K chunks the forward GEMM reduces separately (a power of two, from shapes only: no sync).

    The largest s <= 16 with (estimated output tiles) * s <= #SMs and K / s >= 192, where the tiles are
    counted at BLOCK_M = next_pow2(M) clamped to [32, 128] and BLOCK_N = 128; 1 when the output alone
    fills the GPU, on CPU, and under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 1
    block_m = min(128, max(32, triton.next_power_of_2(max(m, 1))))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while split * 2 <= _SPLIT_K_MAX and tiles * split * 2 <= sms and k // (split * 2) >= _SPLIT_K_MIN_CHUNK:
        split *= 2
    return split


DEFAULT_SMS = 132  # H100 SXM / H200 (sm_90): the persistent grid's size where no CUDA device says otherwise


def sm_count(device):
    """Streaming multiprocessors of a CUDA `device` (a cached host query: no sync), else DEFAULT_SMS."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_unsupported(x, weight):
    """Why x and W cannot go through TMA tensor descriptors (None when they can): needs Triton's host-side
    TensorDescriptor, sm_90+ (or the interpreter), 16-byte aligned base pointers and row strides."""
    if TensorDescriptor is None:
        return "this Triton has no triton.tools.tensor_descriptor.TensorDescriptor"
    if not INTERPRET:
        if x.device.type != "cuda":
            return f"TMA needs CUDA tensors, got {x.device}"
        major, _ = torch.cuda.get_device_capability(x.device)
        if major < 9:
            return f"TMA needs sm_90 or newer, {x.device} is sm_{major}x"
    for name, t in (("x", x), ("weight", weight)):
        if t.data_ptr() % 16:
            return f"{name}'s data pointer is not 16-byte aligned"
    if (x.shape[1] * x.element_size()) % 16:
        return f"a row of K={x.shape[1]} {x.dtype} elements is not a multiple of 16 bytes"
    return None


def _operand_descs(x, weight, tma):
    """(use_tma, (x_desc, w_desc)) for the persistent and stream-K kernels: TMA descriptors when tma is True
    (ValueError when `tma_unsupported`) or None and supported, else the pointers themselves."""
    why_not = tma_unsupported(x, weight) if tma is not False else None
    if tma and why_not:
        raise ValueError(f"tma=True but {why_not}")
    if tma is False or why_not is not None:
        return False, (x, weight)
    (m, k), n = x.shape, weight.shape[0]  # block shapes: placeholders, set per config by _set_tma_blocks
    return True, (TensorDescriptor(x, [m, k], [k, 1], [32, 32]), TensorDescriptor(weight, [n, k], [k, 1], [32, 32]))


def streamk_programs(m, n, k, block_m, block_n, block_k, programs):
    """The stream-K grid: min(programs, #tiles * cdiv(K, BLOCK_K)) (no program without an iteration)."""
    return min(programs, triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * triton.cdiv(k, block_k))


def _streamk_workspace_shape(m, n, k, x, mask_src, programs):
    """(slots, fp32 elements per slot) of the stream-K workspace: two slots per program and BLOCK_M * BLOCK_N
    elements each, the largest of any config the autotuner may launch for this shape (its early pruning,
    run here on the same arguments)."""
    configs = linear_fwd_streamk_kernel.configs
    # the pruner reads only the shape and the element sizes / mask dtype: one answer per such key, not a
    # pruning pass on every call (a host cost of every stream-K forward)
    key = (m, n, k, x.element_size(), mask_src.dtype, programs,
           tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in configs))
    hit = _STREAMK_WORKSPACE.get(key)
    if hit is not None:
        return hit
    if not INTERPRET and len(configs) > 1:
        configs = _pruner("M", "N", "x_ptr", "mask_ptr")(configs, {"M": m, "N": n, "x_ptr": x, "mask_ptr": mask_src})
    blocks = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs]
    shape = (2 * max(streamk_programs(m, n, k, *b, programs) for b in blocks), max(bm * bn for bm, bn, _ in blocks))
    if len(_STREAMK_WORKSPACE) > 1024:
        _STREAMK_WORKSPACE.clear()
    _STREAMK_WORKSPACE[key] = shape
    return shape


_STREAMK_WORKSPACE = {}


def fwd(x, weight, bias, mask_src, kind, words, threshold_val, threshold_ptr, split_k=None,
        schedule=None, tma=None, num_sms=None):
    """y = x @ (W * m)^T + bias. split_k: K chunks reduced separately into an fp32 workspace and summed in
    a fixed order (None = split_k_for's choice; any value gives the same result up to fp32 rounding).

    schedule: "tiles" (linear_fwd_kernel, one program per item), "persistent"
    (linear_fwd_persistent_kernel, min(items, num_sms) programs) or "streamk" (linear_fwd_streamk_kernel,
    min(K-iterations, num_sms) programs sharing the K-iterations of all tiles, then
    linear_fwd_streamk_fixup_kernel; it splits K itself, so split_k must be None or 1, and K == 0 takes
    the tiles kernel); None = SPARSEBERT_FWD_SCHEDULE.
    tma (persistent, streamk): True = x and W through TMA descriptors (ValueError when `tma_unsupported`),
    False = pointers, None = TMA where supported. num_sms: the grid's cap (None = the device's SM count on
    CUDA, DEFAULT_SMS otherwise). With the same config the tiles and persistent schedules do the same
    arithmetic per tile (bitwise equal under the interpreter; tests/test_fused_forward_persistent.py);
    stream-K sums a tile's K-ranges in a fixed order (deterministic; tests/test_fused_forward_streamk.py)."""
    schedule = FWD_SCHEDULE if schedule is None else schedule
    if schedule not in FWD_SCHEDULES:
        raise ValueError(f"schedule must be one of {FWD_SCHEDULES} or None, got {schedule!r}")
    if tma is not None and not isinstance(tma, bool):
        raise ValueError(f"tma must be True, False or None, got {tma!r}")
    if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"num_sms must be a positive int or None, got {num_sms!r}")
    if schedule == "tiles" and (tma or num_sms is not None):
        raise ValueError("tma and num_sms apply to schedule='streamk' and schedule='persistent' only")
    if schedule == "streamk" and split_k not in (None, 1):
        raise ValueError(f"split_k applies to schedule='tiles' and 'persistent'; schedule='streamk' splits K "
                         f"itself (split_k must be None or 1), got split_k={split_k!r}")
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if schedule == "streamk" and k > 0:
        return _fwd_streamk(x, weight, bias, mask_src, kind, words, threshold_val, threshold_ptr, y, tma, num_sms)
    split = split_k_for(m, n, k, x.device) if split_k is None else split_k
    if schedule == "streamk":  # K == 0: no K-iteration to share; y = bias (or 0) from the tiles kernel
        schedule, split = "tiles", 1
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split_k must be a positive int, got {split!r}")
    split = min(split, max(1, triton.cdiv(k, 32)))  # more splits than 32-wide K steps would be empty
    ieee, upcast = dot_flags(x.dtype)
    partial = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    args = (x, weight, bias if bias is not None else weight, mask_src, y, partial)
    scalars = (m, n, k, bucket(m), words, threshold_val, threshold_ptr if threshold_ptr is not None else x)
    flags = dict(MASK_KIND=kind, HAS_BIAS=bias is not None, THRESHOLD_FROM_PTR=threshold_ptr is not None,
                SPLIT_K=split, IEEE_DOT=ieee, UPCAST_DOT=upcast)
    if schedule == "tiles":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        linear_fwd_kernel[grid](*args, *scalars, **flags)
    else:
        use_tma, descs = _operand_descs(x, weight, tma)
        programs = sm_count(x.device) if num_sms is None else num_sms
        def grid(meta):
            return (min(triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]) * split, programs),)
        linear_fwd_persistent_kernel[grid](*args, *descs, *scalars, programs, USE_TMA=use_tma, **flags)
    if split > 1:
        reduce_split_k(partial, bias, y, split)
    return y


def reduce_split_k(partial, bias, y, split):
    """y (M, N) = the fp32 partials (split, M, N) summed in split order, + bias, rounded to y's dtype: one
    launch of linear_fwd_reduce_kernel (bitwise-reproducible, no atomics)."""
    m, n = y.shape
    block_m, block_n = (32, 32) if INTERPRET else (32, 128)
    linear_fwd_reduce_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        partial, bias if bias is not None else y, y, m, n,
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n,
    )


def _fwd_streamk(x, weight, bias, mask_src, kind, words, threshold_val, threshold_ptr, y, tma, num_sms):
    """`fwd(schedule="streamk")` for M, N, K > 0: linear_fwd_streamk_kernel, then the fixup of the shared
    tiles (its grid and blocks from the config the autotuner launched: host state, no sync)."""
    (m, k), n = x.shape, weight.shape[0]
    use_tma, descs = _operand_descs(x, weight, tma)
    programs = sm_count(x.device) if num_sms is None else num_sms
    partial = torch.empty(_streamk_workspace_shape(m, n, k, x, mask_src, programs), device=x.device,
                          dtype=torch.float32)
    ieee, upcast = dot_flags(x.dtype)
    bias_arg = bias if bias is not None else weight

    def grid(meta):
        return (streamk_programs(m, n, k, meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], programs),)

    linear_fwd_streamk_kernel[grid](
        x, weight, bias_arg, mask_src, y, partial, *descs,
        m, n, k, bucket(m), words, threshold_val, threshold_ptr if threshold_ptr is not None else x, programs,
        MASK_KIND=kind, HAS_BIAS=bias is not None, THRESHOLD_FROM_PTR=threshold_ptr is not None,
        IEEE_DOT=ieee, UPCAST_DOT=upcast, USE_TMA=use_tma)
    launch_streamk_fixup(partial, bias_arg, y, m, n, k, bias is not None,
                         linear_fwd_streamk_kernel.best_config.kwargs, programs)
    return y


def launch_streamk_fixup(partial, bias_arg, y, m, n, k, has_bias, blocks, programs):
    """linear_fwd_streamk_fixup_kernel for the main kernel launched with `blocks` (a dict holding BLOCK_M,
    BLOCK_N, BLOCK_K, GROUP_M) on min(programs, its K-iterations) programs: one program per tile."""
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    launched = streamk_programs(m, n, k, bm, bn, bk, programs)
    if bm * bn > partial.shape[1] or 2 * launched > partial.shape[0]:  # the workspace was sized for less
        raise RuntimeError(f"stream-K config {bm}x{bn}x{bk} on {launched} programs outgrew its workspace "
                           f"({partial.shape[0]} slots of {partial.shape[1]} elements)")
    linear_fwd_streamk_fixup_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        partial, bias_arg, y, m, n, k, launched,
        HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=blocks["GROUP_M"],
        num_warps=1 if INTERPRET else 4)


def bwd_input(dy, weight, mask_src, kind, words, threshold_val, threshold_ptr):
    m, n = dy.shape
    k = weight.shape[1]
    dx = torch.empty((m, k), device=dy.device, dtype=dy.dtype)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    ieee, upcast = dot_flags(dy.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    linear_bwd_input_kernel[grid](
        dy, weight, mask_src, dx,
        m, n, k, bucket(m), words, threshold_val, threshold_ptr if threshold_ptr is not None else dy,
        MASK_KIND=kind, THRESHOLD_FROM_PTR=threshold_ptr is not None, IEEE_DOT=ieee, UPCAST_DOT=upcast,
    )
    return dx


def bwd_weight(dy, x, weight, mask_src, kind, words, threshold_val, threshold_ptr,
               dweight_dtype, dscores_dtype, split_m=None):
    """G = dy^T x with its epilogue outputs. dweight_dtype / dscores_dtype None = do not write it.
    `weight` is only read for dscores. Returns (dweight or None, dscores or None)."""
    dweight, dscores, _ = bwd_weight_bias(dy, x, weight, mask_src, kind, words, threshold_val, threshold_ptr,
                                          dweight_dtype, dscores_dtype, None, split_m)
    return dweight, dscores


def bwd_weight_bias(dy, x, weight, mask_src, kind, words, threshold_val, threshold_ptr,
                    dweight_dtype, dscores_dtype, dbias_dtype, split_m=None):
    """`bwd_weight` plus dbias = dy.sum(0) (fp32 accumulation, `dbias_dtype`; None = do not write it),
    reduced inside the weight-gradient kernel from the dy tiles it streams: no separate pass over dy.
    Returns (dweight or None, dscores or None, dbias or None)."""
    m, k = x.shape
    n = dy.shape[1]
    dev = x.device
    dweight = torch.empty((n, k), device=dev, dtype=dweight_dtype) if dweight_dtype is not None else None
    dscores = torch.empty((n, k), device=dev, dtype=dscores_dtype) if dscores_dtype is not None else None
    dbias = torch.empty((n,), device=dev, dtype=dbias_dtype) if dbias_dtype is not None else None
    if n == 0 or k == 0:
        if dbias is not None and n > 0:  # K == 0: no GEMM tile to carry the reduction
            dbias = dy.sum(0, dtype=torch.float32).to(dbias_dtype)
        return dweight, dscores, dbias
    split = split_m_for(m, n, k, dev) if split_m is None else int(split_m)
    split = max(1, min(split, max(m, 1)))
    ieee, upcast = dot_flags(x.dtype)
    thr_ptr = threshold_ptr if threshold_ptr is not None else x
    w_arg = weight if weight is not None else x
    common = dict(MASK_KIND=kind, THRESHOLD_FROM_PTR=threshold_ptr is not None, WRITE_DWEIGHT=dweight is not None,
                  WRITE_DSCORES=dscores is not None, WRITE_DBIAS=dbias is not None, SPLIT_M=split)
    partial = torch.empty((split, n, k), device=dev, dtype=torch.float32) if split > 1 else x
    dbias_partial = torch.empty((split, n), device=dev, dtype=torch.float32) if split > 1 and dbias is not None else x
    outs = (dweight if dweight is not None else x, dscores if dscores is not None else x)
    dbias_arg = dbias if dbias is not None else x
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]), split)  # noqa: E731
    linear_bwd_weight_kernel[grid](
        dy, x, w_arg, mask_src, *outs, partial, dbias_arg, dbias_partial,
        m, n, k, bucket(m), words, threshold_val, thr_ptr, IEEE_DOT=ieee, UPCAST_DOT=upcast, **common,
    )
    if split > 1:
        block_n, block_k = (32, 32) if INTERPRET else (64, 128)
        weight_grad_finalize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            partial, w_arg, mask_src, *outs, dbias_arg, dbias_partial,
            n, k, words, threshold_val, thr_ptr, BLOCK_N=block_n, BLOCK_K=block_k, **common,
        )
    return dweight, dscores, dbias
