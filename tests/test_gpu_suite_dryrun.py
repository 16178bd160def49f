"""The GPU suite's CPU dry run (scripts/gpu_suite.sh --dry-run): the script, its time accounting, its
output files (at most 8, at most 16 MiB each) and its closing targets table work before any GPU run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _run_suite(tmp_path, *args, timeout=900):
    out, copy = tmp_path / "out", tmp_path / "copy"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "SPARSEBERT_SUITE_START")}
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_suite.sh"), "--dry-run", "--out", str(out),
                           "--results-copy", str(copy), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out, copy


def _check_files(out, copy):
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert 0 < len(files) <= 8 and all(p.stat().st_size <= 16 * 1024 * 1024 for p in files)
    assert sorted(p.name for p in copy.iterdir()) == [p.name for p in files]
    (doc_path,) = [p for p in files if p.suffix == ".json"]
    stem = doc_path.name[: -len(".json")]
    assert all(p.name.startswith(stem) for p in files)
    return files, json.loads(doc_path.read_text())


def test_dry_run_whole_pipeline(tmp_path):
    stdout, out, copy = _run_suite(tmp_path, timeout=1200)
    files, doc = _check_files(out, copy)
    suffixes = sorted(p.name.rsplit("-", 1)[-1] if p.suffix == ".png" else p.suffix for p in files)
    assert suffixes == [".csv", ".json", ".log", ".xml", "density.png", "tokens.png"]
    assert doc["dry_run"] and doc["finished"] and doc["elapsed_s"] <= doc["total_budget_s"]
    assert [s["stage"] for s in doc["stages"]] == ["build", "tests", "bench"]
    assert all(s["status"] == "ok" for s in doc["stages"]), doc["stages"]
    assert doc["tests"]["passed"] >= 1 and doc["tests"]["failures"] == 0
    # every benchmark streamed rows, each carrying the environment and a roofline prediction
    benches = {r["bench"] for r in doc["rows"]}
    assert benches == {"masked_linear", "sparse_inference", "structured_speed"}
    for r in doc["rows"]:
        for field in ("git_sha", "gpu", "driver", "torch", "triton", "cuda", "cublas_bf16_reduced_precision",
                      "roofline_us"):
            assert field in r, (field, r)
    fused = [r for r in doc["rows"] if r["bench"] == "masked_linear" and r["version"] == "fused"]
    assert fused and all(r["max_rel_err_vs_unfused"] < 1e-4 for r in fused)
    # Triton launches were counted under the interpreter and turned into GPU compilation estimates
    tests_stage = doc["stages"][1]
    assert tests_stage["specialisations"] > 0 and tests_stage["gpu_compiles_full"] >= tests_stage["gpu_compiles_quick"] > 0
    # the last lines are the targets table, one line per target
    from targets import TARGETS
    tail = stdout.strip().splitlines()[-len(TARGETS):]
    assert [line.split()[0] for line in tail] == [t["id"] for t in TARGETS]
    assert all(line.split()[-1] in ("PASS", "MISS") or line.endswith("NOT RUN") for line in tail)


def test_dry_run_out_of_time_skips_and_says_so(tmp_path):
    """With no time left every stage is skipped, named as such, and the files and table still come out."""
    stdout, out, copy = _run_suite(tmp_path, "--total", "0.5")
    files, doc = _check_files(out, copy)
    assert [(s["stage"], s["status"]) for s in doc["stages"]] == [("build", "skipped"), ("tests", "skipped"),
                                                                  ("bench", "skipped")]
    assert "SKIPPED" in stdout and all(v["status"] == "NOT RUN" for v in doc["targets"])
    assert stdout.strip().splitlines()[-1].endswith("NOT RUN")


def test_targets_check_worst_row_decides():
    from targets import check

    rows = [dict(bench="sparse_inference", kind="linear", format="2:4", tokens=16, shape="768x768", speedup=1.2),
            dict(bench="sparse_inference", kind="linear", format="2:4", tokens=4096, shape="768x3072", speedup=0.9)]
    by_id = {v["id"]: v for v in check(rows)}
    assert by_id["2:4-never-slower"]["status"] == "MISS" and by_id["2:4-never-slower"]["measured"] == 0.9
    assert by_id["2:4-wide"]["status"] == "MISS" and by_id["2:4-wide"]["n_rows"] == 1
    assert by_id["kprune-bert-base"]["status"] == "NOT RUN"
    rows[1]["speedup"] = 1.15
    by_id = {v["id"]: v for v in check(rows)}
    assert by_id["2:4-wide"]["status"] == "PASS" and by_id["2:4-never-slower"]["status"] == "PASS"


def test_parse_junit_counts(tmp_path):
    from gpu_suite import parse_junit

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"><failure/></testcase>'
                   '<testcase classname="a" name="t3"><skipped/></testcase><testcase classname="a" name="t4"/>'
                   '</testsuite></testsuites>')
    got = parse_junit(xml)
    assert (got["passed"], got["failures"], got["skipped"], got["failed_tests"]) == (2, 1, 1, ["a::t2"])
    assert parse_junit(tmp_path / "missing.xml") == {"found": False}


def test_readme_lists_the_targets():
    from targets import markdown

    assert markdown() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("mode,most", [("quick", 2), ("full", None)])
def test_autotune_modes_choose_the_gpu_configs(mode, most):
    """SPARSEBERT_AUTOTUNE=quick leaves one or two configs per autotuned kernel (GPU config lists, i.e.
    with the interpreter off); full leaves all; anything else is refused by name."""
    code = ("from sparsebert.kernels import _gemm, bitmask_linear, bsr_linear, pruned_ffn, pruned_attention\n"
            "ks = [_gemm.linear_fwd_kernel, _gemm.linear_bwd_input_kernel, _gemm.linear_bwd_weight_kernel,\n"
            "      bitmask_linear._bitmask_linear_kernel, bsr_linear._bsr_linear_kernel,\n"
            "      pruned_ffn._gathered_linear_kernel, pruned_attention._attention_kernel]\n"
            "import json; print(json.dumps([len(k.configs) for k in ks]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEBERT_AUTOTUNE"] = mode
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    full = {9, 18, 20, 6, 4}
    assert all(1 <= c <= 2 for c in counts) if most else (set(counts) <= full and max(counts) > 2)


def test_autotune_mode_typo_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEBERT_AUTOTUNE"] = "qiuck"
    out = subprocess.run([sys.executable, "-c", "import sparsebert.kernels._autotune"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "SPARSEBERT_AUTOTUNE must be one of" in out.stderr
