"""Mask granularities for pruning, so a pruned model fits a fast inference format.

* "element": unstructured top-k (serves the bitmask format);
* ("block", b): whole b x b blocks are kept or pruned (serves BSR with block size b);
* "2:4": in every group of 4 consecutive weights of a row, the 2 with the highest scores are kept
  (serves semi-structured sparse tensor cores).

Scores are importances of shape (N, K) = weight.shape: larger = keep (e.g. |w| for magnitude pruning,
movement scores). Masks are bool (N, K), True = keep. Block scores are the mean of the member scores
(partial blocks at the edges average over the entries they have), so edge blocks are not penalized.

Global pruning across layers (IMP) ranks the pooled scores of all layers together: use `pooled_scores`
to get one score per prunable unit, rank them with your threshold, then `expand_pooled_mask` back to
element masks. Ties are broken by position (lower flat index kept first), deterministically.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Granularity = Union[str, Tuple[str, int]]


def _check_scores(scores) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")


def _check_sparsity(sparsity) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")


def _check_block(block) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def topk_keep(flat_scores: Tensor, sparsity: float) -> Tensor:
    """bool mask over a 1-D score tensor keeping the n - round(sparsity * n) highest (ties: lower index)."""
    n = flat_scores.numel()
    keep_n = n - int(round(float(sparsity) * n))
    keep = torch.zeros(n, dtype=torch.bool, device=flat_scores.device)
    if keep_n > 0:
        # Stable descending sort: equal scores keep their index order.
        order = torch.sort(flat_scores.float(), descending=True, stable=True).indices
        keep[order[:keep_n]] = True
    return keep


def pooled_scores(scores: Tensor, granularity: Granularity = "element") -> Tensor:
    """One score per prunable unit: the scores themselves ("element") or block means ((NB, KB) for
    ("block", b)). "2:4" has no pooled form (its units are fixed at 2 of every 4): ValueError."""
    _check_scores(scores)
    kind, block = parse_granularity(granularity)
    if kind == "element":
        return scores
    if kind == "block":
        s = scores.float()[None, None]
        sums = F.avg_pool2d(s, block, stride=block, ceil_mode=True, divisor_override=1)[0, 0]
        ones = torch.ones_like(s)
        counts = F.avg_pool2d(ones, block, stride=block, ceil_mode=True, divisor_override=1)[0, 0]
        return sums / counts
    raise ValueError("granularity '2:4' keeps 2 of every 4 weights per group; it has no pooled scores to rank "
                     "globally (use nm_mask_from_scores per layer)")


def expand_pooled_mask(pooled_mask: Tensor, granularity: Granularity, shape) -> Tensor:
    """A bool mask over pooled units (see `pooled_scores`) -> bool (N, K) element mask."""
    kind, block = parse_granularity(granularity)
    n, k = shape
    if kind == "element":
        if tuple(pooled_mask.shape) != (n, k):
            raise ValueError(f"pooled_mask must have shape {(n, k)}, got {tuple(pooled_mask.shape)}")
        return pooled_mask.bool()
    if kind != "block":
        raise ValueError(f"granularity {granularity!r} has no pooled mask")
    expected = (-(-n // block), -(-k // block))
    if tuple(pooled_mask.shape) != expected:
        raise ValueError(f"pooled_mask must have shape {expected} for weight {(n, k)} and block {block}, "
                         f"got {tuple(pooled_mask.shape)}")
    return pooled_mask.bool().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()


def block_mask_from_scores(scores: Tensor, block: int, sparsity: float) -> Tensor:
    """Keep the highest-mean b x b blocks: round(sparsity * blocks) blocks are pruned. bool (N, K)."""
    _check_scores(scores)
    _check_block(block)
    _check_sparsity(sparsity)
    pooled = pooled_scores(scores, ("block", block))
    keep = topk_keep(pooled.reshape(-1), sparsity).view(pooled.shape)
    return expand_pooled_mask(keep, ("block", block), scores.shape)


def nm_mask_from_scores(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the n highest scores in every group of m consecutive entries of a row (ties: lower position).
    Needs in_features divisible by m. bool (N, K) with exactly n kept per group."""
    _check_scores(scores)
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"an {n}:{m} mask needs in_features divisible by {m}, got scores shape {tuple(scores.shape)}")
    groups = scores.float().reshape(rows, k // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.view(rows, k)


def parse_granularity(granularity: Granularity) -> Tuple[str, int]:
    """"element" -> ("element", 1); ("block", b) or "block:b" -> ("block", b); "2:4" -> ("2:4", 4)."""
    if granularity == "element":
        return "element", 1
    if granularity == "2:4":
        return "2:4", 4
    if isinstance(granularity, str) and granularity.startswith("block:"):
        try:
            granularity = ("block", int(granularity.split(":", 1)[1]))
        except ValueError:
            pass
    if isinstance(granularity, (tuple, list)) and len(granularity) == 2 and granularity[0] == "block":
        _check_block(granularity[1])
        return "block", int(granularity[1])
    raise ValueError(f"granularity must be 'element', '2:4', ('block', b) or 'block:b', got {granularity!r}")


def canonical_granularity(granularity) -> Granularity:
    """None/"element" -> "element"; "2:4" -> "2:4"; ("block", b) or "block:b" -> ("block", b); else ValueError."""
    kind, block = parse_granularity("element" if granularity is None else granularity)
    return ("block", block) if kind == "block" else kind


def granular_topk_mask(scores: Tensor, sparsity: float, granularity: Granularity = "element") -> Tensor:
    """Per-tensor top-k mask at a granularity. For "2:4" the sparsity is fixed: pass 0.5 (anything else
    is a ValueError, since 2:4 cannot express it)."""
    _check_scores(scores)
    _check_sparsity(sparsity)
    kind, block = parse_granularity(granularity)
    if kind == "element":
        return topk_keep(scores.reshape(-1), sparsity).view(scores.shape)
    if kind == "block":
        return block_mask_from_scores(scores, block, sparsity)
    if abs(float(sparsity) - 0.5) > 1e-9:
        raise ValueError(f"granularity '2:4' always prunes exactly half the weights; sparsity must be 0.5, "
                         f"got {sparsity!r}")
    return nm_mask_from_scores(scores, 2, 4)


def satisfies(mask: Tensor, granularity: Granularity) -> bool:
    """True when a bool (N, K) mask has the structure of `granularity` (blocks all-or-none; <= 2 of 4)."""
    kind, block = parse_granularity(granularity)
    if kind == "element":
        return True
    n, k = mask.shape
    if kind == "2:4":
        return k % 4 == 0 and bool((mask.reshape(n, k // 4, 4).sum(-1) <= 2).all())
    pooled = pooled_scores(mask.float(), ("block", block))
    return bool(((pooled == 0) | (pooled == 1)).all())


__all__ = ["canonical_granularity", "block_mask_from_scores", "nm_mask_from_scores", "granular_topk_mask", "pooled_scores",
           "expand_pooled_mask", "parse_granularity", "topk_keep", "satisfies"]
