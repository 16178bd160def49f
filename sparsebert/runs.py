"""Run folders: a run's identity is the hash of its whole configuration, and one process writes a folder.

`claim_run_dir` records the configuration in ``config.json`` the first time a folder is used and refuses
(`RunConfigMismatch`, naming the keys that differ) a folder that holds a run of another configuration,
so a result is never reported for, or merged with, a run it does not belong to. `RunLock` holds an
exclusive ``flock`` on ``.lock`` in the folder for the duration of the run; a second process (or a
second lock in the same process) gets `RunLocked` naming the holder's pid and host. The kernel drops a
flock when its process dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional

from .checkpoint import atomic_write_text, is_temp_file

IDENTITY_FILE = "config.json"
LOCK_FILE = ".lock"


class RunConfigMismatch(ValueError):
    """A run folder holds a run of another configuration."""


class RunLocked(RuntimeError):
    """Another process (or another lock in this one) is writing the run folder."""


def canonical_json(config: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace: equal configurations give equal text."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any]) -> str:
    """The first 12 hex digits of the sha256 of the canonical JSON of `config`."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """``"key: old -> new"`` for every key whose value differs (a missing key shows as <absent>)."""
    absent = "<absent>"
    return [f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)]


def _recorded(rdir: Path) -> Optional[dict]:
    path = rdir / IDENTITY_FILE
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
            raise ValueError("expected {'config': {...}, 'config_hash': ...}")
        return rec
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunConfigMismatch(f"{path} is unreadable ({exc}); cannot tell which configuration the run folder "
                                f"{rdir} holds. Delete the folder to rerun it, or use another output folder") from None


def check_run_dir(rdir, config: Mapping[str, Any]) -> bool:
    """True when `rdir` already belongs to `config`, False when it is absent or empty (a new run).

    Raises RunConfigMismatch when it holds files of another configuration, or files without a recorded
    configuration (written by hand or by an older sparsebert)."""
    rdir, config = Path(rdir), json.loads(canonical_json(config))
    contents = [p.name for p in rdir.iterdir() if p.name != LOCK_FILE and not is_temp_file(p.name)] \
        if rdir.is_dir() else []  # a temporary file is a write killed before it finished: not the run's
    if not contents:
        return False
    rec = _recorded(rdir)
    if rec is None:
        raise RunConfigMismatch(f"run folder {rdir} holds files ({', '.join(sorted(contents)[:4])}) but no "
                                f"{IDENTITY_FILE}: it was not written by this version, and its configuration is "
                                "unknown. Delete the folder to rerun it, or use another output folder")
    if rec.get("config_hash") != config_hash(config) or rec["config"] != dict(config):
        diff = config_diff(rec["config"], config) or ["(hash of the recorded configuration does not match)"]
        raise RunConfigMismatch(f"run folder {rdir} holds a run with another configuration ({'; '.join(diff)}); "
                                "use another output folder, or delete that run folder to rerun it")
    return True


def claim_run_dir(rdir, config: Mapping[str, Any]) -> str:
    """Check `rdir` (see `check_run_dir`) and record `config` in it when new. Returns the config hash."""
    rdir = Path(rdir)
    if not check_run_dir(rdir, config):
        atomic_write_text(json.dumps({"config_hash": config_hash(config), "config": dict(config)}, indent=1),
                          rdir / IDENTITY_FILE)
    return config_hash(config)


class RunLock:
    """``with RunLock(rdir):`` -- an exclusive, non-blocking lock on a run folder (see the module docstring)."""

    def __init__(self, rdir):
        self.path = Path(rdir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise RunLocked(f"run folder {self.path.parent} is being written by another process ({holder}); "
                            "wait for it to finish, or use another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
