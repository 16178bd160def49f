"""Timers shared by the benchmark scripts: eager and CUDA-graph medians on a GPU, wall clock on a CPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

# rows up to this many tokens are also timed as CUDA-graph replays (the GPU time without the Python launch
# path; the first GPU run graphed only <= 64 tokens and left the kernels' own time at 512-16384 unknown)
GRAPH_MAX_TOKENS = 16384


def time_us(fn: Callable, cuda: bool, *, grad_to_none: Optional[Sequence] = None, reps: int = 5) -> float:
    """Median microseconds of fn(): triton.testing.do_bench (L2 flushed before each run) on a GPU, the
    median of `reps` wall-clock runs after one warm-up on a CPU."""
    if cuda:
        import triton.testing
        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def time_graph_us(fn: Callable, cuda: bool) -> float:
    """Median microseconds of fn() replayed from a CUDA graph (triton.testing.do_bench_cudagraph); NaN on
    a CPU, where there are no graphs."""
    if not cuda:
        return float("nan")
    import triton.testing
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
