"""Triton score-masked linear (movement pruning): y = x @ (W * [scores >= tau])^T + b.

The keep-mask is binarized in registers from the scores tile (any float dtype, e.g. bf16 scores beside
fp32 weights) and never written to memory. Backward: dx = dy @ (W * m), and ONE GEMM G = dy^T @ x whose
epilogue writes both dscores = G * W (straight-through estimator, scores' dtype) and, when asked,
dweight = G * m (weight's dtype).

Threshold: a Python float, or a 0-dim float tensor on the scores' device (read by the kernels through a
pointer, so e.g. the result of `topk_threshold` is used without a host-device sync). Either way it is
rounded to the scores' dtype before comparing, which is exactly torch's `scores >= threshold`.
Shapes/dtypes otherwise as in `masked_linear` (x, dy (M, K)/(M, N) contiguous fp32/fp16/bf16; weight
(N, K) contiguous in x's dtype; scores (N, K) contiguous, any of fp32/fp16/bf16; bias (N,) or None; fp32
accumulation; outputs in x's dtype).
"""
from typing import Optional, Tuple, Union

import torch

from . import _gemm
from .masked_linear import _check_bias

__all__ = ["score_masked_linear_fwd", "score_masked_linear_bwd_input", "score_masked_linear_bwd_weight_scores",
           "score_masked_linear_bwd_weight_scores_bias"]

Threshold = Union[float, torch.Tensor]


def _check_weight_scores(weight, scores, k=None, dtype=None):
    _gemm.check_matrix("weight", weight, (None, k), (dtype,) if dtype is not None else _gemm.FLOATS)
    _gemm.check_matrix("scores", scores, tuple(weight.shape))


def score_masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scores: torch.Tensor,
                            threshold: Threshold, *, schedule: Optional[str] = None) -> torch.Tensor:
    """y = x @ (weight * (scores >= threshold)).T + bias, shape (M, N), x's dtype. schedule: the forward's
    grid, "tiles", "persistent" or "streamk" (None = SPARSEBERT_FWD_SCHEDULE; see `_gemm.fwd`)."""
    _gemm.check_matrix("x", x)
    _check_weight_scores(weight, scores, x.shape[1], x.dtype)
    _check_bias(bias, weight.shape[0])
    tau, tau_ptr = _gemm.threshold_args(threshold, scores)
    _gemm.check_device(x, weight, scores, bias)
    return _gemm.fwd(x, weight, bias, scores, _gemm.MASK_SCORES, 0, tau, tau_ptr, schedule=schedule)


def score_masked_linear_bwd_input(dy: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                                  threshold: Threshold) -> torch.Tensor:
    """dx = dy @ (weight * (scores >= threshold)), shape (M, K), dy's dtype."""
    _check_weight_scores(weight, scores)
    _gemm.check_matrix("dy", dy, (None, weight.shape[0]), (weight.dtype,))
    tau, tau_ptr = _gemm.threshold_args(threshold, scores)
    _gemm.check_device(dy, weight, scores)
    return _gemm.bwd_input(dy, weight, scores, _gemm.MASK_SCORES, 0, tau, tau_ptr)


def score_masked_linear_bwd_weight_scores(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                                          threshold: Threshold, need_dweight: bool
                                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dscores, dweight or None) from one GEMM G = dy.T @ x: dscores = G * weight (scores' dtype),
    dweight = G * (scores >= threshold) (weight's dtype) when need_dweight."""
    dscores, dweight, _ = score_masked_linear_bwd_weight_scores_bias(dy, x, weight, scores, threshold, need_dweight,
                                                                      False)
    return dscores, dweight


def score_masked_linear_bwd_weight_scores_bias(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                               scores: torch.Tensor, threshold: Threshold, need_dweight: bool,
                                               need_dbias: bool
                                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dscores, dweight or None, dbias or None): the first two as `score_masked_linear_bwd_weight_scores`;
    dbias = dy.sum(0) (N,), fp32 accumulation, dy's dtype, reduced by the same kernel from the dy tiles it
    reads for the GEMM (no second pass over dy)."""
    _gemm.check_matrix("x", x)
    _check_weight_scores(weight, scores, x.shape[1], x.dtype)
    _gemm.check_matrix("dy", dy, (x.shape[0], weight.shape[0]), (x.dtype,))
    if not isinstance(need_dweight, bool):
        raise TypeError(f"need_dweight must be a bool, got {type(need_dweight).__name__}")
    if not isinstance(need_dbias, bool):
        raise TypeError(f"need_dbias must be a bool, got {type(need_dbias).__name__}")
    tau, tau_ptr = _gemm.threshold_args(threshold, scores)
    _gemm.check_device(dy, x, weight, scores)
    dweight, dscores, dbias = _gemm.bwd_weight_bias(dy, x, weight, scores, _gemm.MASK_SCORES, 0, tau, tau_ptr,
                                                    weight.dtype if need_dweight else None, scores.dtype,
                                                    dy.dtype if need_dbias else None)
    return dscores, dweight, dbias
