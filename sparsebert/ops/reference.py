"""Plain-torch references: the ground truth every backend is tested against.

Same signatures as the public ops in `sparsebert.ops`. They are also the "unfused" baseline of the
benchmarks: `score_masked_linear` materializes W * (s >= tau) and calls F.linear, exactly as
movement-pruning code does, with a straight-through estimator for the scores.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import check_mask_to_pack, check_packed_mask


def pack_mask(mask: Tensor) -> Tensor:
    """(N, K) bool/uint8 mask -> (N, ceil(K/32)) int32 words; bit k % 32 of word k // 32, LSB first."""
    check_mask_to_pack(mask)
    n, k = mask.shape
    words = (k + 31) // 32
    bits = torch.zeros(n, words * 32, dtype=torch.int64, device=mask.device)
    bits[:, :k] = (mask != 0).to(torch.int64)
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    packed = (bits.view(n, words, 32) << shifts).sum(dim=-1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 set => negative).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_mask(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of `pack_mask`: (N, ceil(K/32)) int32 -> (N, K) bool."""
    check_packed_mask(packed, in_features)
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :in_features].bool()


def dense_mask(mask: Tensor, in_features: int) -> Tensor:
    """Any supported mask format -> (N, K) bool."""
    if mask.dtype == torch.int32:
        return unpack_mask(mask, in_features)
    return mask != 0


def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor) -> Tensor:
    """y = x (W * m)^T + b. Autograd gives dX and dW * m (the mask is a constant).

    Masked-dense semantics: a pruned weight is absent (`where(m, W, 0)`), so a NaN or inf stored in a
    masked-out weight does not reach y (every backend follows this)."""
    keep = dense_mask(mask, weight.shape[1])
    return F.linear(x, torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), bias)


class _ScoreMaskedWeight(torch.autograd.Function):
    """W_eff = where(scores >= tau, W, 0) forward; backward dW = G * m and, straight through, dScores = G * W."""

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, threshold: Tensor) -> Tensor:
        keep = scores >= threshold
        ctx.save_for_backward(weight, keep)
        ctx.scores_dtype = scores.dtype
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, keep = ctx.saved_tensors
        dweight = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return dweight, (grad.float() * weight.float()).to(ctx.scores_dtype), None


def score_masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, threshold: Union[float, Tensor]
) -> Tensor:
    """y = x (W * [s >= tau])^T + b, with dScores = (dY^T X) * W by the straight-through estimator.
    Masked-dense semantics as `masked_linear` (a NaN in a pruned weight does not reach y)."""
    if isinstance(threshold, Tensor):
        tau = threshold.detach().to(device=scores.device, dtype=torch.float32).reshape(())
    else:
        tau = torch.full((), float(threshold), dtype=torch.float32, device=scores.device)
    return F.linear(x, _ScoreMaskedWeight.apply(weight, scores, tau.to(scores.dtype)), bias)


def topk_threshold(scores: Union[Tensor, Sequence[Tensor]], sparsity: float) -> Tensor:
    """The threshold tau such that `s >= tau` prunes round(sparsity * n) of the n scores (ties aside).

    Global over all tensors when given a list. Returns a 0-dim fp32 tensor; -inf when nothing is pruned.
    """
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    k_prune = int(round(sparsity * flat.numel()))
    if k_prune == 0:
        return torch.full((), -math.inf, dtype=torch.float32, device=flat.device)
    return flat.kthvalue(k_prune + 1).values if k_prune < flat.numel() else flat.max()


def pruned_ffn(x, w_in, b_in, w_out, b_out, keep):
    """gelu(x W_in[keep]^T + b_in[keep]) W_out[:, keep]^T + b_out: only the kept FFN neurons."""
    h = F.gelu(F.linear(x, w_in[keep], None if b_in is None else b_in[keep]))
    return F.linear(h, w_out[:, keep], b_out)


def pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask=None):
    """Self-attention over the kept `heads` only (QKV rows and output columns gathered); x (B, L, d)."""
    B, L, _ = x.shape
    dims = (heads[:, None] * head_size + torch.arange(head_size, device=x.device)).flatten()

    def proj(w, b):
        return F.linear(x, w[dims], None if b is None else b[dims]).view(B, L, -1, head_size).transpose(1, 2)

    q, k, v = proj(wq, bq), proj(wk, bk), proj(wv, bv)
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_size)
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    ctx = (s.softmax(-1) @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, L, -1)
    return F.linear(ctx, wo[:, dims], bo)
