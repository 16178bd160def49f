"""SIGKILL at seeded points of real `sparsebert srnet` / `sparsebert kprune` processes, saves included:
a finished result is never lost or changed, a resumed srnet plan ends bitwise equal to an uninterrupted
one, and `kprune --out` always holds the complete old model or the complete new one."""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsebert.checkpoint import load_checkpoint
from sparsebert.runs import RunLock

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SRNET = ["srnet", "--model", "tiny", "--task", "synthetic", "--max-train", "160", "--max-eval", "32", "--max-ood",
         "32", "--batch-size", "8", "--max-length", "32", "--lr", "1e-3", "--epochs", "2", "--no-progress",
         "--no-report", "--paradigm", "dense", "c", "--loss", "ce", "--sparsity", "0.5"]
VOLATILE = ("seconds", "resumed_from", "out")  # wall time, where a run resumed from, its folder: differ by design


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _temp_files(root: Path):
    return [p for p in root.rglob("*") if ".tmp" in p.name] if root.is_dir() else []


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "sparsebert", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _run_to_end(argv, timeout=300):
    proc = _start(argv)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]


def _attempt(argv, watch: Path, *, kill_at=None, on_temp=False, timeout=300.0):
    """Start `argv`; SIGKILL it `kill_at` seconds in, or as soon as a temporary file appears under `watch`.
    Returns True when it was killed, False when it finished first (then it must have succeeded)."""
    proc = _start(argv)
    t0 = time.monotonic()
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        assert elapsed < timeout, "subprocess hung"
        if (kill_at is not None and elapsed >= kill_at) or (on_temp and _temp_files(watch)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            return True
        time.sleep(0.005 if on_temp else 0.02)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err[-3000:]
    return False


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _finished(out: Path):
    """{run folder name: (run.json bytes, model.safetensors bytes)} of every finished run under `out`."""
    return {p.parent.name: (p.read_bytes(), (p.parent / "model.safetensors").read_bytes())
            for p in sorted(out.glob("synthetic/*/run.json"))}


def _evals(out: Path):
    found = {}
    for p in out.glob("synthetic/*/evals.json"):
        found.update({(p.parent.name, e["step"]): e for e in json.loads(p.read_text())})
    return found


def test_srnet_survives_sigkill_anywhere_and_resumes_bitwise(tmp_path):
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    ref, out = tmp_path / "A", tmp_path / "B"
    t0 = time.monotonic()
    _run_to_end([*SRNET, "--out", str(ref)])
    duration = time.monotonic() - t0
    rng = random.Random(1234)
    times = sorted(rng.uniform(0.15, 0.95) * duration for _ in range(2))
    # timed kills spread over the run, alternating with kills while a checkpoint/result is being written
    plan = [dict(kill_at=times[0]), dict(on_temp=True), dict(kill_at=times[1]), dict(on_temp=True)]
    seen_done, seen_evals, kills = {}, {}, 0
    for how in plan:
        killed = _attempt([*SRNET, "--out", str(out)], out, **how)
        kills += killed
        done, evals = _finished(out), _evals(out)
        for name, files in seen_done.items():  # a finished run is never lost or rewritten
            assert done.get(name) == files, f"finished run {name} lost or changed by a kill ({how})"
        for key in evals.keys() & seen_evals.keys():  # an evaluation is never changed (rerun: identical)
            assert evals[key] == seen_evals[key], key
        seen_done, seen_evals = done, {**seen_evals, **evals}
        if not killed:
            break
    else:
        _run_to_end([*SRNET, "--out", str(out)])
    assert kills >= 1
    final = _finished(out)
    assert set(final) == set(_finished(ref)) == {"dense-ce-seed0", "c-ce-s0.5-constant-seed0"}
    for name in final:
        ra, rb = ref / "synthetic" / name, out / "synthetic" / name
        assert _strip(json.loads((rb / "run.json").read_text())) == _strip(json.loads((ra / "run.json").read_text()))
        assert json.loads((rb / "evals.json").read_text()) == json.loads((ra / "evals.json").read_text())
        for f in sorted(p.name for p in ra.glob("*.safetensors")):
            a, b = load_checkpoint(ra / f), load_checkpoint(rb / f)
            assert a.keys() == b.keys(), (name, f)
            for k in a:
                assert torch.equal(a[k], b[k]), (name, f, k)
        assert not (rb / "ckpt").exists()
        RunLock(rb).acquire().release()  # the lock is free
    assert _temp_files(out / "synthetic") == []
    print(f"srnet: {kills} kills, wall {time.monotonic() - wall0:.1f}s, child cpu {_cpu_seconds() - cpu0:.1f}s")


# ------------------------------------------------------------------------------------------ kprune --out
def _model_dir(root: Path) -> Path:
    from transformers import BertTokenizer

    from test_kprune_fidelity import WORDS, tiny
    d = root / "model"
    tiny(3).save_pretrained(d)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(d)
    return d


def _saved(folder: Path):
    """(config.json, report without the timing, weights) of a pruned model folder, through the library's loader."""
    from sparsebert.nn.structured import load_pruned
    def untimed(obj):
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if not k.endswith(("seconds", "speedup"))}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj
    report = untimed(json.loads((folder / "prune_report.json").read_text()))
    return (json.loads((folder / "config.json").read_text()), report,
            {k: v.clone() for k, v in load_pruned(str(folder)).state_dict().items()},
            sorted(p.name for p in folder.iterdir()))


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[2].keys() == b[2].keys() and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_kprune_out_is_always_the_whole_old_or_whole_new_model(tmp_path):
    from test_kprune_fidelity import data_file
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    base = ["kprune", "--model", str(_model_dir(tmp_path)), "--data", str(data_file(tmp_path)), "--method", "kprune"]
    old_argv, new_argv = [*base, "--flops-keep", "0.7"], [*base, "--flops-keep", "0.4"]
    _run_to_end([*new_argv, "--out", str(tmp_path / "new_ref")])
    out = tmp_path / "runs" / "pruned"
    t0 = time.monotonic()
    _run_to_end([*old_argv, "--out", str(out)])  # the first pruned model, saved into OUT
    duration = time.monotonic() - t0
    shutil.copytree(out, tmp_path / "old_ref")
    old, new = _saved(tmp_path / "old_ref"), _saved(tmp_path / "new_ref")
    assert not _same(old, new)
    rng = random.Random(99)
    plan = [dict(on_temp=True), dict(kill_at=rng.uniform(0.3, 0.95) * duration), dict(on_temp=True)]
    for how in plan:
        if not _same(_saved(out), old):  # OUT holds the old model before each attempt
            shutil.rmtree(out)
            shutil.copytree(tmp_path / "old_ref", out)
        killed = _attempt([*new_argv, "--out", str(out)], out.parent, **how)
        now = _saved(out)  # raises when OUT is missing or incomplete
        assert _same(now, new) if not killed else (_same(now, old) or _same(now, new)), how
    print(f"kprune: wall {time.monotonic() - wall0:.1f}s, child cpu {_cpu_seconds() - cpu0:.1f}s")


