"""`sparsebert srnet` and `sparsebert report`: bad arguments, and a tiny end-to-end run with its report."""
import json

import pytest

from sparsebert.cli import main

TINY = ["--model", "tiny", "--task", "synthetic", "--max-train", "48", "--max-eval", "32", "--max-ood", "32",
        "--batch-size", "16", "--max-length", "32", "--lr", "1e-3", "--no-progress"]


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.5"], "expected a number in (0, 1)"),
    (["--sparsity", "abc"], "expected a number in (0, 1)"),
    (["--paradigm", "z"], "invalid choice"),
    (["--loss", "focal"], "invalid choice"),
    (["--seeds", "0"], "positive integer"),
    (["--task", "imagenet"], "invalid choice"),
    (["--lr", "-1"], "positive number"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["srnet", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_model_and_options_are_clear_errors(tmp_path, capsys):
    assert main(["srnet", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["srnet", *TINY, "--paradigm", "c", "--search-from", "0.5", "--out", str(tmp_path)]) == 2
    assert "paradigm a" in capsys.readouterr().err
    assert main(["srnet", *TINY, "--granularity", "rows", "--out", str(tmp_path)]) == 2
    assert "granularity" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_end_to_end_run_resume_and_report(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["srnet", *TINY, "--paradigm", "dense", "c", "--loss", "ce", "--sparsity", "0.5", "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    assert "2 to run" in capsys.readouterr().out
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "run 2/2" in captured.err and "report:" in captured.out  # progress on stderr, results on stdout
    run = json.loads((out / "synthetic" / "c-ce-s0.5-constant-seed0" / "run.json").read_text())
    assert run["sparsity"] == pytest.approx(0.5, abs=1e-3) and run["config"]["model"] == "tiny"
    for name in ("synthetic.png", "synthetic.md", "summary.csv", "summary.json"):
        assert (out / "report" / name).stat().st_size > 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {r["method"] for r in summary} == {"dense ce", "c: mask on pre-trained (ce, constant)"}
    assert main(argv) == 0  # everything done: nothing reruns
    assert "(2 already done), 0 to run" in capsys.readouterr().out
    assert main(["report", str(out), "--report-dir", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "synthetic.png").is_file()
