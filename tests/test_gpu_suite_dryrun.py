"""The GPU suite's CPU dry run (scripts/gpu_suite.sh --dry-run): the script, its time accounting, its
output files (at most 8, at most 16 MiB each) and its closing targets table work before any GPU run.
Also: the crossover sweep's derivation and table (bench/bench_crossover.py) and `sparsebert bench --suite gpu`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    (doc_path,) = [p for p in files if p.suffix == ".json" and not p.name.endswith("-crossover.json")]
    stem = doc_path.name[: -len(".json")]
    assert all(p.name.startswith(stem) for p in files)
    return files, json.loads(doc_path.read_text())


def test_dry_run_whole_pipeline(tmp_path):
    stdout, out, copy = _run_suite(tmp_path, timeout=1200)
    files, doc = _check_files(out, copy)
    suffixes = sorted(p.name.rsplit("-", 1)[-1] if p.suffix == ".png" or p.name.endswith("-crossover.json")
                      else p.suffix for p in files)
    assert suffixes == [".csv", ".json", ".log", ".xml", "crossover.json", "density.png", "tokens.png"]
    assert doc["dry_run"] and doc["finished"] and doc["elapsed_s"] <= doc["total_budget_s"]
    assert [s["stage"] for s in doc["stages"]] == ["build", "tests", "sanitize", "crossover", "bench", "profile"]
    assert all(s["status"] == "ok" for s in doc["stages"]), doc["stages"]
    # CPU time per stage is accounted, and the dry run stays a dry run: under 60 s of CPU when it was written
    # (issue 8), 67 s in a CI run beside a second busy process, while full-size shapes slipping into it would
    # cost thousands of seconds. The bound catches that slip; it is not a timing claim, so it leaves room for a
    # loaded CI machine.
    assert all(s["cpu_seconds"] > 0 for s in doc["stages"])
    assert sum(s["cpu_seconds"] for s in doc["stages"]) < 240, [(s["stage"], s["cpu_seconds"]) for s in doc["stages"]]
    assert doc["tests"]["passed"] >= 1 and doc["tests"]["failures"] == 0
    # every benchmark streamed rows, each carrying the environment and a roofline prediction
    benches = {r["bench"] for r in doc["rows"]}
    assert benches == {"masked_linear", "sparse_inference", "structured_speed", "crossover", "op_overhead",
                       "mask_training_step"}
    for r in doc["rows"]:
        # op_overhead times the host path of a call: no bytes or FLOPs to put a roofline on
        for field in ("git_sha", "gpu", "driver", "torch", "triton", "cuda", "cublas_bf16_reduced_precision",
                      *(("roofline_us",) if r["bench"] != "op_overhead" else ())):
            assert field in r, (field, r)
    overhead = {(r["op"], r["path"]) for r in doc["rows"] if r["bench"] == "op_overhead"}
    assert ("score_masked_linear", "eager fast path") in overhead and ("score_masked_linear", "registered op") in overhead
    steps = {r["variant"]: r for r in doc["rows"] if r["bench"] == "mask_training_step"}
    assert set(steps) == {"dense", "masked"} and steps["dense"]["time_vs_dense"] == 1.0
    assert all(r["step_ms"] > 0 for r in steps.values())
    fused = [r for r in doc["rows"] if r["bench"] == "masked_linear" and r["version"] == "fused"]
    assert fused and all(r["max_rel_err_vs_unfused"] < 1e-4 for r in fused)
    # the crossover stage: measured rows in the JSON, and a table file the package's loader accepts
    cross = [r for r in doc["rows"] if r["bench"] == "crossover"]
    assert {r["op"] for r in cross} == {"masked_linear", "score_masked_linear"}
    assert all(r["fused_ms"] > 0 and r["weight_pass_ms"] > 0 for r in cross)
    from sparsebert.ops import _crossover
    table_path = out / doc["crossover"]["file"]
    table = _crossover.load_table(str(table_path))
    gpu = doc["environment"]["gpu"]
    assert table["gpus"][gpu] == doc["crossover"]["tokens"]
    assert set(table["gpus"][gpu]) == {"masked_linear", "score_masked_linear"}
    for op in _crossover.OPS:
        assert _crossover.crossover_tokens(op, gpu, torch.float32, table) in (0, 16, 32, 64)
    # Triton launches were counted under the interpreter and turned into GPU compilation estimates
    sanitize = doc["stages"][2]  # the kernels' sanitizer script, on the interpreter in a dry run
    assert sanitize["steps"][0]["status"] == "ok" and sanitize["steps"][0]["sanitizer"] is None
    profile = doc["stages"][5]  # the profile cases without ncu (interpreter, tiny shapes), checked against F.linear
    assert profile["steps"][0]["status"] == "ok" and profile["steps"][0]["profiler"] is None
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
                                                                  ("sanitize", "skipped"), ("crossover", "skipped"),
                                                                  ("bench", "skipped"), ("profile", "skipped")]
    assert doc["crossover"] is None
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


# ------------------------------------------------------------------------------------------------ crossover
def _points(fused_wins_at, tokens, shapes, margin=0.05):
    """Synthetic (fused ms, weight-pass ms): the fused path 20% faster where listed, 20% slower elsewhere."""
    return {(m, k, n): ((0.8, 1.0) if m in fused_wins_at else (1.2, 1.0)) for m in tokens for k, n in shapes}


def test_crossover_derivation():
    from bench_crossover import derive

    tokens, shapes = [16, 32, 64, 128, 256], [(8, 16), (16, 8)]
    assert derive(_points({16, 32}, tokens, shapes), tokens, shapes, 0.05)[0] == 64
    # a noisy win below a loss: the weight pass from just above the LARGEST win
    assert derive(_points({16, 64}, tokens, shapes), tokens, shapes, 0.05)[0] == 128
    assert derive(_points(set(), tokens, shapes), tokens, shapes, 0.05)[0] == 0  # never fused
    assert derive(_points(set(tokens), tokens, shapes), tokens, shapes, 0.05)[0] == 512  # fused through the sweep
    # the fused path must win at EVERY shape, by more than the margin
    pts = _points({16, 32}, tokens, shapes)
    pts[(32, 16, 8)] = (0.97, 1.0)
    assert derive(pts, tokens, shapes, 0.05)[0] == 32
    # measured top-down: no win yet and the sweep unfinished is undetermined; a win determines it
    partial = {key: v for key, v in _points({32}, tokens, shapes).items() if key[0] >= 64}
    assert derive(partial, tokens, shapes, 0.05)[0] is None
    partial.update({key: v for key, v in _points({32}, tokens, shapes).items() if key[0] == 32})
    assert derive(partial, tokens, shapes, 0.05)[0] == 64
    # a token count measured at one shape only does not count
    partial = {key: v for key, v in _points({32}, tokens, shapes).items() if key[0] >= 64 or key == (32, 8, 16)}
    assert derive(partial, tokens, shapes, 0.05)[0] is None


def test_crossover_table_is_read_by_the_dispatch(tmp_path):
    from bench_crossover import write_table
    from sparsebert.ops import _crossover

    env = {"git_sha": "abc", "torch": "t", "triton": "tr", "cuda": "c", "driver": "d"}
    path = tmp_path / "crossover.json"
    write_table(path, "NVIDIA H200", {("masked_linear", "bfloat16"): 256, ("score_masked_linear", "float16"): 0},
                env, 0.05, [16, 32])
    table = _crossover.load_table(str(path))
    assert _crossover.crossover_tokens("masked_linear", "NVIDIA H200", torch.bfloat16, table) == 256
    assert _crossover.crossover_tokens("score_masked_linear", "NVIDIA H200", torch.float16, table) == 0
    # what was not measured keeps the default; the package's own entries are kept
    assert _crossover.crossover_tokens("masked_linear", "NVIDIA H200", torch.float16, table) == table["default_tokens"]
    package = _crossover.load_table(_crossover.TABLE_PATH)
    assert all(table["gpus"][g] == e for g, e in package["gpus"].items() if g != "NVIDIA H200")
    assert table["measured"]["NVIDIA H200"]["git_sha"] == "abc"
    assert table["measured"]["NVIDIA H200"]["entries"] == ["masked_linear/bfloat16", "score_masked_linear/float16"]
    # a GPU's use_weight_pass decision reads the table (CPU tensors never take the weight pass)
    assert not _crossover.use_weight_pass("masked_linear", torch.device("cpu"), torch.bfloat16, 10 ** 6, table)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_bench_suite_gpu_arguments(tmp_path, monkeypatch, capsys):
    from sparsebert import cli
    from sparsebert.cli import bench

    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "--suite", "gpu", "--dry-run", "--out", str(tmp_path / "o"), "--", "--total", "30"]) == 0
    (cmd, cwd), = calls
    assert cmd == [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(tmp_path / "o"),
                   "--total", "30"]
    assert Path(cwd) == ROOT
    # options that belong to --suite gpu only, and --cpu with it, are refused by name before anything runs
    calls.clear()
    assert cli.main(["bench", "--dry-run"]) == 2
    assert cli.main(["bench", "--suite", "masked_linear", "--out", "x"]) == 2
    assert cli.main(["bench", "--suite", "gpu", "--cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--dry-run and --out apply to --suite gpu only" in err and "--cpu does not apply" in err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--suite", "gpu"]) == 2
        assert "add --dry-run" in capsys.readouterr().err
    assert calls == []


def test_cli_bench_without_the_repository_bench_folder(tmp_path, monkeypatch, capsys):
    from sparsebert import cli
    from sparsebert.cli import bench

    real_bench_dir = bench.bench_dir
    monkeypatch.setattr(bench, "bench_dir", lambda root=None: real_bench_dir(tmp_path))  # an installed package
    monkeypatch.setattr(bench.subprocess, "call", lambda *a, **k: pytest.fail("nothing may run"))
    assert cli.main(["bench", "--suite", "gpu", "--dry-run"]) == 2
    assert "no bench/ folder" in capsys.readouterr().err
    (tmp_path / "bench").mkdir()
    assert cli.main(["bench", "--suite", "gpu", "--dry-run"]) == 2
    assert "no gpu_suite.py" in capsys.readouterr().err



@pytest.mark.parametrize("cutlass_rc", [0, 1])
def test_build_with_cutlass_falls_back_without_it(tmp_path, monkeypatch, cutlass_rc):
    """The GPU build (here with its commands recorded, not run): with the CUTLASS headers importable, first a
    build with them; if it fails, one without them (SPARSEBERT_NO_CUTLASS=1), so the tests keep an extension."""
    import gpu_suite

    args = gpu_suite.build_parser().parse_args(["--out", str(tmp_path / "out"), "--results-copy", str(tmp_path / "c")])
    suite = gpu_suite.Suite(args)
    calls = []

    def fake_run(cmd, budget, env):
        calls.append((cmd, env.get("SPARSEBERT_NO_CUTLASS")))
        rc = cutlass_rc if len(calls) == 1 else 0
        return {"cmd": " ".join(cmd), "rc": rc, "status": "ok" if rc == 0 else f"failed (rc {rc})", "seconds": 1.0,
                "cpu_seconds": 1.0, "limit_s": budget}

    monkeypatch.setattr(suite, "run", fake_run)
    monkeypatch.setattr(gpu_suite, "_has_module", lambda name: name == "cutlass_library")
    steps = suite.build_steps(180.0)
    builds = [c for c in calls if "build_ext" in c[0]]
    if cutlass_rc == 0:
        assert [flag for _, flag in builds] == [None] and steps[0]["cutlass"]
    else:
        assert [flag for _, flag in builds] == [None, "1"]
    assert "import sparsebert._C" in " ".join(calls[-1][0])
    monkeypatch.setattr(gpu_suite, "_has_module", lambda name: False)
    calls.clear()
    suite.build_steps(180.0)
    assert [flag for c, flag in calls if "build_ext" in c] == ["1"]


def test_replot_draws_graph_speedups_of_a_suite_json(tmp_path):
    """--replot redraws a committed run's plots on another basis; a row without a graph time is left out of
    a "graph" plot, and masked-linear rows get their graph ratio from graph_ms when the run predates it."""
    import gpu_suite

    env = {"gpu": "G", "torch": "t", "triton": "tr", "git_sha": "abc"}
    rows = [dict(bench="sparse_inference", kind="linear", format="bsr64", density=0.1, tokens=1, shape="768x768",
                 speedup=0.05, graph_speedup=1.4),
            dict(bench="sparse_inference", kind="linear", format="bitmask", density=0.1, tokens=4096,
                 shape="768x768", speedup=0.1, graph_speedup=float("nan")),
            dict(bench="masked_linear", version="dense", mode="fwd", tokens=8, shape="768x768", graph_ms=0.004),
            dict(bench="masked_linear", version="fused", mode="fwd", tokens=8, shape="768x768", graph_ms=0.02,
                 time_vs_dense=40.0)]
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"environment": env, "rows": rows}))
    assert gpu_suite.main(["--replot", str(src), "--plot-basis", "graph", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g-speedup-vs-density.png").stat().st_size > 0
    assert (tmp_path / "g-speedup-vs-tokens.png").stat().st_size > 0
    assert gpu_suite._speedup(rows[0], "graph") == 1.4 and gpu_suite._speedup(rows[1], "graph") is None
    assert gpu_suite._speedup(rows[1], "auto") == 0.1
    with pytest.raises(SystemExit):
        gpu_suite.main(["--replot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])


def test_sanitize_script_bound_flags_a_wrong_tile():
    """The sanitizer script's check: the exact product passes its bound, a product missing one weight fails."""
    import sanitize_kernels as S

    torch.manual_seed(0)
    x, w, b = torch.randn(7, 96), torch.randn(11, 96), torch.randn(11)
    assert S._max_excess(torch.nn.functional.linear(x, w, b), x, w, b) <= 1.0
    w_missing = w.clone()
    w_missing[3, (x[0] * w[3]).abs().argmax()] = 0
    assert S._max_excess(torch.nn.functional.linear(x, w_missing, b), x, w, b) > 1.0


