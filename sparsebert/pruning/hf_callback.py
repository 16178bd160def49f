"""MaskTrainingCallback: a Hugging Face `TrainerCallback` that steps a `MaskScheduler`.

The Trainer's own optimizer trains the scores (they are parameters of the model with requires_grad),
so the user keeps the Trainer, its optimizer, lr schedule and checkpoints; after each optimizer step
the callback moves the scheduler to `state.global_step`; at the end of training it binarizes at the
final sparsity (and, with `freeze_at_end`, turns the scores into fixed masks).

Several processes (`accelerate launch` or `torchrun` with the Trainer): build the MaskScheduler on the
plain model before the Trainer wraps it in DistributedDataParallel; every rank holds the callback and
steps its scheduler; DDP averages the scores' gradients, so the scores and the thresholds (per matrix or
global) stay identical across ranks. `MaskScheduler(..., check_ranks=True)` asserts it at every step.
"""
from __future__ import annotations

from transformers import TrainerCallback

from .scheduler import MaskScheduler


class MaskTrainingCallback(TrainerCallback):
    def __init__(self, scheduler: MaskScheduler, *, freeze_at_end: bool = False):
        if not isinstance(scheduler, MaskScheduler):
            raise TypeError(f"scheduler must be a MaskScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.freeze_at_end = freeze_at_end

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step != self.scheduler.steps_done:  # resumed from a Trainer checkpoint
            self.scheduler.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.scheduler.steps_done + 1:
            self.scheduler.step()
        else:
            self.scheduler.set_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.scheduler.finalize(freeze=self.freeze_at_end)
