"""Counting the Triton compilations a benchmark script or a pytest run triggers (for the GPU suite).

When SPARSEBERT_COMPILE_COUNT names a file, `counting_compiles()` (around a script's main) and this
module as a pytest plugin (`-p _compile_count`) count the distinct kernel specialisations launched
(sparsebert.kernels._autotune.CompileCounter) and append one JSON line to that file: the label, the
specialisations per kernel, and the GPU compilations they mean in quick and full autotuning. Unset, both
do nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

COUNT_ENV = "SPARSEBERT_COMPILE_COUNT"


def _write(counter, label: str) -> None:
    with open(os.environ[COUNT_ENV], "a") as f:
        f.write(json.dumps({"label": label, "specialisations": counter.specialisations,
                            "per_kernel": counter.per_kernel(), "gpu_compiles_quick": counter.gpu_compiles("quick"),
                            "gpu_compiles_full": counter.gpu_compiles("full")}) + "\n")


@contextlib.contextmanager
def counting_compiles(label: str = None):
    if not os.environ.get(COUNT_ENV):
        yield None
        return
    from sparsebert.kernels._autotune import CompileCounter

    counter = CompileCounter()
    try:
        with counter:
            yield counter
    finally:
        _write(counter, label or os.path.basename(sys.argv[0]))


_session_counter = None


def pytest_configure(config):
    global _session_counter
    if os.environ.get(COUNT_ENV):
        from sparsebert.kernels._autotune import CompileCounter

        _session_counter = CompileCounter().__enter__()


def pytest_unconfigure(config):
    global _session_counter
    if _session_counter is not None:
        _session_counter.__exit__(None, None, None)
        _write(_session_counter, "pytest")
        _session_counter = None
