"""score_masked_linear: y = x (W * [s >= tau])^T + b, the mask binarized inside the kernel.

The mask is never written to memory. Backward: dX = dY (W * m), and, by the straight-through
estimator, dScores = (dY^T X) * W produced by the same GEMM as the optional dW = (dY^T X) * m
(one GEMM, two epilogue outputs); db = sum of dY over the tokens comes from the same backend call (the
Triton kernel reduces it from the dY tiles its GEMM streams; torch, C++ and CUDA take dY.sum(0)). The
threshold travels as a 0-dim tensor so that a threshold computed on the device by `topk_threshold` needs no
host round trip in the ops layer.

Size dispatch (issue 10 item 1, as `masked_linear`): with backend="auto" on CUDA at or above the measured
crossover, `sparsebert::score_masked_weight` writes W * [s >= tau] once, F.linear (cuBLAS, bias in the
epilogue) and autograd's input-gradient GEMM share it, and the weight gradient is cuBLAS G = dY^T X followed
by one elementwise pass writing dScores = G * W and dW = G * m (`sparsebert::score_masked_weight_grad`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import _validate as V
from ._backends import impl, op_backend, resolve_backend
from .masked_linear import PASS_BACKENDS, _auto_takes_weight_pass, pass_backend


def _tau(threshold: Tensor, backend: str) -> Tensor:
    # Every backend takes the 0-dim tensor and reads it where it lives (the C++/CUDA ops through their
    # `.tensor` overloads): no host sync.
    return threshold


@custom_op("sparsebert::score_masked_linear", mutates_args=())
def _score_masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, threshold: Tensor,
                         backend: str) -> Tensor:
    backend = resolve_backend(backend, x.device)
    return impl(backend).score_masked_linear_fwd(x, weight, bias, scores, _tau(threshold, backend))


@_score_masked_linear.register_fake
def _(x, weight, bias, scores, threshold, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("sparsebert::score_masked_linear_bwd_input", mutates_args=())
def _score_masked_linear_bwd_input(dy: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor, backend: str) -> Tensor:
    backend = resolve_backend(backend, dy.device)
    return impl(backend).score_masked_linear_bwd_input(dy, weight, scores, _tau(threshold, backend))


@_score_masked_linear_bwd_input.register_fake
def _(dy, weight, scores, threshold, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@custom_op("sparsebert::score_masked_linear_bwd_weight_scores", mutates_args=())
def _score_masked_linear_bwd_weight_scores(dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor,
                                           need_dweight: bool, need_dbias: bool,
                                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dScores, dW, db) from one backend call (the Triton kernel reduces db from the dY tiles its GEMM
    streams); an output not asked for is an empty tensor."""
    backend = resolve_backend(backend, dy.device)
    ds, dw, db = impl(backend).score_masked_linear_bwd_weight_scores_bias(
        dy, x, weight, scores, _tau(threshold, backend), need_dweight, need_dbias)
    return ds, (dw if dw is not None else weight.new_empty(0)), (db if db is not None else dy.new_empty(0))


@_score_masked_linear_bwd_weight_scores.register_fake
def _(dy, x, weight, scores, threshold, need_dweight, need_dbias, backend):
    return (scores.new_empty(scores.shape), weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0),
            dy.new_empty(dy.shape[1] if need_dbias else 0))


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
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    if need_dw or need_ds:
        ds, dw, db = _score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, need_dw, need_db,
                                                            ctx.backend)
        ds = ds if need_ds else None
        dw = dw if need_dw else None
        db = db if need_db else None
    elif need_db:  # no weight-gradient GEMM to carry the reduction
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, ds, None, None


_score_masked_linear.register_autograd(_backward, setup_context=_setup)


@custom_op("sparsebert::score_masked_weight", mutates_args=())
def _score_masked_weight(weight: Tensor, scores: Tensor, threshold: Tensor, backend: str) -> Tensor:
    """W * [scores >= tau] (masked-dense), one elementwise pass; tau read on the device."""
    if backend == "triton":
        from sparsebert.kernels import _gemm, mask_weight
        return mask_weight.masked_weight(weight, scores, _gemm.MASK_SCORES, threshold)
    if backend == "cpp":
        return torch.ops.sparsebert_ext.score_masked_weight(weight, scores, threshold)
    from ._torch_backend import _masked
    return _masked(weight, scores >= threshold)


