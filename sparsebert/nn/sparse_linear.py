"""SparseLinear: a drop-in replacement for nn.Linear with an unstructured mask.

Modes
  "dense"   plain F.linear (a SparseLinear waiting for a mask);
  "mask"    a fixed mask buffer (uint8, 1 = keep), forward and backward through `masked_linear`;
            the weight gradient is masked, so retraining keeps pruned weights at their value (IMP);
  "scores"  trainable real-valued scores binarized in the kernel, m = [scores >= tau], through
            `score_masked_linear` with a straight-through estimator (mask training). tau is either the
            `threshold` buffer (set by the caller, e.g. a global top-k over many layers) or, when
            `target_sparsity` is set, this layer's own top-k threshold computed at every forward.
            With a structured `granularity` ("2:4" or ("block", b), for the 2:4 and BSR inference
            formats) the per-layer top-k keeps whole groups; the kernel is the same, fed a 0/1 score
            surrogate whose gradient is the identity (straight-through).

State-dict keys: `weight`, `bias` (as nn.Linear), plus `mask` in mode "mask" or `scores` and `threshold`
in mode "scores".
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import masked_linear, score_masked_linear, topk_threshold
from ..ops import _validate as V
from .granularity import canonical_granularity, granular_topk_mask

MODES = ("dense", "mask", "scores")
SCORE_INITS = ("magnitude", "constant", "kaiming")


class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 mode: str = "dense", mask: Optional[Tensor] = None, score_init: str = "magnitude",
                 score_init_value: float = 1.0, scores_dtype: torch.dtype = torch.float32,
                 target_sparsity: Optional[float] = None, threshold: float = 0.0, granularity="element",
                 backend: str = "auto"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend
        self.mode = "dense"
        self.target_sparsity: Optional[float] = None
        self.granularity = canonical_granularity(granularity)
        if mode == "mask":
            self.set_mask(torch.ones_like(self.weight, dtype=torch.uint8) if mask is None else mask)
        elif mode == "scores":
            self.init_scores(score_init, value=score_init_value, dtype=scores_dtype)
            self.set_threshold(threshold)
            self.set_target_sparsity(target_sparsity)
        elif mode != "dense":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "mask", **kwargs) -> "SparseLinear":
        """Wrap an existing nn.Linear, sharing its weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.backend = kwargs.pop("backend", "auto")
        new.mode, new.target_sparsity = "dense", None
        new.granularity = canonical_granularity(kwargs.pop("granularity", "element"))
        if mode == "mask":
            mask = kwargs.pop("mask", None)
            new.set_mask(mask if mask is not None else (linear.weight != 0))
        elif mode == "scores":
            new.init_scores(kwargs.pop("score_init", "magnitude"), value=kwargs.pop("score_init_value", 1.0),
                            dtype=kwargs.pop("scores_dtype", torch.float32))
            new.set_threshold(kwargs.pop("threshold", 0.0))
            new.set_target_sparsity(kwargs.pop("target_sparsity", None))
        elif mode != "dense":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kwargs:
            raise TypeError(f"unexpected arguments for mode {mode!r}: {sorted(kwargs)}")
        return new

    def _drop_state(self) -> None:
        for name in ("mask", "threshold"):
            if name in self._buffers:
                del self._buffers[name]
        if "scores" in self._parameters:
            del self._parameters["scores"]

    def set_mask(self, mask: Tensor) -> "SparseLinear":
        """Fix the mask (bool/uint8, weight's shape, nonzero = keep) and switch to mode "mask"."""
        V.check_tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        m = (mask.detach() != 0).to(device=self.weight.device, dtype=torch.uint8)
        self._drop_state()
        self.register_buffer("mask", m.contiguous())
        self.mode = "mask"
        return self

    def init_scores(self, how: str = "magnitude", *, value: float = 1.0, dtype: torch.dtype = torch.float32) -> "SparseLinear":
        """Create trainable scores and switch to mode "scores".

        how: "magnitude" (|W|, the usual start of mask training), "constant" (`value` everywhere; ties
        keep everything until the scores move) or "kaiming" (uniform, as in supermask training).
        """
        w = self.weight.detach()
        if how == "magnitude":
            s = w.abs().to(dtype)
        elif how == "constant":
            s = torch.full_like(w, float(value), dtype=dtype)
        elif how == "kaiming":
            s = torch.empty_like(w, dtype=torch.float32)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            s = s.to(dtype)
        else:
            raise ValueError(f"score_init must be one of {SCORE_INITS}, got {how!r}")
        self._drop_state()
        self.scores = nn.Parameter(s.contiguous())
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=w.device))
        self.mode = "scores"
        return self

    def set_threshold(self, tau) -> None:
        if self.mode != "scores":
            raise RuntimeError("set_threshold needs mode 'scores' (call init_scores first)")
        self.threshold.copy_(V.as_threshold(tau, self.threshold.device))

    def set_target_sparsity(self, sparsity: Optional[float]) -> None:
        """Per-layer top-k binarization at this sparsity (None: use the `threshold` buffer)."""
        self.target_sparsity = None if sparsity is None else V.check_sparsity(sparsity)

    def set_granularity(self, granularity) -> None:
        """"element", "2:4", ("block", b) or "block:b": the shape of the groups the top-k keeps or prunes."""
        self.granularity = canonical_granularity(granularity)

    # ------------------------------------------------------------------ compute
    def current_threshold(self) -> Tensor:
        if self.target_sparsity is not None:
            return topk_threshold(self.scores, self.target_sparsity, backend=self.backend)
        return self.threshold

    def _structured(self) -> bool:
        if self.granularity == "element":
            return False
        if self.target_sparsity is None:
            raise RuntimeError(f"granularity {self.granularity!r} selects groups by per-layer top-k: "
                               "call set_target_sparsity first")
        return True

    def _group_mask(self) -> Tensor:
        return granular_topk_mask(self.scores.detach(), self.target_sparsity, self.granularity)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.mode == "mask":
            return masked_linear(x, self.weight, self.bias, self.mask, backend=self.backend)
        if self._structured():
            # Value m (0/1) with the gradient of the scores: the fused kernel at threshold 0.5 is the STE.
            m = self._group_mask().to(self.scores.dtype)
            surrogate = self.scores + (m - self.scores).detach()
            return score_masked_linear(x, self.weight, self.bias, surrogate, 0.5, backend=self.backend)
        return score_masked_linear(x, self.weight, self.bias, self.scores, self.current_threshold(),
                                   backend=self.backend)

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def effective_mask(self) -> Tensor:
        """The bool mask the forward applies (all True in mode "dense")."""
        if self.mode == "mask":
            return self.mask.bool()
        if self.mode == "scores":
            if self._structured():
                return self._group_mask()
            return self.scores >= self.current_threshold().to(self.scores.dtype)
        return torch.ones_like(self.weight, dtype=torch.bool)

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of weights that are pruned or zero."""
        kept = self.effective_mask() & (self.weight != 0)
        return 1.0 - kept.sum().item() / kept.numel()

    @torch.no_grad()
    def freeze_mask(self) -> "SparseLinear":
        """Scores -> fixed mask (end of mask training)."""
        return self.set_mask(self.effective_mask())

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W * m (zeros where pruned)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight * self.effective_mask().to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        extra = f", target_sparsity={self.target_sparsity}" if self.target_sparsity is not None else ""
        extra += f", granularity={self.granularity}" if self.granularity != "element" else ""
        return f"{super().extra_repr()}, mode={self.mode}{extra}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Follow the mode recorded in the checkpoint: a mask or scores key switches this layer to it.
        if prefix + "mask" in state_dict and self.mode != "mask":
            self.set_mask(state_dict[prefix + "mask"])
        elif prefix + "scores" in state_dict and self.mode != "scores":
            self.init_scores("constant", dtype=state_dict[prefix + "scores"].dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
