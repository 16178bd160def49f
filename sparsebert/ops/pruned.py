"""Head/neuron-pruned attention and FFN on dense weights with index lists of kept units (ops layer).

``pruned_ffn(x, w_in, b_in, w_out, b_out, keep, *, backend="auto")`` and
``pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask=None, *, backend="auto")``.
Backends: "torch" (the references in `sparsebert.ops.reference`: gather the kept rows/columns, then dense
torch ops) and "triton" (``sparsebert.kernels.pruned_ffn`` / ``pruned_attention``: read only the kept
rows/columns inside the kernel; the output projection's weight is read column-major, so pass ``w_out`` /
``wo`` as ``w.t().contiguous().t()`` to save a transpose per call). Each is a `torch.library` custom op with a
fake impl. Forward only, for the masked (not removed) model while pruning; the masked dense model
(``sparsebert.nn.structured``) is the differentiable path, and a pruned model is served by
``sparsebert.nn.inference.for_inference`` (smaller layers + cuBLAS + SDPA).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import reference as R
from ._backends import resolve_backend
from ._validate import device_check

__all__ = ["pruned_ffn", "pruned_attention", "pruned_ffn_reference", "pruned_attention_reference"]

pruned_ffn_reference = R.pruned_ffn
pruned_attention_reference = R.pruned_attention
_SUPPORTS = ("triton", "torch")


def _index(keep, limit, name, device):
    """The kept indices as int64 on `device`; the range check runs on the device (`device_check`: ValueError
    on the CPU, a device-side assert on a GPU), so a forward never waits for the device."""
    if not isinstance(keep, torch.Tensor) or keep.dtype not in (torch.int32, torch.int64) or keep.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor of kept indices")
    keep = keep.to(device=device, dtype=torch.long)
    if keep.numel():
        device_check(((keep >= 0) & (keep < limit)).all(), f"{name} must index into [0, {limit})")
    return keep


def _check_x(x, d, name="x"):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != d:
        raise ValueError(f"{name} must have {d} features in its last dim, got {x.shape[-1]}")


@custom_op("sparsebert::pruned_ffn", mutates_args=())
def _pruned_ffn(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                keep: Tensor, backend: str) -> Tensor:
    if backend == "torch":
        return R.pruned_ffn(x, w_in, b_in, w_out, b_out, keep)
    from sparsebert.kernels.pruned_ffn import pruned_ffn as tri
    return tri(x.contiguous(), w_in, b_in, w_out, b_out, keep)  # the kernel picks each weight's layout


@_pruned_ffn.register_fake
def _(x, w_in, b_in, w_out, b_out, keep, backend):
    return x.new_empty(x.shape[0], w_out.shape[0])


@custom_op("sparsebert::pruned_attention", mutates_args=())
def _pruned_attention(x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], wv: Tensor,
                      bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], heads: Tensor, head_size: int,
                      key_mask: Tensor, backend: str) -> Tensor:
    if backend == "torch":
        return R.pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask)
    from sparsebert.kernels.pruned_attention import pruned_attention as tri
    return tri(x.contiguous(), wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask)


@_pruned_attention.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask, backend):
    return x.new_empty(x.shape[0], x.shape[1], wo.shape[0])


def pruned_ffn(x, w_in, b_in, w_out, b_out, keep, *, backend="auto"):
    """``gelu(x W_in[keep]^T + b_in[keep]) W_out[:, keep]^T + b_out``; x (..., d)."""
    _check_x(x, w_in.shape[1])
    if w_out.shape != (w_in.shape[1], w_in.shape[0]):
        raise ValueError(f"w_out must have shape {(w_in.shape[1], w_in.shape[0])}, got {tuple(w_out.shape)}")
    keep = _index(keep, w_in.shape[0], "keep", x.device)
    chosen = resolve_backend(backend, x.device, supports=_SUPPORTS)
    lead = x.shape[:-1]
    return _pruned_ffn(x.reshape(-1, x.shape[-1]), w_in, b_in, w_out, b_out, keep, chosen).view(*lead, -1)


def pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size: int, key_mask=None, *, backend="auto"):
    """Self-attention over the kept ``heads`` of dense Q/K/V/O weights; x (B, L, d), key_mask (B, L)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, hidden), got shape {tuple(x.shape)}")
    _check_x(x, wq.shape[1])
    if not isinstance(head_size, int) or head_size <= 0 or wq.shape[0] % head_size:
        raise ValueError(f"head_size must be a positive int dividing {wq.shape[0]}, got {head_size!r}")
    heads = _index(heads, wq.shape[0] // head_size, "heads", x.device)
    if key_mask is None:
        key_mask = torch.ones(x.shape[:2], dtype=torch.int32, device=x.device)
    elif key_mask.shape != x.shape[:2]:
        raise ValueError(f"key_mask must have shape {tuple(x.shape[:2])}, got {tuple(key_mask.shape)}")
    chosen = resolve_backend(backend, x.device, supports=_SUPPORTS)
    return _pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask, chosen)