@_score_masked_weight.register_fake
def _(weight, scores, threshold, backend):
    return torch.empty_like(weight)


@custom_op("sparsebert::score_masked_weight_grad", mutates_args=())
def _score_masked_weight_grad(grad: Tensor, weight: Tensor, scores: Tensor, threshold: Tensor, need_dscores: bool,
                              need_dweight: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """From G = dY^T X: (dscores = G * W in the scores' dtype, dweight = G * m in the weight's dtype), one pass;
    an output not asked for is an empty tensor."""
    if backend == "triton":
        from sparsebert.kernels import _gemm, mask_weight
        ds, dw = mask_weight.weight_grad_epilogue(grad, weight, scores, _gemm.MASK_SCORES, threshold,
                                                  need_dscores=need_dscores, need_dweight=need_dweight)
    elif backend == "cpp":
        ds, dw = torch.ops.sparsebert_ext.score_masked_weight_grad(grad, weight, scores, threshold, need_dscores,
                                                                   need_dweight)
    else:
        from ._torch_backend import _masked
        g = grad.float()
        ds = (g * weight.float()).to(scores.dtype) if need_dscores else None
        dw = _masked(g, scores >= threshold).to(weight.dtype) if need_dweight else None
    return (ds if ds is not None else scores.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_score_masked_weight_grad.register_fake
def _(grad, weight, scores, threshold, need_dscores, need_dweight, backend):
    return (scores.new_empty(scores.shape) if need_dscores else scores.new_empty(0),
            weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0))


def _setup_weight(ctx, inputs, output):
    weight, scores, threshold, backend = inputs
    ctx.save_for_backward(weight, scores, threshold)
    ctx.backend = backend


def _backward_weight(ctx, grad):
    weight, scores, threshold = ctx.saved_tensors
    need_dw, need_ds = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dw or need_ds):
        return None, None, None, None
    ds, dw = _score_masked_weight_grad(grad.contiguous(), weight, scores, threshold, need_ds, need_dw, ctx.backend)
    return (dw if need_dw else None), (ds if need_ds else None), None, None


_score_masked_weight.register_autograd(_backward_weight, setup_context=_setup_weight)


def score_masked_linear_weight_pass(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor,
                                    threshold: Union[float, Tensor], *, pass_kernel: Optional[str] = None) -> Tensor:
    """The weight-pass path of `score_masked_linear` (what "auto" runs at or above the crossover).
    pass_kernel: "triton", "torch" or None (best available)."""
    V.check_linear(x, weight, bias)
    V.check_scores(scores, weight)
    return _weight_pass(x, weight, bias, scores, V.as_threshold(threshold, weight.device), pass_kernel)


def _weight_pass(x, weight, bias, scores, tau, pass_kernel):
    if pass_kernel is None:
        pass_kernel = pass_backend(x.device)
    elif pass_kernel not in PASS_BACKENDS:
        raise ValueError(f"pass_kernel must be one of {PASS_BACKENDS} or None, got {pass_kernel!r}")
    w_eff = _score_masked_weight(weight.contiguous(), scores.contiguous(), tau, pass_kernel)
    return torch.nn.functional.linear(x, w_eff, bias)


def score_masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor,
                        threshold: Union[float, Tensor], *, backend: str = "auto") -> Tensor:
    """y = x (W * [scores >= threshold])^T + b; gradients: dX, dScores (STE), dW and db when they require grad.

    x: (..., K) float32/float16/bfloat16; weight: (N, K) same dtype; scores: (N, K) any float dtype
    (bf16 scores halve the bytes read); threshold: float or 0-dim tensor, not NaN.
    """
    V.check_linear(x, weight, bias)
    V.check_scores(scores, weight)
    tau = V.as_threshold(threshold, weight.device)
    if _auto_takes_weight_pass("score_masked_linear", backend, x):
        return _weight_pass(x, weight, bias, scores, tau, None)
    chosen = op_backend(backend, x.device)
    lead = x.shape[:-1]
    y = _score_masked_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                             None if bias is None else bias.contiguous(), scores.contiguous(), tau, chosen)
    return y.reshape(*lead, weight.shape[0])
