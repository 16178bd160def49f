"""Iterative magnitude pruning (IMP) of the encoder linears, through SparseLinear mode "mask".

Each round prunes the smallest-magnitude surviving weights to the round's sparsity (per matrix or one
global threshold), optionally rewinds the weights to a saved state (the pre-trained weights, as in the
lottery-ticket studies of BERT, or an early fine-tuning checkpoint), and fine-tunes with a fresh
optimizer (`sparsebert.train.finetune`, so the weight gradient is masked and pruned weights stay pruned).
Round targets come from `schedules.imp_sparsities` (a number of rounds, or a per-round rate). A finished
round is saved atomically; an interrupted run resumes at the round (and step) where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..checkpoint import atomic_save, load_checkpoint
from ..nn import SparseLinear, sparsify, sparsity_report
from ..nn.sparsify import encoder_linears
from ..train import finetune
from ..nn.granularity import canonical_granularity
from ._masks import select_masks
from .schedules import imp_sparsities

REWIND_SKIP = ("mask", "scores", "threshold")


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, *, scope: str = "global",
                    granularity="element") -> Dict[str, Tensor]:
    """Keep-masks (bool) of the encoder linears at `sparsity` by |W|; weights already pruned (masked by a
    SparseLinear) rank below every surviving one, so masks only shrink from round to round."""
    lins = encoder_linears(model)
    scores = []
    for lin in lins.values():
        s = lin.weight.detach().abs().float()
        if isinstance(lin, SparseLinear) and lin.mode != "dense":
            s = torch.where(lin.effective_mask(), s, torch.full_like(s, -1.0))
        scores.append(s)
    scope = "per_matrix" if scope in ("per_matrix", "per_layer", "local") else scope
    masks = select_masks(scores, sparsity, scope=scope, granularity=canonical_granularity(granularity))
    return dict(zip(lins.keys(), masks))


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Turn the encoder linears into SparseLinear mode "mask" holding `masks` (name -> keep-mask)."""
    sparsify(model, mode="mask")
    lins = encoder_linears(model)
    for name, m in masks.items():
        if name not in lins:
            raise KeyError(f"mask for {name!r}, which is not an encoder linear of the model")
        lins[name].set_mask(m)
    return model


@torch.no_grad()
def rewind_weights(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Copy every weight of `state` (e.g. the pre-trained weights) into `model`, keeping its masks.

    Parameters missing from `state` (a freshly initialized classifier) are left as they are."""
    own = model.state_dict()
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in REWIND_SKIP or key not in own:
            continue
        if own[key].shape != value.shape:
            raise ValueError(f"rewind state {key!r} has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}")
        own[key].copy_(value)
    return model


def iterative_magnitude_pruning(model: nn.Module, train_loader, *, target_sparsity: float,
                                rounds: Optional[int] = None, rate: Optional[float] = None, scope: str = "global",
                                granularity="element", rewind_state: Optional[Mapping[str, Tensor]] = None,
                                loss_fn: Optional[Callable] = None, ckpt_dir=None, log_fn=None,
                                progress: bool = True, **finetune_kwargs: Any) -> Dict[str, Any]:
    """Prune `model` to `target_sparsity` in rounds; each round: prune, rewind (if `rewind_state`), fine-tune.

    `finetune_kwargs` go to `finetune` (epochs, lr, max_steps, ...), once per round, each round with a new
    optimizer. Returns {"round_sparsities", "rounds": [{"sparsity", "train": ...}], "sparsity": report}.
    """
    if rounds is None and rate is None:
        rounds = 1
    targets = imp_sparsities(target_sparsity, rounds=rounds, rate=rate)
    sparsify(model, mode="mask")
    history = []
    for i, s in enumerate(targets):
        round_dir = Path(ckpt_dir) / f"round-{i:02d}" if ckpt_dir is not None else None
        done = round_dir / "done.pt" if round_dir is not None else None
        if done is not None and done.is_file():
            saved = load_checkpoint(done)
            model.load_state_dict(saved["model"])
            history.append(saved["record"])
            if log_fn:
                log_fn(f"imp: round {i + 1}/{len(targets)} already done (sparsity {s:.3f})")
            continue
        apply_masks(model, magnitude_masks(model, s, scope=scope, granularity=granularity))
        if rewind_state is not None:
            rewind_weights(model, rewind_state)
        if log_fn:
            log_fn(f"imp: round {i + 1}/{len(targets)}: pruned to {sparsity_report(model)['overall']:.4f}, fine-tuning")
        train = finetune(model, train_loader, loss_fn=loss_fn, ckpt_dir=round_dir, log_fn=log_fn, progress=progress,
                         desc=f"imp round {i + 1}/{len(targets)}", **finetune_kwargs)
        record = {"round": i, "target": s, "sparsity": sparsity_report(model)["overall"],
                  "mean_loss": train["mean_loss"], "last_loss": train["last_loss"], "steps": train["steps"]}
        history.append(record)
        if done is not None:
            atomic_save({"model": model.state_dict(), "record": record}, done)
    return {"round_sparsities": targets, "rounds": history, "sparsity": sparsity_report(model)["overall"]}
