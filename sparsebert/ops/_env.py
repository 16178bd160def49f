"""The two environment switches the ops read on every call, read cheaply.

SPARSEBERT_BACKEND (a backend forced for the whole run) and TRITON_INTERPRET (Triton kernels on CPU tensors)
may change while the process runs (tests set them), so every op call reads them. `os.environ.get` decodes
through Python-level encode/decode functions: the two reads of an eager op call cost ~5-10 us in place on
the 2-core CI machine, a tenth of the call. On POSIX, CPython's `os.environ` keeps the environment in a
dict of bytes (`os.environ._data`) that every write through `os.environ` (and pytest's monkeypatch)
updates, so a lookup there gives the same answer without the decoding; elsewhere `os.environ.get`.
tests/test_env_switches.py checks that the two agree.
"""
from __future__ import annotations

import os
from typing import Optional

_BYTES_KEYS = os.name == "posix"


def _read(name: str, key: bytes) -> Optional[str]:
    data = getattr(os.environ, "_data", None) if _BYTES_KEYS else None
    if type(data) is not dict:
        return os.environ.get(name)
    value = data.get(key)
    return None if value is None else os.fsdecode(value)


def backend_override() -> str:
    """SPARSEBERT_BACKEND, "auto" when unset."""
    value = _read("SPARSEBERT_BACKEND", b"SPARSEBERT_BACKEND")
    return "auto" if value is None else value


def triton_interpret() -> Optional[str]:
    """TRITON_INTERPRET as set (None when unset)."""
    return _read("TRITON_INTERPRET", b"TRITON_INTERPRET")