# an `ncu --csv --page raw` report as Nsight Compute writes it: messages, a header, a units row, one row per kernel
_NCU_RAW = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
OK        spmm64: max error / bound = 0.006
==PROF== Profiling "bitmask_spmm_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed","launch__grid_size","launch__block_size","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_membar_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"
"","","","","","","","","","","","usecond","%","%","","","register/thread","%","inst","inst","inst","inst","inst"
"0","4242","python3.12","gpu","void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>>","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","1.18","0.31","0.52","1","128","16","6.02","0.50","0","0","1.10","1"
"1","4242","python3.12","gpu","void sparsebert::cuda::bitmask_spmm_kernel<__nv_bfloat16, 8>","1","7","(128, 1, 1)","(12, 6, 1)","0","9.0","35.87","1.94","3.05","72","128","80","6.21","3.20","1.95","41.70","0.80","1"
"""


def test_parse_ncu_raw_csv_keeps_kernels_metrics_and_top_stalls():
    """The profile stage's reading of ncu's raw page: one entry per kernel, the whitelisted metrics as numbers
    with the duration's unit, the three largest stall reasons in order; no table -> no kernels."""
    import profile_kernels as P

    kernels = P.parse_ncu_csv(_NCU_RAW)
    assert [k["kernel"].split("<")[0] for k in kernels] == ["void at::native::vectorized_elementwise_kernel",
                                                          "void sparsebert::cuda::bitmask_spmm_kernel"]
    spmm = kernels[1]
    assert spmm["duration"] == 35.87 and spmm["duration_unit"] == "usecond"
    assert (spmm["grid"], spmm["block"], spmm["regs"], spmm["occupancy_pct"]) == (72, 128, 80, 6.21)
    assert list(spmm["stalls"]) == ["membar", "long_scoreboard", "barrier"]
    line = P.summary_line(spmm)
    assert "35.87 usecond" in line and "membar 41.7" in line
    assert P.parse_ncu_csv("==PROF== ERR_NVGPUCTRPERM - no permission\n") == []


