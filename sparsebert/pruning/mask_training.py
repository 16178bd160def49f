"""Mask training: learn a binary mask over frozen weights with the straight-through estimator.

`train_masks` runs the shared loop (`sparsebert.train.finetune`: AdamW, linear warm-up and decay,
atomic checkpoints, exact resume) around a `MaskScheduler` (`scheduler.py`), which holds the whole
recipe: which matrices are masked, how the scores start, when the thresholds are reset and how the
sparsity moves. The scores are binarized inside the fused `score_masked_linear` kernel,
m = [scores >= tau], and receive the STE gradient dL/dscores = (dY^T X) * W.

Defaults follow the "Win-win Deal" authors' code (llyx97/sparse-and-robust-PLM, `mask_run_glue.py` and
`hg_transformers/mask_trainer.py`, MNLI scripts under `scripts/mask_train/`):
  * the six encoder matrices, the pooler and the classifier masked; every weight frozen, the head too;
  * binary magnitude start (2 * phi / 0, phi = 0.01), thresholds reset every `threshold_refresh_steps`
    (the paper's 1,000 of 61,360 steps, scaled to the run: `paper_refresh_steps`);
  * constant sparsity ("cubic" for the gradual study: from `initial_sparsity` to `sparsity` over the whole
    run, with raw |W| scores, as its 0.7 -> 0.9 runs);
  * AdamW, lr 5e-5 on the scores, linear warm-up over `PAPER_WARMUP_RATIO` = 3,600 / 61,360 = 5.87% of
    the steps (the paper's 3,600 warm-up steps of 5 MNLI epochs, as a fraction of the run), then linear
    decay; no weight decay on the scores; global gradient-norm clipping at 1.
This project's earlier recipe stays available: `score_init="magnitude", threshold_refresh_steps=0,
include_head=False, train_head=True, schedule="cubic", end_frac=0.7, lr_scores=1e-2, warmup_ratio=0`.
At the end the masks are binarized at the final sparsity exactly and frozen (mode "mask").
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch import nn

from ..distributed import unwrap
from ..nn import sparsity_report
from ..train import finetune
from .scheduler import PAPER_PHI, PAPER_WARMUP_RATIO, MaskScheduler

PAPER_LR_SCORES = 5e-5


def train_masks(model: nn.Module, train_loader, *, sparsity: float, schedule: str = "constant",
                initial_sparsity: Optional[float] = None, begin_frac: float = 0.0, end_frac: float = 1.0,
                scope: str = "per_layer", granularity="element", score_init: Optional[str] = None,
                phi: float = PAPER_PHI, threshold_refresh_steps: Optional[int] = None, include_head=True,
                lr_scores: float = PAPER_LR_SCORES, lr: float = 2e-5, train_head: bool = False,
                freeze_weights: bool = True, loss_fn: Optional[Callable] = None, epochs: float = 1.0,
                max_steps: Optional[int] = None, warmup_ratio: float = PAPER_WARMUP_RATIO,
                freeze_at_end: bool = True, ckpt_dir=None, ckpt_every: int = 200, progress: bool = True,
                log_fn=None, step_callback=None, backend: str = "auto", check_ranks: bool = False,
                **finetune_kwargs: Any) -> Dict[str, Any]:
    """Train masks on `model` to `sparsity`; returns {"schedule", "scheduler", "scope", "train", "sparsity",
    "head_sparsity"}: "sparsity" is the measured sparsity of the encoder linears after the final
    binarization, "head_sparsity" that of the masked head matrices (None when the head is not masked).

    `score_init` None: "magnitude_binary" for a constant schedule, "magnitude" (raw |W|) for the cubic one
    (as the paper's code), "magnitude" for block/2:4 granularities. `step_callback(step, info)` gets
    info["mask_scheduler"] too. `lr` applies to the head when `train_head` (or every weight when not
    `freeze_weights`).

    Under a process group (torchrun) the loop is data parallel (`finetune`); `check_ranks=True` asserts
    after every step that every rank holds the same masks (`MaskScheduler`; a debugging host sync).
    """
    if not lr_scores > 0:
        raise ValueError(f"lr_scores must be positive, got {lr_scores!r}")
    model = unwrap(model)  # a DDP wrapper is dropped: sparsify adds the scores; finetune wraps again
    if "before_step" in finetune_kwargs:
        raise ValueError("train_masks drives before_step itself; use step_callback")
    total = max_steps if max_steps is not None else max(1, int(-(-epochs * len(train_loader) // 1)))
    if score_init is None:
        score_init = "magnitude" if schedule == "cubic" else None
    sched = MaskScheduler(model, sparsity=sparsity, total_steps=total, schedule=schedule,
                          initial_sparsity=initial_sparsity, begin_frac=begin_frac, end_frac=end_frac, scope=scope,
                          threshold_refresh_steps=threshold_refresh_steps, score_init=score_init, phi=phi,
                          include_head=include_head, train_head=train_head, freeze_weights=freeze_weights,
                          granularity=granularity, backend=backend, check_ranks=check_ranks)
    score_group = {"params": sched.scores(), "lr": lr_scores, "weight_decay": 0.0}

    def before_step(step: int) -> None:  # a resumed run: the thresholds came back with the model
        if step != sched.steps_done:
            sched.set_step(step)

    def after_step(step: int, info: Dict[str, float]) -> None:
        sched.step()
        if step_callback is not None:
            step_callback(step, {**info, "mask_scheduler": sched})

    train = finetune(model, train_loader, loss_fn=loss_fn, epochs=epochs, lr=lr, max_steps=total,
                     warmup_ratio=warmup_ratio, extra_param_groups=[score_group], ckpt_dir=ckpt_dir,
                     ckpt_every=ckpt_every, progress=progress, log_fn=log_fn, step_callback=after_step,
                     before_step=before_step, desc="mask training", **finetune_kwargs)
    sched.finalize(freeze=freeze_at_end)
    report = sparsity_report(model)
    names = {id(m): n for n, m in model.named_modules()}
    head_report = report.get("head", {})
    head = [head_report[names[id(lin)]] for lin in sched.layers if names.get(id(lin)) in head_report]
    head_sparsity = (sum(e["zeros"] for e in head) / sum(e["numel"] for e in head)) if head else None
    return {"schedule": sched.schedule.as_dict(), "scheduler": sched.config(), "scope": sched.scope, "train": train,
            "sparsity": report["overall"], "head_sparsity": head_sparsity}
