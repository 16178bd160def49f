"""MaskScheduler: mask training as an object any training loop holds (plain, HF Trainer, Lightning).

Like a `torch.ao.pruning` sparsifier it prepares the model once and is then stepped after each optimizer
step; the user's loop and optimizer train the scores (`scheduler.scores()`), the library never owns the
loop. What it does, following the "Win-win Deal" authors' code (llyx97/sparse-and-robust-PLM):

* the prunable linears (the six encoder matrices, plus the pooler and the classifier with
  `include_head=True`, as `mask_run_glue.py: init_masker` with `--mask_classifier true` masks them)
  become SparseLinear layers in mode "scores"; every weight is frozen (the head too unless `train_head`,
  as `--train_classifier false`);
* scores start as `score_init="magnitude_binary"`: 2 * phi for the top (1 - s_0) of |W| per matrix, 0 for
  the rest, with the threshold phi = 0.01 (`masking/maskers.py: MaskedLinearX.controlled_init`,
  `_magnitude`); `"magnitude"` (raw |W|, thresholded at the per-matrix top-k of step 0) is that code's
  `magnitude_soft`, used there for the gradual-sparsity runs;
* the mask is `scores >= threshold` with the threshold a buffer, reset to the per-matrix (or global)
  top-k threshold at the scheduled sparsity every `threshold_refresh_steps` optimizer steps
  (`hg_transformers/mask_trainer.py: reset_threshold`, called every `logging_steps` = 1,000 of the
  61,360 MNLI steps; the default here scales that period to the run: `paper_refresh_steps`);
  between refreshes the scores move freely and the sparsity drifts. `threshold_refresh_steps=0` gives
  this project's earlier rule: the per-layer top-k recomputed at every forward (global: every step).
* the sparsity follows `SparsitySchedule` (constant by default; cubic from the initial to the final
  sparsity, `masking/sparsity_control.py: automated_gradual_sparsity`), a pure function of the step.

Differences from that code, kept small and stated: the mask keeps `scores >= tau` where it keeps
`scores > kth` (identical without ties: tau is the (k+1)-th smallest score); k = round(s * n) where it
takes int(s * n) (at most one weight per matrix); its guard "keep the old threshold when the k-th score
equals the largest" has no counterpart (it only fires when all scores are equal).
Groups ("block:b", "2:4") are selected by per-layer top-k at every forward whatever the refresh setting.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from ..nn import SparseLinear, sparsify
from ..nn.granularity import canonical_granularity
from ..nn.sparse_linear import check_scores_for_nan
from ..nn.sparsify import head_linears, prunable_linears
from ..ops import topk_threshold
from .schedules import SparsitySchedule

SCOPES = ("per_layer", "global")
SCORE_INITS = ("magnitude_binary", "magnitude", "constant", "kaiming")
PAPER_PHI = 0.01
# The paper's MNLI scale: 5 epochs of ceil(392,702 / 32) = 12,272 steps; 3,600 warm-up steps
# (`scripts/mask_train/.../mnli/0.5.sh`) and a threshold reset every 1,000 steps (`logging_steps`).
PAPER_TOTAL_STEPS = 5 * 12272
PAPER_WARMUP_RATIO = 3600 / PAPER_TOTAL_STEPS
PAPER_REFRESH_STEPS = 1000


def paper_refresh_steps(total_steps: int) -> int:
    """The threshold reset period scaled to a run of `total_steps`: the paper's 1,000 of 61,360 steps
    (1.63%), at least 1. A run of the paper's length gets 1,000."""
    return max(1, round(total_steps * PAPER_REFRESH_STEPS / PAPER_TOTAL_STEPS))


def _canonical_scope(scope: str) -> str:
    if scope in ("per_matrix", "local"):
        scope = "per_layer"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


