"""SparseLinear: a drop-in replacement for nn.Linear with an unstructured mask.

Modes
  "dense"   plain F.linear (a SparseLinear waiting for a mask);
  "mask"    a fixed mask buffer (uint8, 1 = keep), forward and backward through `masked_linear`;
            the weight gradient is masked, so retraining keeps pruned weights at their value (IMP);
  "scores"  trainable real-valued scores binarized in the kernel, m = [scores >= tau], through
            `score_masked_linear` with a straight-through estimator (mask training). tau is either the
            `threshold` buffer (set by the caller, e.g. a global top-k over many layers) or, when
            `target_sparsity` is set, this layer's own top-k threshold computed at every forward
            (`refresh_threshold` stores that top-k threshold in the buffer instead: recomputed only when
            called, e.g. every 1,000 steps as in the "Win-win Deal" code).
            With a structured `granularity` ("2:4" or ("block", b), for the 2:4 and BSR inference
            formats) the per-layer top-k keeps whole groups; the kernel is the same, fed a 0/1 score
            surrogate whose gradient is the identity (straight-through).

State-dict keys: `weight`, `bias` (as nn.Linear), plus `mask` in mode "mask" or `scores` and `threshold`
in mode "scores".
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import BACKENDS, masked_linear, score_masked_linear, topk_threshold
from ..ops.topk_threshold import topk_threshold_at_rank
from ..ops import _validate as V
from .granularity import canonical_granularity, granular_topk_mask

MODES = ("dense", "mask", "scores")
SCORE_INITS = ("magnitude", "magnitude_binary", "constant", "kaiming")


class _StraightThrough(torch.autograd.Function):
    """Values: the group mask as 0/1 in the scores' dtype (never NaN, even where a score is inf, where
    `s + (m - s).detach()` gives inf - inf); gradient: passed to the scores unchanged (the STE)."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: Tensor) -> Tensor:
        return keep.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _check_target_sparsity(sparsity, granularity) -> None:
    """target_sparsity: None or a float in [0, 1); exactly 0.5 with granularity "2:4"."""
    if sparsity is None:
        return
    V.check_sparsity(sparsity, "target_sparsity")
    if granularity == "2:4" and sparsity != 0.5:
        raise ValueError(f"target_sparsity must be 0.5 with granularity '2:4' (it keeps 2 of every 4 weights), "
                         f"got {sparsity}")


