"""Block-sparse (BSR) linear: y = x @ W.T + bias, W stored as B x B blocks in torch's BSR layout.

values (nnzb, B, B), crow_indices (N/B + 1,) int32, col_indices (nnzb,) int32. Each program owns a
BLOCK_M x B output tile (one block row of W) and loops only over that row's nonzero blocks: one x tile
load, one block load and one `tl.dot` per nonzero block, so the work is the dense work times the block
density, at dense per-block efficiency. Programs of one block row are adjacent in the launch order so
its blocks are read from L2 by all token tiles.
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


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "B"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _bsr_linear_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
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


def bsr_linear_fwd(x, values, crow_indices, col_indices, bias, in_features: int):
    """x (M, K) contiguous -> y (M, N) in x's dtype. Inputs are validated by sparsebert.ops."""
    m, k = x.shape
    block = values.shape[-1]
    n = (crow_indices.numel() - 1) * block
    if values.numel() >= 2**31:
        raise ValueError(f"values has {values.numel()} elements; the BSR kernel indexes them with int32")
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n // block)  # noqa: E731
    _bsr_linear_kernel[grid](
        x, values, crow_indices, col_indices, bias if bias is not None else x, y,
        m, n, k, x.stride(0), y.stride(0), triton.next_power_of_2(max(m, 1)),
        HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype), B=block,
    )
    return y
