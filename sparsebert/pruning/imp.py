"""Iterative magnitude pruning (IMP) of the encoder linears (and the pooler), through SparseLinear mode "mask".

Each round prunes the smallest-magnitude surviving weights to the round's sparsity (per matrix or one
global threshold), optionally rewinds the weights to a saved state (the pre-trained weights, as in the
lottery-ticket studies of BERT, or an early fine-tuning checkpoint), and trains with a fresh optimizer
(`sparsebert.train.finetune`, so the weight gradient is masked and pruned weights stay pruned).

`imp_mode="paper"` (default) follows the "Win-win Deal" code (`hg_transformers/trainer_imp.py:
pruning_and_save`, `pruning_model_local`): one training run of the given length cut into equal
intervals; at the start of each, 10% of the ORIGINAL weights are pruned (1 / (10 - r) of the remaining
ones at round r, so the sparsity after r + 1 rounds is 0.1 (r + 1)), the optimizer and its linear lr
schedule are recreated (over ten intervals, the paper's whole run, without warm-up), and the six encoder
matrices plus the pooler are pruned. The data order restarts with a new shuffle each round (the paper's
loop continues its epoch). `imp_mode="per_round_finetune"` is this project's earlier rule: every round
is a full fine-tuning run, round targets from `schedules.imp_sparsities` (`rounds` or `rate`).
A finished round is saved atomically; an interrupted run resumes at the round (and step) where it stopped.

Data parallel (a process group, e.g. torchrun): each round's training is `finetune`'s DDP loop; before
pruning, rank 0's weights are broadcast (no drift can make the ranks' magnitude thresholds differ) and
the new masks are compared across ranks (a fingerprint all-reduced once per round); only rank 0 writes.
Each round reads the data in a new order: the DistributedSampler's seed is `data_seed` (default 0) + round.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..distributed import (broadcast_module_state, check_same_across_ranks, is_distributed, masks_checksum,
                           save_on_main, unwrap)
from ..nn import SparseLinear, sparsify, sparsity_report
from ..nn.sparsify import head_linears, prunable_linears
from ..train import finetune
from ..nn.granularity import canonical_granularity
from ._masks import select_masks
from .schedules import imp_sparsities

REWIND_SKIP = ("mask", "scores", "threshold")
IMP_MODES = ("paper", "per_round_finetune")
PAPER_ROUND_FRACTION = 0.1
PAPER_INTERVALS = 10  # trainer_imp.py: save_steps = t_total / 10, a pruning step at each


def paper_imp_sparsities(target: float, fraction: float = PAPER_ROUND_FRACTION) -> List[float]:
    """Sparsity after each round when every round prunes `fraction` of the original weights:
    fraction, 2 fraction, ... up to `target` (the last round clipped to it)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise ValueError(f"target_sparsity must be in (0, 1), got {target!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"round_fraction must be in (0, 1), got {fraction!r}")
    n = max(1, math.ceil(target / fraction - 1e-9))
    return [min(float(target), fraction * (i + 1)) for i in range(n)]


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, *, scope: str = "global",
                    granularity="element", include_head=False) -> Dict[str, Tensor]:
    """Keep-masks (bool) of the prunable linears (`sparsify.prunable_linears`: the encoder's, plus the
    head's by `include_head`) at `sparsity` by |W|; weights already pruned (masked by a SparseLinear)
    rank below every surviving one, so masks only shrink from round to round."""
    lins = prunable_linears(model, include_head)
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
    """Turn the encoder linears (and the head linears named in `masks`) into SparseLinear mode "mask"
    holding `masks` (name -> keep-mask)."""
    heads = [n for n in masks if n in head_linears(model)]
    include_head = False
    if heads:
        include_head = "pooler" if all(n.endswith(("pooler.dense", "pre_classifier")) for n in heads) else True
    sparsify(model, mode="mask", include_head=include_head, existing="keep")
    lins = prunable_linears(model, include_head)
    for name, m in masks.items():
        if name not in lins:
            raise KeyError(f"mask for {name!r}, which is not an encoder or head linear of the model")
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


