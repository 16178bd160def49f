"""Results never lie and loading a file never runs code: run identity, one writer per run folder,
checksummed safetensors checkpoints with fallback, no unpickling, umask-respecting files."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _helpers import tiny_bert
from sparsebert.checkpoint import (CheckpointError, CheckpointFallbackWarning, atomic_save, load_checkpoint,
                                   load_latest_checkpoint, step_checkpoint_path)
from sparsebert.runs import RunConfigMismatch, RunLock, RunLocked, config_hash
from sparsebert.train import finetune
from test_train_checkpoint import loader


class _RunsCode:
    """Unpickling this calls os.system: a planted 'checkpoint'."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_pickle(path, marker):
    torch.save({"model": _RunsCode(marker)}, path)


def test_planted_pickle_checkpoint_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "ck.pt", marker)
    with pytest.raises(CheckpointError, match=r"ck\.pt is a pickle"):
        load_checkpoint(tmp_path / "ck.pt")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _plant_pickle(legacy / "step-00000009.pt", marker)
    with pytest.raises(CheckpointError, match="step-00000009.pt"):
        finetune(tiny_bert(), loader(), max_steps=3, ckpt_dir=legacy, progress=False)
    # a pickle under the new name is an unreadable file: skipped (with a warning), never unpickled
    ckdir = tmp_path / "ck"
    finetune(tiny_bert(), loader(), max_steps=6, ckpt_dir=ckdir, ckpt_every=3, progress=False)
    _plant_pickle(step_checkpoint_path(ckdir, 99), marker)
    with pytest.warns(CheckpointFallbackWarning, match="step-00000099"):
        path, state = load_latest_checkpoint(ckdir)
    assert path.name == "step-00000006.safetensors" and state["step"] == 6
    assert not marker.exists()


