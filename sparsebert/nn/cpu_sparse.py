"""CPU sparse inference: the `SparseRowsLinear` layer and the measured sparse-or-dense choice behind
`compress(model, format="auto")`.

    SparseRowsLinear(weight, bias)          unstructured float32 W as nonzeros + int16 columns + row offsets;
                                            forward = the C++ AVX2 kernel (sparsebert.ops.sparse_rows_linear),
                                            one-token inputs through the weight's row-group slots
    choose_cpu_format(weight, bias)         times that layer against dense F.linear at a few token counts
                                            and returns a FormatChoice ("sparse-rows" only when it is at least
                                            `margin` faster at every one of them)
    measure_speedup(module, weight, bias)   dense time / module time per token count (the explicit-format
                                            check in compress())
Timings are medians of interleaved wall-clock runs (sparse, dense, sparse, ...) after a warm-up, so that a
change of machine load hits both candidates alike. `timer=` replaces the clock (tests).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import reference_formats as rf
from ..ops.sparse_rows_linear import (cpp_available, slots_available, sparse_rows_linear, sparse_rows_slots,
                                     validate_sparse_rows_format)
from .compress import _CompressedLinear, _nbytes

DEFAULT_TOKENS = (1, 16, 128)
DEFAULT_MARGIN = 0.10

# timer(candidates, tokens) -> {name: seconds}: the time of each candidate callable at that token count.
Timer = Callable[[Mapping[str, Callable[[], Tensor]], int], Mapping[str, float]]


class SlowerThanDenseWarning(UserWarning):
    """A compressed layer measured slower than the dense product it replaces."""


_SLOT_NAMES = ("slot_values", "slot_lanes", "slot_chunks", "group_offsets")  # as sparse_rows_slots returns them


class SparseRowsLinear(_CompressedLinear):
    """y = x W^T + b with an unstructured float32 W stored row by row (values, col_indices, row_offsets;
    layout in sparsebert.ops.reference_formats). CPU: the C++ kernel; elsewhere: decode + F.linear.

    matvec_slots (default True): also hold the weight's row-group slots (built from the stored format at
    construction and after every state-dict load, never saved), so that a one-token input runs the one-token
    kernel (1.26-2.98x MKL's dense GEMV at 80-90% sparsity on BERT-base shapes, one or two threads, where the
    gather kernel was 0.6-1.5x: bench/results/cpu-20261130-sparse-rows.csv). They cost memory: 0.35-0.55x of the dense fp32 weight at 80-90% random sparsity,
    counted in `weight_nbytes()` and `footprint_report`; False keeps only the sparse-rows tensors."""

    format = "sparse-rows"

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto",
                 matvec_slots: bool = True):
        if weight.dtype != torch.float32:
            raise TypeError(f"SparseRowsLinear stores float32 weights, got {weight.dtype} (cast with .float())")
        if bias is not None and bias.dtype != torch.float32:
            raise TypeError(f"SparseRowsLinear needs a float32 bias, got {bias.dtype}")
        if not isinstance(matvec_slots, bool):
            raise TypeError(f"matvec_slots must be a bool, got {matvec_slots!r}")
        super().__init__(weight.shape[1], weight.shape[0], bias)
        values, cols, offsets = rf.sparse_rows_encode(weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("col_indices", cols)
        self.register_buffer("row_offsets", offsets)
        self.backend = backend
        self.matvec_slots = matvec_slots
        self.validate()
        self._build_slots()

    def _build_slots(self) -> None:
        """(Re)builds the row-group slots from the stored format (non-persistent buffers: never saved)."""
        self._set_slots(sparse_rows_slots(self.values, self.col_indices, self.row_offsets, self.in_features)
                        if self.matvec_slots else (None,) * len(_SLOT_NAMES))

    def _set_slots(self, tensors) -> None:
        for name, t in zip(_SLOT_NAMES, tensors):
            self.register_buffer(name, t, persistent=False)
        self._refresh_slots()

    def _refresh_slots(self) -> None:
        # forward reads the slots as one plain attribute: four nn.Module attribute lookups per call cost
        # ~2 us each, a good part of a one-token product's time
        slots = tuple(self._buffers[name] for name in _SLOT_NAMES)
        self._slot_tuple = None if slots[0] is None else slots

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half() replace the buffers
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_slots()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors, n_missing = len(error_msgs), len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not any(prefix + k in state_dict for k in ("values", "col_indices", "row_offsets")):
            return  # nothing of the weight in this state dict: the slots still match it
        if len(error_msgs) == n_errors and len(missing_keys) == n_missing:  # loaded whole (and validated)
            self._build_slots()
        else:  # a partial load: slots of the old weight must not outlive it (one token takes the gather kernel)
            self._set_slots((None,) * len(_SLOT_NAMES))

    def validate(self) -> None:
        validate_sparse_rows_format(self.values, self.col_indices, self.row_offsets, self.in_features,
                                    self.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def weight_nbytes(self) -> int:
        """The sparse-rows tensors and, when held, the row-group slots (memory in use for the weight)."""
        return _nbytes(self.values, self.col_indices, self.row_offsets, *(self._slot_tuple or ()))

    def dense_weight(self) -> Tensor:
        return rf.sparse_rows_decode(self.values, self.col_indices, self.row_offsets, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # plain dict lookups (see _refresh_slots)
        return sparse_rows_linear(x, b["values"], b["col_indices"], b["row_offsets"], b["bias"], self.in_features,
                                  backend=self.backend, slots=self._slot_tuple)

    def manifest(self) -> Dict:
        return {**super().manifest(), "nnz": self.values.numel(), "matvec_slots": self.matvec_slots}


@dataclass
class FormatChoice:
    """What compress(format="auto") chose for one layer and why. speedups: token count -> dense time /
    sparse time (> 1: the sparse layer is faster)."""

    format: str
    speedups: Dict[int, float] = field(default_factory=dict)
    reason: str = ""
    module: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)  # the measured layer

    def as_dict(self) -> Dict:
        return {"format": self.format, "speedups": dict(self.speedups), "reason": self.reason}


def interleaved_median_timer(reps: int = 9, warmup: int = 2) -> Timer:
    """A Timer: `warmup` untimed calls of each candidate, then `reps` rounds calling each candidate once in
    turn; the median wall-clock seconds per candidate."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")

    def timer(candidates: Mapping[str, Callable[[], Tensor]], tokens: int) -> Dict[str, float]:
        # On a GPU each call is timed from an idle device to its finished kernels (a measurement, not a
        # forward pass: the synchronizations are the point), so it counts the launch path and the kernels.
        sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
        with torch.inference_mode():
            for fn in candidates.values():
                for _ in range(warmup):
                    fn()
            times = {name: [] for name in candidates}
            for _ in range(reps):
                for name, fn in candidates.items():
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[name].append(time.perf_counter() - t0)
        return {name: statistics.median(ts) for name, ts in times.items()}

    return timer


