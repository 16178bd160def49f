"""scripts/kprune_eval.py's result cache: a key holds every method option (defaults included), and rows
written before that are re-keyed by the options they really ran with, so the 2026-11-30 change of two
Kprune defaults recomputes Kprune and reuses Kwon et al. and KCM."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparsebert.pruning.structured_api import method_options

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("kprune_eval_for_tests", ROOT / "scripts" / "kprune_eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


KE = _script()


def _prune_cfg(method, options, variant="full"):
    return {"kind": "prune", "teacher": "t", "task": "sst2", "method": method, "flops_keep": 0.4, "sample_seed": 0,
            "sample_tokens": 4096, "variant": variant, "options": options, "seq_len": "average", "dev": "d"}


def test_the_legacy_table_names_every_current_option():
    """Adding an option to a method must come with its value for the runs made before it existed."""
    for method in ("kprune", "kwon", "kcm"):
        assert set(KE.LEGACY_OPTIONS[method]) == set(method_options(method)), method
    # the only defaults that changed since those runs: Kprune's two authors'-code behaviours
    changed = {m: {k for k, v in KE.LEGACY_OPTIONS[m].items() if method_options(m)[k] != v} for m in KE.LEGACY_OPTIONS}
    assert changed == {"kprune": {"empty_sublayer_bias", "tune_unpruned_ffn"}, "kwon": set(), "kcm": set()}


def test_legacy_rows_are_rekeyed_by_what_they_ran_with(tmp_path):
    rows = []
    for method, variant, given in (("kprune", "full", {}), ("kwon", "full", {}), ("kcm", "full", {}),
                                   ("kprune", "no_tuning", {"weight_tuning": False})):
        cfg = _prune_cfg(method, given, variant)
        rows.append({"key": KE.key_of(cfg), "config": cfg, "preds": [0, 1]})
    speed_cfg = {"kind": "speed", "prune": rows[0]["key"], "batch": 8, "seq": 64, "reps": 5, "threads": 1}
    rows.append({"key": KE.key_of(speed_cfg), "config": speed_cfg})
    teacher = {"kind": "teacher", "task": "sst2"}
    rows.append({"key": KE.key_of(teacher), "config": teacher})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_text()
    res = KE.Results(path)
    assert path.read_text() == before  # the file is never rewritten
    assert len(res.rows) == len(rows)

    def now(method, given=None, variant="full"):  # the key a run made today computes
        return KE.key_of(_prune_cfg(method, KE.resolved_options(method, given or {}), variant))

    assert res.get(now("kwon")) is not None and res.get(now("kcm")) is not None  # unchanged defaults: reused
    assert res.get(now("kprune")) is None  # Kprune's defaults changed: recomputed
    assert res.get(now("kprune", {"weight_tuning": False}, "no_tuning")) is None
    old = res.get(KE.key_of(_prune_cfg("kprune", KE.LEGACY_OPTIONS["kprune"])))
    assert old is not None and old["legacy_key"] == rows[0]["key"]
    labels = sorted(KE.variant_label(r["config"]) for r in res.rows.values() if r["config"]["kind"] == "prune")
    assert labels == ["full", "full", "full@earlier", "no_tuning@earlier"]
    speed = [r for r in res.rows.values() if r["config"]["kind"] == "speed"]
    assert speed[0]["config"]["prune"] == old["key"] and speed[0]["key"] == KE.key_of(speed[0]["config"])


@pytest.mark.parametrize("given,label", [({}, "full"), ({"mu": 8.0}, "full@mu=8.0"),
                                         ({"empty_sublayer_bias": "keep", "tune_unpruned_ffn": True}, "full@earlier")])
def test_variant_label_names_options_off_the_variants_own(given, label):
    assert KE.variant_label(_prune_cfg("kprune", KE.resolved_options("kprune", given))) == label
    abl = _prune_cfg("kprune", KE.resolved_options("kprune", {"weight_tuning": False}), "no_tuning")
    assert KE.variant_label(abl) == "no_tuning"


def _records(task="mnli", n=60, classes=3):
    """A teacher and two methods x two seeds over `n` dev examples, shaped as the study writes them."""
    import torch
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g).tolist()
    binary = classes == 2
    teacher_cfg = {"kind": "teacher", "task": task, "backbone": "b", "max_length": 64, "train_examples": None,
                   "epochs": 3.0, "lr": 1e-4, "batch_size": 32, "seed": 0, "dev": "d"}
    tkey = KE.key_of(teacher_cfg)
    summ = {"accuracy": 0.6, "f1": 0.5 if binary else None, "majority_accuracy": 0.4,
            "constant_f1": 0.3 if binary else None, "one_class": False, "pred_counts": [20] * classes}
    recs = [{"key": tkey, "config": teacher_cfg, "train_steps": 10, "train_seconds": 1.0, "summary": summ,
             "labels": labels, "preds": labels, "dev_probs": [[1.0 / classes] * classes] * n}]
    for method in ("kprune", "kwon"):
        for seed in (0, 1):
            cfg = {**_prune_cfg(method, KE.resolved_options(method, {})), "task": task, "teacher": tkey,
                   "sample_seed": seed}
            preds = torch.randint(0, classes, (n,), generator=g).tolist()
            recs.append({"key": KE.key_of(cfg), "config": cfg, "preds": preds, "summary": {**summ, "one_class": False},
                         "agreement": 0.8, "mean_kl": 0.1, "flops_keep_reached": 0.4, "prune_seconds": 2.0,
                         "seq_len": 30.0})
    return recs


@pytest.mark.parametrize("classes", [3, 2])
def test_report_files_are_written_whole_and_hold_every_group(tmp_path, classes):
    import argparse
    import csv
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(classes=classes)))
    out = tmp_path / "report"
    KE.write_outputs(KE.Results(path), out, argparse.Namespace())
    assert sorted(p.name for p in out.iterdir()) == ["metric_vs_flops.png", "pairwise.csv", "results.json",
                                                     "table.csv", "tables.md"]  # no temporary file left
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert sorted(r["method"] for r in rows) == ["kprune", "kwon"] and all(r["seeds"] == "2" for r in rows)
    doc = json.loads((out / "results.json").read_text())
    assert doc["scale"]["mnli"]["runs"]["full @ 4096 tokens"]["sample_seeds"] == [0, 1]
    (pair,) = list(csv.DictReader((out / "pairwise.csv").open()))
    assert ("f1_diff" in pair) == (classes == 2)  # F1 only where the task is binary


def test_a_larger_pruning_sample_is_compared_with_the_same_method_on_the_same_seed(tmp_path):
    """A kprune run on a 100,000-token sample (seed 0) beside the 4,096-token runs (seeds 0, 1): the report pairs it
    with the 4,096-token kprune run of seed 0 (not seed 1, and not kwon), on the same dev examples."""
    import argparse
    import csv
    recs = _records()
    teacher = recs[0]
    small = next(r for r in recs[1:] if r["config"]["method"] == "kprune" and r["config"]["sample_seed"] == 0)
    cfg = {**small["config"], "sample_tokens": 100_000}
    big = {**small, "key": KE.key_of(cfg), "config": cfg, "preds": teacher["labels"]}  # every dev example right
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs + [big]))
    out = tmp_path / "report"
    KE.write_outputs(KE.Results(path), out, argparse.Namespace())
    pairs = list(csv.DictReader((out / "pairwise.csv").open()))
    (row,) = [p for p in pairs if p["sample_tokens"] == "100000 vs 4096"]
    labels = teacher["labels"]
    small_acc = sum(p == y for p, y in zip(small["preds"], labels)) / len(labels)
    assert (row["a"], row["b"], row["seeds"]) == ("kprune @100000", "kprune @4096", "1")
    assert float(row["accuracy_diff"]) == pytest.approx(1 - small_acc, abs=1e-5)
    assert int(row["a_only_right"]) == sum(p != y for p, y in zip(small["preds"], labels)) and row["b_only_right"] == "0"
    assert [p["sample_tokens"] for p in pairs].count("4096") == 1  # kprune vs kwon at 4,096 tokens, as before
    assert "| mnli | 100000 vs 4096 | 0.4 | kprune @100000 | kprune @4096 | 1 |" in (out / "tables.md").read_text()
    # two sizes at one budget: the size plot is drawn (the single-size report above has none)
    assert (out / "metric_vs_sample_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_without_results_refuses_and_leaves_the_output_alone(tmp_path, capsys):
    """A mistyped --runs must not replace a committed report with an empty one."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "table.csv").write_text("committed\n")
    with pytest.raises(SystemExit) as exc:
        KE.main(["--report-only", "--runs", str(tmp_path / "no_such_study"), "--out", str(out)])
    assert "--report-only: no results in" in str(exc.value) and "no_such_study" in str(exc.value)
    assert sorted(p.name for p in out.iterdir()) == ["table.csv"]
    assert (out / "table.csv").read_text() == "committed\n"


