"""scripts/demo_seeds.py at the demo's seconds-long test size: the demo's SRNet runs under several seeds, the
report files and their numbers, resuming, and bad --seeds."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "scripts" / "demo_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo_seeds")
    mod = _module()
    rc = mod.main(["--size", "test", "--seeds", "0", "3", "--out", str(tmp / "runs"), "--report-dir",
                   str(tmp / "report")])
    return mod, tmp, rc


def test_report_files_and_numbers(study):
    mod, tmp, rc = study
    assert rc == 0
    report = tmp / "report"
    assert sorted(p.name for p in report.iterdir()) == ["seeds.csv", "seeds.json", "seeds.png", "summary.md"]
    doc = json.loads((report / "seeds.json").read_text())
    rows = list(csv.DictReader((report / "seeds.csv").open()))
    assert [(int(r["seed"]), r["model"]) for r in rows] == [(0, "dense"), (0, "SRNet"), (3, "dense"), (3, "SRNet")]
    for name in mod.MODELS:
        for split, col in (("id_test", "id_acc"), ("ood_test", "ood_acc")):
            accs = [float(r[col]) for r in rows if r["model"] == name]
            cell = doc["summary"][f"{name}/{split}"]
            assert cell["n_seeds"] == 2 and cell["low"] <= cell["mean"] <= cell["high"]
            assert cell["mean"] == pytest.approx(sum(accs) / len(accs))  # same example count for every seed
            assert 0.0 < cell["majority_accuracy"] <= 1.0
    # the SRNet rows carry the mask run's sparsity, the dense rows none
    assert all(float(r["sparsity"]) > 0.5 for r in rows if r["model"] == "SRNet")
    assert all(float(r["sparsity"]) == 0.0 for r in rows if r["model"] == "dense")
    text = (report / "summary.md").read_text()
    assert "majority class" in text and "| 3 |" in text and "SRNet - dense (paired)" in text
    for split in mod.SPLITS:  # the paired difference is the difference of the two means
        d = doc["summary"][f"SRNet-dense/{split}"]
        assert d["mean"] == pytest.approx(doc["summary"][f"SRNet/{split}"]["mean"] - doc["summary"][f"dense/{split}"]["mean"])


def test_seeds_differ_and_resume_reuses_runs(study):
    mod, tmp, _ = study
    runs = sorted(p.name for p in (tmp / "runs" / "srnet").rglob("*seed*") if p.is_dir())
    assert any("seed0" in r for r in runs) and any("seed3" in r for r in runs)
    before = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*.safetensors")}
    assert mod.main(["--size", "test", "--seeds", "3", "--out", str(tmp / "runs"), "--report-dir",
                     str(tmp / "report3")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*.safetensors")} == before  # nothing retrained


@pytest.mark.parametrize("seeds", [["1", "1"], ["-2"]])
def test_bad_seeds_are_refused_before_any_run(tmp_path, seeds, capsys):
    with pytest.raises(SystemExit) as e:
        _module().main(["--size", "test", "--seeds", *seeds, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_another_mask_recipe_runs_in_its_own_folder_and_is_recorded(study):
    mod, tmp, _ = study
    assert mod.main(["--size", "test", "--seeds", "3", "--lr-scores", "0.05", "--out", str(tmp / "runs"),
                     "--report-dir", str(tmp / "report_lr")]) == 0
    run = next((tmp / "runs" / "srnet-lr_scores0.05").rglob("a-*seed3"))
    assert json.loads((run / "run.json").read_text())["config"]["lr_scores"] == 0.05
    doc = json.loads((tmp / "report_lr" / "seeds.json").read_text())
    assert doc["settings"]["recipe_changes"] == {"lr_scores": 0.05}


@pytest.mark.parametrize("flag,value", [("--lr-scores", "0"), ("--mask-epochs", "nan"), ("--lr-scores", "-1")])
def test_bad_recipe_values_are_refused_before_any_run(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        _module().main(["--size", "test", flag, value, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
