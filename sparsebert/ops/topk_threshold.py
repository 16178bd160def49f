"""topk_threshold: the score threshold that prunes exactly the requested fraction.

Per matrix, or globally over a list of matrices. Backends select the (k+1)-th smallest value without a
full sort (radix select on GPU, nth_element in C++, kthvalue in torch).

Two ops: `sparsebert::topk_threshold` takes the number to prune as an int (a constant of a compiled graph),
`sparsebert::topk_threshold_at_rank` takes it as a 0-dim int64 tensor on the scores' device (data: a
sparsity that changes every step neither recompiles a torch.compile graph nor syncs the host). A tensor
sparsity, or `topk_threshold_at_rank`, goes through the second.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import _validate as V
from ._backends import impl, op_backend, resolve_backend


@custom_op("sparsebert::topk_threshold", mutates_args=())
def _topk_threshold(scores: List[Tensor], k_prune: int, backend: str) -> Tensor:
    return impl(resolve_backend(backend, scores[0].device)).topk_threshold(scores, k_prune).reshape(()).float()


@_topk_threshold.register_fake
def _(scores, k_prune, backend):
    return scores[0].new_empty((), dtype=torch.float32)


@custom_op("sparsebert::topk_threshold_at_rank", mutates_args=())
def _topk_threshold_at_rank(scores: List[Tensor], k_prune: Tensor, backend: str) -> Tensor:
    return impl(resolve_backend(backend, scores[0].device)).topk_threshold(scores, k_prune).reshape(()).float()


@_topk_threshold_at_rank.register_fake
def _(scores, k_prune, backend):
    return scores[0].new_empty((), dtype=torch.float32)


def _check_scores(scores) -> List[Tensor]:
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if not tensors:
        raise ValueError("scores must be a tensor or a non-empty list of tensors")
    for i, t in enumerate(tensors):
        V.check_tensor(f"scores[{i}]", t)
        V.check_float(f"scores[{i}]", t)
        if t.numel() == 0:
            raise ValueError(f"scores[{i}] is empty")
        V.check_same_device(f"scores[{i}]", t, "scores[0]", tensors[0])
    for i, t in enumerate(tensors):  # NaN has no rank: refused on every backend, on the device (no sync)
        V.assert_no_nan(f"scores[{i}]" if len(tensors) > 1 else "scores", t)
    return tensors


def _check_scalar_tensor(name: str, t: Tensor, device: torch.device, floating: bool) -> None:
    if t.dim() != 0:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the scores' device {device}, got {t.device}")
    if floating != t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be {'a float' if floating else 'an integer'} tensor, got {t.dtype}")


def _checked_threshold(tau: Tensor) -> Tensor:
    """tau is one of the scores, -inf or +inf, and the scores were refused if they held a NaN
    (`_check_scores`): an op given tau (`as_threshold`) need not check it again."""
    V.remember_checked(tau)
    return tau


def rank_of_sparsity(sparsity: Tensor, n: int) -> Tensor:
    """k_prune = min(round(sparsity * n), n - 1) as a 0-dim int64 tensor, computed on sparsity's device in
    float64 (round half to even, as Python's round on the float path)."""
    return torch.round(sparsity.detach().double() * n).clamp(0, n - 1).long()


def topk_threshold_at_rank(scores: Union[Tensor, Sequence[Tensor]], k_prune: Union[int, Tensor], *,
                           backend: str = "auto") -> Tensor:
    """tau = the (k_prune + 1)-th smallest of all scores (-inf when k_prune == 0, +inf when k_prune == n).

    k_prune: an int, or a 0-dim integer tensor on the scores' device (read by the kernels: no host sync and,
    under torch.compile, no recompile when it changes). A tensor k_prune is clamped into [0, n].
    """
    tensors = _check_scores(scores)
    n = sum(t.numel() for t in tensors)
    chosen = op_backend(backend, tensors[0].device)
    flat = [t.detach().contiguous() for t in tensors]
    if isinstance(k_prune, Tensor):
        _check_scalar_tensor("k_prune", k_prune, tensors[0].device, floating=False)
        with torch.no_grad():
            return _checked_threshold(_topk_threshold_at_rank(flat, k_prune.detach().clamp(0, n).long(), chosen))
    if isinstance(k_prune, bool) or not isinstance(k_prune, int):
        raise TypeError(f"k_prune must be an int or a 0-dim integer tensor, got {type(k_prune).__name__}")
    if not 0 <= k_prune <= n:
        raise ValueError(f"k_prune must satisfy 0 <= k_prune <= {n} (the number of scores), got {k_prune}")
    with torch.no_grad():
        return _checked_threshold(_topk_threshold(flat, k_prune, chosen))


def topk_threshold(scores: Union[Tensor, Sequence[Tensor]], sparsity: Union[float, Tensor], *,
                   backend: str = "auto") -> Tensor:
    """tau such that `s >= tau` keeps n - round(sparsity * n) of the n scores (exact when there are no ties).

    scores: one tensor, or a list of tensors (one global threshold over all), NaN-free; sparsity in [0, 1):
    a float, or a 0-dim float tensor on the scores' device (k is then computed on the device from the value
    the tensor holds, float64 recommended; its range is checked on the device).
    Returns a 0-dim float32 tensor on the scores' device (-inf when nothing is pruned). No gradient.
    NaN scores raise RuntimeError naming the tensor; the check runs on the device (`torch._assert_async`,
    a device-side assert on a GPU), so the call never waits for the device.
    """
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if isinstance(sparsity, Tensor):
        if not tensors:
            raise ValueError("scores must be a tensor or a non-empty list of tensors")
        V.check_tensor("scores[0]", tensors[0])
        _check_scalar_tensor("sparsity", sparsity, tensors[0].device, floating=True)
        V.device_check((sparsity >= 0) & (sparsity < 1), "sparsity must be in [0, 1)")
        n = sum(t.numel() for t in tensors)
        return topk_threshold_at_rank(tensors, rank_of_sparsity(sparsity, n), backend=backend)
    tensors = _check_scores(tensors)
    sparsity = V.check_sparsity(sparsity)
    n = sum(t.numel() for t in tensors)
    k_prune = min(int(round(sparsity * n)), n - 1)
    chosen = op_backend(backend, tensors[0].device)
    with torch.no_grad():
        return _checked_threshold(_topk_threshold([t.detach().contiguous() for t in tensors], k_prune, chosen))