def test_profile_stage_runs_ncu_per_case_and_keeps_parsed_kernels(tmp_path, monkeypatch):
    """The GPU profile stage (ncu replaced by a recorder that writes the report): one ncu process per case with
    the profiler-window options, the kernels parsed into the step, and a counter-permission failure ending
    the stage with the reason instead of failing every case."""
    import gpu_suite
    import profile_kernels as P

    args = gpu_suite.build_parser().parse_args(["--out", str(tmp_path / "out"), "--results-copy", str(tmp_path / "c"),
                                                "--profile-cases", "spmm64", "bitmask16"])
    suite = gpu_suite.Suite(args)
    calls = []

    def fake_run(cmd, budget, env):
        calls.append(cmd)
        report = Path(cmd[cmd.index("--log-file") + 1])
        report.write_text(_NCU_RAW)
        return {"cmd": " ".join(cmd), "rc": 0, "status": "ok", "seconds": 1.0, "cpu_seconds": 1.0, "limit_s": budget}

    monkeypatch.setattr(suite, "run", fake_run)
    monkeypatch.setattr(gpu_suite, "find_tool", lambda name: "/usr/bin/ncu")
    steps = suite.profile_steps(40.0)
    assert [s["case"] for s in steps] == ["spmm64", "bitmask16"]
    assert all(c[0] == "/usr/bin/ncu" and c[1:1 + len(P.NCU_ARGS)] == P.NCU_ARGS for c in calls)
    assert [c[-1] for c in calls] == ["spmm64", "bitmask16"]
    assert steps[0]["kernels"][1]["duration"] == 35.87

    def no_permission(cmd, budget, env):
        calls.append(cmd)
        Path(cmd[cmd.index("--log-file") + 1]).write_text("==ERROR== ERR_NVGPUCTRPERM - The user does not have "
                                                          "permission to access NVIDIA GPU Performance Counters\n")
        return {"cmd": " ".join(cmd), "rc": 1, "status": "failed (rc 1)", "seconds": 1.0, "cpu_seconds": 1.0,
                "limit_s": budget}

    monkeypatch.setattr(suite, "run", no_permission)
    calls.clear()
    steps = suite.profile_steps(40.0)
    assert len(calls) == 1 and "ERR_NVGPUCTRPERM" in steps[0]["reason"] and steps[0]["kernels"] == []