def test_optimizer_and_rng_state_roundtrip_exactly(tmp_path):
    import random

    import numpy as np
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(4, 5)).pow(2).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "bf16": torch.randn(3, 7).bfloat16(), "scalars": [1, 2.5, None, "x"],
             "tied": (model.weight, model.weight)}
    atomic_save(state, tmp_path / "s.safetensors")
    back = load_checkpoint(tmp_path / "s.safetensors")
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["torch"], state["torch"]) and torch.equal(back["bf16"], state["bf16"])
    assert back["scalars"] == [1, 2.5, None, "x"] and torch.equal(back["tied"][1], model.weight)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(back["optimizer"]["state"][i][k], v), (i, k)
    with pytest.raises(TypeError, match="set"):
        atomic_save({"bad": {1, 2}}, tmp_path / "s.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "s.safetensors")["torch"], state["torch"])  # old file intact


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "ck.safetensors"
    atomic_save({"w": torch.randn(64, 64), "step": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck\.safetensors is truncated"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # one bit of the tensor data
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors is corrupt: its sha256 checksum"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupt_newest_checkpoint_falls_back_and_resume_stays_exact(tmp_path):
    dl = loader()
    kw = dict(epochs=3, lr=1e-3, progress=False)
    ref = tiny_bert()
    torch.manual_seed(5)
    r_ref = finetune(ref, dl, **kw)

    def crash(step, info):
        if step == 8:
            raise KeyboardInterrupt
    crashed = tiny_bert()
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        finetune(crashed, dl, ckpt_dir=tmp_path, ckpt_every=3, step_callback=crash, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003.safetensors", "step-00000006.safetensors"]
    newest = tmp_path / "step-00000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a full disk, say
    torch.manual_seed(999)
    resumed = tiny_bert(seed=3)
    with pytest.warns(CheckpointFallbackWarning, match="step-00000006.safetensors is truncated"):
        r_res = finetune(resumed, dl, ckpt_dir=tmp_path, ckpt_every=3, **kw)
    assert r_res["resumed_from"] == 3 and r_res["losses"] == r_ref["losses"]
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_finetune_refuses_to_resume_with_another_lr(tmp_path):
    finetune(tiny_bert(), loader(), max_steps=3, lr=1e-3, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"lr, weight_decay.*fresh ckpt_dir"):
        finetune(tiny_bert(), loader(), max_steps=3, lr=2e-3, ckpt_dir=tmp_path, progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path, umask):
    from sparsebert.checkpoint import atomic_write_text
    old = os.umask(umask)
    try:
        atomic_save({"t": torch.ones(2)}, tmp_path / "a.safetensors")
        atomic_write_text("{}", tmp_path / "b.json")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_config_hash_is_canonical():
    a = {"lr": 1e-3, "epochs": 1.0, "model": "tiny"}
    assert config_hash(a) == config_hash(dict(reversed(list(a.items()))))
    assert len(config_hash(a)) == 12 and config_hash({**a, "lr": 2e-3}) != config_hash(a)


def test_run_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid.*{os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sparsebert.runs import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"another process.*{holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # a killed holder leaves no stale lock


def test_corrupt_tokenization_cache_is_rebuilt(tmp_path):
    from sparsebert.data import SimpleVocabTokenizer, TokenizedDataset
    from sparsebert.data.tasks import Example
    from sparsebert.data.tokenize import tokenize_examples
    ex = [Example("one two three", "two", 0), Example("four five", None, 1), Example("six", "seven", 0)]
    tok = SimpleVocabTokenizer.from_examples(ex)
    TokenizedDataset.from_examples(ex, tok, max_length=8, cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(cache.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=f"{cache.name} is unreadable"):
        ds = TokenizedDataset.from_examples(ex, tok, max_length=8, cache_dir=tmp_path)
    assert ds.input_ids == tokenize_examples(ex, tok, 8)["input_ids"]
    assert load_checkpoint(cache)["lengths"].tolist() == [len(x) for x in ds.input_ids]  # rewritten whole


# ------------------------------------------------------------------------------------------ srnet runs
TINY = ["--model", "tiny", "--task", "synthetic", "--max-train", "48", "--max-eval", "32", "--max-ood", "32",
        "--batch-size", "16", "--max-length", "32", "--no-progress", "--no-report", "--paradigm", "dense",
        "--loss", "ce"]


def _srnet(out, *extra):
    from sparsebert.cli import main
    return main(["srnet", *TINY, "--out", str(out), *extra])


def test_changed_configuration_is_refused_never_reported(tmp_path, capsys):
    assert _srnet(tmp_path, "--lr", "1e-3") == 0
    rdir = tmp_path / "synthetic" / "dense-ce-seed0"
    run = json.loads((rdir / "run.json").read_text())
    assert run["config_hash"] == json.loads((rdir / "config.json").read_text())["config_hash"]
    capsys.readouterr()
    for extra, key in ((["--lr", "2e-3"], "lr: 0.001 -> 0.002"), (["--lr", "1e-3", "--epochs", "3"], "epochs: 1.0 -> 3.0"),
                       (["--lr", "1e-3", "--max-train", "40"], "max_train: 48 -> 40")):
        assert _srnet(tmp_path, *extra) == 2
        err = capsys.readouterr()
        assert key in err.err and "already done" not in err.out
    # deleting run.json does not make a changed configuration merge with the old evaluations
    (rdir / "run.json").unlink()
    assert _srnet(tmp_path, "--lr", "1e-3", "--epochs", "3") == 2
    assert "epochs: 1.0 -> 3.0" in capsys.readouterr().err
    # the same configuration reruns from scratch: no stale evaluation is merged
    history = json.loads((rdir / "evals.json").read_text())
    history.append({**history[-1], "step": 999})
    (rdir / "evals.json").write_text(json.dumps(history))
    assert _srnet(tmp_path, "--lr", "1e-3") == 0
    assert [e["step"] for e in json.loads((rdir / "run.json").read_text())["evals"]] == [run["evals"][-1]["step"]]
    assert json.loads((rdir / "run.json").read_text())["last"] == run["last"]


def test_resume_with_changed_lr_is_refused(tmp_path, monkeypatch):
    import sparsebert.train as train_mod
    from sparsebert.pruning.srnet import Runner, SRNetConfig
    cfg = SRNetConfig(task="synthetic", model="tiny", paradigm="dense", loss="ce", max_train=96, max_eval=32,
                      max_ood=32, batch_size=16, max_length=32, lr=1e-3)
    real = train_mod.finetune

    def crashing(*args, **kwargs):
        def boom(step, info):
            if step == 5:
                raise KeyboardInterrupt
        return real(*args, **{**kwargs, "step_callback": boom, "ckpt_every": 2})
    monkeypatch.setattr(train_mod, "finetune", crashing)
    with pytest.raises(KeyboardInterrupt):
        Runner(tmp_path, progress=False, log_fn=None).run(cfg)
    monkeypatch.setattr(train_mod, "finetune", real)
    changed = SRNetConfig(**{**cfg.__dict__, "lr": 5e-4})
    with pytest.raises(RunConfigMismatch, match=r"lr: 0\.001 -> 0\.0005"):
        Runner(tmp_path, progress=False, log_fn=None).run(changed)
    assert Runner(tmp_path, progress=False, log_fn=None).run(cfg)["pruning"]["train"]["resumed_from"] == 4


def test_second_process_on_the_same_out_gets_a_clear_error(tmp_path, capsys):
    rdir = tmp_path / "synthetic" / "dense-ce-seed0"
    with RunLock(rdir):  # another writer holds the run folder (a second lock refuses, as a second process)
        assert _srnet(tmp_path, "--lr", "1e-3") == 2
    assert "being written by another process" in capsys.readouterr().err
    assert not (rdir / "run.json").exists()
    assert _srnet(tmp_path, "--lr", "1e-3") == 0


def test_legacy_run_folder_without_identity_is_refused(tmp_path, capsys):
    rdir = tmp_path / "synthetic" / "dense-ce-seed0"
    rdir.mkdir(parents=True)
    (rdir / "run.json").write_text(json.dumps({"run": "dense-ce-seed0", "last": {"id": 1.0, "ood": 1.0}}))
    assert _srnet(tmp_path, "--lr", "1e-3") == 2
    assert "no config.json" in capsys.readouterr().err
