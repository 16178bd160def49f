"""Helpers shared by IMP and mask training: score-to-mask selection at a granularity."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

from ..nn.granularity import Granularity, canonical_granularity, granular_topk_mask
from ..ops import topk_threshold

SCOPES = ("global", "per_matrix")


def select_masks(scores: Sequence[Tensor], sparsity: float, *, scope: str = "global",
                 granularity: Granularity = "element") -> List[Tensor]:
    """Bool keep-masks for a list of score matrices: the top (1 - sparsity) by score.

    scope "global": one threshold over all matrices (element granularity only); "per_matrix": each matrix
    pruned to `sparsity`. Non-element granularities call `granular_topk_mask` per matrix.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    granularity = canonical_granularity(granularity)
    if granularity != "element":
        if scope == "global":
            raise ValueError("scope 'global' supports granularity 'element' only; use scope 'per_matrix'")
        return [granular_topk_mask(s.detach(), sparsity, granularity=granularity).bool() for s in scores]
    if scope == "global":
        tau = topk_threshold(list(scores), sparsity)
        return [s.detach() >= tau.to(s.dtype) for s in scores]
    return [s.detach() >= topk_threshold(s, sparsity).to(s.dtype) for s in scores]


def exact_count_masks(scores: Sequence[Tensor], sparsity: float, *, scope: str = "global") -> List[Tensor]:
    """Like `select_masks` at element granularity but with ties broken by position, so that exactly
    round(sparsity * n) entries are pruned (per matrix, or over all for "global")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    def one(flat: Tensor) -> Tensor:
        n = flat.numel()
        k = min(int(round(sparsity * n)), n - 1)
        keep = torch.ones(n, dtype=torch.bool, device=flat.device)
        if k > 0:
            keep[torch.argsort(flat.float(), stable=True)[:k]] = False
        return keep
    if scope == "per_matrix":
        return [one(s.detach().reshape(-1)).reshape(s.shape) for s in scores]
    keep = one(torch.cat([s.detach().reshape(-1).float() for s in scores]))
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def masks_sparsity(masks: Dict[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total