class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 mode: str = "dense", mask: Optional[Tensor] = None, score_init: str = "magnitude",
                 score_init_value: float = 1.0, scores_dtype: torch.dtype = torch.float32,
                 target_sparsity: Optional[float] = None, threshold: Optional[float] = None, granularity="element",
                 backend: str = "auto", phi: float = 0.01):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend
        self.mode = "dense"
        self.target_sparsity: Optional[float] = None
        self.granularity = canonical_granularity(granularity)
        _check_target_sparsity(target_sparsity, self.granularity)
        if mode == "mask":
            self.set_mask(torch.ones_like(self.weight, dtype=torch.uint8) if mask is None else mask)
        elif mode == "scores":
            self.init_scores(score_init, value=score_init_value, dtype=scores_dtype, sparsity=target_sparsity, phi=phi)
            if threshold is not None:  # default: 0, or phi for "magnitude_binary"
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
        _check_target_sparsity(kwargs.get("target_sparsity"), new.granularity)
        if mode == "mask":
            mask = kwargs.pop("mask", None)
            new.set_mask(mask if mask is not None else (linear.weight != 0))
        elif mode == "scores":
            new.init_scores(kwargs.pop("score_init", "magnitude"), value=kwargs.pop("score_init_value", 1.0),
                            dtype=kwargs.pop("scores_dtype", torch.float32),
                            sparsity=kwargs.pop("score_init_sparsity", kwargs.get("target_sparsity")),
                            phi=kwargs.pop("phi", 0.01))
            threshold = kwargs.pop("threshold", None)
            if threshold is not None:  # default: 0, or phi for "magnitude_binary"
                new.set_threshold(threshold)
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
        """Fix the mask (weight's shape; bool or integer, nonzero = keep) and switch to mode "mask".

        A floating-point mask is taken only when every value is exactly 0 or 1: a float mask of
        probabilities or scores would otherwise silently mean "keep everything nonzero" (threshold it first,
        e.g. `probs > 0.5`)."""
        V.check_tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            binary = (mask == 0) | (mask == 1)
            if not bool(binary.all()):  # set_mask is not a per-forward path: this host check is fine here
                bad = mask[~binary].reshape(-1)[0]
                raise ValueError(f"mask is {mask.dtype} with values other than 0 and 1 (e.g. {bad.item()}); a float "
                                 "mask must be exactly 0/1. Threshold probabilities or scores first (e.g. probs > 0.5)")
        m = (mask.detach() != 0).to(device=self.weight.device, dtype=torch.uint8)
        self._drop_state()
        self.register_buffer("mask", m.contiguous())
        self.mode = "mask"
        return self

    def init_scores(self, how: str = "magnitude", *, value: float = 1.0, dtype: torch.dtype = torch.float32,
                    sparsity: Optional[float] = None, phi: float = 0.01) -> "SparseLinear":
        """Create trainable scores and switch to mode "scores".

        how: "magnitude" (|W|, the usual start of mask training), "magnitude_binary" (2 * phi for the
        top (1 - sparsity) of |W| in this matrix, 0 for the rest, and the threshold buffer set to phi: the
        "Win-win Deal" code's start, `controlled_init="magnitude"` in `masking/maskers.py`), "constant"
        (`value` everywhere; ties keep everything until the scores move) or "kaiming" (uniform, as in
        supermask training).
        """
        w = self.weight.detach()
        if how == "magnitude_binary":
            if sparsity is None:
                raise ValueError("score_init 'magnitude_binary' needs the sparsity of the binary start")
            if not (isinstance(phi, (int, float)) and not isinstance(phi, bool) and phi > 0 and math.isfinite(phi)):
                raise ValueError(f"phi must be a positive finite float, got {phi!r}")
            keep = w.abs() >= topk_threshold(w.abs().float(), V.check_sparsity(sparsity), backend=self.backend)
            s = torch.where(keep, 2.0 * float(phi), 0.0).to(dtype)
        elif how == "magnitude":
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
        self.register_buffer("threshold", torch.full((), float(phi) if how == "magnitude_binary" else 0.0,
                                                     dtype=torch.float32, device=w.device))
        self.mode = "scores"
        return self

    def set_threshold(self, tau) -> None:
        if self.mode != "scores":
            raise RuntimeError("set_threshold needs mode 'scores' (call init_scores first)")
        self.threshold.copy_(V.as_threshold(tau, self.threshold.device))
        V.remember_checked(self.threshold)  # as_threshold refused NaN (on the host, or queued on the device)

    @torch.no_grad()
    def refresh_threshold(self, sparsity: float) -> None:
        """Set the `threshold` buffer to this layer's top-k threshold at `sparsity` (on the device, no host
        sync) and binarize by the buffer from now on, until the next refresh."""
        if self.mode != "scores":
            raise RuntimeError("refresh_threshold needs mode 'scores' (call init_scores first)")
        # set_threshold takes the checked top-k threshold as is and marks the buffer checked: the forward
        # then skips its check of the buffer
        self.set_threshold(topk_threshold(self.scores, V.check_sparsity(sparsity), backend=self.backend))
        self.target_sparsity = None

    def set_target_sparsity(self, sparsity: Optional[float]) -> None:
        """Per-layer top-k binarization at this sparsity (None: use the `threshold` buffer)."""
        self.target_sparsity = sparsity

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, name: str) -> None:
        # checked by name only: the layer may move to another device before its first forward
        if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
        self.__dict__["_backend"] = name

    @property
    def target_sparsity(self) -> Optional[float]:
        return self.__dict__.get("_target_sparsity")

    @target_sparsity.setter
    def target_sparsity(self, sparsity: Optional[float]) -> None:
        # The forward reads the number to prune from the non-persistent int64 buffer `_topk_rank` (filled on
        # the device, no sync) and the flag `_has_target`, never the float: under torch.compile a changing
        # sparsity is data, not a recompile.
        _check_target_sparsity(sparsity, self.__dict__.get("granularity", "element"))
        sparsity = None if sparsity is None else V.check_sparsity(sparsity, "target_sparsity")
        self.__dict__["_target_sparsity"] = sparsity
        self._has_target = sparsity is not None
        if sparsity is not None:
            n = self.weight.numel()
            if "_topk_rank" not in self._buffers:
                self.register_buffer("_topk_rank", torch.zeros((), dtype=torch.int64, device=self.weight.device),
                                     persistent=False)
            self._topk_rank.fill_(min(int(round(sparsity * n)), n - 1))

    def set_granularity(self, granularity) -> None:
        """"element", "2:4", ("block", b) or "block:b": the shape of the groups the top-k keeps or prunes."""
        self.granularity = canonical_granularity(granularity)

    # ------------------------------------------------------------------ compute
    def current_threshold(self) -> Tensor:
        if self._has_target:
            return topk_threshold_at_rank(self.scores, self._topk_rank, backend=self.backend)
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
            V.assert_no_nan(f"the scores of SparseLinear({self.in_features}, {self.out_features})", self.scores)
            # Value m (0/1) with the gradient of the scores: the fused kernel at threshold 0.5 is the STE.
            surrogate = _StraightThrough.apply(self.scores, self._group_mask())
            V.remember_checked(surrogate)  # exactly 0 or 1: the op need not check it (4 launches a forward)
            return score_masked_linear(x, self.weight, self.bias, surrogate, 0.5, backend=self.backend)
        if not self._has_target:  # (with a target, topk_threshold refuses NaN scores itself)
            V.assert_no_nan(f"the scores of SparseLinear({self.in_features}, {self.out_features})", self.scores)
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


def check_scores_for_nan(layers: Mapping[str, SparseLinear]) -> None:
    """Refuse NaN in the scores of many layers at once ({name: layer}, mode "scores"), with one reduction
    for all of them (`_validate.assert_no_nan_all`), and remember them as checked: each layer's forward then
    skips its own check (4 kernel launches per layer) until the scores change again. A training loop calls
    it after its optimizer step (`MaskScheduler.step` does); ValueError naming the layer on the CPU, a
    device-side assert on a GPU (no host sync)."""
    named = [(f"the scores of {name}", lin.scores) for name, lin in layers.items() if lin.mode == "scores"]
    V.assert_no_nan_all(named, f"the scores of the {len(named)} trained SparseLinear layers")
