"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then os.replace.

A reader never sees a half-written file: either the old checkpoint or the new one is at `path`.
Checkpoints of one run live in one folder as ``step-00000123.pt``; `latest_checkpoint` finds the newest.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def _atomic_write(path: PathLike, mode: str, write) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename over `path`:
    readers see the old file or the new one, never a torn one. The rename is made durable too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save `obj` to `path` atomically. Returns the path."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write a text file (e.g. a run JSON) atomically."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    return _atomic_write(path, "wb", lambda f: f.write(data))


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by `atomic_save` (full pickle: optimizer and RNG states included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def step_checkpoint_path(ckpt_dir: PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{int(step):08d}.pt"


def latest_checkpoint(ckpt_dir: Optional[PathLike]) -> Optional[Path]:
    """The ``step-N.pt`` file with the largest N in `ckpt_dir`, or None (no folder or no checkpoint)."""
    if ckpt_dir is None or not Path(ckpt_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _STEP_FILE.match(p.name))]
    return max(found)[1] if found else None


def load_latest(ckpt_dir: Optional[PathLike], map_location: Any = "cpu") -> Optional[Any]:
    """The newest checkpoint of `ckpt_dir` loaded, or None."""
    p = latest_checkpoint(ckpt_dir)
    return None if p is None else load_checkpoint(p, map_location)


def prune_old_checkpoints(ckpt_dir: PathLike, keep_last: int = 1) -> None:
    """Delete all but the `keep_last` newest ``step-N.pt`` files."""
    found = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _STEP_FILE.match(p.name)))
    for _, p in found[:-keep_last] if keep_last > 0 else found:
        p.unlink(missing_ok=True)
