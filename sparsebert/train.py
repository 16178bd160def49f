"""A generic fine-tuning loop for sequence classifiers: AdamW, linear warmup/decay, progress with ETA,
atomic checkpoints and exact resume.

Batches are dicts from the data collate: ``input_ids``, ``attention_mask``, optional ``token_type_ids``,
``labels`` and optional ``bias_probs`` / ``teacher_probs``. The loss has the debias-loss signature
``loss_fn(logits, labels, bias_probs=None, teacher_probs=None) -> scalar`` (default: cross-entropy, MSE
for a 1-output regression head).

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, the position in the epoch, the
RNG state at the start of the epoch (which fixes the shuffling of a DataLoader with num_workers=0) and the
RNG state after the step (dropout). Resuming replays the epoch's sampler and skips the batches already
seen, so an interrupted run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save, load_latest_checkpoint, prune_old_checkpoints, step_checkpoint_path
from .distributed import (all_reduce_mean, barrier, is_distributed, is_main_process, sampler_of, shard_loader,
                          unwrap, world_size, wrap_ddp)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


def cross_entropy_loss(logits, labels, bias_probs=None, teacher_probs=None):
    """Plain cross-entropy with the debias-loss signature (extra arguments ignored)."""
    return F.cross_entropy(logits, labels)


def mse_loss(logits, labels, bias_probs=None, teacher_probs=None):
    """Mean squared error of a 1-output (regression) head, with the debias-loss signature."""
    if logits.shape[-1] != 1:
        raise ValueError(f"mse_loss: expected logits with 1 output (regression), got {logits.shape[-1]}")
    return F.mse_loss(logits.squeeze(-1).float(), labels.float())


def default_loss_fn(model: nn.Module) -> Callable:
    """MSE for a 1-output (regression) head, cross-entropy otherwise (as HF does for num_labels == 1)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return mse_loss if num_labels == 1 else cross_entropy_loss


