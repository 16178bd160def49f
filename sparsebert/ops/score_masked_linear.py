"""score_masked_linear: y = x (W * [s >= tau])^T + b, the mask binarized inside the kernel.

The mask is never written to memory. Backward: dX = dY (W * m), and, by the straight-through
estimator, dScores = (dY^T X) * W produced by the same GEMM as the optional dW = (dY^T X) * m
(one GEMM, two epilogue outputs). The threshold travels as a 0-dim tensor so that a threshold computed on
the device by `topk_threshold` needs no host round trip in the ops layer.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _validate as V
from ._backends import impl, resolve_backend


def _tau(threshold: Tensor, backend: str):
    # torch and Triton read the threshold on the device (no host sync); the C++/CUDA ops take a float.
    return threshold if backend in ("torch", "triton") else float(threshold)


@torch.library.custom_op("sparsebert::score_masked_linear", mutates_args=())
def _score_masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, threshold: Tensor,
                         backend: str) -> Tensor:
    return impl(backend).score_masked_linear_fwd(x, weight, bias, scores, _tau(threshold, backend))


@_score_masked_linear.register_fake
def _(x, weight, bias, scores, threshold, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("sparsebert::score_masked_linear_bwd_input", mutates_args=())
def _score_masked_linear_bwd_input(dy: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor, backend: str) -> Tensor:
    return impl(backend).score_masked_linear_bwd_input(dy, weight, scores, _tau(threshold, backend))


@_score_masked_linear_bwd_input.register_fake
def _(dy, weight, scores, threshold, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@torch.library.custom_op("sparsebert::score_masked_linear_bwd_weight_scores", mutates_args=())
def _score_masked_linear_bwd_weight_scores(dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor,
                                           need_dweight: bool, backend: str) -> Tuple[Tensor, Tensor]:
    ds, dw = impl(backend).score_masked_linear_bwd_weight_scores(dy, x, weight, scores, _tau(threshold, backend),
                                                                  need_dweight)
    return ds, (dw if dw is not None else weight.new_empty(0))


@_score_masked_linear_bwd_weight_scores.register_fake
def _(dy, x, weight, scores, threshold, need_dweight, backend):
    return scores.new_empty(scores.shape), (weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias, scores, threshold, backend = inputs
    ctx.save_for_backward(x, weight, scores, threshold)
    ctx.backend, ctx.has_bias = backend, bias is not None


def _backward(ctx, dy):
    x, weight, scores, threshold = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = db = ds = None
    if ctx.needs_input_grad[0]:
        dx = _score_masked_linear_bwd_input(dy, weight, scores, threshold, ctx.backend)
    need_dw, need_ds = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if need_dw or need_ds:
        ds, dw = _score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, need_dw, ctx.backend)
        ds = ds if need_ds else None
        dw = dw if need_dw else None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, ds, None, None


_score_masked_linear.register_autograd(_backward, setup_context=_setup)


def score_masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor,
                        threshold: Union[float, Tensor], *, backend: str = "auto") -> Tensor:
    """y = x (W * [scores >= threshold])^T + b; gradients: dX, dScores (STE), dW and db when they require grad.

    x: (..., K) float32/float16/bfloat16; weight: (N, K) same dtype; scores: (N, K) any float dtype
    (bf16 scores halve the bytes read); threshold: float or 0-dim tensor, not NaN.
    """
    V.check_linear(x, weight, bias)
    V.check_scores(scores, weight)
    tau = V.as_threshold(threshold, weight.device)
    chosen = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    y = _score_masked_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                             None if bias is None else bias.contiguous(), scores.contiguous(), tau, chosen)
    return y.reshape(*lead, weight.shape[0])
