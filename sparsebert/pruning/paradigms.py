"""The three ways of finding a sparse and robust subnetwork (SRNet) of the "Win-win Deal" study
(Liu et al., NeurIPS 2022), each usable with any training loss (CE or a debiasing loss):

  (a) prune the fine-tuned model: mask training on its frozen weights ("mask") or IMP with retraining
      ("imp"), starting from the dense model fine-tuned with the same loss;
  (b) prune the pre-trained model and fine-tune the subnetwork in isolation: masks from the fine-tuned
      weights -- by IMP, or given (`masks`, e.g. found by mask training in paradigm a) -- weights rewound
      to the pre-trained ones (or an early fine-tuning checkpoint), then the subnetwork is trained from
      there with its mask fixed (lottery-ticket style);
  (c) train masks on the frozen pre-trained model (only the scores learn: the classification head is
      masked and frozen, as in the authors' `mask_on_plm_pt` scripts; `train_head=True` trains it).

Mask search from an intermediate fine-tuning checkpoint ("when to start searching") is paradigm (a)
applied to that checkpoint. These functions work on a model and a loader; the experiment driver
(`sparsebert.pruning.srnet`) builds those, keeps checkpoints, and evaluates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from torch import Tensor, nn

from ..nn import sparsity_report
from ..nn.sparsify import encoder_linears, prunable_linears
from ..train import finetune
from .imp import apply_masks, iterative_magnitude_pruning, rewind_weights
from .mask_training import train_masks

PARADIGMS = ("a", "b", "c")
METHODS = ("mask", "imp")


def masks_from_state(state: Mapping[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """The keep-masks (name -> bool) stored in a saved state dict (the ``<name>.mask`` buffers of frozen
    SparseLinear layers, e.g. a finished mask-training run): every encoder linear's (required) and the
    pooler's when the state has one. The classifier's is not taken: the authors' retraining of given masks
    masks the encoder and the pooler, not the classifier (`run_glue.py: pruning_model_with_mask`, with
    `mask_classifier false` in their retrain scripts)."""
    encoder = encoder_linears(model)
    missing = [n for n in encoder if f"{n}.mask" not in state]
    if missing:
        raise ValueError(f"state: no mask for {len(missing)} encoder linears (first: {missing[0]!r}); expected "
                         "the state dict of a finished mask-training or IMP run")
    linears = prunable_linears(model, include_head="pooler")
    out = {}
    for n, lin in linears.items():
        if f"{n}.mask" not in state:
            continue  # a pooler without a mask (an encoder-only run): it stays dense
        m = state[f"{n}.mask"]
        if m.shape != lin.weight.shape:
            raise ValueError(f"state: mask of {n!r} has shape {tuple(m.shape)}, the weight has "
                             f"{tuple(lin.weight.shape)}")
        out[n] = m.bool()
    return out


def retrain_with_masks(model: nn.Module, train_loader, masks: Mapping[str, Tensor], *,
                       rewind_state: Optional[Mapping] = None, loss_fn: Optional[Callable] = None, ckpt_dir=None,
                       log_fn=None, progress: bool = True, **finetune_kwargs: Any) -> Dict[str, Any]:
    """Fix `masks` on `model`, rewind its weights to `rewind_state` (when given), and fine-tune the
    subnetwork (pruned weights stay zero). Returns {"sparsity", "train"}."""
    apply_masks(model, masks)
    if rewind_state is not None:
        rewind_weights(model, rewind_state)
    for p in model.parameters():
        p.requires_grad_(True)
    if log_fn:
        log_fn(f"retraining a subnetwork of sparsity {sparsity_report(model)['overall']:.4f}")
    train = finetune(model, train_loader, loss_fn=loss_fn, ckpt_dir=ckpt_dir, log_fn=log_fn, progress=progress,
                     desc="retrain subnetwork", **finetune_kwargs)
    return {"sparsity": sparsity_report(model)["overall"], "train": train}


def find_subnetwork(paradigm: str, model: nn.Module, train_loader, *, sparsity: float, loss_fn: Optional[Callable],
                    method: str = "mask", rewind_state: Optional[Mapping] = None,
                    masks: Optional[Mapping[str, Tensor]] = None,
                    mask_kwargs: Optional[Mapping[str, Any]] = None, imp_kwargs: Optional[Mapping[str, Any]] = None,
                    retrain_kwargs: Optional[Mapping[str, Any]] = None, ckpt_dir=None, log_fn=None,
                    progress: bool = True) -> Dict[str, Any]:
    """Run one paradigm in place on `model` (which must already hold the right starting weights: the
    fine-tuned model for "a" and "b", the pre-trained one for "c"; for "b" with IMP run as the authors, with
    `retrain_kwargs`, the rewind point). Returns the pruning record.

    mask_kwargs go to `train_masks` (sparsity schedule, scope, lr_scores, epochs, ...); imp_kwargs to
    `iterative_magnitude_pruning` (rounds/rate, scope, epochs, lr, ...). Paradigm "b" needs `rewind_state`;
    with `masks` (e.g. from a paradigm-a mask-training run) it retrains those masks instead of running IMP,
    with the finetune options of imp_kwargs (epochs, lr, max_steps, ...). Paradigm "b" with IMP and
    `retrain_kwargs` (finetune options) retrains the final IMP mask from `rewind_state` for a whole run after
    the search, as the authors' lt/retrain; the record's "search" holds the IMP rounds.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, got {paradigm!r}")
    if masks is not None and paradigm != "b":
        raise ValueError(f"masks are retrained in paradigm 'b' only, got paradigm {paradigm!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mask_kwargs, imp_kwargs = dict(mask_kwargs or {}), dict(imp_kwargs or {})
    common = dict(loss_fn=loss_fn, ckpt_dir=ckpt_dir, log_fn=log_fn, progress=progress)
    if paradigm == "c" or (paradigm == "a" and method == "mask"):
        rec = train_masks(model, train_loader, sparsity=sparsity, freeze_weights=True, **common, **mask_kwargs)
        return {"paradigm": paradigm, "method": "mask", **rec}
    if paradigm == "a":
        rec = iterative_magnitude_pruning(model, train_loader, target_sparsity=sparsity, rewind_state=None,
                                          **common, **imp_kwargs)
        return {"paradigm": paradigm, "method": "imp", **rec}
    if rewind_state is None:
        raise ValueError("paradigm 'b' needs rewind_state (the pre-trained weights or an early checkpoint)")
    if masks is not None:
        ft_kwargs = {k: v for k, v in imp_kwargs.items() if k not in ("rounds", "rate", "scope", "granularity")}
        rec = retrain_with_masks(model, train_loader, masks, rewind_state=rewind_state, **common, **ft_kwargs)
        return {"paradigm": paradigm, "method": "mask_training", **rec}
    rec = iterative_magnitude_pruning(model, train_loader, target_sparsity=sparsity, rewind_state=rewind_state,
                                      **common, **imp_kwargs)
    if retrain_kwargs is None:
        return {"paradigm": paradigm, "method": "imp", **rec}
    found = {n: lin.mask.bool().clone() for n, lin in prunable_linears(model, include_head="pooler").items()
             if getattr(lin, "mode", None) == "mask"}
    retrain_common = dict(common, ckpt_dir=None if ckpt_dir is None else Path(ckpt_dir) / "retrain")
    retrained = retrain_with_masks(model, train_loader, found, rewind_state=rewind_state, **retrain_common,
                                   **retrain_kwargs)
    return {"paradigm": paradigm, "method": "imp", "search": rec, **retrained}
