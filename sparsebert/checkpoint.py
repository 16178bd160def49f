"""Checkpoints that loading can never turn into code execution, written atomically.

A checkpoint is one safetensors file: the tensors of a nested state (dicts, lists, tuples, numbers,
strings, None, tensors, numpy arrays), and in the safetensors header the rest of the state as JSON plus
a sha256 over that JSON and every tensor's bytes, verified on load. Nothing is ever unpickled: a pickle
(``torch.save``) file is refused with an error naming it.

Files are written to a temporary file beside the target, fsynced, then renamed over it (readers see the
old file or the new one, never a torn one), with the mode the user's umask gives. Training checkpoints
of one run live in one folder as ``step-00000123.safetensors``; `load_latest_checkpoint` loads the newest
readable one and falls back to the previous one, with a warning naming the bad file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]
FORMAT = "sparsebert.state/1"
STEP_SUFFIX = ".safetensors"
_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
_LEGACY_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: truncated, corrupt, a pickle, or not a sparsebert state."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unreadable and an older one was loaded instead."""


# ------------------------------------------------------------------------------------------ atomic writes
def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore
    os.umask(mask)
    return mask


def _atomic_write(path: PathLike, mode: str, write) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename over `path`:
    readers see the old file or the new one, never a torn one. The file gets mode 0666 & ~umask (as
    `open` would give), and the rename is made durable too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
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


def is_temp_file(name: str) -> bool:
    """Whether `name` is the temporary file of an `_atomic_write` (left behind when its process was killed)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(folder: PathLike) -> None:
    """Delete the temporary files that killed writers left directly in `folder`. Only call it while holding
    the folder's lock (no live writer may be using them)."""
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if p.is_file() and is_temp_file(p.name):
                p.unlink(missing_ok=True)


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write a text file (e.g. a run JSON) atomically."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    return _atomic_write(path, "wb", lambda f: f.write(data))


# ------------------------------------------------------------------------------------------ state <-> tensors + JSON
def _encode(obj: Any, where: str, tensors: Dict[str, torch.Tensor], storages: set) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise TypeError(f"cannot save {where}: only dense (strided) tensors are supported, got {obj.layout}")
        t = obj.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # safetensors refuses tensors that share memory
        storages.add(t.untyped_storage().data_ptr())
        key, n = where, 1
        while key in tensors:
            key, n = f"{where}#{n}", n + 1
        tensors[key] = t
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot save {where}: numpy dtype {obj.dtype} is not numeric")
        enc = _encode(torch.from_numpy(obj.astype(obj.dtype.newbyteorder("="), copy=True)), where, tensors, storages)
        return {"__ndarray__": enc["__tensor__"], "dtype": obj.dtype.str}
    if np is not None and isinstance(obj, np.generic):
        return _encode(obj.item(), where, tensors, storages)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}/{i}", tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}/{i}", tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{where}/{k}", tensors, storages) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{where}/key", {}, set()), _encode(v, f"{where}/{k}", tensors, storages)]
                             for k, v in obj.items()]}
    raise TypeError(f"cannot save {where or 'the state'}: {type(obj).__name__} is not a tensor, number, string, "
                    "None, list, tuple or dict")


