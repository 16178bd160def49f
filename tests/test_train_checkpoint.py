"""The shared fine-tuning loop and atomic checkpoints: exact resume after an interrupt."""
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsebert.checkpoint import atomic_save, latest_checkpoint, load_checkpoint, step_checkpoint_path
from _helpers import tiny_bert
from sparsebert.debias import make_loss
from sparsebert.train import finetune


def loader(n=40, bias=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 9), generator=g)
    lab = (ids[:, 1] > 25).long()
    bp = torch.softmax(torch.randn(n, 2, generator=g), -1)

    def collate(items):
        x = torch.stack([t[0] for t in items])
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "token_type_ids": torch.zeros_like(x),
                 "labels": torch.stack([t[1] for t in items])}
        if bias:
            batch["bias_probs"] = torch.stack([t[2] for t in items])
        return batch
    return DataLoader(TensorDataset(ids, lab, bp), batch_size=8, shuffle=True, collate_fn=collate)


def test_atomic_save_roundtrip_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(None) is None
    for step in (3, 12, 7):
        atomic_save({"step": step, "t": torch.arange(step)}, step_checkpoint_path(tmp_path, step))
    assert latest_checkpoint(tmp_path).name == "step-00000012.safetensors"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["t"], torch.arange(12))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"v": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"v": lambda: 2}, path)  # a lambda cannot be pickled
    assert load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("loss", ["ce", "poe"])
def test_resume_after_interrupt_matches_uninterrupted(tmp_path, loss):
    dl = loader(bias=loss == "poe")
    kw = dict(epochs=3, lr=1e-3, progress=False, loss_fn=make_loss(loss))
    ref = tiny_bert()
    torch.manual_seed(5)
    r_ref = finetune(ref, dl, **kw)

    def crash(step, info):
        if step == 8:  # mid-epoch (5 batches per epoch), 2 steps after the last checkpoint
            raise KeyboardInterrupt
    crashed = tiny_bert()
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        finetune(crashed, dl, ckpt_dir=tmp_path, ckpt_every=3, step_callback=crash, **kw)
    assert latest_checkpoint(tmp_path).name == "step-00000006.safetensors"
    torch.manual_seed(999)  # the resumed process starts with another RNG state: the checkpoint restores it
    resumed = tiny_bert(seed=3)  # and other weights
    r_res = finetune(resumed, dl, ckpt_dir=tmp_path, ckpt_every=3, **kw)
    assert r_res["resumed_from"] == 6 and r_res["steps"] == r_ref["steps"] == 15
    assert r_res["losses"] == r_ref["losses"]
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished run in the same folder returns at once with the same numbers
    again = finetune(tiny_bert(seed=4), dl, ckpt_dir=tmp_path, ckpt_every=3, **kw)
    assert again["resumed_from"] == 15 and again["losses"] == r_ref["losses"]


def test_a_kill_inside_the_callback_of_a_checkpoint_step_replays_that_step(tmp_path):
    """The step callback runs before its step's checkpoint: a process killed inside the callback of a
    checkpoint step (an srnet snapshot or evaluation being written) resumes from the checkpoint before, so
    the resumed run calls the callback for that step again; it is never skipped. (The loop used to write the
    checkpoint first: the kill-resume test then lost a snapshot once in a while.)"""
    dl = loader()
    kw = dict(epochs=3, lr=1e-3, progress=False, ckpt_dir=tmp_path, ckpt_every=3)

    def killed_at_6(step, info):
        if step == 6:
            raise KeyboardInterrupt

    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_bert(), dl, step_callback=killed_at_6, **kw)
    assert latest_checkpoint(tmp_path).name == "step-00000003.safetensors"  # not 6: its callback never finished
    seen = []
    torch.manual_seed(5)
    r = finetune(tiny_bert(), dl, step_callback=lambda step, info: seen.append(step), **kw)
    assert r["resumed_from"] == 3 and seen == list(range(4, 16))


def test_finetune_lowers_loss_and_extra_groups():
    model = tiny_bert()
    head = list(model.classifier.parameters())
    r = finetune(model, loader(), epochs=6, lr=1e-3, progress=False, warmup_ratio=0.0,
                 extra_param_groups=[{"params": head, "lr": 5e-3, "weight_decay": 0.0}])
    k = len(r["losses"]) // 5
    assert sum(r["losses"][-k:]) / k < sum(r["losses"][:k]) / k


def test_finetune_max_steps_and_bad_args(tmp_path):
    model = tiny_bert()
    assert finetune(model, loader(), max_steps=4, progress=False)["steps"] == 4
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, loader(), epochs=0, progress=False)
    with pytest.raises(ValueError, match="warmup_ratio"):
        finetune(model, loader(), warmup_ratio=1.5, progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        finetune(model, loader(), max_steps=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        finetune(model, [], progress=False)
    finetune(model, loader(), max_steps=3, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="fresh ckpt_dir"):
        finetune(model, loader(), max_steps=5, ckpt_dir=tmp_path, progress=False)