def _check_tokens(tokens: Sequence[int]) -> tuple:
    tokens = tuple(tokens)
    if not tokens or not all(isinstance(t, int) and t >= 1 for t in tokens):
        raise ValueError(f"tokens must be a non-empty sequence of positive ints, got {tokens!r}")
    return tokens


def measure_speedup(module: torch.nn.Module, weight: Tensor, bias: Optional[Tensor], *,
                    tokens: Sequence[int] = DEFAULT_TOKENS, timer: Optional[Timer] = None,
                    seed: int = 0) -> Dict[int, float]:
    """Dense time / module time for x of shape (t, in_features), t in `tokens` (random inputs, weight's dtype
    and device). > 1 means the module is faster than F.linear with the dense weight."""
    tokens = _check_tokens(tokens)
    timer = timer or interleaved_median_timer()
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach()
    out = {}
    for t in tokens:
        x = torch.randn(t, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
        times = timer({"sparse": lambda: module(x), "dense": lambda: F.linear(x, w, b)}, t)
        out[t] = float(times["dense"]) / max(float(times["sparse"]), 1e-12)
    return out


def choose_cpu_format(weight: Tensor, bias: Optional[Tensor] = None, *, tokens: Sequence[int] = DEFAULT_TOKENS,
                      margin: float = DEFAULT_MARGIN, timer: Optional[Timer] = None,
                      module: Optional[SparseRowsLinear] = None) -> FormatChoice:
    """"sparse-rows" when a SparseRowsLinear of (weight, bias) is at least `margin` faster than dense F.linear
    at every token count in `tokens` (measured here, now), else "dense". Weights that the sparse kernel does
    not serve (not on the CPU, not float32, no C++ kernel built) get "dense" without a measurement.

    The layer is measured first without its one-token slots (the sparse-rows tensors alone, the least
    memory); only when that misses at one token is the layer with the slots timed there (they take
    0.35-0.55x of the dense weight's bytes more), and kept when it then passes everywhere. `module`: a
    layer to measure as it is instead."""
    tokens = _check_tokens(tokens)
    if not 0.0 <= margin < 10.0:
        raise ValueError(f"margin must be in [0, 10), got {margin!r}")
    if weight.device.type != "cpu":
        return FormatChoice("dense", reason=f"the sparse-rows kernel is a CPU kernel; weight is on {weight.device}")
    if weight.dtype != torch.float32:
        return FormatChoice("dense", reason=f"the sparse-rows kernel is float32 only; weight is {weight.dtype}")
    if not cpp_available():
        return FormatChoice("dense", reason="the C++ extension (sparsebert._C) with the sparse-rows kernel is not "
                                            "loaded; its torch fallback is never faster than dense")
    need = 1.0 + margin
    given = module is not None
    module = module if given else SparseRowsLinear(weight, bias, matvec_slots=False)
    speedups = measure_speedup(module, weight, bias, tokens=tokens, timer=timer)
    with_slots = ""
    if (not given and 1 in speedups and speedups[1] < need and slots_available()
            and all(r >= need for t, r in speedups.items() if t != 1)):
        slotted = SparseRowsLinear(weight, bias)
        one = measure_speedup(slotted, weight, bias, tokens=(1,), timer=timer)[1]
        if one >= need:
            module, speedups, with_slots = slotted, {**speedups, 1: one}, " (one token through the row-group slots)"
    worst_t = min(speedups, key=speedups.get)
    worst = speedups[worst_t]
    if worst >= need:
        return FormatChoice("sparse-rows", speedups,
                            f"sparse-rows is >= {worst:.2f}x dense at every token count {list(tokens)}{with_slots}",
                            module)
    return FormatChoice("dense", speedups, f"sparse-rows is {worst:.2f}x dense at {worst_t} tokens "
                                           f"(needs >= {need:.2f}x at every token count)")


__all__ = ["SparseRowsLinear", "FormatChoice", "choose_cpu_format", "measure_speedup", "interleaved_median_timer",
           "SlowerThanDenseWarning", "DEFAULT_TOKENS", "DEFAULT_MARGIN"]
