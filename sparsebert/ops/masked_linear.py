"""masked_linear: y = x (W * m)^T + b with a fixed mask (bool/uint8, or bit-packed int32).

Backward gives dX and dW * m (retraining a pruned layer, as in IMP), and db. The backends' weight-gradient
function returns db too: the Triton kernel reduces it from the dY tiles its GEMM streams (no second pass
over dY); the torch, C++ and CUDA backends take a separate `dY.sum(0)`.
One torch.library op per kernel (forward, input backward, weight backward), each with a fake impl, so
the whole thing traces under torch.compile; `register_autograd` ties them together.

Size dispatch (issue 10 item 1): with backend="auto" on CUDA and at least the crossover number of tokens
(`_crossover`, a measured per-GPU table), the layer runs as the weight pass: `sparsebert::masked_weight`
writes W * m once (one elementwise kernel), F.linear does the forward GEMM with the bias in cuBLAS's
epilogue, autograd's input-gradient GEMM reads the same W * m, and the weight gradient is cuBLAS dY^T X
followed by the same elementwise pass (dW = G * m); db is autograd's reduction of dY. On the CPU "auto" keeps
the fused C++ ops: they build W * m in the forward and again in the input gradient, the weight pass once per
step but keeps it alive from the forward to the backward (one W-sized tensor per layer); since the C++
passes became branch-free (~0.08 ms for 590k fp32 elements) the two measure the same per step
(bench/results/README.md), so the path without the extra memory stays.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import _crossover, _env
from . import _validate as V
from ._backends import available_backends, impl, op_backend, resolve_backend

PASS_BACKENDS = ("triton", "cpp", "torch")  # the kernels of the elementwise weight pass


@custom_op("sparsebert::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, packed: bool, backend: str) -> Tensor:
    return impl(resolve_backend(backend, x.device)).masked_linear_fwd(x, weight, bias, mask, packed)


@_masked_linear.register_fake
def _(x, weight, bias, mask, packed, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("sparsebert::masked_linear_bwd_input", mutates_args=())
def _masked_linear_bwd_input(dy: Tensor, weight: Tensor, mask: Tensor, packed: bool, backend: str) -> Tensor:
    return impl(resolve_backend(backend, dy.device)).masked_linear_bwd_input(dy, weight, mask, packed)


@_masked_linear_bwd_input.register_fake
def _(dy, weight, mask, packed, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@custom_op("sparsebert::masked_linear_bwd_weight", mutates_args=())
def _masked_linear_bwd_weight(dy: Tensor, x: Tensor, mask: Tensor, packed: bool, need_dbias: bool,
                              backend: str) -> Tuple[Tensor, Tensor]:
    """(dW, db) from one backend call; db is an empty tensor when not asked for."""
    dw, db = impl(resolve_backend(backend, dy.device)).masked_linear_bwd_weight_bias(dy, x, mask, packed, need_dbias)
    return dw, (db if db is not None else dy.new_empty(0))


@_masked_linear_bwd_weight.register_fake
def _(dy, x, mask, packed, need_dbias, backend):
    return x.new_empty(dy.shape[1], x.shape[1]), dy.new_empty(dy.shape[1] if need_dbias else 0)


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
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1]:
        dw, db = _masked_linear_bwd_weight(dy, x, mask, ctx.packed, need_db, ctx.backend)
        db = db if need_db else None
    elif need_db:  # no weight-gradient GEMM to carry the reduction
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, None, None, None


_masked_linear.register_autograd(_backward, setup_context=_setup)


@custom_op("sparsebert::masked_weight", mutates_args=())
def _masked_weight(weight: Tensor, mask: Tensor, packed: bool, backend: str) -> Tensor:
    """W * m (masked-dense: a pruned entry is 0 even where W is NaN/inf), one elementwise pass."""
    if backend == "triton":
        from sparsebert.kernels import _gemm, mask_weight
        return mask_weight.masked_weight(weight, mask, _gemm.MASK_PACKED if packed else _gemm.MASK_UINT8)
    if backend == "cpp":
        return torch.ops.sparsebert_ext.masked_weight(weight, mask, packed)
    from ._torch_backend import _keep, _masked
    return _masked(weight, _keep(mask, packed, weight.shape[1]))


@_masked_weight.register_fake
def _(weight, mask, packed, backend):
    return torch.empty_like(weight)


def _setup_weight(ctx, inputs, output):
    weight, mask, packed, backend = inputs
    ctx.save_for_backward(mask)
    ctx.packed, ctx.backend = packed, backend


def _backward_weight(ctx, grad):
    (mask,) = ctx.saved_tensors
    # dW = dW_eff * m: the same elementwise pass, on the gradient cuBLAS computed (dY^T X)
    return _masked_weight(grad.contiguous(), mask, ctx.packed, ctx.backend), None, None, None


_masked_weight.register_autograd(_backward_weight, setup_context=_setup_weight)


def pass_backend(device: torch.device) -> str:
    """The kernel of the weight pass on `device`: on a GPU Triton, else torch; on the CPU the C++ kernels
    where built, else Triton's interpreter where it is on, else torch (cached per device type and
    TRITON_INTERPRET: it runs on every call of the weight pass)."""
    key = (device.type, _env.triton_interpret())
    hit = _PASS_BACKEND.get(key)
    if hit is None:
        usable = available_backends(device)
        order = ("cpp", "triton", "torch") if device.type == "cpu" else ("triton", "torch")
        hit = _PASS_BACKEND[key] = next(b for b in order if b in usable)
    return hit


_PASS_BACKEND = {}


def masked_linear_weight_pass(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, *,
                              pass_kernel: Optional[str] = None) -> Tensor:
    """The weight-pass path of `masked_linear` (what "auto" runs at or above the crossover): W * m written
    once, then dense GEMMs (cuBLAS on a GPU). pass_kernel: "triton", "torch" or None (best available)."""
    V.check_linear(x, weight, bias)
    packed = V.check_mask(mask, weight)
    return _weight_pass(x, weight, bias, mask, packed, pass_kernel)


def _weight_pass(x, weight, bias, mask, packed, pass_kernel):
    if pass_kernel is None:
        pass_kernel = pass_backend(x.device)
    elif pass_kernel not in PASS_BACKENDS:
        raise ValueError(f"pass_kernel must be one of {PASS_BACKENDS} or None, got {pass_kernel!r}")
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    w_eff = _masked_weight(weight.contiguous(), mask.contiguous(), packed, pass_kernel)
    return torch.nn.functional.linear(x, w_eff, bias)


def _auto_takes_weight_pass(op: str, backend: str, x: Tensor) -> bool:
    """Whether backend="auto" runs the layer as the weight pass: on CUDA at or above the measured crossover
    (`_crossover`), in training and inference alike. On the CPU never: since their passes are branch-free,
    the fused C++ ops cost the same per training step without the W-sized tensor per layer that the weight
    pass keeps for the backward (a MiniLM mask-training step, bench/bench_mask_training_step.py: 1.06x
    dense fused, 1.07x weight pass, same run; bench/results/README.md). The explicit `*_weight_pass`
    functions still take pass_kernel="cpp"."""
    if backend != "auto" or x.device.type != "cuda" or _env.backend_override() != "auto":
        return False
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return _crossover.use_weight_pass(op, x.device, x.dtype, tokens)


def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, *, backend: str = "auto") -> Tensor:
    """y = x (W * m)^T + b.

    x: (..., K) float32/float16/bfloat16, any layout; weight: (N, K) same dtype; bias: (N,) or None;
    mask: (N, K) bool/uint8 (nonzero keeps) or (N, ceil(K/32)) int32 bit-packed (see `pack_mask`).
    backend: "auto", "torch", "cpp", "cuda" or "triton". "auto" on CUDA picks by token count against the
    measured crossover (`_crossover`): the weight pass + cuBLAS above it, the fused kernels below.
    """
    V.check_linear(x, weight, bias)
    packed = V.check_mask(mask, weight)
    if _auto_takes_weight_pass("masked_linear", backend, x):
        return _weight_pass(x, weight, bias, mask, packed, None)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    chosen = op_backend(backend, x.device)
    lead = x.shape[:-1]
    y = _masked_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                       None if bias is None else bias.contiguous(), mask.contiguous(), packed, chosen)
    return y.reshape(*lead, weight.shape[0])
