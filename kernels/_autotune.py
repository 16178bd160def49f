"""Which autotuning configs each kernel gets, and a counter of the Triton compilations a run triggers.

SPARSEBERT_AUTOTUNE (read at import time):
    full   (default) every GPU config of a kernel is a candidate; the autotuner compiles and times each
    quick  one or two configs per kernel (the ones its module names), so a test run compiles little
SPARSEBERT_FWD_SCHEDULE (read at import time): the masked-linear forward's grid, "tiles" (default),
    "persistent" or "streamk" (see FWD_SCHEDULES below).

Under the interpreter (TRITON_INTERPRET=1) a kernel gets its single interpreter config either way.
`select` also records, per kernel module, how many GPU configs each mode would give; `CompileCounter`
uses that to turn the specialisations a CPU run exercises into the number of GPU compilations.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Sequence, Tuple

from ._interpreter import INTERPRET

MODES = ("full", "quick")
MODE = os.environ.get("SPARSEBERT_AUTOTUNE", "full").strip().lower() or "full"
if MODE not in MODES:
    raise ValueError(f"SPARSEBERT_AUTOTUNE must be one of {MODES}, got {MODE!r}")

# The masked-linear forward's grid (kernels/_gemm.py `fwd(schedule=None)`): "tiles", one program per
# (output tile, K split), "persistent", min(items, #SMs) programs looping over them (TMA loads of x
# and W where available), or "streamk", min(K-iterations, #SMs) programs sharing all tiles' K-iterations
# evenly, plus a fixup launch summing the shared tiles. "tiles" stays the default until a GPU run
# measures the other two.
FWD_SCHEDULES = ("tiles", "persistent", "streamk")
FWD_SCHEDULE = os.environ.get("SPARSEBERT_FWD_SCHEDULE", "tiles").strip().lower() or "tiles"
if FWD_SCHEDULE not in FWD_SCHEDULES:
    raise ValueError(f"SPARSEBERT_FWD_SCHEDULE must be one of {FWD_SCHEDULES}, got {FWD_SCHEDULE!r}")

# kernel group (the caller's label: its module's name, or "module.kernel" for a second autotuned kernel
# of a module) -> (GPU configs in full mode, in quick mode)
CONFIG_COUNTS: Dict[str, Tuple[int, int]] = {}


def select(name: str, gpu_configs: Sequence, interpreter_configs: Sequence, quick: Sequence[int]) -> List:
    """The configs `@triton.autotune` gets: the interpreter's under TRITON_INTERPRET=1, else all of
    `gpu_configs` (full) or those at the indices `quick` (quick mode, one or two)."""
    if not 1 <= len(quick) <= 2 or any(not 0 <= i < len(gpu_configs) for i in quick):
        raise ValueError(f"{name}: quick must name one or two indices into its {len(gpu_configs)} GPU configs, "
                         f"got {list(quick)}")
    CONFIG_COUNTS[name] = (len(gpu_configs), len(quick))
    if INTERPRET:
        return list(interpreter_configs)
    if MODE == "quick":
        return [gpu_configs[i] for i in quick]
    return list(gpu_configs)


@contextlib.contextmanager
def forced_config(autotuner, config):
    """Run `autotuner` with `config` only: with one config the autotuner neither prunes nor times, it calls
    its raw @triton.jit function with that config's kwargs, num_warps, num_stages and pre-hook (tests and
    bench/sanitize_kernels.py launch configs the current lists leave out this way)."""
    saved = autotuner.configs
    autotuner.configs = [config]
    try:
        yield
    finally:
        autotuner.configs = saved


def _specialisation(value, constexpr: bool):
    """What Triton specialises a launch argument on: a constexpr's value; a tensor's dtype; an int's
    ==1, %16==0 and 64-bit range; only the type of a float or bool; None."""
    if constexpr:
        return ("constexpr", repr(value))
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        return ("tensor", str(dtype))
    if type(value).__name__ == "TensorDescriptor":  # Triton specialises on the base dtype and block shape
        return ("tensordesc", str(value.base.dtype), tuple(value.block_shape))
    if value is None:
        return None
    if isinstance(value, (bool, float)):
        return type(value).__name__
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, abs(value) >= 2 ** 31)
    return repr(value)


def _constexpr_names(fn) -> Tuple[List[str], set]:
    """Parameter names of a @triton.jit function, and those annotated tl.constexpr."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    const = {p.name for p in params if "constexpr" in str(p.annotation)}
    return [p.name for p in params], const


class CompileCounter:
    """Counts the distinct (kernel, argument specialisation, constexpr values) launches made while it is
    active, by wrapping Triton's interpreter or JIT launch; with `gpu_compiles()` it estimates how many
    compilations the same run makes on a GPU (x the quick or full config count of autotuned kernels).

        with CompileCounter() as c:
            run_tests()
        print(c.specialisations, c.gpu_compiles("quick"))
    """

    def __init__(self):
        self.seen: Dict[str, set] = {}
        self._patched = []

    def __enter__(self):
        import triton
        from triton.runtime import autotuner

        counter = self
        targets = [(autotuner.Autotuner, "run", True)]
        if INTERPRET:
            from triton.runtime.interpreter import InterpretedFunction
            targets.append((InterpretedFunction, "run", False))
        else:
            targets.append((triton.runtime.jit.JITFunction, "run", False))
        for owner, attr, tuned in targets:
            original = getattr(owner, attr)

            def wrapped(fn_self, *args, __original=original, __tuned=tuned, **kwargs):
                counter._record(fn_self, args, kwargs, __tuned)
                return __original(fn_self, *args, **kwargs)

            setattr(owner, attr, wrapped)
            self._patched.append((owner, attr, original))
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return False

    def _record(self, fn_self, args, kwargs, tuned):
        base = getattr(fn_self, "base_fn", None) or getattr(fn_self, "fn", None) or fn_self
        kernel = f"{getattr(base, '__module__', '?').rsplit('.', 1)[-1]}.{getattr(base, '__name__', repr(base))}"
        if tuned:  # the autotuner adds the config; record the launch without it, marked as tuned
            kernel = "tuned:" + kernel
        else:
            if ("tuned:" + kernel) in self.seen:
                return  # the autotuner's own launch of a kernel it wraps: counted there
            kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        try:
            names, const = _constexpr_names(base)
        except (TypeError, ValueError):
            names, const = [], set()
        spec = tuple(_specialisation(a, i < len(names) and names[i] in const) for i, a in enumerate(args)) + tuple(
            (k, _specialisation(v, k in const or k not in names)) for k, v in sorted(kwargs.items()) if k != "grid")
        self.seen.setdefault(kernel, set()).add(spec)

    @property
    def specialisations(self) -> int:
        return sum(len(s) for s in self.seen.values())

    def per_kernel(self) -> Dict[str, int]:
        return {k: len(v) for k, v in sorted(self.seen.items())}

    def gpu_compiles(self, mode: str = MODE) -> int:
        """Estimated GPU compilations: each specialisation of an autotuned kernel compiles every config
        of its group (an upper bound: early pruning drops some), a plain @triton.jit kernel once."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        total = 0
        for kernel, specs in self.seen.items():
            if kernel.startswith("tuned:"):
                module, _, fn = kernel[len("tuned:"):].partition(".")  # a group named module.kernel first
                full, quick = CONFIG_COUNTS.get(f"{module}.{fn}", CONFIG_COUNTS.get(module, (1, 1)))
                total += len(specs) * (quick if mode == "quick" else full)
            else:
                total += len(specs)
        return total