def iterative_magnitude_pruning(model: nn.Module, train_loader, *, target_sparsity: float, imp_mode: str = "paper",
                                rounds: Optional[int] = None, rate: Optional[float] = None,
                                round_fraction: float = PAPER_ROUND_FRACTION, intervals: Optional[int] = PAPER_INTERVALS,
                                scope: str = "global",
                                granularity="element", include_head=None,
                                rewind_state: Optional[Mapping[str, Tensor]] = None,
                                loss_fn: Optional[Callable] = None, ckpt_dir=None, log_fn=None,
                                progress: bool = True, **finetune_kwargs: Any) -> Dict[str, Any]:
    """Prune `model` to `target_sparsity` in rounds; each round: prune, rewind (if `rewind_state`), train.

    imp_mode "paper": `round_fraction` of the original weights per round, the run's steps (`max_steps`,
    or `epochs` x len(train_loader)) cut into `intervals` equal rounds of which the target needs the first
    ceil(target / round_fraction) (the authors' `trainer_imp.py` cuts its run into 10 whatever the target:
    intervals=10; None cuts the run into exactly the rounds the target needs), no warm-up unless
    `warmup_ratio` is given, the lr decaying over all `intervals` rounds; `include_head` None means the
    pooler ("pooler"). imp_mode "per_round_finetune": `rounds` or
    `rate` (see `imp_sparsities`), each round a whole `finetune` run; `include_head` None means none.
    `finetune_kwargs` go to `finetune` (epochs, lr, max_steps, ...). Returns {"imp_mode",
    "round_sparsities", "rounds": [{"sparsity", "steps", ...}], "sparsity", "head_sparsity"}.
    """
    if imp_mode not in IMP_MODES:
        raise ValueError(f"imp_mode must be one of {IMP_MODES}, got {imp_mode!r}")
    model = unwrap(model)  # a DDP wrapper is dropped (sparsify swaps modules); finetune wraps again
    data_seed = finetune_kwargs.pop("data_seed", None)
    if data_seed is None and is_distributed():
        data_seed = 0
    round_steps: Optional[List[int]] = None
    if imp_mode == "paper":
        if rounds is not None or rate is not None:
            raise ValueError("imp_mode 'paper' prunes round_fraction of the original weights per round; "
                             "rounds and rate belong to imp_mode 'per_round_finetune'")
        targets = paper_imp_sparsities(target_sparsity, round_fraction)
        include_head = "pooler" if include_head is None else include_head
        max_steps = finetune_kwargs.pop("max_steps", None)
        epochs = finetune_kwargs.pop("epochs", 1.0)
        total = max_steps if max_steps is not None else max(1, math.ceil(epochs * len(train_loader)))
        if total < len(targets):
            raise ValueError(f"imp_mode 'paper' needs at least one step per round: {len(targets)} rounds, "
                             f"{total} steps")
        if intervals is not None and (isinstance(intervals, bool) or not isinstance(intervals, int)
                                      or intervals < len(targets)):
            raise ValueError(f"intervals must be None or an int >= the {len(targets)} rounds that target "
                             f"{target_sparsity} needs, got {intervals!r}")
        cuts = len(targets) if intervals is None else intervals
        if total < cuts:
            raise ValueError(f"imp_mode 'paper' needs at least one step per interval: {cuts} intervals, "
                             f"{total} steps (a longer run, fewer intervals, or intervals=None: the run cut into "
                             f"the {len(targets)} rounds the target needs)")
        interval = total // cuts
        # the run's remainder steps go to its last interval: to the last round only when it is the run's last
        last = total - interval * (cuts - 1) if cuts == len(targets) else interval
        round_steps = [interval] * (len(targets) - 1) + [last]
        decay = max(round_steps[-1], round(interval / round_fraction))
        finetune_kwargs.setdefault("warmup_ratio", 0.0)
    else:
        if rounds is None and rate is None:
            rounds = 1
        targets = imp_sparsities(target_sparsity, rounds=rounds, rate=rate)
        include_head = False if include_head is None else include_head
    sparsify(model, mode="mask", include_head=include_head, existing="keep")
    history = []
    for i, s in enumerate(targets):
        round_dir = Path(ckpt_dir) / f"round-{i:02d}" if ckpt_dir is not None else None
        done = round_dir / "done.safetensors" if round_dir is not None else None
        if done is not None and done.is_file():
            saved = load_checkpoint(done)
            model.load_state_dict(saved["model"])
            history.append(saved["record"])
            if log_fn:
                log_fn(f"imp: round {i + 1}/{len(targets)} already done (sparsity {s:.3f})")
            continue
        broadcast_module_state(model)  # identical weights on every rank before the magnitude threshold
        masks = magnitude_masks(model, s, scope=scope, granularity=granularity, include_head=include_head)
        check_same_across_ranks(masks_checksum(masks.values()), f"the IMP masks of round {i + 1}")
        apply_masks(model, masks)
        if rewind_state is not None:
            rewind_weights(model, rewind_state)
        if log_fn:
            log_fn(f"imp: round {i + 1}/{len(targets)}: pruned to {sparsity_report(model)['overall']:.4f}, training")
        per_round = dict(max_steps=round_steps[i], lr_decay_steps=decay) if round_steps is not None else {}
        if data_seed is not None:
            per_round["data_seed"] = data_seed + i
        train = finetune(model, train_loader, loss_fn=loss_fn, ckpt_dir=round_dir, log_fn=log_fn, progress=progress,
                         desc=f"imp round {i + 1}/{len(targets)}", **per_round, **finetune_kwargs)
        record = {"round": i, "target": s, "sparsity": sparsity_report(model)["overall"],
                  "mean_loss": train["mean_loss"], "last_loss": train["last_loss"], "steps": train["steps"]}
        history.append(record)
        if done is not None:
            save_on_main({"model": model.state_dict(), "record": record}, done)
    head = {n: m for n, m in prunable_linears(model, include_head).items() if n in head_linears(model)}
    head_sparsity = (1.0 - sum(int(m.effective_mask().sum()) for m in head.values())
                     / sum(m.weight.numel() for m in head.values())) if head else None
    return {"imp_mode": imp_mode, "round_sparsities": targets, "rounds": history,
            "sparsity": sparsity_report(model)["overall"], "head_sparsity": head_sparsity}