def _junit(path, cases):
    """A JUnit report: cases = [(classname, name, "pass" | "fail" | "error")]."""
    body = "".join(f'<testcase classname="{c}" name="{n}">' + ("<failure/>" if s == "fail" else "<error/>" if s == "error"
                                                               else "") + "</testcase>" for c, n, s in cases)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite tests="{len(cases)}" failures='
                    f'"{sum(s == "fail" for _, _, s in cases)}" errors="{sum(s == "error" for _, _, s in cases)}" '
                    f'skipped="0">{body}</testsuite></testsuites>')


def test_previous_failure_files_come_from_the_newest_report(tmp_path):
    import gpu_suite

    _junit(tmp_path / "nvidia-h200-2026-11-30-aaaa-tests.junit.xml",
           [("tests.test_gpu_kernels", "test_a[x]", "fail"), ("tests.test_ops", "test_b", "pass")])
    assert gpu_suite.previous_failure_files(tmp_path) == ["tests/test_gpu_kernels.py"]
    _junit(tmp_path / "nvidia-h200-2026-12-05-bbbb.junit.xml",
           [("tests.test_sparse_format_kernels", "test_c", "error"), ("tests.test_gone_since", "test_d", "fail"),
            ("tests.test_gpu_kernels", "test_a[x]", "pass")])
    assert gpu_suite.previous_failure_files(tmp_path) == ["tests/test_sparse_format_kernels.py"]
    assert gpu_suite.previous_failure_files(tmp_path / "none") == []