class MaskScheduler:
    """Mask training on `model` to `sparsity` over `total_steps` optimizer steps; call `step()` after
    each optimizer step and `finalize()` at the end. See the module docstring for the recipe.

    Resume: the thresholds are buffers of the model (they come back with its state dict); `state_dict()`
    holds the step count and the configuration, `load_state_dict` refuses a different configuration.

    Data parallel: every rank holds a scheduler and steps it; the scores are parameters, so DDP averages
    their gradients and they stay identical, and so do the thresholds computed from them (per matrix or
    global). `check_ranks=True` (debugging: a host sync per step) asserts it after every step and at
    `finalize`: a fingerprint of the masks is all-reduced and compared (`check_masks_across_ranks`).
    """

    def __init__(self, model: nn.Module, *, sparsity: float, total_steps: int, schedule: str = "constant",
                 initial_sparsity: Optional[float] = None, begin_frac: float = 0.0, end_frac: float = 1.0,
                 scope: str = "per_layer", threshold_refresh_steps: Optional[int] = None,
                 score_init: Optional[str] = None, phi: float = PAPER_PHI, include_head=True,
                 train_head: bool = False, freeze_weights: bool = True, granularity="element",
                 backend: str = "auto", check_ranks: bool = False):
        scope = _canonical_scope(scope)
        granularity = canonical_granularity(granularity)
        if threshold_refresh_steps is None:
            threshold_refresh_steps = paper_refresh_steps(total_steps) if isinstance(total_steps, int) else 1
        if isinstance(threshold_refresh_steps, bool) or not isinstance(threshold_refresh_steps, int) \
                or threshold_refresh_steps < 0:
            raise ValueError(f"threshold_refresh_steps must be an int >= 0 (0: every forward), "
                             f"got {threshold_refresh_steps!r}")
        if granularity != "element" and scope == "global":
            raise ValueError("scope 'global' supports granularity 'element' only; use scope 'per_layer'")
        if granularity == "2:4" and (schedule != "constant" or sparsity != 0.5):
            raise ValueError("granularity '2:4' prunes exactly half of each group of 4: use sparsity=0.5 and "
                             f"schedule='constant' (got sparsity={sparsity}, schedule={schedule!r})")
        if score_init is None:
            score_init = "magnitude_binary" if granularity == "element" else "magnitude"
        if score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
        if score_init == "magnitude_binary" and granularity != "element":
            raise ValueError("score_init 'magnitude_binary' needs granularity 'element'; use 'magnitude'")
        if initial_sparsity is None:
            initial_sparsity = 0.0 if schedule == "cubic" else sparsity
        self.schedule = SparsitySchedule(schedule, sparsity, total_steps,
                                         initial=initial_sparsity if schedule == "cubic" else 0.0,
                                         begin_frac=begin_frac, end_frac=end_frac)
        self.scope, self.granularity, self.backend = scope, granularity, backend
        self.refresh_steps = threshold_refresh_steps
        self.score_init, self.phi = score_init, float(phi)
        self.include_head, self.train_head = include_head, bool(train_head)
        self.check_ranks = bool(check_ranks)
        self.layers: List[SparseLinear] = self._prepare(model, freeze_weights)
        self.steps_done = 0
        self._apply(0, start=True)

    # ------------------------------------------------------------------ set-up
    def _prepare(self, model: nn.Module, freeze_weights: bool) -> List[SparseLinear]:
        targets = prunable_linears(model, self.include_head)
        for lin in targets.values():  # a model loaded with frozen masks: back to plain weights first
            if isinstance(lin, SparseLinear) and lin.mode == "mask":
                with torch.no_grad():
                    lin.weight.mul_(lin.mask.to(lin.weight.dtype))
        sparsify(model, mode="dense", include_head=self.include_head, backend=self.backend,
                 existing="keep")
        self._named = prunable_linears(model, self.include_head)
        layers = list(self._named.values())
        s0 = self.schedule(0)
        for lin in layers:
            lin.backend = self.backend
            lin.init_scores(self.score_init, sparsity=s0, phi=self.phi)
            lin.set_granularity(self.granularity)
        head = {id(p) for m in head_linears(model).values() for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(not freeze_weights or (self.train_head and id(p) in head))
        for lin in layers:
            lin.scores.requires_grad_(True)
        return layers

    # ------------------------------------------------------------------ schedule
    @property
    def sparsity(self) -> float:
        """The scheduled sparsity at the current step."""
        return self.schedule(self.steps_done)

    def scores(self) -> List[nn.Parameter]:
        """The trainable scores, for the user's optimizer (e.g. a group with its own lr)."""
        return [lin.scores for lin in self.layers]

    def _per_forward(self) -> bool:
        return self.refresh_steps == 0 or self.granularity != "element"

    @torch.no_grad()
    def refresh(self, sparsity: Optional[float] = None) -> None:
        """Reset the thresholds to the top-k at `sparsity` (default: the scheduled one), on the device."""
        s = self.sparsity if sparsity is None else sparsity
        if self._per_forward():
            self._set_per_forward(s)
        elif self.scope == "per_layer":
            for lin in self.layers:
                lin.refresh_threshold(s)
        else:
            tau = topk_threshold([lin.scores for lin in self.layers], s, backend=self.backend)
            for lin in self.layers:
                lin.set_threshold(tau)  # tau comes from checked scores: the forwards skip its check
                lin.set_target_sparsity(None)

    @torch.no_grad()
    def _set_per_forward(self, s: float) -> None:
        if self.scope == "per_layer" or self.granularity != "element":
            for lin in self.layers:
                lin.set_target_sparsity(s)
        else:  # one global threshold, computed once per step
            tau = topk_threshold([lin.scores for lin in self.layers], s, backend=self.backend)
            for lin in self.layers:
                lin.set_target_sparsity(None)
                lin.set_threshold(tau)

    def _apply(self, step: int, *, start: bool = False) -> None:
        if self._per_forward():
            self._set_per_forward(self.schedule(step))
        elif start:
            # binary start: the threshold stays phi until the first refresh; raw scores: top-k at step 0
            if self.score_init != "magnitude_binary":
                self.refresh(self.schedule(0))
            else:
                for lin in self.layers:
                    lin.set_target_sparsity(None)
        elif step > 0 and step % self.refresh_steps == 0:
            self.refresh(self.schedule(step))

    def step(self) -> None:
        """Call once after each optimizer step."""
        self.set_step(self.steps_done + 1)

    def set_step(self, step: int) -> None:
        """Put the scheduler at `step` optimizer steps done (e.g. after resuming the model's state dict):
        applies that step's rule; idempotent (a refresh recomputes the same thresholds from the scores)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.steps_done = step
        # The optimizer step changed every score matrix: one NaN check for all of them here, instead of one
        # per layer in the next forward (4 launches each; the forwards find them checked and skip it).
        check_scores_for_nan(self._named)
        if step == 0:
            for lin in self.layers:
                lin.set_target_sparsity(None)
            if self._per_forward():
                self._set_per_forward(self.schedule(0))
        else:
            self._apply(step)
        if self.check_ranks:
            self.check_masks_across_ranks()

    def check_masks_across_ranks(self) -> None:
        """Raise RuntimeError when the masks differ between the ranks of the process group (no-op without
        one). A debugging check: it synchronises with the host."""
        from ..distributed import check_same_across_ranks, masks_checksum
        check_same_across_ranks(masks_checksum([lin.effective_mask() for lin in self.layers]),
                                f"the mask-training masks at step {self.steps_done}")

    @contextlib.contextmanager
    def exact_sparsity(self, sparsity: Optional[float] = None) -> Iterator[None]:
        """Binarize at exactly the scheduled sparsity inside the block (e.g. to evaluate), then put the
        thresholds back, so that evaluating does not change training."""
        saved = [(lin.threshold.clone(), lin.target_sparsity) for lin in self.layers]
        self.refresh(sparsity)
        try:
            yield
        finally:
            with torch.no_grad():
                for lin, (tau, ts) in zip(self.layers, saved):
                    lin.threshold.copy_(tau)
                    lin.target_sparsity = ts

    @torch.no_grad()
    def finalize(self, freeze: bool = True) -> None:
        """Binarize at the final scheduled sparsity exactly; with `freeze`, scores -> fixed masks."""
        self.refresh(self.schedule(self.schedule.total_steps))
        if self.check_ranks:
            self.check_masks_across_ranks()
        if freeze:
            for lin in self.layers:
                lin.freeze_mask()

    # ------------------------------------------------------------------ state
    def config(self) -> Dict[str, Any]:
        return {"schedule": self.schedule.as_dict(), "scope": self.scope, "granularity": str(self.granularity),
                "threshold_refresh_steps": self.refresh_steps, "score_init": self.score_init, "phi": self.phi,
                "include_head": self.include_head, "train_head": self.train_head}

    def state_dict(self) -> Dict[str, Any]:
        return {"steps_done": self.steps_done, "config": self.config()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(f"MaskScheduler state was saved with configuration {state.get('config')}, "
                             f"this scheduler has {self.config()}")
        self.set_step(int(state["steps_done"]))
