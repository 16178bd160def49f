"""topk_threshold: the score threshold that prunes exactly the requested fraction.

Per matrix, or globally over a list of matrices. Backends select the (k+1)-th smallest value without a
full sort (radix select on GPU, nth_element in C++, kthvalue in torch).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

from . import _validate as V
from ._backends import impl, resolve_backend


@torch.library.custom_op("sparsebert::topk_threshold", mutates_args=())
def _topk_threshold(scores: List[Tensor], k_prune: int, backend: str) -> Tensor:
    return impl(backend).topk_threshold(scores, k_prune).reshape(()).float()


@_topk_threshold.register_fake
def _(scores, k_prune, backend):
    return scores[0].new_empty((), dtype=torch.float32)


def topk_threshold(scores: Union[Tensor, Sequence[Tensor]], sparsity: float, *, backend: str = "auto") -> Tensor:
    """tau such that `s >= tau` keeps n - round(sparsity * n) of the n scores (exact when there are no ties).

    scores: one tensor, or a list of tensors (one global threshold over all); sparsity in [0, 1).
    Returns a 0-dim float32 tensor on the scores' device (-inf when nothing is pruned). No gradient.
    """
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if not tensors:
        raise ValueError("scores must be a tensor or a non-empty list of tensors")
    for i, t in enumerate(tensors):
        V.check_tensor(f"scores[{i}]", t)
        V.check_float(f"scores[{i}]", t)
        if t.numel() == 0:
            raise ValueError(f"scores[{i}] is empty")
        V.check_same_device(f"scores[{i}]", t, "scores[0]", tensors[0])
    sparsity = V.check_sparsity(sparsity)
    n = sum(t.numel() for t in tensors)
    k_prune = min(int(round(sparsity * n)), n - 1)
    chosen = resolve_backend(backend, tensors[0].device)
    with torch.no_grad():
        return _topk_threshold([t.detach().contiguous() for t in tensors], k_prune, chosen)
