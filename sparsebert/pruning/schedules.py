"""Sparsity schedules.

`cubic_sparsity` is the gradual pruning schedule of Zhu & Gupta 2017 ("To prune, or not to prune"):
    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))**3   for t_0 <= t <= t_1,
s_i before t_0 and s_f after t_1. It prunes fast early, when many weights are redundant, and slowly as
the final sparsity nears. `imp_sparsities` gives the per-round targets of iterative magnitude pruning.
"""
from __future__ import annotations

import math
from typing import List, Optional


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def cubic_sparsity(step: int, *, initial: float, final: float, begin_step: int, end_step: int) -> float:
    """Sparsity at `step` of the cubic schedule from `initial` (at begin_step) to `final` (at end_step)."""
    initial, final = _check_fraction("initial", initial), _check_fraction("final", final)
    if begin_step < 0 or end_step < begin_step:
        raise ValueError(f"need 0 <= begin_step <= end_step, got begin_step={begin_step}, end_step={end_step}")
    if step <= begin_step:
        return initial if end_step > begin_step else final
    if step >= end_step:
        return final
    frac = (step - begin_step) / (end_step - begin_step)
    return final + (initial - final) * (1.0 - frac) ** 3


class SparsitySchedule:
    """Sparsity as a pure function of the step (so a resumed run gets the same values).

    kind "constant": `final` from step 0. kind "cubic": Zhu & Gupta from `initial` at
    begin_frac * total_steps to `final` at end_frac * total_steps.
    """

    KINDS = ("constant", "cubic")

    def __init__(self, kind: str, final: float, total_steps: int, *, initial: float = 0.0,
                 begin_frac: float = 0.0, end_frac: float = 0.7):
        if kind not in self.KINDS:
            raise ValueError(f"schedule must be one of {self.KINDS}, got {kind!r}")
        if not 0.0 <= begin_frac <= end_frac <= 1.0:
            raise ValueError(f"need 0 <= begin_frac <= end_frac <= 1, got {begin_frac}, {end_frac}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.kind, self.total_steps = kind, int(total_steps)
        self.final, self.initial = _check_fraction("final", final), _check_fraction("initial", initial)
        if kind == "cubic" and self.initial > self.final:
            raise ValueError(f"initial sparsity {initial} is above the final {final}")
        self.begin_step = int(round(begin_frac * total_steps))
        self.end_step = int(round(end_frac * total_steps))

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.final
        return cubic_sparsity(step, initial=self.initial, final=self.final,
                              begin_step=self.begin_step, end_step=self.end_step)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "initial": self.initial, "final": self.final, "begin_step": self.begin_step,
                "end_step": self.end_step, "total_steps": self.total_steps}


def imp_sparsities(target: float, *, rounds: Optional[int] = None, rate: Optional[float] = None) -> List[float]:
    """Sparsity after each round of iterative magnitude pruning that reaches `target`.

    Give `rounds` (each round prunes the same fraction of the remaining weights, so after round i the
    sparsity is 1 - (1 - target)**(i / rounds)) or `rate` (each round prunes `rate` of the remaining
    weights: 1 - (1 - rate)**i, the last round clipped to `target`; ceil(log(1 - target) / log(1 - rate))
    rounds). Exactly one of the two.
    """
    target = _check_fraction("target", target)
    if (rounds is None) == (rate is None):
        raise ValueError("give exactly one of rounds and rate")
    if target == 0.0:
        return [0.0]
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive int, got {rounds!r}")
        out = [1.0 - (1.0 - target) ** (i / rounds) for i in range(1, rounds + 1)]
    else:
        rate = _check_fraction("rate", rate)
        if rate == 0.0:
            raise ValueError("rate must be > 0")
        n = max(1, math.ceil(math.log(1.0 - target) / math.log(1.0 - rate) - 1e-9))
        out = [min(target, 1.0 - (1.0 - rate) ** i) for i in range(1, n + 1)]
    out[-1] = target
    return out