def model_inputs(batch: Mapping[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch and batch[k] is not None}


def forward_logits(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    out = model(**model_inputs(batch, device))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def compute_loss(model, batch, loss_fn, device):
    logits = forward_logits(model, batch, device)
    labels = batch["labels"].to(device)
    extra = {k: (batch[k].to(device) if batch.get(k) is not None else None) for k in ("bias_probs", "teacher_probs")}
    return loss_fn(logits, labels, **extra), logits


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: nn.Module, lr: float, weight_decay: float, extra_param_groups: Sequence[Mapping] = ()):
    """AdamW groups: decayed weights, undecayed biases/LayerNorm, then `extra_param_groups` (which win:
    a parameter listed there is taken out of the model groups). Frozen parameters are left out."""
    extra = [dict(g) for g in extra_param_groups]
    for g in extra:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    taken = {id(p) for g in extra for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        (no_decay if name.endswith(_NO_DECAY) or p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}] + extra
    return [g for g in groups if g["params"]]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_args(epochs, lr, weight_decay, warmup_ratio, max_steps, ckpt_every):
    if max_steps is None and (not isinstance(epochs, (int, float)) or not epochs > 0):
        raise ValueError(f"epochs must be a positive number, got {epochs!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if not isinstance(ckpt_every, int) or ckpt_every < 1:
        raise ValueError(f"ckpt_every must be a positive int, got {ckpt_every!r}")


def finetune(model: nn.Module, train_loader: Iterable, *, loss_fn: Optional[Callable] = None, epochs: float = 1.0,
             lr: float = 2e-5, weight_decay: float = 0.01, warmup_ratio: float = 0.1, max_steps: Optional[int] = None,
             extra_param_groups: Sequence[Mapping] = (), ckpt_dir=None, ckpt_every: int = 200, keep_last: int = 2,
             progress: bool = True, log_fn: Optional[Callable[[str], None]] = None, log_every: int = 50,
             step_callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
             before_step: Optional[Callable[[int], None]] = None,
             grad_clip: Optional[float] = 1.0, device=None, desc: str = "train",
             lr_decay_steps: Optional[int] = None, data_seed: Optional[int] = None) -> Dict[str, Any]:
    """Fine-tune `model` on `train_loader`; returns {"steps", "mean_loss", "last_loss", "losses", "seconds",
    "resumed_from", "total_steps"}.

    total steps = `max_steps` or ceil(epochs * len(train_loader)); the lr warms up and decays linearly over
    `lr_decay_steps` (default: the total; more: the run is the start of a longer schedule, as one IMP
    round of the "Win-win Deal" code). `extra_param_groups` are AdamW groups
    with their own lr/weight_decay (e.g. mask scores); they follow the same warmup/decay factor.
    `before_step(step)` runs before each step (step = steps done so far; use it for schedules that must
    be a pure function of the step so that resume is exact); `step_callback(step, {"loss", "lr"})` after
    each step, before that step's checkpoint (a callback whose work a resumed run must not skip is safe).
    With `ckpt_dir`, a checkpoint is written atomically every `ckpt_every` steps and at the end; a call
    with a folder holding a checkpoint resumes from it (and returns at once when it is the final one).

    Data parallel (a `torch.distributed` process group initialised, e.g. under torchrun): the model is
    wrapped in DistributedDataParallel (or taken already wrapped), `train_loader`'s dataset is read through
    a DistributedSampler seeded with `data_seed` (default 0; `set_epoch` each epoch) with per-rank batch =
    `train_loader.batch_size` / world size, the recorded loss is the mean over the ranks, and only rank 0
    writes checkpoints (every rank loads the same one on resume). The data position is re-derived from the
    global step, so a run resumed with another world size continues at the same example; see
    `sparsebert.distributed` for what is exact across world sizes. `data_seed` given without a process
    group: the same sampler as a world of 1 (the reference a multi-process run is compared with).
    """
    _check_args(epochs, lr, weight_decay, warmup_ratio, max_steps, ckpt_every)
    net, model = model, unwrap(model)  # net runs the forward (DDP under a process group), model holds the state
    sampler = sampler_of(train_loader)
    if sampler is None and (is_distributed() or data_seed is not None):
        train_loader = shard_loader(train_loader, 0 if data_seed is None else data_seed)
        sampler = train_loader.sampler
    loss_fn = loss_fn or default_loss_fn(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    groups = param_groups(model, lr, weight_decay, extra_param_groups)
    if not groups:
        raise ValueError("model has no trainable parameters (and extra_param_groups is empty)")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    horizon = total if lr_decay_steps is None else int(lr_decay_steps)  # warm-up and decay span (IMP rounds)
    if horizon < total:
        raise ValueError(f"lr_decay_steps must be >= the run's {total} steps, got {lr_decay_steps}")
    scheduler = linear_schedule(optimizer, int(warmup_ratio * horizon), horizon)

    step, losses, resumed_from = 0, [], None
    state = None
    found = load_latest_checkpoint(ckpt_dir)  # the newest readable one (a bad file falls back, with a warning)
    if found is not None:
        ckpt, state = found
        if state.get("total_steps") != total:
            raise ValueError(f"checkpoint {ckpt} was written for {state.get('total_steps')} steps, this run has {total}; "
                             "use a fresh ckpt_dir")
        saved = [(g.get("initial_lr", g.get("lr")), g.get("weight_decay")) for g in state["optimizer"]["param_groups"]]
        now = [(g.get("initial_lr", g.get("lr")), g.get("weight_decay")) for g in optimizer.param_groups]
        if saved != now:
            raise ValueError(f"checkpoint {ckpt} was written with (lr, weight_decay) per parameter group {saved}, "
                             f"this run has {now}; use a fresh ckpt_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, resumed_from = state["step"], list(state["losses"]), state["step"]
        if log_fn and is_main_process():
            log_fn(f"{desc}: resumed from {ckpt} at step {step}/{total}")
    net = wrap_ddp(net, device)
    if not is_main_process():
        log_fn = None

    def save(epoch_rng):
        if is_main_process():
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "step": step, "total_steps": total, "losses": losses,
                         "epoch_rng": epoch_rng, "rng": _rng_state(), "done": step >= total,
                         "world_size": world_size()},
                        step_checkpoint_path(ckpt_dir, step))
            prune_old_checkpoints(ckpt_dir, keep_last)
        barrier()

    t0 = time.perf_counter()
    net.train()
    bar = None
    if progress and step < total and is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True, leave=False)
    try:
        while step < total:
            epoch_pos = step % steps_per_epoch
            if state is not None and epoch_pos > 0:
                _set_rng_state(state["epoch_rng"])  # replay this epoch's shuffling ...
                epoch_rng = state["epoch_rng"]
            else:
                if state is not None:
                    _set_rng_state(state["rng"])
                epoch_rng = _rng_state()
            if sampler is not None:
                sampler.set_epoch(step // steps_per_epoch)  # the order is a function of (data_seed, epoch)
            it = iter(train_loader)
            for _ in range(epoch_pos):  # ... skip the batches already trained on ...
                next(it)
            if state is not None and epoch_pos > 0:
                _set_rng_state(state["rng"])  # ... and continue with the RNG of the interrupted step
            state = None
            for batch in it:
                if step >= total:
                    break
                if before_step is not None:
                    before_step(step)
                loss, _ = compute_loss(net, batch, loss_fn, device)
                mean_loss = all_reduce_mean(loss.detach())  # over the ranks: every rank stops together
                if not torch.isfinite(mean_loss):
                    raise FloatingPointError(f"{desc}: loss is {mean_loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(float(mean_loss.item()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if log_fn and (step % log_every == 0 or step == total):
                    recent = losses[-log_every:]
                    log_fn(f"{desc}: step {step}/{total} loss {sum(recent) / len(recent):.4f}")
                # the callback first: a checkpoint then holds everything its step did (files the callback
                # writes included), so a run killed between the two replays the step instead of skipping
                # the callback's work for good (an srnet snapshot or evaluation at a checkpoint step)
                if step_callback is not None:
                    step_callback(step, {"loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
                if ckpt_dir is not None and (step % ckpt_every == 0 or step == total):
                    save(epoch_rng)
    finally:
        if bar is not None:
            bar.close()
    return {"steps": step, "total_steps": total, "resumed_from": resumed_from, "losses": losses,
            "mean_loss": sum(losses) / max(1, len(losses)), "last_loss": losses[-1] if losses else float("nan"),
            "seconds": time.perf_counter() - t0}
