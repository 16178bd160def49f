"""The "Win-win Deal" code's mask-training and IMP recipe (llyx97/sparse-and-robust-PLM), and mask training
as a scheduler object inside any loop (plain, Hugging Face Trainer, torch.compile)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsebert.nn import SparseLinear, sparsity_report
from sparsebert.nn.sparsify import encoder_linears, head_linears, prunable_linears
from sparsebert.pruning import MaskScheduler
from sparsebert.pruning.imp import iterative_magnitude_pruning, paper_imp_sparsities
from sparsebert.pruning.mask_training import train_masks
from sparsebert.pruning.scheduler import PAPER_WARMUP_RATIO, paper_refresh_steps
from sparsebert.pruning.schedules import cubic_sparsity
from sparsebert.train import linear_schedule
from _helpers import tiny_bert


def loader(n=48, shuffle=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 7), generator=g)
    collate = lambda items: {"input_ids": torch.stack([t[0] for t in items]),  # noqa: E731
                             "attention_mask": torch.ones(len(items), 7, dtype=torch.long),
                             "labels": torch.stack([t[1] for t in items])}
    return DataLoader(TensorDataset(ids, (ids[:, 0] > 25).long()), batch_size=8, shuffle=shuffle, collate_fn=collate)


def pruned_count(lin):
    return int((~lin.effective_mask()).sum())


# ------------------------------------------------------------------------------------------ score init
def test_binary_magnitude_start_on_a_2x3_matrix():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.1, 0.3], [-0.7, 0.2, 0.05]]))
    sl = SparseLinear.from_linear(lin, mode="dense")
    sl.init_scores("magnitude_binary", sparsity=0.5, phi=0.01)
    # maskers.py `_magnitude`: k = 3 smallest |W| (0.05, 0.1, 0.2) -> 0; the rest -> 2 * phi; threshold phi
    assert torch.equal(sl.scores, torch.tensor([[0.02, 0.0, 0.02], [0.02, 0.0, 0.0]]))
    assert sl.threshold.item() == pytest.approx(0.01)
    assert torch.equal(sl.effective_mask(), torch.tensor([[True, False, True], [True, False, False]]))
    with pytest.raises(ValueError, match="sparsity"):
        sl.init_scores("magnitude_binary")
    with pytest.raises(ValueError, match="phi"):
        sl.init_scores("magnitude_binary", sparsity=0.5, phi=-1.0)


def test_scheduler_defaults_mask_and_freeze_the_head():
    model = tiny_bert()
    head_before = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in head_linears(model).items()}
    sched = MaskScheduler(model, sparsity=0.5, total_steps=10)
    names = list(prunable_linears(model, True))
    assert set(head_linears(model)) <= set(names) and {"bert.pooler.dense", "classifier"} <= set(names)
    assert len(sched.layers) == len(names) == 12 + 2
    for lin in sched.layers:
        assert lin.mode == "scores" and lin.scores.requires_grad
        assert set(lin.scores.unique().tolist()) <= {0.0, torch.tensor(0.02).item()}
        assert lin.threshold.item() == pytest.approx(0.01)
        assert pruned_count(lin) == round(0.5 * lin.weight.numel())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    train_masks(model, loader(), sparsity=0.5, max_steps=4, lr_scores=5e-2, progress=False)
    for n, m in head_linears(model).items():
        assert isinstance(m, SparseLinear) and m.mode == "mask"
        assert torch.equal(m.weight, head_before[n][0]) and torch.equal(m.bias, head_before[n][1]), n
        assert int((~m.mask.bool()).sum()) == round(0.5 * m.weight.numel()), n
    # options: head left alone, or trained
    other = tiny_bert()
    MaskScheduler(other, sparsity=0.5, total_steps=10, include_head=False, train_head=True)
    assert not any(isinstance(m, SparseLinear) for m in head_linears(other).values())
    assert all(m.weight.requires_grad for m in head_linears(other).values())


# ------------------------------------------------------------------------------------------ threshold refresh
def test_thresholds_are_reset_every_k_steps_only(monkeypatch):
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.5, total_steps=20, threshold_refresh_steps=3)
    g = torch.Generator().manual_seed(0)
    taus = []
    for step in range(1, 8):
        with torch.no_grad():  # stand-in for an optimizer step on the scores
            for lin in sched.layers:
                lin.scores.add_(torch.randn(lin.scores.shape, generator=g) * 0.01)
        before = [lin.threshold.clone() for lin in sched.layers]
        for name in ("item", "tolist", "__bool__", "__float__"):  # no host sync in step()
            monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("sync")))
        sched.step()
        monkeypatch.undo()
        after = [lin.threshold.clone() for lin in sched.layers]
        if step % 3 == 0:
            for lin, tau in zip(sched.layers, after):  # per-matrix k-th: exactly round(0.5 n) pruned
                assert pruned_count(lin) == round(0.5 * lin.weight.numel())
                assert lin.target_sparsity is None
            assert any(not torch.equal(a, b) for a, b in zip(before, after))
        else:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), step
        taus.append(after[0].item())
    assert taus[0] == pytest.approx(0.01) and taus[1] == pytest.approx(0.01) and taus[2] != pytest.approx(0.01)
    # the period scales with the run: 1,000 of the paper's 61,360 steps
    assert paper_refresh_steps(61360) == 1000 and paper_refresh_steps(6136) == 100 and paper_refresh_steps(10) == 1


def test_refresh_every_forward_is_the_old_rule():
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.6, total_steps=10, threshold_refresh_steps=0, score_init="magnitude")
    assert all(lin.target_sparsity == 0.6 for lin in sched.layers)
    with torch.no_grad():
        sched.layers[0].scores.mul_(-1.0)  # the mask follows the scores at once
    assert pruned_count(sched.layers[0]) == round(0.6 * sched.layers[0].weight.numel())


# ------------------------------------------------------------------------------------------ schedule, optimizer
def test_constant_by_default_and_cubic_over_the_whole_run():
    model = tiny_bert()
    out = train_masks(model, loader(), sparsity=0.5, max_steps=3, progress=False)
    assert out["schedule"]["kind"] == "constant" and out["scheduler"]["score_init"] == "magnitude_binary"
    assert out["sparsity"] == pytest.approx(0.5, abs=1e-3) and out["head_sparsity"] == pytest.approx(0.5, abs=1e-2)
    model = tiny_bert()
    seen = []
    out = train_masks(model, loader(), sparsity=0.9, schedule="cubic", initial_sparsity=0.7, max_steps=12,
                      threshold_refresh_steps=1, progress=False, freeze_at_end=False,
                      step_callback=lambda step, info: seen.append(sparsity_report(model)["overall"]))
    assert out["scheduler"]["score_init"] == "magnitude"  # raw |W| for the gradual runs, as the paper's code
    assert out["schedule"]["begin_step"] == 0 and out["schedule"]["end_step"] == 12
    expected = [cubic_sparsity(k, initial=0.7, final=0.9, begin_step=0, end_step=12) for k in range(1, 13)]
    assert seen == pytest.approx(expected, abs=2e-3)
    assert seen[-1] == pytest.approx(0.9, abs=1e-3) and seen[0] > 0.7


def test_adamw_warmup_is_the_papers_fraction():
    assert PAPER_WARMUP_RATIO == pytest.approx(3600 / (5 * 12272))
    lrs = []
    train_masks(tiny_bert(), loader(n=400), sparsity=0.5, max_steps=50, lr_scores=1e-3, progress=False,
                step_callback=lambda step, info: lrs.append(info["lr"]))
    warm = int(PAPER_WARMUP_RATIO * 50)  # 2 steps of 50
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = linear_schedule(opt, warm, 50)
    expected = []
    for _ in range(50):
        opt.step()
        ref.step()
        expected.append(ref.get_last_lr()[0])
    assert warm == 2 and lrs == pytest.approx(expected) and max(lrs) == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------------ IMP
def test_imp_rounds_prune_ten_percent_of_the_original_weights(monkeypatch):
    assert paper_imp_sparsities(0.5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert paper_imp_sparsities(0.75) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75])
    made = []
    real = torch.optim.AdamW

    class CountingAdamW(real):
        def __init__(self, *a, **k):
            made.append(self)
            super().__init__(*a, **k)
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    model = tiny_bert()
    seen, lrs = {}, []

    def before(step):
        if step == 0:  # right after the round's pruning: the counts per matrix, pooler included
            seen[len(seen)] = {n: pruned_count(m) for n, m in prunable_linears(model, "pooler").items()}

    # the run (30 steps) cut into the authors' 10 intervals: the target 0.3 runs the first 3, 3 steps each
    out = iterative_magnitude_pruning(model, loader(), target_sparsity=0.3, max_steps=30, lr=1e-3, scope="per_matrix",
                                      progress=False, before_step=before,
                                      step_callback=lambda step, info: lrs.append(info["lr"]))
    assert out["imp_mode"] == "paper" and out["round_sparsities"] == pytest.approx([0.1, 0.2, 0.3])
    assert [r["steps"] for r in out["rounds"]] == [3, 3, 3]
    assert len(made) == 3  # a fresh optimizer every round
    assert len({id(o) for o in made}) == 3 and all(len(o.state) > 0 for o in made)
    for r in range(3):
        for name, m in prunable_linears(model, "pooler").items():
            n = m.weight.numel()
            assert seen[r][name] == round(0.1 * (r + 1) * n), (r, name)  # 1/(10-r) of the remaining ones
    assert "bert.pooler.dense" in seen[0] and "classifier" not in seen[0]
    assert not isinstance(model.classifier, SparseLinear)
    # lr: a new linear decay over ten intervals each round, no warm-up: never far below the base lr
    assert len(lrs) == 9 and min(lrs) >= 1e-3 * (1 - 3 / 30) - 1e-12 and lrs[3] == pytest.approx(lrs[0])
    with pytest.raises(ValueError, match="per_round_finetune"):
        iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.5, rounds=2, max_steps=4, progress=False)
    with pytest.raises(ValueError, match="imp_mode"):
        iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.5, imp_mode="x", progress=False)


# ------------------------------------------------------------------------------------------ any training loop
def test_plain_loop_equals_train_masks():
    kw = dict(sparsity=0.5, threshold_refresh_steps=2)
    torch.manual_seed(5)
    ref = tiny_bert()
    torch.manual_seed(5)
    train_masks(ref, loader(), max_steps=8, lr_scores=5e-2, warmup_ratio=0.25, progress=False, **kw)

    model = tiny_bert()
    torch.manual_seed(5)
    sched = MaskScheduler(model, total_steps=8, **kw)
    opt = torch.optim.AdamW([{"params": sched.scores(), "lr": 5e-2, "weight_decay": 0.0}], lr=2e-5)
    lr_sched = linear_schedule(opt, 2, 8)
    model.train()
    step = 0
    while step < 8:
        for batch in loader():
            if step == 8:
                break
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sched.scores(), 1.0)
            opt.step()
            lr_sched.step()
            sched.step()
            step += 1
    sched.finalize()
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_scheduler_state_dict_resume_and_config_check():
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.5, total_steps=10, threshold_refresh_steps=2)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    assert state["steps_done"] == 4
    again = MaskScheduler(tiny_bert(), sparsity=0.5, total_steps=10, threshold_refresh_steps=2)
    again.load_state_dict(state)
    assert again.steps_done == 4
    other = MaskScheduler(tiny_bert(), sparsity=0.6, total_steps=10, threshold_refresh_steps=2)
    with pytest.raises(ValueError, match="configuration"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="threshold_refresh_steps"):
        MaskScheduler(tiny_bert(), sparsity=0.5, total_steps=10, threshold_refresh_steps=-1)
    with pytest.raises(ValueError, match="score_init"):
        MaskScheduler(tiny_bert(), sparsity=0.5, total_steps=10, score_init="random")


def test_train_masks_resume_is_exact_with_refreshes(tmp_path):
    kw = dict(sparsity=0.6, max_steps=10, lr_scores=5e-2, threshold_refresh_steps=4, progress=False,
              freeze_at_end=False)
    ref = tiny_bert()
    torch.manual_seed(3)
    train_masks(ref, loader(), **kw)

    def crash(step, info):
        if step == 9:  # resumes from the checkpoint at 8, a refresh step (written after that step's refresh)
            raise KeyboardInterrupt
    crashed = tiny_bert()
    torch.manual_seed(3)
    with pytest.raises(KeyboardInterrupt):
        train_masks(crashed, loader(), ckpt_dir=tmp_path, ckpt_every=4, step_callback=crash, **kw)
    resumed = tiny_bert()
    train_masks(resumed, loader(), ckpt_dir=tmp_path, ckpt_every=4, **kw)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _trainer_state(step):
    from transformers import TrainerControl, TrainerState
    state = TrainerState()
    state.global_step = step
    return state, TrainerControl()


def test_callback_steps_the_scheduler():
    from sparsebert.pruning import MaskTrainingCallback
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.5, total_steps=6, threshold_refresh_steps=2)
    cb = MaskTrainingCallback(sched, freeze_at_end=True)
    state, control = _trainer_state(0)
    cb.on_train_begin(None, state, control)
    for step in range(1, 7):
        state.global_step = step
        cb.on_step_end(None, state, control)
        assert sched.steps_done == step
    cb.on_train_end(None, state, control)
    assert all(lin.mode == "mask" for lin in sched.layers)
    resumed = MaskScheduler(tiny_bert(), sparsity=0.5, total_steps=6, threshold_refresh_steps=2)
    cb2 = MaskTrainingCallback(resumed)
    state, control = _trainer_state(4)  # a Trainer resumed from its step-4 checkpoint
    cb2.on_train_begin(None, state, control)
    assert resumed.steps_done == 4
    with pytest.raises(TypeError, match="MaskScheduler"):
        MaskTrainingCallback(object())


def test_hf_trainer_with_the_callback(tmp_path):
    pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments
    from sparsebert.pruning import MaskTrainingCallback
    model = tiny_bert()
    ds = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": b["labels"][i]}
          for b in loader(shuffle=False) for i in range(len(b["labels"]))]
    sched = MaskScheduler(model, sparsity=0.5, total_steps=6, threshold_refresh_steps=2)
    weights = {n: l.weight.detach().clone() for n, l in encoder_linears(model).items()}
    scores0 = [s.detach().clone() for s in sched.scores()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[MaskTrainingCallback(sched)]).train()
    assert sched.steps_done == 6
    assert all(not torch.equal(a, b) for a, b in zip(scores0, sched.scores()))  # the Trainer's optimizer moved them
    for name, lin in encoder_linears(model).items():
        assert lin.mode == "scores" and torch.equal(lin.weight, weights[name])
        assert pruned_count(lin) == round(0.5 * lin.weight.numel())  # on_train_end: the final sparsity exactly


# ------------------------------------------------------------------------------------------ torch.compile
def _compiled_steps(threshold_refresh_steps):
    torch._dynamo.reset()
    model = tiny_bert().eval()
    sched = MaskScheduler(model, sparsity=0.8, schedule="cubic", initial_sparsity=0.2, total_steps=4,
                          threshold_refresh_steps=threshold_refresh_steps, score_init="magnitude")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        with torch.no_grad():
            got = compiled(input_ids=ids).logits
            want = model(input_ids=ids).logits
        assert torch.equal(got, want)
        sched.step()  # the scheduled sparsity changes every step
    return sched


def test_compile_fullgraph_survives_threshold_refreshes():
    sched = _compiled_steps(1)
    assert sched.steps_done == 4


def test_compile_fullgraph_survives_target_sparsity_changes():
    _compiled_steps(0)