def test_a_study_reports_beside_its_runs_unless_out_names_a_folder(tmp_path):
    """Without --out the report goes to RUNS/report, never over the committed results/kprune (a side study
    run with the old default wrote its tables there)."""
    runs = tmp_path / "side_study"
    runs.mkdir()
    (runs / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    committed = sorted((p.name, p.stat().st_mtime_ns) for p in (ROOT / "results" / "kprune").iterdir())
    assert KE.main(["--report-only", "--runs", str(runs)]) == 0
    assert (runs / "report" / "tables.md").is_file()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (ROOT / "results" / "kprune").iterdir()) == committed
    assert KE.main(["--report-only", "--runs", str(runs), "--out", str(tmp_path / "named")]) == 0
    assert (tmp_path / "named" / "tables.md").is_file()


def test_ablation_runs_get_their_plot_and_a_study_without_them_does_not(tmp_path):
    import argparse
    recs = _records(classes=2)
    plain = tmp_path / "plain"
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    KE.write_outputs(KE.Results(tmp_path / "plain.jsonl"), plain, argparse.Namespace())
    assert not (plain / "ablations.png").exists()
    full = next(r for r in recs[1:] if r["config"]["method"] == "kprune")
    cfg = {**full["config"], "variant": "no_tuning", "options": KE.resolved_options("kprune", {"weight_tuning": False})}
    assert KE.variant_label(cfg) == "no_tuning"
    (tmp_path / "abl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + [{**full, "key": KE.key_of(cfg),
                                                                                       "config": cfg}]))
    out = tmp_path / "abl"
    KE.write_outputs(KE.Results(tmp_path / "abl.jsonl"), out, argparse.Namespace())
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_retrained_teacher_that_differs_from_its_record_stops_the_study(tmp_path):
    """Only the record survived (a study moved to another machine); the teacher trained again predicts one dev
    example differently: its weights are removed and the study stops, instead of pruning it under the old key."""
    weights = tmp_path / "ft" / "final"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    recorded = {"preds": [0, 1, 2, 1]}
    KE.check_retrained_teacher("mnli", recorded, [0, 1, 2, 1], weights, tmp_path)  # the same teacher: no error
    assert weights.is_dir()
    with pytest.raises(SystemExit) as exc:
        KE.check_retrained_teacher("mnli", recorded, [0, 1, 2, 0], weights, tmp_path)
    assert "differs from the teacher recorded" in str(exc.value) and "on 1 of 4 dev predictions" in str(exc.value)
    assert not weights.exists()
