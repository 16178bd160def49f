"""Block-sparse (BSR) linear: y = x @ W.T + bias, W stored as B x B blocks in torch's BSR layout.

values (nnzb, B, B), crow_indices (N/B + 1,) int32, col_indices (nnzb,) int32. Each program owns a
BLOCK_M x B output tile (one block row of W) and loops only over that row's nonzero blocks: one x tile
load, one block load and one `tl.dot` per nonzero block, so the work is the dense work times the block
density, at dense per-block efficiency. Two schedules (`bsr_linear_fwd(schedule=...)`):
    tiles       one program per (M tile, block row); programs of one block row are adjacent in the launch
                order so its blocks are read from L2 by all token tiles. 1-5 nonzero blocks per row at
                10% density make each program a short, prologue-bound loop.
    persistent  about PROGRAMS_PER_SM x SMs programs; each owns one block row and a strided set of its M
                tiles, and runs one flattened loop over (M tile, nonzero block) with the epilogue on each
                tile's last block, so the software pipeline spans tiles and the row's blocks stay hot
                (weight-stationary in L1/L2; a dynamic number of blocks cannot be held in registers).
Both autotune on (M bucket, N, K, B, density bucket = nonzero blocks per block row as a power of two).
"""

import torch
import triton
import triton.language as tl

from ._interpreter import exact_dot
from ._autotune import select


def _configs():
    # quick: BLOCK_M 16 (4 warps, 2 stages) and 128 (4 warps, 3 stages)
    return select("bsr_linear", [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (16, 64, 128) for w in (4, 8) for s in (2, 3, 4)
    ] + [triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=s) for s in (2, 3)],
        [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)], quick=(0, 13))


def _prune_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "B", "DENSITY_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _bsr_linear_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET, DENSITY_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    block_elems = offs_b[:, None] * B + offs_b[None, :]

    first = tl.load(crow_ptr + block_row)
    last = tl.load(crow_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for i in range(first, last):
        col = tl.load(col_ptr + i)
        x = tl.load(x_rows + (col * B + offs_b)[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(values_ptr + i * (B * B) + block_elems)  # (B out rows, B in cols)
        if IEEE:  # fp32 inputs, or bf16 under the interpreter (whose bf16 tl.dot is wrong): exact fp32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    offs_n = block_row * B + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


# ------------------------------------------------------------------------------- persistent schedule
def _persistent_configs():
    # quick: BLOCK_M 128 (4 warps, 3 stages) and 32 (4 warps, 3 stages)
    return select("bsr_linear._bsr_linear_persistent_kernel", [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm, w in ((32, 4), (64, 4), (128, 4), (128, 8)) for s in (3, 4, 5)
    ] + [triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=s) for s in (2, 3)],
        [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)], quick=(6, 0))


# Programs per SM the persistent grid aims for (two resident CTAs hide one's epilogue behind the other's
# mainloop); under the interpreter a small constant SM count, so CPU tests run several M tiles per program.
PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 2
_SM_COUNT = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached); INTERPRETER_SMS for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def m_splits(m: int, block_rows: int, block_m: int, sms: int) -> int:
    """How many programs share one block row: enough for PROGRAMS_PER_SM * sms programs in all, never more
    than the row's M tiles."""
    return max(1, min(triton.cdiv(max(m, 1), block_m), triton.cdiv(PROGRAMS_PER_SM * sms, max(block_rows, 1))))


@triton.autotune(configs=_persistent_configs(), key=["M_BUCKET", "N", "K", "B", "DENSITY_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _bsr_linear_persistent_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET, DENSITY_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # program (block_row, split) computes M tiles split, split + splits, ... of one block row of W, in one
    # flattened loop over (M tile, nonzero block): the row's blocks stay hot in L1/L2 for all its M tiles
    # and the software pipeline (num_stages) runs across tiles instead of restarting per tile.
    block_row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    num_tiles = tl.cdiv(M, BLOCK_M)
    my_tiles = tl.cdiv(num_tiles - split, splits)
    first = tl.load(crow_ptr + block_row)
    nnz = tl.load(crow_ptr + block_row + 1) - first
    steps = tl.maximum(nnz, 1)  # an empty block row still writes its tiles (bias or zeros): one step
    # an empty block row multiplies block 0 (the launcher sends no all-empty weight here) by masked-off,
    # zero x rows: no masks on the block or index loads, which keeps them vectorised
    m_load = tl.where(nnz > 0, M, 0)

    offs_b = tl.arange(0, B)
    offs_n = block_row * B + offs_b
    block_elems = offs_b[:, None] * B + offs_b[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n).to(tl.float32)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for it in range(0, my_tiles * steps):
        t = it // steps
        ki = it - t * steps
        offs_m = (split + t * splits) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        i = tl.where(nnz > 0, first + ki, 0)
        col = tl.load(col_ptr + i)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (col * B + offs_b)[None, :],
                    mask=(offs_m < m_load)[:, None], other=0.0)
        w = tl.load(values_ptr + i * (B * B) + block_elems)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        if ki == steps - 1:
            out = acc
            if HAS_BIAS:
                out += bias[None, :]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])
            acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)


def density_bucket(nnzb: int, block_rows: int) -> int:
    """Nonzero blocks per block row, rounded up to a power of two (>= 1): the autotune key's density."""
    return triton.next_power_of_2(max(1, triton.cdiv(nnzb, max(block_rows, 1))))


SCHEDULES = ("auto", "persistent", "tiles")
# "auto" takes the persistent schedule from this many tokens on; below it a block row has at most a few
# M tiles, and the one-tile-per-program grid (no loop-carried epilogue) is the simpler launch. A guess
# from the schedules' structure, not yet measured on a GPU (bench/bench_sparse_inference.py --bsr-schedule).
PERSISTENT_MIN_TOKENS = 256


def bsr_linear_fwd(x, values, crow_indices, col_indices, bias, in_features: int, schedule: str = "auto"):
    """x (M, K) contiguous -> y (M, N) in x's dtype. Inputs are validated by sparsebert.ops.

    schedule: "tiles" (one program per (M tile, block row)), "persistent" (programs per block row loop
    over M tiles, as many programs as the GPU holds at once; a weight with no blocks takes "tiles") or
    "auto" (persistent from PERSISTENT_MIN_TOKENS tokens on)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m, k = x.shape
    block = values.shape[-1]
    block_rows = crow_indices.numel() - 1
    n = block_rows * block
    if values.numel() >= 2**31:
        raise ValueError(f"values has {values.numel()} elements; the BSR kernel indexes them with int32")
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    args = (x, values, crow_indices, col_indices, bias if bias is not None else x, y,
            m, n, k, x.stride(0), y.stride(0), triton.next_power_of_2(max(m, 1)),
            density_bucket(values.shape[0], block_rows))
    meta = dict(HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype), B=block)
    if schedule == "auto":
        schedule = "persistent" if m >= PERSISTENT_MIN_TOKENS else "tiles"
    if schedule == "persistent" and values.shape[0] > 0:  # an all-empty weight: the tiles grid writes bias
        sms = sm_count(x.device)
        grid = lambda meta: (block_rows, m_splits(m, block_rows, meta["BLOCK_M"], sms))  # noqa: E731
        _bsr_linear_persistent_kernel[grid](*args, **meta)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), block_rows)  # noqa: E731
        _bsr_linear_kernel[grid](*args, **meta)
    return y
