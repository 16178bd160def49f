"""The "torch" backend: the 2-D backend contract (docs/ARCHITECTURE.md) in plain torch.

Always available; the slow but sure path on any device (bitsandbytes-style default backend).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import dense_mask, pack_mask, unpack_mask  # noqa: F401  (re-exported for the dispatcher)


def _mask_of(mask: Tensor, packed: bool, k: int, dtype: torch.dtype) -> Tensor:
    m = unpack_mask(mask, k) if packed else mask != 0
    return m.to(dtype)


def masked_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, packed: bool) -> Tensor:
    w = weight * _mask_of(mask, packed, weight.shape[1], weight.dtype)
    return torch.nn.functional.linear(x, w, bias)


def masked_linear_bwd_input(dy: Tensor, weight: Tensor, mask: Tensor, packed: bool) -> Tensor:
    return dy @ (weight * _mask_of(mask, packed, weight.shape[1], weight.dtype))


def masked_linear_bwd_weight(dy: Tensor, x: Tensor, mask: Tensor, packed: bool) -> Tensor:
    g = dy.float().t() @ x.float()
    return (g * _mask_of(mask, packed, x.shape[1], torch.float32)).to(x.dtype)


def score_masked_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, threshold: float) -> Tensor:
    return torch.nn.functional.linear(x, weight * (scores >= threshold).to(weight.dtype), bias)


def score_masked_linear_bwd_input(dy: Tensor, weight: Tensor, scores: Tensor, threshold: float) -> Tensor:
    return dy @ (weight * (scores >= threshold).to(weight.dtype))


def score_masked_linear_bwd_weight_scores(
    dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, threshold: float, need_dweight: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    g = dy.float().t() @ x.float()
    dscores = (g * weight.float()).to(scores.dtype)
    dweight = (g * (scores >= threshold).float()).to(weight.dtype) if need_dweight else None
    return dscores, dweight


def topk_threshold(scores: List[Tensor], k_prune: int) -> Tensor:
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    if k_prune == 0:
        return torch.tensor(-math.inf, device=flat.device)
    return flat.kthvalue(k_prune + 1).values
