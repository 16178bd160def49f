"""Debiasing training losses. Every loss is an ``nn.Module`` with
``forward(logits (B, C), labels (B,), bias_probs=None (B, C), teacher_probs=None (B, C)) -> scalar``.

* :class:`CrossEntropyLoss`: plain mean cross-entropy (bias/teacher probabilities are ignored).
* :class:`ProductOfExpertsLoss` (Clark et al. 2019; He et al. 2019): cross-entropy of the renormalized
  product ``softmax(log_softmax(logits) + log(bias_probs))``; the bias expert is fixed (no gradient).
* :class:`ExampleReweightingLoss` (Clark et al. 2019; Utama et al. 2020 baseline): per-example
  cross-entropy weighted by ``w_i = 1 - p_bias_i(y_i)``. Default normalization ``"weights"``:
  ``sum_i w_i CE_i / sum_i w_i`` (as in Clark et al.'s and Utama et al.'s released code); ``"mean"``:
  ``sum_i w_i CE_i / B``.
* :class:`ConfidenceRegularizationLoss` (Utama et al. 2020, "Mind the trade-off"): the teacher's
  probabilities scaled by the bias confidence on the gold label, ``s_ij = t_ij ** (1 - p_bias_i(y_i))``,
  renormalized over j; loss = mean_i ``-sum_j s_ij log_softmax(logits)_ij``.

Probabilities are validated: shape (B, C), finite, non-negative, rows summing to 1 within 1e-3.
Computation is in float32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CrossEntropyLoss", "ProductOfExpertsLoss", "ExampleReweightingLoss", "ConfidenceRegularizationLoss",
           "make_loss", "LOSSES"]

_PROB_ATOL = 1e-3


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a 2-D float tensor (batch, num_labels), got "
                         f"{getattr(logits, 'dtype', type(logits))} {tuple(getattr(logits, 'shape', ()))}")
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point()
            or labels.dtype == torch.bool):
        raise ValueError(f"labels: expected a 1-D integer tensor (batch,), got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels: expected batch size {logits.shape[0]} (as logits), got {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels: expected values in [0, {logits.shape[1]}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return logits.float(), labels.long()


def _check_probs(probs, name: str, logits: torch.Tensor) -> torch.Tensor:
    if probs is None:
        raise ValueError(f"{name}: this loss needs {name} of shape {tuple(logits.shape)}, got None")
    if not isinstance(probs, torch.Tensor) or probs.shape != logits.shape or not probs.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of shape {tuple(logits.shape)} (as logits), got "
                         f"{getattr(probs, 'dtype', type(probs))} {tuple(getattr(probs, 'shape', ()))}")
    p = probs.detach().float().to(logits.device)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name}: expected finite non-negative probabilities")
    sums = p.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=_PROB_ATOL, rtol=0):
        bad = int((sums - 1).abs().argmax())
        raise ValueError(f"{name}: expected each row to sum to 1 (within {_PROB_ATOL}); row {bad} sums to "
                         f"{float(sums[bad]):.6f}")
    return p


class CrossEntropyLoss(nn.Module):
    def forward(self, logits, labels, bias_probs=None, teacher_probs=None):
        logits, labels = _check_logits_labels(logits, labels)
        return F.cross_entropy(logits, labels)


class ProductOfExpertsLoss(nn.Module):
    """``eps`` floors the bias probabilities before the log (a zero would make the product -inf)."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, logits, labels, bias_probs=None, teacher_probs=None):
        logits, labels = _check_logits_labels(logits, labels)
        bias = _check_probs(bias_probs, "bias_probs", logits)
        combined = F.log_softmax(logits, dim=-1) + torch.log(bias.clamp_min(self.eps))
        return F.cross_entropy(combined, labels)  # cross_entropy's log_softmax renormalizes the product


class ExampleReweightingLoss(nn.Module):
    def __init__(self, normalize: str = "weights"):
        super().__init__()
        if normalize not in ("weights", "mean"):
            raise ValueError(f"normalize: expected 'weights' or 'mean', got {normalize!r}")
        self.normalize = normalize

    def forward(self, logits, labels, bias_probs=None, teacher_probs=None):
        logits, labels = _check_logits_labels(logits, labels)
        bias = _check_probs(bias_probs, "bias_probs", logits)
        weights = 1.0 - bias.gather(1, labels[:, None]).squeeze(1)
        per_example = F.cross_entropy(logits, labels, reduction="none")
        total = (weights * per_example).sum()
        if self.normalize == "mean":
            return total / max(labels.shape[0], 1)
        return total / weights.sum().clamp_min(1e-12)  # all weights 0 (bias certain and right): loss 0


class ConfidenceRegularizationLoss(nn.Module):
    def forward(self, logits, labels, bias_probs=None, teacher_probs=None):
        logits, labels = _check_logits_labels(logits, labels)
        bias = _check_probs(bias_probs, "bias_probs", logits)
        teacher = _check_probs(teacher_probs, "teacher_probs", logits)
        exponent = 1.0 - bias.gather(1, labels[:, None])  # (B, 1)
        scaled = teacher.pow(exponent)
        soft = scaled / scaled.sum(-1, keepdim=True)
        return -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()


LOSSES = {"ce": CrossEntropyLoss, "poe": ProductOfExpertsLoss, "reweight": ExampleReweightingLoss,
          "conf_reg": ConfidenceRegularizationLoss}


def make_loss(name: str, **kwargs) -> nn.Module:
    """``"ce"``, ``"poe"``, ``"reweight"`` or ``"conf_reg"``; kwargs go to the constructor."""
    if name not in LOSSES:
        raise ValueError(f"name: expected one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name](**kwargs)


def needs_bias_probs(name: str) -> bool:
    return name in ("poe", "reweight", "conf_reg")


def needs_teacher_probs(name: str) -> bool:
    return name == "conf_reg"


__all__ += ["needs_bias_probs", "needs_teacher_probs"]
