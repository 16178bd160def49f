"""Mask training: learn a binary mask over frozen weights with the straight-through estimator.

Every encoder linear becomes a SparseLinear in mode "scores": real-valued scores (initialized from |W|)
are binarized inside the fused `score_masked_linear` kernel, m = [scores >= tau], and receive the STE
gradient dL/dscores = (dY^T X) * W. tau comes from `topk_threshold`, per layer (each matrix at the
scheduled sparsity) or global (one threshold over the list of all scores). The sparsity follows a
schedule, constant or the cubic gradual schedule of Zhu & Gupta from an initial to a final sparsity,
evaluated as a pure function of the step (exact resume). Scores have their own learning rate; the
classification head may train with the ordinary lr. At the end the masks are frozen (mode "mask").
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..nn import SparseLinear, sparsify, sparsity_report
from ..nn.sparsify import encoder_linears, head_linears
from ..nn.granularity import canonical_granularity
from ..ops import topk_threshold
from ..train import finetune
from .schedules import SparsitySchedule

SCOPES = ("per_layer", "global")


def prepare_mask_training(model: nn.Module, *, score_init: str = "magnitude", freeze_weights: bool = True,
                          train_head: bool = True, granularity="element", backend: str = "auto") -> List[SparseLinear]:
    """Put the encoder linears in mode "scores" and set requires_grad: scores always; the head when
    `train_head`; every other weight only when not `freeze_weights`. Returns the SparseLinear layers."""
    granularity = canonical_granularity(granularity)
    for lin in encoder_linears(model).values():  # a model loaded with frozen masks: back to plain weights
        if isinstance(lin, SparseLinear) and lin.mode == "mask":
            with torch.no_grad():
                lin.weight.mul_(lin.mask.to(lin.weight.dtype))
    sparsify(model, mode="scores", score_init=score_init, backend=backend)
    lins = list(encoder_linears(model).values())
    for lin in lins:
        if lin.mode != "scores":
            lin.init_scores(score_init)
    head = {id(p) for m in head_linears(model).values() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(not freeze_weights or (train_head and id(p) in head))
    for lin in lins:
        lin.scores.requires_grad_(True)
        lin.set_granularity(granularity)
    return lins


def set_sparsity(lins: List[SparseLinear], sparsity: float, scope: str) -> None:
    """Binarize the scores of `lins` at `sparsity`: per-layer top-k, or one global top-k threshold."""
    if scope == "per_layer" or lins[0].granularity != "element":
        for lin in lins:
            lin.set_target_sparsity(sparsity)
    else:
        tau = topk_threshold([lin.scores for lin in lins], sparsity)
        for lin in lins:
            lin.set_target_sparsity(None)
            lin.set_threshold(tau)


@torch.no_grad()
def freeze_masks(lins: List[SparseLinear]) -> None:
    """Scores -> fixed masks (mode "mask"), whatever the granularity."""
    for lin in lins:
        lin.freeze_mask()


def train_masks(model: nn.Module, train_loader, *, sparsity: float, schedule: str = "cubic",
                initial_sparsity: float = 0.0, begin_frac: float = 0.0, end_frac: float = 0.7,
                scope: str = "per_layer", granularity="element", score_init: str = "magnitude",
                lr_scores: float = 1e-2, lr: float = 2e-5, train_head: bool = True, freeze_weights: bool = True,
                loss_fn: Optional[Callable] = None, epochs: float = 1.0, max_steps: Optional[int] = None,
                warmup_ratio: float = 0.0, freeze_at_end: bool = True, ckpt_dir=None, ckpt_every: int = 200,
                progress: bool = True, log_fn=None, step_callback=None, backend: str = "auto",
                **finetune_kwargs: Any) -> Dict[str, Any]:
    """Train masks on `model` to `sparsity` (over the encoder linears); returns {"schedule", "train",
    "sparsity"} where "sparsity" is the measured encoder sparsity after freezing."""
    if scope in ("per_matrix", "local"):
        scope = "per_layer"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not lr_scores > 0:
        raise ValueError(f"lr_scores must be positive, got {lr_scores!r}")
    if canonical_granularity(granularity) != "element" and scope == "global":
        raise ValueError("scope 'global' supports granularity 'element' only; use scope 'per_layer'")
    if canonical_granularity(granularity) == "2:4" and (schedule != "constant" or sparsity != 0.5):
        raise ValueError("granularity '2:4' prunes exactly half of each group of 4: use sparsity=0.5 and "
                         f"schedule='constant' (got sparsity={sparsity}, schedule={schedule!r})")
    lins = prepare_mask_training(model, score_init=score_init, freeze_weights=freeze_weights, train_head=train_head,
                                 granularity=granularity, backend=backend)
    total = max_steps if max_steps is not None else max(1, int(-(-epochs * len(train_loader) // 1)))
    sched = SparsitySchedule(schedule, sparsity, total, initial=initial_sparsity if schedule == "cubic" else 0.0,
                             begin_frac=begin_frac, end_frac=end_frac)
    score_group = {"params": [lin.scores for lin in lins], "lr": lr_scores, "weight_decay": 0.0}
    train = finetune(model, train_loader, loss_fn=loss_fn, epochs=epochs, lr=lr, max_steps=total,
                     warmup_ratio=warmup_ratio, extra_param_groups=[score_group], ckpt_dir=ckpt_dir,
                     ckpt_every=ckpt_every, progress=progress, log_fn=log_fn, step_callback=step_callback,
                     before_step=lambda step: set_sparsity(lins, sched(step), scope), desc="mask training",
                     **finetune_kwargs)
    set_sparsity(lins, sched(total), scope)
    if freeze_at_end:
        freeze_masks(lins)
    return {"schedule": sched.as_dict(), "scope": scope, "train": train,
            "sparsity": sparsity_report(model)["overall"]}
