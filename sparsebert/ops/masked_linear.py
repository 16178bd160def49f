"""masked_linear: y = x (W * m)^T + b with a fixed mask (bool/uint8, or bit-packed int32).

Backward gives dX and dW * m (retraining a pruned layer, as in IMP), and db.
One torch.library op per kernel (forward, input backward, weight backward), each with a fake impl, so
the whole thing traces under torch.compile; `register_autograd` ties them together.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from ._backends import impl, resolve_backend


@torch.library.custom_op("sparsebert::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, packed: bool, backend: str) -> Tensor:
    return impl(backend).masked_linear_fwd(x, weight, bias, mask, packed)


@_masked_linear.register_fake
def _(x, weight, bias, mask, packed, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("sparsebert::masked_linear_bwd_input", mutates_args=())
def _masked_linear_bwd_input(dy: Tensor, weight: Tensor, mask: Tensor, packed: bool, backend: str) -> Tensor:
    return impl(backend).masked_linear_bwd_input(dy, weight, mask, packed)


@_masked_linear_bwd_input.register_fake
def _(dy, weight, mask, packed, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@torch.library.custom_op("sparsebert::masked_linear_bwd_weight", mutates_args=())
def _masked_linear_bwd_weight(dy: Tensor, x: Tensor, mask: Tensor, packed: bool, backend: str) -> Tensor:
    return impl(backend).masked_linear_bwd_weight(dy, x, mask, packed)


@_masked_linear_bwd_weight.register_fake
def _(dy, x, mask, packed, backend):
    return x.new_empty(dy.shape[1], x.shape[1])


def _setup(ctx, inputs, output):
    x, weight, bias, mask, packed, backend = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.packed, ctx.backend, ctx.has_bias = packed, backend, bias is not None


def _backward(ctx, dy):
    x, weight, mask = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _masked_linear_bwd_input(dy, weight, mask, ctx.packed, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = _masked_linear_bwd_weight(dy, x, mask, ctx.packed, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, None, None, None


_masked_linear.register_autograd(_backward, setup_context=_setup)


def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, *, backend: str = "auto") -> Tensor:
    """y = x (W * m)^T + b.

    x: (..., K) float32/float16/bfloat16, any layout; weight: (N, K) same dtype; bias: (N,) or None;
    mask: (N, K) bool/uint8 (nonzero keeps) or (N, ceil(K/32)) int32 bit-packed (see `pack_mask`).
    backend: "auto", "torch", "cpp", "cuda" or "triton".
    """
    V.check_linear(x, weight, bias)
    packed = V.check_mask(mask, weight)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    chosen = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    y = _masked_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                       None if bias is None else bias.contiguous(), mask.contiguous(), packed, chosen)
    return y.reshape(*lead, weight.shape[0])
