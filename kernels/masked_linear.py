"""Triton masked linear: y = x @ (W * m)^T + b with a fixed 0/1 mask, never materializing W * m.

Backend-level contract of docs/ARCHITECTURE.md (2-D, already-validated-shape inputs; checked again here):
    x (M, K), dy (M, N) contiguous fp32/fp16/bf16; weight (N, K) contiguous, x's dtype; bias (N,) float
    or None; mask (N, K) uint8/bool (nonzero = keep) with packed=False,
    or (N, ceil(K/32)) int32 with packed=True (bit k % 32 of word k // 32, LSB first).
Accumulation in fp32; outputs in x's (dy's) dtype. The kernels live in `_gemm.py` (shared with
`score_masked_linear`): the mask is applied to each weight tile right after its load inside the K loop,
the bias is added in the epilogue, and the weight gradient is masked in the GEMM epilogue.
"""
from typing import Optional, Tuple

import torch

from . import _gemm

__all__ = ["masked_linear_fwd", "masked_linear_bwd_input", "masked_linear_bwd_weight", "masked_linear_bwd_weight_bias"]


def _check_weight_side(weight, mask, packed, k=None, dtype=None):
    _gemm.check_matrix("weight", weight, (None, k), (dtype,) if dtype is not None else _gemm.FLOATS)
    n, k = weight.shape
    return _gemm.check_mask(mask, packed, n, k)


def masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                      packed: bool, *, schedule: Optional[str] = None) -> torch.Tensor:
    """y = x @ (weight * mask).T + bias, shape (M, N), x's dtype. schedule: the forward's grid, "tiles",
    "persistent" or "streamk" (None = SPARSEBERT_FWD_SCHEDULE; see `_gemm.fwd`)."""
    _gemm.check_matrix("x", x)
    mask, kind, words = _check_weight_side(weight, mask, packed, x.shape[1], x.dtype)
    _check_bias(bias, weight.shape[0])
    _gemm.check_device(x, weight, mask, bias)
    return _gemm.fwd(x, weight, bias, mask, kind, words, 0.0, None, schedule=schedule)


def masked_linear_bwd_input(dy: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, packed: bool) -> torch.Tensor:
    """dx = dy @ (weight * mask), shape (M, K), dy's dtype."""
    mask, kind, words = _check_weight_side(weight, mask, packed)
    _gemm.check_matrix("dy", dy, (None, weight.shape[0]), (weight.dtype,))
    _gemm.check_device(dy, weight, mask)
    return _gemm.bwd_input(dy, weight, mask, kind, words, 0.0, None)


def masked_linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, packed: bool) -> torch.Tensor:
    """dw = (dy.T @ x) * mask, shape (N, K), x's dtype; one GEMM with the mask applied in its epilogue."""
    return masked_linear_bwd_weight_bias(dy, x, mask, packed, False)[0]


def masked_linear_bwd_weight_bias(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, packed: bool,
                                  need_dbias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dw, db or None): dw as `masked_linear_bwd_weight`; db = dy.sum(0) (N,), fp32 accumulation, dy's
    dtype, reduced by the same kernel from the dy tiles it reads for the GEMM (no second pass over dy)."""
    _gemm.check_matrix("x", x)
    _gemm.check_matrix("dy", dy, (x.shape[0], None), (x.dtype,))
    mask, kind, words = _gemm.check_mask(mask, packed, dy.shape[1], x.shape[1])
    if not isinstance(need_dbias, bool):
        raise TypeError(f"need_dbias must be a bool, got {type(need_dbias).__name__}")
    _gemm.check_device(dy, x, mask)
    dweight, _, dbias = _gemm.bwd_weight_bias(dy, x, None, mask, kind, words, 0.0, None, x.dtype, None,
                                              dy.dtype if need_dbias else None)
    return dweight, dbias


def _check_bias(bias, n):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in _gemm.FLOATS:
        raise TypeError(f"bias must be fp32/fp16/bf16, got {bias.dtype}")
    if bias.shape != (n,) or not bias.is_contiguous():
        raise ValueError(f"bias must be a contiguous ({n},) tensor, got shape {tuple(bias.shape)}")
