"""The "torch" backend: the 2-D backend contract (docs/ARCHITECTURE.md) in plain torch.

Always available; the slow but sure path on any device (bitsandbytes-style default backend).
Masked-dense semantics, as the C++, CUDA and Triton kernels: a pruned weight is absent (`where(m, W, 0)`),
so a NaN or inf in a masked-out weight never reaches the output (`W * m` would give NaN rows).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import dense_mask, pack_mask, unpack_mask  # noqa: F401  (re-exported for the dispatcher)


def _keep(mask: Tensor, packed: bool, k: int) -> Tensor:
    return unpack_mask(mask, k) if packed else mask != 0


def _masked(t: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, t, 0.0)  # a Python scalar: no 0-dim tensor (a fill launch on a GPU) per call


def masked_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, packed: bool) -> Tensor:
    w = _masked(weight, _keep(mask, packed, weight.shape[1]))
    return torch.nn.functional.linear(x, w, bias)


def masked_linear_bwd_input(dy: Tensor, weight: Tensor, mask: Tensor, packed: bool) -> Tensor:
    return dy @ _masked(weight, _keep(mask, packed, weight.shape[1]))


def masked_linear_bwd_weight(dy: Tensor, x: Tensor, mask: Tensor, packed: bool) -> Tensor:
    g = dy.float().t() @ x.float()
    return _masked(g, _keep(mask, packed, x.shape[1])).to(x.dtype)


def _dbias(dy: Tensor, need_dbias: bool) -> Optional[Tensor]:
    return dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else None


def masked_linear_bwd_weight_bias(dy: Tensor, x: Tensor, mask: Tensor, packed: bool,
                                  need_dbias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    return masked_linear_bwd_weight(dy, x, mask, packed), _dbias(dy, need_dbias)


def score_masked_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, threshold: float) -> Tensor:
    return torch.nn.functional.linear(x, _masked(weight, scores >= threshold), bias)


def score_masked_linear_bwd_input(dy: Tensor, weight: Tensor, scores: Tensor, threshold: float) -> Tensor:
    return dy @ _masked(weight, scores >= threshold)


def score_masked_linear_bwd_weight_scores(
    dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, threshold: float, need_dweight: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    g = dy.float().t() @ x.float()
    dscores = (g * weight.float()).to(scores.dtype)
    dweight = _masked(g, scores >= threshold).to(weight.dtype) if need_dweight else None
    return dscores, dweight


def score_masked_linear_bwd_weight_scores_bias(
    dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, threshold: float, need_dweight: bool, need_dbias: bool
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, need_dweight)
    return dscores, dweight, _dbias(dy, need_dbias)


def topk_threshold(scores: List[Tensor], k_prune) -> Tensor:
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    if isinstance(k_prune, Tensor):  # a 0-dim integer tensor on the device: sort + gather, no host sync
        n = flat.numel()
        k = k_prune.reshape(1).long()
        value = flat.sort().values.gather(0, k.clamp(0, n - 1)).reshape(())
        inf = torch.full((), math.inf, dtype=torch.float32, device=flat.device)
        return torch.where(k.reshape(()) <= 0, -inf, torch.where(k.reshape(()) >= n, inf, value))
    if not 0 <= k_prune <= flat.numel():
        raise ValueError(f"k_prune must satisfy 0 <= k_prune <= {flat.numel()} (the number of scores), got {k_prune}")
    if k_prune == 0:
        return torch.full((), -math.inf, dtype=torch.float32, device=flat.device)
    if k_prune == flat.numel():  # everything pruned: +inf, as the C++ and CUDA kernels
        return torch.full((), math.inf, dtype=torch.float32, device=flat.device)
    return flat.kthvalue(k_prune + 1).values