def test_kprune_save_killed_between_renames_keeps_a_whole_model(tmp_path):
    """A process that dies right after the first rename step of the save (the spot where an older
    rename-aside-then-rename-in left no OUT at all) still leaves a complete model in OUT."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    script = f"""
import os
from pathlib import Path
import sparsebert.cli.kprune as K
real_rename, real_exchange = os.rename, K.exchange_paths
def die_after(fn):
    def wrapped(*a):
        r = fn(*a)
        os._exit(137)  # as a SIGKILL right after this step
    return wrapped
os.rename = die_after(real_rename)
K.exchange_paths = die_after(real_exchange)
K.save_atomically(lambda tmp: (tmp / "config.json").write_text("new"), Path({str(out)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert (out / "config.json").read_text() in ("old", "new")


def test_a_write_killed_before_config_json_exists_does_not_block_the_run(tmp_path):
    """A kill while the identity file was first written left only its temporary file: the folder is a new
    run (not refused as 'files but no config.json'), and the lock holder sweeps the temporary file away."""
    from sparsebert.checkpoint import remove_temp_files
    from sparsebert.runs import check_run_dir, claim_run_dir
    (tmp_path / ".config.json.k1ll3d.tmp").write_text('{"config_ha')
    assert check_run_dir(tmp_path, {"lr": 1e-3}) is False
    claim_run_dir(tmp_path, {"lr": 1e-3})
    assert check_run_dir(tmp_path, {"lr": 1e-3}) is True
    remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