def _decode(node: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        import numpy as np
        return tensors[node["__ndarray__"]].numpy().astype(np.dtype(node["dtype"]))
    if "__dtype__" in node:
        return getattr(torch, node["__dtype__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__dict__" in node:
        return {_decode(k, {}): _decode(v, tensors) for k, v in node["__dict__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _digest(tree_json: str, tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(tree_json.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\0{key}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def serialize_state(obj: Any) -> bytes:
    """The bytes of a checkpoint holding `obj` (see the module docstring for what `obj` may contain)."""
    from safetensors.torch import save
    tensors: Dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(obj, "", tensors, set()), separators=(",", ":"))
    return save(tensors, metadata={"format": FORMAT, "tree": tree, "sha256": _digest(tree, tensors)})


def _is_pickle(data: bytes) -> bool:
    """torch.save's zip, or a raw pickle (b"\\x80" + protocol). A safetensors file whose 8-byte header
    length has low byte 0x80 also starts with b"\\x80": its JSON header (b"{" at byte 8) tells it apart."""
    if data.startswith(b"PK\x03\x04"):
        return True
    if data[:1] != b"\x80":
        return False
    return not (len(data) > 8 and data[8:9] == b"{" and 8 + struct.unpack("<Q", data[:8])[0] <= len(data))


def deserialize_state(data: bytes, name: str = "checkpoint") -> Any:
    """Inverse of `serialize_state`; `name` (the file) is named in every error."""
    if _is_pickle(data):
        raise CheckpointError(f"{name} is a pickle (torch.save) file; sparsebert never unpickles files, because "
                              "loading a pickle can run arbitrary code. Re-create it with this version.")
    if len(data) < 8:
        raise CheckpointError(f"{name} is truncated: {len(data)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(f"{name} is truncated or not a safetensors file: its header claims {n} bytes, "
                              f"the file has {len(data)}")
    try:
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{name} is corrupt: unreadable safetensors header ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a sparsebert checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    from safetensors.torch import load
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type for torn data
        raise CheckpointError(f"{name} is truncated or corrupt: {exc}") from None
    if _digest(meta.get("tree", ""), tensors) != meta.get("sha256"):
        raise CheckpointError(f"{name} is corrupt: its sha256 checksum does not match its contents")
    try:
        return _decode(json.loads(meta["tree"]), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name} is corrupt: bad state tree ({exc})") from None


def atomic_save(obj: Any, path: PathLike) -> Path:
    """Save `obj` (a nested state: see the module docstring) to `path` atomically. Returns the path."""
    data = serialize_state(obj)  # a state that cannot be saved fails here, before the old file is touched
    return _atomic_write(path, "wb", lambda f: f.write(data))


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by `atomic_save`, checksum verified. Never unpickles: a pickle file, a
    truncated or corrupt file raise `CheckpointError` naming the file; a missing one FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = deserialize_state(path.read_bytes(), f"checkpoint {path}")
    if map_location is not None and torch.device(map_location) != torch.device("cpu"):
        state = _decode_to(state, torch.device(map_location))
    return state


def _decode_to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _decode_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode_to(v, device) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------ step checkpoints
def step_checkpoint_path(ckpt_dir: PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{int(step):08d}{STEP_SUFFIX}"


def _step_files(ckpt_dir: Optional[PathLike]) -> List[Tuple[int, Path]]:
    """(step, path) of the step checkpoints in `ckpt_dir`, oldest first."""
    if ckpt_dir is None or not Path(ckpt_dir).is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _STEP_FILE.match(p.name)))


def latest_checkpoint(ckpt_dir: Optional[PathLike]) -> Optional[Path]:
    """The ``step-N.safetensors`` file with the largest N in `ckpt_dir`, or None (no folder or no checkpoint)."""
    found = _step_files(ckpt_dir)
    return found[-1][1] if found else None


def load_latest_checkpoint(ckpt_dir: Optional[PathLike], map_location: Any = "cpu") -> Optional[Tuple[Path, Any]]:
    """(path, state) of the newest readable step checkpoint of `ckpt_dir`, or None when there is none.

    An unreadable newest file (truncated, corrupt, failed checksum) is skipped with a
    `CheckpointFallbackWarning` naming it, and the previous one is loaded. Raises `CheckpointError` when
    every file is unreadable, or when the folder holds only pickle checkpoints of an older sparsebert
    (refused, never unpickled)."""
    found = _step_files(ckpt_dir)
    if not found:
        legacy = [p.name for p in Path(ckpt_dir).iterdir() if _LEGACY_STEP_FILE.match(p.name)] \
            if ckpt_dir is not None and Path(ckpt_dir).is_dir() else []
        if legacy:
            raise CheckpointError(f"{ckpt_dir} holds pickle checkpoints ({', '.join(sorted(legacy))}) of an older "
                                  "sparsebert; they are not loaded, because loading a pickle can run arbitrary code. "
                                  "Delete the folder to start this run over.")
        return None
    errors = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location)
        except (CheckpointError, OSError) as exc:
            errors.append(str(exc))
            continue
        for msg in errors:
            warnings.warn(f"{msg}; falling back to {path}", CheckpointFallbackWarning, stacklevel=2)
        return path, state
    raise CheckpointError("no readable checkpoint in {}: {}".format(ckpt_dir, "; ".join(errors)))


def load_latest(ckpt_dir: Optional[PathLike], map_location: Any = "cpu") -> Optional[Any]:
    """The newest readable checkpoint of `ckpt_dir` loaded (see `load_latest_checkpoint`), or None."""
    found = load_latest_checkpoint(ckpt_dir, map_location)
    return None if found is None else found[1]


def prune_old_checkpoints(ckpt_dir: PathLike, keep_last: int = 2) -> None:
    """Delete all but the `keep_last` newest ``step-N.safetensors`` files."""
    found = _step_files(ckpt_dir)
    for _, p in found[:-keep_last] if keep_last > 0 else found:
        p.unlink(missing_ok=True)
