"""`sparsebert demo` at its hidden test size: the closing table (rows, columns, stdout only), the report files,
resuming, and that the SRNet row's model is the mask-trained run's model."""
import csv
import json

import pytest
import torch

from sparsebert.cli import main
from sparsebert.cli import demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--out", str(out), "--size", "test"])
    return out, rc, buf.getvalue()


def _table(stdout):
    lines = stdout.splitlines()
    header = lines[0].split()
    rows = [l for l in lines[2:5]]
    return lines, header, rows


def test_table_has_the_three_models_and_every_column(demo_run):
    out, rc, stdout = demo_run
    assert rc == 0
    lines, header, rows = _table(stdout)
    # the first line of stdout is the table's header: progress went to stderr
    assert lines[0].split("  ")[0].strip() == "model"
    for col in demo.COLUMNS:
        assert col in lines[0], col
    assert set(lines[1]) <= {"-", " "}
    assert [r.split()[0] for r in rows] == list(demo.ROWS)
    assert lines[5].startswith(demo.MAJORITY_ROW) and "constant prediction" in lines[5]  # the baseline row
    assert lines[6] == ""  # exactly three models and the baseline, then the notes
    dense = rows[0]
    assert dense.count("1.00x") == 2  # dense against itself
    assert "50% FLOPs kept" in rows[2]
    assert f"{demo.SIZES['test'].sparsity:.0%} weights zero" in rows[1]
    notes = "\n".join(lines[7:])
    assert "format='auto'" in notes and "demo.png" in notes


def test_report_files_hold_the_same_numbers(demo_run):
    out, _, stdout = demo_run
    rep = out / "report"
    result = json.loads((rep / "demo.json").read_text())
    assert [r["model"] for r in result["rows"]] == list(demo.ROWS)
    assert (rep / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(rep / "demo.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == [*demo.ROWS, demo.MAJORITY_ROW]
    assert float(table[-1]["id_acc"]) == result["majority"]["id_acc"] and 0.3 <= result["majority"]["id_acc"] <= 0.7
    by = {r["model"]: r for r in result["rows"]}
    for r in result["rows"]:
        assert 0.0 <= r["id_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0
        assert all(v > 0 for v in r["latency_ms"].values())
        assert set(r["latency_ms"]) == set(r["speedup"]) == {str(b) for b in demo.LATENCY_BATCHES}
    assert by["dense"]["speedup"] == {"1": 1.0, "32": 1.0}
    assert abs(by["SRNet"]["sparsity"] - demo.SIZES["test"].sparsity) < 0.01
    assert by["Kprune"]["flops_keep"] <= 0.5 + 0.02
    assert by["Kprune"]["weight_bytes"] < by["dense"]["weight_bytes"]
    # the SRNet format summary covers every compressed layer
    assert sum(result["srnet_formats"].values()) == len(result["srnet_compress_choices"]) > 0
    assert demo.format_table(result["rows"], result["majority"]) in stdout
    # a model predicting one class is said so in the notes, and only then
    collapsed = [r["model"] for r in result["rows"] if r["one_class"]]
    assert ("predicts one class for every ID test example" in stdout) == bool(collapsed)
    # the demo's dense and SRNet rows score what their srnet runs recorded on the same test halves
    for name, key in (("dense", "dense_run"), ("SRNet", "srnet_run")):
        run = json.loads((out / "srnet" / "synthetic" / result[key].split("/")[-1] / "run.json").read_text())
        assert by[name]["id_acc"] == pytest.approx(run["last"]["id"], abs=1e-9)
        assert by[name]["ood_acc"] == pytest.approx(run["last"]["ood"], abs=1e-9)


def test_srnet_row_is_the_mask_trained_model(demo_run):
    """The dense-with-zeros model the demo compresses computes what the saved masked model computes."""
    from sparsebert.checkpoint import load_checkpoint
    from sparsebert.nn import sparsify
    from sparsebert.pruning.srnet import MODEL_FILE, Runner, build_model
    out, _, _ = demo_run
    result = json.loads((out / "report" / "demo.json").read_text())
    run_dir = out / "srnet" / "synthetic" / result["srnet_run"].split("/")[-1]
    cfg_json = json.loads((run_dir / "run.json").read_text())["config"]
    from sparsebert.pruning.srnet import SRNetConfig
    cfg = SRNetConfig(**cfg_json)
    runner = Runner(out / "srnet", progress=False, log_fn=None)
    data = runner.data(cfg)
    sub = demo._subnetwork_model(runner, cfg, data).eval()
    masked = sparsify(build_model(cfg, data, cfg.seed), mode="mask", include_classifier=True)
    masked.load_state_dict(load_checkpoint(run_dir / MODEL_FILE))
    masked.eval()
    batch = next(iter(data.loader("id_test", batch_size=16)))
    x = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(sub(**x).logits, masked(**x).logits, rtol=1e-5, atol=1e-5)
    zeros = sum(int((m.weight == 0).sum()) for n, m in sub.named_modules() if n.startswith("bert.encoder")
                and isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for n, m in sub.named_modules() if n.startswith("bert.encoder")
                and isinstance(m, torch.nn.Linear))
    assert zeros / total == pytest.approx(demo.SIZES["test"].sparsity, abs=0.01)


def test_rerun_resumes_the_training_runs(demo_run, capsys):
    out, _, _ = demo_run
    runs = sorted((out / "srnet" / "synthetic").glob("*/run.json"))
    assert len(runs) == 2
    before = {p: p.stat().st_mtime_ns for p in runs}
    assert main(["demo", "--out", str(out), "--size", "test"]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    assert capsys.readouterr().out.splitlines()[0].startswith("model")


def test_backbone_folder_is_named_by_what_it_is(tmp_path):
    a = demo.write_backbone(tmp_path, demo.SIZES["test"])
    assert demo.write_backbone(tmp_path, demo.SIZES["test"]) == a
    b = demo.write_backbone(tmp_path, demo.SIZES["default"])
    assert a != b and (b / "config.json").is_file() and (a / "vocab.txt").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
    cfg = json.loads((b / "config.json").read_text())
    d = demo.SIZES["default"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (d.hidden, d.layers, d.ffn)


def test_bad_out_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err


def test_measure_latency_interleaves_and_reports_each_batch():
    calls = []

    class M(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, input_ids, attention_mask):
            calls.append((self.name, input_ids.shape[0]))
            return input_ids.float().sum()

    x = {"input_ids": torch.randint(0, 9, (32, 7)), "attention_mask": torch.ones(32, 7, dtype=torch.long)}
    lat = demo.measure_latency({"a": M("a"), "b": M("b")}, x, reps=4, warmup=1)
    assert set(lat) == {"a", "b"} and all(set(v) == {1, 32} and min(v.values()) > 0 for v in lat.values())
    timed = [c for c in calls if c[1] == 1][2:]  # after the warm-up
    assert timed == [("a", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("a", 1)]


def test_notes_name_a_collapsed_model_and_only_it(demo_run):
    out, _, _ = demo_run
    result = json.loads((out / "report" / "demo.json").read_text())
    result["files"] = ["demo.json"]
    for r in result["rows"]:
        r["one_class"] = r["model"] == "SRNet"
    notes = demo.format_notes(result)
    assert notes.splitlines()[0].startswith("SRNet predicts one class for every ID test example")
    for r in result["rows"]:
        r["one_class"] = False
    assert "one class" not in demo.format_notes(result)
