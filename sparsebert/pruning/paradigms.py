"""The three ways of finding a sparse and robust subnetwork (SRNet) of the "Win-win Deal" study
(Liu et al., NeurIPS 2022), each usable with any training loss (CE or a debiasing loss):

  (a) prune the fine-tuned model: mask training on its frozen weights ("mask") or IMP with retraining
      ("imp"), starting from the dense model fine-tuned with the same loss;
  (b) prune the pre-trained model and fine-tune the subnetwork in isolation: IMP masks from the
      fine-tuned weights, weights rewound to the pre-trained ones (or an early fine-tuning checkpoint),
      then the subnetwork is trained from there (lottery-ticket style);
  (c) train masks on the frozen pre-trained model (only the scores and the classification head learn).

Mask search from an intermediate fine-tuning checkpoint ("when to start searching") is paradigm (a)
applied to that checkpoint. These functions work on a model and a loader; the experiment driver
(`sparsebert.pruning.srnet`) builds those, keeps checkpoints, and evaluates.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from torch import nn

from .imp import iterative_magnitude_pruning
from .mask_training import train_masks

PARADIGMS = ("a", "b", "c")
METHODS = ("mask", "imp")


def find_subnetwork(paradigm: str, model: nn.Module, train_loader, *, sparsity: float, loss_fn: Optional[Callable],
                    method: str = "mask", rewind_state: Optional[Mapping] = None,
                    mask_kwargs: Optional[Mapping[str, Any]] = None, imp_kwargs: Optional[Mapping[str, Any]] = None,
                    ckpt_dir=None, log_fn=None, progress: bool = True) -> Dict[str, Any]:
    """Run one paradigm in place on `model` (which must already hold the right starting weights: the
    fine-tuned model for "a" and "b", the pre-trained one for "c"). Returns the pruning record.

    mask_kwargs go to `train_masks` (sparsity schedule, scope, lr_scores, epochs, ...); imp_kwargs to
    `iterative_magnitude_pruning` (rounds/rate, scope, epochs, lr, ...). Paradigm "b" needs `rewind_state`.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, got {paradigm!r}")
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
    rec = iterative_magnitude_pruning(model, train_loader, target_sparsity=sparsity, rewind_state=rewind_state,
                                      **common, **imp_kwargs)
    return {"paradigm": paradigm, "method": "imp", **rec}