def test_test_stage_runs_previous_failures_first_and_merges_reports(tmp_path, monkeypatch):
    """GPU test stage (pytest recorded, not run): the files that failed last time first, then the rest with those
    files ignored; the two JUnit reports merged into the run's one file, counts summed."""
    import gpu_suite

    results = tmp_path / "results"
    results.mkdir()
    _junit(results / "g-2026-11-30-aaaa-tests.junit.xml", [("tests.test_gpu_kernels", "test_a", "fail")])
    args = gpu_suite.build_parser().parse_args(["--out", str(tmp_path / "out"), "--results-copy", str(results),
                                                "--test-workers", "1"])
    suite = gpu_suite.Suite(args)
    calls = []

    def fake_run(cmd, budget, env):
        calls.append(cmd)
        report = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
        _junit(report, [("tests.test_gpu_kernels", "test_a", "pass")] if len(calls) == 1 else
               [("tests.test_ops", "test_b", "pass"), ("tests.test_ops", "test_c", "fail")])
        return {"cmd": " ".join(cmd), "rc": 0, "status": "ok", "seconds": 1.0, "cpu_seconds": 1.0, "limit_s": budget}

    monkeypatch.setattr(suite, "run", fake_run)
    steps = suite.test_steps(100.0)
    assert calls[0][-3:] == ["-m", "cuda", "tests/test_gpu_kernels.py"] and "first" in steps[0]
    assert calls[1][-3:] == ["-m", "cuda", "--ignore=tests/test_gpu_kernels.py"]
    assert (suite.tests["tests"], suite.tests["passed"], suite.tests["failures"]) == (3, 2, 1)
    assert suite.tests["failed_tests"] == ["tests.test_ops::test_c"]


def test_find_tool_looks_past_path(tmp_path, monkeypatch):
    """ncu / compute-sanitizer: PATH first, then $CUDA_HOME/bin (the CUDA images keep the tools off PATH)."""
    import gpu_suite

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert gpu_suite.find_tool("ncu-test-tool") is None
    tool = tmp_path / "cuda" / "bin" / "ncu-test-tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert gpu_suite.find_tool("ncu-test-tool") == str(tool)
