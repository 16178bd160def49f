"""The PAWS-QQP controlled-bias experiment (issue 11): the paws_qqp_biased task's splits, the bias model on
its overlap cue, the `pawsqqp` stage of scripts/srnet_eval.py (plan, a tiny end-to-end run) and its report."""
import dataclasses
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from sparsebert.data import (
    PAWS_BIASED, bigram_overlap, load_task, overlap_biased_split, overlap_cue_scores, word_overlap,
)
from sparsebert.data.tasks import default_data_dir
from sparsebert.debias import OverlapCueFeaturizer, PairOverlapFeaturizer, fit_bias_model, make_featurizer
from sparsebert.pruning.srnet import run_identity

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("srnet_eval_for_tests", ROOT / "scripts" / "srnet_eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


SE = _script()
WORDS = [f"w{i}" for i in range(60)]


def _write_paws(path: Path, n: int, seed: int) -> None:
    """PAWS-layout pairs: even rows keep the word order (high bigram overlap), odd rows shuffle it (low);
    labels drawn independently of the order, so any cue-label agreement comes from the biased split."""
    rng = random.Random(seed)
    rows = ["id\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(7, 11))
        other = list(words)
        if i % 2 == 0:
            other[rng.randrange(len(other))] = rng.choice(WORDS)  # one word swapped, order kept
        else:
            while other == words:
                rng.shuffle(other)
        rows.append(f"{i + 1}\t{' '.join(words)}\t{' '.join(other)}\t{int(rng.random() < 0.5)}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def paws_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "paws_qqp").mkdir()
    _write_paws(root / "paws_qqp" / "train.tsv", 240, 0)
    _write_paws(root / "paws_qqp" / "dev_and_test.tsv", 40, 1)
    return root


def _cue(ex, threshold):
    return int(bigram_overlap(ex.text_a, ex.text_b) >= threshold)


# ------------------------------------------------------------------------------------------ the task
def test_bigram_overlap_sees_word_order():
    assert bigram_overlap("a b c", "A B C") == 1.0
    assert bigram_overlap("a b c", "c b a") == 0.0 and word_overlap("a b c", "c b a") == 1.0
    assert bigram_overlap("a b c d", "a b c") == pytest.approx(2 / 3)
    assert bigram_overlap("word", "word") == 0.0 and bigram_overlap("a b", None) == 0.0
    with pytest.raises(ValueError, match="cue"):
        overlap_cue_scores([], "trigrams")


def test_biased_task_splits(paws_dir):
    s = load_task("paws_qqp_biased", data_dir=paws_dir, seed=0)
    assert s.spec.name == "paws_qqp_biased" and s.ood_spec.name == "paws_qqp" and s.spec.num_labels == 2
    st = s.sources["bias_split"]
    th = st["threshold"]
    assert st["cue"] == PAWS_BIASED["cue"] == "bigrams"
    # every pool pair lands in exactly one part
    lines = [{ex.meta["line"] for ex in part} for part in (s.train, s.id_dev, s.ood)]
    assert sum(map(len, lines)) == 240 and set.union(*lines) == set(range(2, 242))
    assert lines[0].isdisjoint(lines[1]) and lines[0].isdisjoint(lines[2]) and lines[1].isdisjoint(lines[2])
    biased = len(s.train) + len(s.id_dev)
    assert abs(len(s.id_dev) - PAWS_BIASED["dev_fraction"] * biased) <= 2  # 10%, rounded per (label, cue) cell
    # the agreement, recomputed from the texts: 80% on train (to one pair), 0 on the anti-correlated OOD part
    train_agree = sum(_cue(ex, th) == ex.label for ex in s.train) / len(s.train)
    assert abs(train_agree - 0.8) <= 1.5 / len(s.train) and st["agree_fraction"] == pytest.approx(train_agree)
    assert abs(sum(_cue(ex, th) == ex.label for ex in s.id_dev) / len(s.id_dev) - 0.8) < 0.15
    assert len(s.ood) > 0 and all(_cue(ex, th) != ex.label for ex in s.ood)
    for part in (s.train, s.id_dev, s.ood, s.extra_ood["paws_dev_and_test"]):
        assert all(ex.meta["cue_agrees"] == (_cue(ex, th) == ex.label) for ex in part)
    extra = s.extra_ood["paws_dev_and_test"]
    assert len(extra) == 40 and all(ex.meta["source"] == "paws:dev_and_test.tsv" for ex in extra)
    assert "paws_dev_and_test" in s.sources
    # deterministic in the seed; another seed draws another subset
    again = load_task("paws_qqp_biased", data_dir=paws_dir, seed=0)
    assert again.train == s.train and again.id_dev == s.id_dev and again.ood == s.ood
    other = load_task("paws_qqp_biased", data_dir=paws_dir, seed=1)
    assert {ex.meta["line"] for ex in other.train} != lines[0]
    assert load_task("paws_qqp_biased", "train", data_dir=paws_dir) == s.train


def test_biased_task_bad_input(paws_dir):
    with pytest.raises(ValueError, match="dev_fraction"):
        load_task("paws_qqp_biased", data_dir=paws_dir, dev_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load_task("paws_qqp_biased", data_dir=paws_dir / "nowhere")
    exs = load_task("paws_qqp_biased", data_dir=paws_dir).train
    with pytest.raises(ValueError, match="cue"):
        overlap_biased_split(exs, 0.8, cue="chars")


def test_biased_task_on_the_real_file_matches_the_stage_sizes():
    if not (default_data_dir() / "paws_qqp" / "train.tsv").is_file():
        pytest.skip("PAWS-QQP train.tsv not available")
    s = load_task("paws_qqp_biased")
    assert (len(s.train), len(s.id_dev), len(s.ood), len(s.extra_ood["paws_dev_and_test"])) == (8561, 951, 2476, 677)
    steps = math.ceil(len(s.train) / SE.PAWS["batch_size"])  # the estimate in the PAWS comment
    assert math.ceil(SE.PAWS["epochs"] * steps) == 590 and math.ceil(SE.PAWS["mask_epochs"] * steps) == 242


# ---------------------------------------------------------------------------------- the bias model
def test_bias_model_is_the_overlap_cue(paws_dir):
    s = load_task("paws_qqp_biased", data_dir=paws_dir)
    th = s.sources["bias_split"]["threshold"]
    f = make_featurizer("paws_qqp_biased", examples=s.train)
    assert isinstance(f, OverlapCueFeaturizer) and f.feature_names == ("cue_bigrams",)
    assert isinstance(make_featurizer("paws_qqp"), PairOverlapFeaturizer)  # the plain task keeps its features
    x = f(s.train)
    assert x.shape == (len(s.train), 1)
    assert torch.allclose(x[:, 0], torch.tensor([bigram_overlap(e.text_a, e.text_b) for e in s.train]))
    model = fit_bias_model(s.train, f, 2)
    pred = model.predict(x)
    cue = torch.tensor([_cue(e, th) for e in s.train])
    assert (pred == cue).float().mean() > 0.95  # it follows the cue ...
    ood_pred = model.predict(f(s.ood))
    assert (ood_pred == torch.tensor([e.label for e in s.ood])).float().mean() < 0.1  # ... so it fails OOD
    with pytest.raises(ValueError, match="cues"):
        OverlapCueFeaturizer(())
    with pytest.raises(ValueError, match="text_b"):
        f([s.train[0].__class__("a b", None, 0)])


# ------------------------------------------------------------------------------------ the stage plan
def test_pawsqqp_plan_shares_one_teacher():
    cfgs = SE.plan("pawsqqp", "/tmp/never-written")
    assert "pawsqqp" in SE.STAGES
    assert [c.run_name for c in cfgs] == [
        "dense-ce-seed0",
        "a-ce+poe-s0.5-constant-seed0-t0", "a-ce+reweight-s0.5-constant-seed0-t0", "a-ce+ce-s0.5-constant-seed0-t0",
        "a-ce+poe-s0.5-constant-seed1-t0", "a-ce+reweight-s0.5-constant-seed1-t0",
        "a-ce+poe-s0.5-constant-seed2-t0", "a-ce+reweight-s0.5-constant-seed2-t0"]
    teacher = cfgs[0]
    assert teacher.paradigm == "dense" and teacher.loss == "ce"
    for c in cfgs:
        assert c.task == "paws_qqp_biased" and c.model == "minilm"
        for k in ("lr", "lr_scores", "batch_size", "max_length", "eval_points"):
            assert getattr(c, k) == SE.MNLI[k], k
    for c in cfgs[1:]:
        assert c.paradigm == "a" and c.sparsity == 0.5 and c.source == "ce"
        assert run_identity(c.dense_dependency()) == run_identity(teacher)  # the same folder, the same config
    assert SE.plan("teacher", "/tmp/never-written")[0].task == "mnli"  # the mnli stages are untouched



def test_longmask_stage_is_its_own_run_beside_the_main_one():
    """Stage longmask: the 50% CE-teacher mask search with 4x the steps. Its runs must never resume or be
    mistaken for the main stage's 245-step runs (another folder, another identity), and share the teacher."""
    main = {c.run_name: c for c in SE.plan("main", "/tmp/never-written")}
    assert "a-ce+poe-s0.5-constant-seed0-t0" in main  # the main stage's names are unchanged
    long = SE.plan("longmask", "/tmp/never-written")
    assert "longmask" in SE.STAGES
    assert [c.run_name for c in long] == [f"a-ce+{loss}-s0.5-constant-seed{s}-me2-t0"
                                          for s in (0, 1, 2) for loss in ("poe", "ce", "reweight")]
    short = main["a-ce+poe-s0.5-constant-seed0-t0"]
    assert long[0].mask_epochs == 4 * short.mask_epochs
    assert run_identity(long[0]) != run_identity(short)
    assert run_identity(long[0].dense_dependency()) == run_identity(short.dense_dependency())



def test_match_selects_runs_by_name_and_keeps_their_teacher():
    """`run --match`: a partial sweep (e.g. one loss) keeps the plan's order and never drops the dense teacher
    the selected mask runs start from; no match selects nothing but the teacher; no --match selects all."""
    paws = SE.plan("pawsqqp", "/tmp/never-written")
    assert SE.selected(paws, None) == paws
    picked = SE.selected(paws, ["+poe-s0.5-constant-seed1", "+ce-s0.5"])
    assert [c.run_name for c in picked] == ["dense-ce-seed0", "a-ce+ce-s0.5-constant-seed0-t0",
                                            "a-ce+poe-s0.5-constant-seed1-t0"]
    assert picked[0] is paws[0] and picked[0].paradigm == "dense"
    assert [c.paradigm for c in SE.selected(paws, ["no-such-run"])] == ["dense"]
    main = SE.selected(SE.plan("main", "/tmp/never-written"), ["+reweight-s0.7"])
    assert [c.run_name for c in main] == [f"a-ce+reweight-s0.7-constant-seed{s}-t0" for s in (0, 1, 2)]


def test_seeds_add_runs_beside_the_default_ones_and_keep_the_teacher(capsys):
    """`run --seeds`: more seeds of the same cells. The default seeds' runs keep their names (a finished sweep
    is reused, not rerun), the new seeds name new runs of the same recipe and the same teacher, the one-seed
    stages ignore it, and a bad seed is refused by the parser naming the option."""
    base = {c.run_name: c for c in SE.plan("cecontrol", "/tmp/never-written")}
    assert list(base) == [f"a-ce+ce-s0.5-constant-seed{s}-t0" for s in SE.SEEDS]
    more = SE.plan("cecontrol", "/tmp/never-written", seeds=[3, 4])
    assert [c.run_name for c in more] == ["a-ce+ce-s0.5-constant-seed3-t0", "a-ce+ce-s0.5-constant-seed4-t0"]
    assert SE.plan("cecontrol", "/tmp/never-written", seeds=[3, 4, 3]) == more  # a repeated seed is one run
    ref = base["a-ce+ce-s0.5-constant-seed0-t0"]
    for c in more:
        assert dataclasses.replace(c, seed=0) == ref  # only the seed differs
        assert run_identity(c.dense_dependency()) == run_identity(ref.dense_dependency())
    assert [c.seed for c in SE.plan("teacher", "/tmp/never-written", seeds=[5])] == [0]
    assert [c.seed for c in SE.plan("paradigms", "/tmp/never-written", seeds=[5])] == [0, 0]
    paws = [c.run_name for c in SE.plan("pawsqqp", "/tmp/never-written", seeds=[3])]
    assert paws == ["dense-ce-seed0", "a-ce+poe-s0.5-constant-seed3-t0", "a-ce+reweight-s0.5-constant-seed3-t0"]
    for bad in ("x", "-1"):
        with pytest.raises(SystemExit):
            SE.main(["run", "--seeds", bad, "--out", "/tmp/never-written"])
        assert "--seeds: expected a non-negative integer seed" in capsys.readouterr().err


def test_teacher_seed_names_the_teacher_every_mask_run_starts_from(monkeypatch, capsys):
    """`run --teacher-seed T`: the teacher stage trains the dense run of seed T, every paradigm-a/b run starts from
    exactly that run (same identity) and says so in its name (-t<T>), the mask seeds are untouched, and T=0 is
    every earlier study's plan unchanged. A bad value is refused naming the option."""
    for stage in SE.STAGES:
        assert SE.plan(stage, "/tmp/never-written", teacher_seed=0) == SE.plan(stage, "/tmp/never-written")
        cfgs = SE.plan(stage, "/tmp/never-written", seeds=[0, 2], teacher_seed=3)
        for c in cfgs:
            assert c.teacher_seed == 3
            if c.paradigm in ("a", "b"):
                assert c.run_name.endswith("-t3") and c.seed in (0, 2)
                assert c.dense_dependency().seed == 3
                if cfgs[0].paradigm == "dense":  # a plan that trains its teacher: the one the runs start from
                    assert run_identity(c.dense_dependency()) == run_identity(cfgs[0])
    teacher = SE.plan("teacher", "/tmp/never-written", teacher_seed=3)
    assert [c.run_name for c in teacher] == ["dense-ce-seed3"]
    mask = SE.plan("main", "/tmp/never-written", seeds=[1], teacher_seed=3)[0]
    assert run_identity(mask.dense_dependency()) == run_identity(teacher[0])
    assert run_identity(mask) != run_identity(SE.plan("main", "/tmp/never-written", seeds=[1])[0])
    seen = []

    def fake_run(self, cfg):
        seen.append(cfg.run_name)
        return {"run": cfg.run_name, "last": {"id": 0.5, "ood": 0.5}, "seconds": 1.0}

    monkeypatch.setattr(SE.PredictionSavingRunner, "run", fake_run)
    assert SE.main(["run", "--stage", "teacher", "main", "--match", "+poe-s0.7", "--seeds", "4",
                    "--teacher-seed", "1", "--out", "/tmp/never-written"]) == 0
    assert seen == ["dense-ce-seed1", "a-ce+poe-s0.7-constant-seed4-t1"]
    capsys.readouterr()
    for bad in ("-1", "x", "0.5"):
        with pytest.raises(SystemExit):
            SE.main(["run", "--teacher-seed", bad, "--out", "/tmp/never-written"])
        assert "--teacher-seed: expected a non-negative integer seed" in capsys.readouterr().err


# ------------------------------------------------------------------------- a tiny end-to-end run + report
def test_weight_decay_reaches_every_run_and_the_teacher_it_starts_from(monkeypatch, capsys):
    """`run --weight-decay`: the teacher's AdamW decay (v4 ran 0.01, the authors' code 0). Every run of the plan
    and the dense run each mask run starts from carry it, it changes their identity (so a folder of decay-0 runs
    is never reused for it), and a bad value is refused naming the option."""
    for stage in SE.STAGES:
        default, decayed = SE.plan(stage, "/tmp/never-written"), SE.plan(stage, "/tmp/never-written", weight_decay=0.01)
        assert [c.run_name for c in default] == [c.run_name for c in decayed]
        assert all(c.weight_decay == 0.0 for c in default) and all(c.weight_decay == 0.01 for c in decayed)
        for c, d in zip(default, decayed):
            assert run_identity(c) != run_identity(d)
            if c.paradigm in ("a", "b"):
                assert d.dense_dependency().weight_decay == 0.01 and c.dense_dependency().weight_decay == 0.0
    seen = []

    def fake_run(self, cfg):
        seen.append((cfg.run_name, cfg.weight_decay))
        return {"run": cfg.run_name, "last": {"id": 0.5, "ood": 0.5}, "seconds": 1.0}

    monkeypatch.setattr(SE.PredictionSavingRunner, "run", fake_run)
    assert SE.main(["run", "--stage", "teacher", "main", "--match", "+poe-s0.7", "--seeds", "4",
                    "--weight-decay", "0.01", "--out", "/tmp/never-written"]) == 0
    assert seen == [("dense-ce-seed0", 0.01), ("a-ce+poe-s0.7-constant-seed4-t0", 0.01)]
    capsys.readouterr()
    for bad in ("-0.01", "inf", "nan", "x"):
        with pytest.raises(SystemExit):
            SE.main(["run", "--weight-decay", bad, "--out", "/tmp/never-written"])
        assert "--weight-decay: expected a" in capsys.readouterr().err


def test_pawsqqp_stage_runs_and_reports_on_a_tiny_model(paws_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBERT_DATA", str(paws_dir))
    out = tmp_path / "runs"
    cfgs = SE.paws_plan(str(out), model="tiny", epochs=1.0, mask_epochs=0.5, max_eval=None, max_ood=None)
    runner = SE.PredictionSavingRunner(out, progress=False, log_fn=None)
    for cfg in (cfgs[1], cfgs[4]):  # poe seeds 0 and 1: the shared teacher runs first, once
        runner.run(cfg)
    folders = sorted(p.name for p in (out / "paws_qqp_biased").iterdir() if (p / "run.json").is_file())
    assert folders == sorted([cfgs[0].run_name, cfgs[1].run_name, cfgs[4].run_name])
    run = json.loads((out / "paws_qqp_biased" / cfgs[1].run_name / "run.json").read_text())
    preds = json.loads((out / "paws_qqp_biased" / cfgs[1].run_name / f"preds-step{run['last']['step']}.json").read_text())
    assert set(preds) == {"id_dev", "id_test", "ood_dev", "ood_test", "paws_dev_and_test"}
    assert len(preds["paws_dev_and_test"]["labels"]) == 40 and len(preds["paws_dev_and_test"]["cue_agrees"]) == 40
    assert not any(preds["ood_dev"]["cue_agrees"] + preds["ood_test"]["cue_agrees"])
    assert run["data"]["bias_split"]["agree_fraction"] == pytest.approx(0.8, abs=0.01)
    rdir = tmp_path / "report"
    assert SE.main(["report", "--out", str(out), "--report-dir", str(rdir)]) == 0
    table = (rdir / "paws_qqp_biased_tables.md").read_text()
    assert "| dense ce (teacher) | 1 |" in table and "| a: ce->poe, constant, lr_scores 0.0005, 5 steps | 2 |" in table
    assert "Difference from the dense CE teacher" in table
    assert not (rdir / "mnli_tables.md").exists()  # no mnli runs: no mnli table
    rows = json.loads((rdir / "paws_qqp_biased_summary.json").read_text())
    assert rows[1]["seeds"] == [0, 1] and rows[1]["paws"]["n"] == 40


def test_start_evaluates_the_mask_search_step_zero_of_a_seeded_decayed_teacher(tmp_path, monkeypatch, capsys):
    """`start`: the teacher of --teacher-seed / --weight-decay under the scheduler's binary magnitude masks at each
    sparsity (the paradigm-a search before its first step), on the whole held-out ID and HANS-style sets. A tiny
    model on a slice of the real MNLI dev set; an unfinished teacher and a bad sparsity are refused by name."""
    from sparsebert.data.tasks import default_data_dir
    if not (default_data_dir() / "mnli" / "dev_matched.tsv").is_file():
        pytest.skip(f"needs mnli/dev_matched.tsv under {default_data_dir()} (../shared/data; see its README)")
    for k, v in dict(model="tiny", epochs=1.0, max_train=48, max_eval=24, max_ood=20, hans_per_subcase=2).items():
        monkeypatch.setitem(SE.MNLI, k, v)
    out, write = tmp_path / "runs", tmp_path / "start.json"
    argv = ["--out", str(out), "--teacher-seed", "1", "--weight-decay", "0.01"]
    assert SE.main(["start", *argv, "--write", str(write)]) == 2
    assert "the teacher dense-ce-seed1 (weight decay 0.01) is not finished" in capsys.readouterr().err
    assert SE.main(["run", "--stage", "teacher", *argv]) == 0
    assert SE.main(["start", *argv, "--sparsity", "0.7", "1.0", "--write", str(write)]) == 2
    assert "--sparsity: expected values in (0, 1), got 1.0" in capsys.readouterr().err
    assert SE.main(["start", *argv, "--sparsity", "0.3", "0.9", "--write", str(write)]) == 0
    got = json.loads(write.read_text())
    assert got["teacher"] == "dense-ce-seed1" and (got["weight_decay"], got["teacher_seed"]) == (0.01, 1)
    assert [r["search"] for r in got["rows"]] == ["a-ce+poe-s0.3-constant-seed0-t1", "a-ce+poe-s0.9-constant-seed0-t1"]
    for r in got["rows"]:
        assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)  # the masks were in place
        assert r["n_id"] == 24 and sum(r["id_pred_counts"]) == 24 and len(r["id_pred_counts"]) == 3
        assert sum(r["ood_pred_counts"]) == r["n_ood"] and len(r["ood_pred_counts"]) == 2
        assert r["id_one_class"] == (sum(c > 0 for c in r["id_pred_counts"]) == 1)
        assert r["id_top_share"] == max(r["id_pred_counts"]) / 24 and 0 <= r["id_accuracy"] <= 1
    teacher = json.loads((out / "mnli" / "dense-ce-seed1" / "run.json").read_text())
    assert teacher["config"]["weight_decay"] == 0.01 and teacher["config"]["teacher_seed"] == 1


# ----------------------------------------------------------------------------- report from fake runs
def _fake_run(folder: Path, *, run: str, paradigm: str, loss: str, seed: int, splits: dict, task_extra=None):
    """A finished run folder: run.json + preds-step5.json. splits: name -> (predicted class, label, cue) lists."""
    folder.mkdir(parents=True)
    cfg = {"loss": loss, "source": "ce", "schedule": "constant", "initial_sparsity": 0.0, "sparsity": 0.5,
           "include_head": True, "lr_scores": 5e-4, "rewind": "pretrained", "hans_rule": "argmax"}
    json.dump({"run": run, "paradigm": paradigm, "seed": seed, "sparsity": 0.0 if paradigm == "dense" else 0.5,
               "seconds": 60.0, "last": {"step": 5}, "config": cfg, "data": task_extra or {}},
              open(folder / "run.json", "w"))
    preds = {}
    for name, (pred, label, extra) in splits.items():
        k = 3 if name.startswith(("id", "ood")) and task_extra is None else 2
        preds[name] = {"probs": [[0.9 if c == p else 0.1 / (k - 1) for c in range(k)] for p in pred],
                       "labels": label, "heuristic": extra if task_extra is None else [None] * len(label),
                       "subcase": [None] * len(label)}
        if task_extra is not None:
            preds[name]["cue_agrees"] = extra
    json.dump(preds, open(folder / "preds-step5.json", "w"))


def test_report_renders_the_paws_table_beside_the_mnli_one(tmp_path):
    out, rdir = tmp_path / "runs", tmp_path / "report"
    assert SE.main(["report", "--out", str(out), "--report-dir", str(rdir)]) == 2  # nothing finished yet
    lab = [1, 0, 1, 0, 0, 1, 0, 0]
    cue = [True, True, False, True, True, False, True, True]
    bias = {"bias_split": {"agree_fraction": 0.8, "threshold": 0.667}}
    paws = out / "paws_qqp_biased"
    always_para = {s: ([1] * 8, lab, cue) for s in ("id_dev", "id_test", "ood_dev", "ood_test", "paws_dev_and_test")}
    _fake_run(paws / "dense-ce-seed0", run="dense-ce-seed0", paradigm="dense", loss="ce", seed=0, splits=always_para,
              task_extra=bias)
    for seed in (0, 1):
        name = f"a-ce+poe-s0.5-constant-seed{seed}-t0"
        right = {s: (lab, lab, cue) for s in always_para}
        _fake_run(paws / name, run=name, paradigm="a", loss="poe", seed=seed, splits=right, task_extra=bias)
    # one mnli teacher, so both reports are written from one out folder
    heur = ["lexical_overlap", "subsequence"] * 2
    _fake_run(out / "mnli" / "dense-ce-seed0", run="dense-ce-seed0", paradigm="dense", loss="ce", seed=0,
              splits={"id_dev": ([0, 1, 2, 0], [0, 1, 2, 1], heur), "id_test": ([0, 1, 2, 0], [0, 1, 2, 2], heur),
                      "ood_dev": ([0, 0, 1, 0], [0, 1, 1, 0], heur), "ood_test": ([0, 2, 0, 0], [0, 1, 1, 0], heur)})
    assert SE.main(["report", "--out", str(out), "--report-dir", str(rdir)]) == 0
    for name in ("mnli_tables.md", "mnli_summary.json", "mnli.png", "paws_qqp_biased_tables.md",
                 "paws_qqp_biased_summary.csv", "paws_qqp_biased_summary.json", "runs/paws_qqp_biased-dense-ce-seed0.json"):
        assert (rdir / name).is_file(), name
    rows = json.loads((rdir / "paws_qqp_biased_summary.json").read_text())
    teacher, poe = rows
    n = 16  # dev + test halves pooled
    assert teacher["id"]["n"] == n and teacher["paws"]["n"] == 8
    assert teacher["id"]["accuracy"]["mean"] == pytest.approx(3 / 8) and teacher["id"]["one_class"] == [True]
    assert teacher["id"]["f1"]["mean"] == pytest.approx(2 * 3 / (2 * 3 + 5))  # tp 3, fp 5, fn 0
    assert teacher["id"]["majority_accuracy"] == pytest.approx(5 / 8)
    assert teacher["id"]["constant_f1"] == pytest.approx(teacher["id"]["f1"]["mean"])
    assert teacher["id"]["accuracy_cue_agrees"] == pytest.approx(1 / 6) and teacher["id"]["accuracy_cue_wrong"] == 1.0
    assert poe["seeds"] == [0, 1] and poe["ood"]["accuracy"]["mean"] == 1.0 and poe["ood"]["f1"]["mean"] == 1.0
    assert poe["ood"]["one_class"] == [False, False]
    d = poe["paws"]["vs_teacher"]
    assert d["accuracy"]["mean"] == pytest.approx(5 / 8) and d["f1"]["mean"] == pytest.approx(1 - 6 / 11)
    assert d["accuracy"]["low"] <= d["accuracy"]["mean"] <= d["accuracy"]["high"]
    assert poe["train_cue_agreement"] == 0.8 and "vs_teacher" not in teacher["id"]
    table = (rdir / "paws_qqp_biased_tables.md").read_text()
    assert "**ONE CLASS**: ID, OOD anti-corr., PAWS dev+test" in table
    assert "| majority class / constant predictor | - | - | 62.5 | 54.5 |" in table
    assert "| a: ce->poe, constant, lr_scores 0.0005, 5 steps | 2 | +62.5 [" in table
    assert "agrees with the label on 80.0%" in table



def test_mnli_report_compares_debiased_masks_with_the_ce_mask_control(tmp_path):
    """The control table pairs each debiased group with the CE mask-training group of the same sparsity and
    steps, seed by seed; a group without its control (or the teacher) gets none."""
    out, rdir = tmp_path / "runs", tmp_path / "report"
    heur = ["lexical_overlap", "subsequence"] * 2
    id_lab, ood_lab = [0, 1, 2, 1], [0, 1, 1, 0]
    def splits(id_pred, ood_pred):
        return {"id_dev": (id_pred, id_lab, heur), "id_test": (id_pred, id_lab, heur),
                "ood_dev": (ood_pred, ood_lab, heur), "ood_test": (ood_pred, ood_lab, heur)}
    mnli = out / "mnli"
    _fake_run(mnli / "dense-ce-seed0", run="dense-ce-seed0", paradigm="dense", loss="ce", seed=0,
              splits=splits([0, 1, 2, 0], [0, 0, 0, 0]))
    for seed in (0, 1):
        # poe: ID 2/4 right, OOD 4/4 right; ce control: ID 3/4 seed 0 and 4/4 seed 1, OOD 2/4 (all entailment)
        _fake_run(mnli / f"poe{seed}", run=f"poe{seed}", paradigm="a", loss="poe", seed=seed,
                  splits=splits([0, 1, 0, 0], [0, 2, 1, 0]))
        _fake_run(mnli / f"ce{seed}", run=f"ce{seed}", paradigm="a", loss="ce", seed=seed,
                  splits=splits([0, 1, 2, 0] if seed == 0 else [0, 1, 2, 1], [0, 0, 0, 0]))
    _fake_run(mnli / "reweight0", run="reweight0", paradigm="a", loss="reweight", seed=2,  # no ce run with seed 2
              splits=splits([0, 1, 2, 1], [0, 0, 0, 0]))
    assert SE.main(["report", "--out", str(out), "--report-dir", str(rdir)]) == 0
    rows = {r["loss"]: r for r in json.loads((rdir / "mnli_summary.json").read_text())}
    v = rows["ce->poe"]["vs_ce_mask"]
    assert v["seeds"] == [0, 1] and v["control"] == "a: ce->ce, constant, lr_scores 0.0005, 5 steps"
    assert v["id"]["mean"] == pytest.approx((2 / 4 - 3 / 4 + 2 / 4 - 1) / 2)
    assert v["ood"]["mean"] == pytest.approx(0.5) and v["ood_non_entailed"]["mean"] == pytest.approx(1.0)
    assert v["ood_entailed"]["mean"] == pytest.approx(0.0)
    assert v["id"]["low"] <= v["id"]["mean"] <= v["id"]["high"]
    assert "vs_ce_mask" not in rows["ce->reweight"] and "vs_ce_mask" not in rows["ce->ce"]
    table = (rdir / "mnli_tables.md").read_text()
    assert "## Debiasing loss vs CE mask training" in table
    assert "| a: ce->poe, constant, lr_scores 0.0005, 5 steps | 2 | 0.5 | -37.5 [" in table
    with pytest.raises(ValueError, match="reference: expected 2 per-seed vectors, got 1"):
        import torch
        SE._diff_ci([torch.ones(3, dtype=torch.bool)] * 2, [torch.ones(3, dtype=torch.bool)])


def test_run_skips_a_run_another_process_holds(tmp_path, monkeypatch, capsys):
    """Two `run` processes can share a stage: a run whose folder lock is held is skipped, not fatal."""
    from sparsebert.runs import RunLocked
    ev = SE
    done = []

    def fake_run(self, cfg):
        if cfg.paradigm == "dense":
            raise RunLocked("run folder X is being written by another process")
        done.append(cfg.run_name)
        return {"run": cfg.run_name, "last": {"id": 0.5, "ood": 0.5}, "seconds": 1.0}

    monkeypatch.setattr(ev.PredictionSavingRunner, "run", fake_run)
    assert ev.main(["run", "--stage", "pawsqqp", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dense-ce-seed0" in out and "skipped" in out
    assert len(done) == 7  # every mask run still went ahead


def test_compare_puts_two_reports_runs_side_by_side(tmp_path, capsys):
    """`compare BEFORE AFTER`: the runs in both, field by field, with the difference; the others counted."""
    def run_json(folder, name, id_acc, ood, ent=None, non=None):
        folder.mkdir(exist_ok=True)
        last = {"id": id_acc, "ood": ood, **({"ood_entailed": ent, "ood_non_entailed": non} if ent is not None else {})}
        (folder / f"{name}.json").write_text(json.dumps({"run": name, "last": last}))

    before, after = tmp_path / "v4", tmp_path / "v5"
    run_json(before, "dense-ce-seed0", 0.6385, 0.52, 0.969, 0.071)
    run_json(after, "dense-ce-seed0", 0.6365, 0.5222, 0.96, 0.0844)
    run_json(before, "a-ce+poe-s0.5-constant-seed0-t0", 0.59, 0.53)
    run_json(before, "a-ce+poe-s0.7-constant-seed0-t0", 0.50, 0.52)
    run_json(after, "a-ce+poe-s0.5-constant-seed0-t0", 0.5927, 0.52)
    run_json(after, "new-run", 0.1, 0.1)
    out = tmp_path / "cmp.md"
    assert SE.main(["compare", str(before), str(after), "--write", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()[2:] if line.startswith("| ")}
    assert set(rows) == {"dense-ce-seed0", "a-ce+poe-s0.5-constant-seed0-t0"}
    assert "63.8 -> 63.6 (-0.2)" in rows["dense-ce-seed0"] and "7.1 -> 8.4 (+1.3)" in rows["dense-ce-seed0"]
    assert "59.0 -> 59.3 (+0.3)" in rows["a-ce+poe-s0.5-constant-seed0-t0"]
    assert "Not compared: 1 runs only before; only after: new-run." in text
    assert SE.main(["compare", str(tmp_path / "missing"), str(after)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_collapse_counts_one_class_runs_per_teacher_and_compares_them(tmp_path, capsys):
    """`collapse`: one folder per teacher; per cell, the seeds whose predictions are all one class (ID or
    HANS-style), and Fisher's exact test between the folders. Here folder "a" has 2 of 3 poe seeds collapsed
    (one on ID, one on HANS-style only), folder "b" 0 of 3; the ce run is outside --match."""
    id_lab, ood_lab, heur = [0, 1, 2, 0], [0, 1, 1, 0], ["lexical_overlap"] * 4

    def splits(id_pred, ood_pred):
        return {"id_dev": (id_pred, id_lab, heur), "id_test": (id_pred, id_lab, heur),
                "ood_dev": (ood_pred, ood_lab, heur), "ood_test": (ood_pred, ood_lab, heur)}
    fine = ([0, 1, 2, 2], [0, 1, 0, 0])
    for folder, runs in (("a", [fine, ([1, 1, 1, 1], [0, 1, 0, 1]), ([0, 1, 2, 0], [0, 0, 0, 0])]),
                         ("b", [fine, fine, ([0, 2, 2, 0], [1, 1, 1, 0])])):
        mnli = tmp_path / folder / "mnli"
        _fake_run(mnli / "dense-ce-seed0", run="dense-ce-seed0", paradigm="dense", loss="ce", seed=0,
                  splits=splits([0, 1, 2, 0], [0, 0, 1, 0]))
        for seed, (i, o) in enumerate(runs):
            _fake_run(mnli / f"poe{seed}", run=f"a-ce+poe-s0.5-constant-seed{seed}-t0", paradigm="a", loss="poe",
                      seed=seed, splits=splits(i, o))
        _fake_run(mnli / "ce0", run="a-ce+ce-s0.5-constant-seed0-t0", paradigm="a", loss="ce", seed=0,
                  splits=splits([0, 0, 0, 0], [0, 0, 0, 0]))
    rdir = tmp_path / "report"
    assert SE.main(["collapse", "--runs", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--match", "+poe-s0.5",
                    "--report-dir", str(rdir)]) == 0
    study = json.loads((rdir / "collapse.json").read_text())
    (cell_a,), (cell_b,) = (list(g["cells"].values()) for g in study["groups"])
    assert [r["one_class"] for r in cell_a["runs"]] == [False, True, True] and cell_a["collapsed"] == 2
    assert cell_a["collapsed_id"] == 1 and cell_b["collapsed"] == 0 and cell_b["seeds"] == 3
    assert cell_a["runs"][1]["id_top_share"] == 1.0 and cell_a["runs"][0]["id"] == 0.75
    assert cell_b["runs"][2]["ood_non_entailed"] == 1.0 and cell_b["runs"][2]["ood_entailed"] == 0.5  # [1,1,1,0] vs [0,1,1,0]
    (test,) = study["fisher_exact"]
    assert (test["a"], test["b"]) == ("a", "b") and test["p_value"] == pytest.approx(0.4)  # 2/3 vs 0/3: 6/15
    assert test["id_only_p_value"] == pytest.approx(1.0)  # 1/3 vs 0/3
    # ID accuracy per seed: a 0.75, 0.25, 1.0; b 0.75, 0.75, 0.75 -> b - a = 0.75 - 2/3, paired by seeds 0-2
    assert test["paired_seeds"] == [0, 1, 2] and test["id_diff"]["mean"] == pytest.approx(0.75 - 2 / 3)
    assert test["id_diff"]["low"] <= test["id_diff"]["mean"] <= test["id_diff"]["high"]
    assert study["groups"][0]["teacher"]["id"] == 1.0
    csv_rows = (rdir / "collapse.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 6 and csv_rows[2].endswith(",True,True") and csv_rows[3].endswith(",True,False")
    assert "2 of 3 collapsed (1 of them to one class on ID too)" in (rdir / "collapse.md").read_text() and (rdir / "collapse.png").stat().st_size > 0
    (pooled,) = study["pooled_fisher_exact"]  # one cell matched: the pooled test is that cell's
    assert (pooled["a"], pooled["b"]) == ("a", "b") and pooled["p_value"] == pytest.approx(0.4)
    assert pooled["id_only_p_value"] == pytest.approx(1.0)
    assert study["groups"][0]["pooled"] == {"collapsed": 2, "collapsed_id": 1, "seeds": 3}
    assert study["by_group"] == [] and study["by_group_fisher_exact"] == []
    # GROUP/NAME labels: teachers pooled by group (here group x = folders a and b, group y = folder a again)
    assert SE.main(["collapse", "--runs", f"x/a={tmp_path / 'a'}", f"x/b={tmp_path / 'b'}", f"y/a={tmp_path / 'a'}",
                    "--match", "+poe-s0.5", "--report-dir", str(rdir)]) == 0
    study = json.loads((rdir / "collapse.json").read_text())
    assert [(t["a"], t["b"]) for t in study["pooled_fisher_exact"]] == [("x/a", "x/b"), ("x/a", "y/a"), ("x/b", "y/a")]
    assert study["pooled_fisher_exact"][1]["p_value"] == pytest.approx(1.0)  # a against itself
    assert study["by_group"] == [{"group": "x", "teachers": ["x/a", "x/b"], "collapsed": 2, "collapsed_id": 1, "seeds": 6,
                                  "per_teacher": [[2, 3], [0, 3]], "per_teacher_id": [[1, 3], [0, 3]]},
                                 {"group": "y", "teachers": ["y/a"], "collapsed": 2, "collapsed_id": 1, "seeds": 3,
                                  "per_teacher": [[2, 3]], "per_teacher_id": [[1, 3]]}]
    (g,) = study["by_group_fisher_exact"]
    # teachers as units: the 3 splits of teachers (2/3, 0/3 | 2/3) into groups of 2 and 1 give |rate difference|
    # 1/3 (observed), 2/3 ({2/3, 2/3} | 0/3), 1/3: p = 3/3, and the most lopsided split alone would give 1/3
    assert g["teacher_permutation"] == {"p_value": pytest.approx(1.0), "min_p_value": pytest.approx(1 / 3), "splits": 3}
    assert g["teacher_permutation_id"]["p_value"] == pytest.approx(1.0)
    # 2 of 6 vs 2 of 3 (margins 4 collapsed, 9 runs): P(k) = C(6,k) C(3,4-k) / C(9,4) for k = 1..4 = 6, 45, 60, 15
    # (/126); observed k = 2 (45), so p = (6 + 45 + 15) / 126
    assert (g["a"], g["b"]) == ("x", "y") and g["p_value"] == pytest.approx(66 / 126)
    md = (rdir / "collapse.md").read_text()
    assert "## Teachers pooled by group" in md
    assert "| x | 2/3, 0/3 | 2/6 (1) | y | 2/3 | 2/3 (1) | 0.524 | 1.000 | 1.000 (0.333) | 1.000 (0.333) |" in md
    assert "| x/a | 2/3 (1) | y/a | 2/3 (1) | 1.000 | 1.000 |" in md
    capsys.readouterr()
    for argv, msg in ((["--runs", "nolabel"], "expected LABEL=DIR"),
                      (["--runs", f"a={tmp_path / 'a'}", f"a={tmp_path / 'b'}"], "label 'a' given twice"),
                      (["--runs", f"a={tmp_path / 'none'}"], "is not a folder of srnet_eval runs"),
                      (["--runs", f"a={tmp_path / 'a'}", "--match", "+reweight"], "no finished mask run matches")):
        argv = argv + ([] if "--match" in argv else ["--match", "+poe"])
        assert SE.main(["collapse", *argv, "--report-dir", str(rdir)]) == 2
        assert msg in capsys.readouterr().err
