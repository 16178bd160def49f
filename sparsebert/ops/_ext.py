"""Loader of the compiled extension `sparsebert._C` (C++ CPU kernels, CUDA kernels when built).

Importing `sparsebert._C` runs its static `TORCH_LIBRARY` registrations; the ops then live in
`torch.ops.sparsebert_ext.<name>` (schemas in csrc/cpu/*.cpp). Nothing here raises: a missing or
broken build (no compiler at install time, SPARSEBERT_NO_EXT=1, a .so built against another torch)
just means `load()` returns False, with the reason logged at debug level and kept in `load_error()`.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import threading
from typing import Any, Dict, Optional

import torch

log = logging.getLogger("sparsebert.ops")

_lock = threading.Lock()
_loaded: Optional[bool] = None
_error: Optional[str] = None


def load() -> bool:
    """Import sparsebert._C once; True when it loaded and registered its ops. Never raises."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                importlib.import_module("sparsebert._C")
                torch.ops.sparsebert_ext.build_info  # noqa: B018 - raises if the registrations did not run
                _loaded = True
            except Exception as exc:  # ImportError, OSError (undefined symbol: built against another torch), ...
                _error = f"{type(exc).__name__}: {exc}"
                log.debug("sparsebert._C not loaded (%s); the C++/CUDA backends are off", _error)
                _loaded = False
    return _loaded


def load_error() -> Optional[str]:
    """Why `load()` returned False (None when it loaded or was not tried yet)."""
    return _error


@functools.lru_cache(maxsize=None)
def _build_info_cached() -> Dict[str, Any]:
    return json.loads(torch.ops.sparsebert_ext.build_info())


def build_info() -> Dict[str, Any]:
    """How the extension was built: {"cpu": bool, "cuda": bool, "cuda_arch_list", "nvcc_version",
    "torch_version" (built against), "torch_cuda_version", "openmp", "cxx_compiler", "torch_headers",
    "cpu_sources", "cuda_sources", "version"}; {} when the extension is not loaded."""
    if not load():
        return {}
    return dict(_build_info_cached())


def has_cpu() -> bool:
    """True when the C++ CPU kernels are built and loaded."""
    return bool(build_info().get("cpu", False))


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into the loaded extension (whether a GPU is visible is
    a separate question: torch.cuda.is_available())."""
    return bool(build_info().get("cuda", False))


def has_cutlass() -> bool:
    """True when the CUDA kernels include the CUTLASS sm90 GEMMs (built for sm_90a with CUTLASS; docs/CUTLASS.md).
    The CUDA backend's masked-linear ops then run them on a 9.0 device for bf16 data with N and K multiples of 8
    and 16-byte aligned operands (SPARSEBERT_CUTLASS_DISPATCH=0 turns that off); otherwise the WMMA kernels."""
    return bool(build_info().get("cutlass", False))
