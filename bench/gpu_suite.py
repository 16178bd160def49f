"""The GPU suite: build, GPU correctness tests, benchmarks, in one self-timed run (`bash scripts/gpu_suite.sh`).

Stages, each with its own time budget inside the total (default 570 s: a device call's 600 s limit less a
30 s margin), each run under `timeout`, a failed or timed-out stage never stopping the next ones:

    build   TORCH_CUDA_ARCH_LIST=9.0a, all cores: `setup.py build_ext --inplace` (fallback: pip install -e),
            with the CUTLASS GEMMs when their wheel is importable (fallback: without them)
    tests   SPARSEBERT_TEST_GPU=1 SPARSEBERT_AUTOTUNE=quick pytest -m cuda (170 s; JUnit XML -> pass/fail
            counts): first the test files that failed in the newest committed GPU run, then the others
    sanitize   bench/sanitize_kernels.py under compute-sanitizer (45 s): racecheck on the 8-warp looping
            tiles the first run found wrong, memcheck on the format and CUDA kernels (ERROR SUMMARY recorded)
    crossover  bench/bench_crossover.py (50 s): the token count from which `auto` takes the weight pass, per
            op and dtype (bf16 first); before the benchmarks because its result is a library setting, theirs
            a report; writes <stem>-crossover.json, the table to commit as sparsebert/ops/crossover.json
    bench   the benchmark scripts in priority order, each given a slice of what is left (less the profile
            stage's budget); a script that would not fit its minimum is skipped and listed as such
    profile bench/profile_kernels.py under Nsight Compute (60 s): one call per case of the first run's worst
            misses (the CUDA bitmask SpMM at 64 tokens, the Triton bitmask kernel, the score-masked op, ...),
            each kernel's duration, SM / memory throughput, occupancy and top warp stalls in the JSON

Everything measured lands as it goes (after every stage and benchmark; benchmark rows are streamed
row by row, so a killed script keeps its finished rows) in the output folder (--out, else $OUT, else
bench/results/suite-<stamp>) as at most 8 files of at most 16 MiB: <stem>.json (all results, stage
times and CPU times, test counts, Triton compilation counts, crossover table, targets), <stem>.csv (rows),
<stem>.log, <stem>.junit.xml, <stem>-crossover.json, <stem>-speedup-vs-density.png,
<stem>-speedup-vs-tokens.png, with stem = <gpu>-<date>-<sha>; the same
files are copied to bench/results/. The last lines printed are the targets table (bench/targets.py).

Triton compilations: TRITON_CACHE_DIR is .triton-cache/ in the repo (git-ignored); each stage reports
the compiled kernels its run added to the cache (GPU) and the kernel specialisations it launched with
the compilations they mean in quick/full autotuning (counted under the interpreter on a CPU). Stage
time estimates from those counts: see bench/README.md.

--dry-run (on a CPU): the same pipeline with the interpreter (TRITON_INTERPRET=1), tiny shapes
(--smoke) and an import check instead of the build, so the script, its time accounting, its table and
its files are exercised before any GPU run; tests/test_gpu_suite_dryrun.py runs it in CI.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _results import RESULTS_DIR, environment, slug  # noqa: E402
from targets import check, table  # noqa: E402

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 1024 * 1024
START = float(os.environ.get("SPARSEBERT_SUITE_START") or time.time())

# Benchmarks in priority order: (name, minimum seconds worth starting with, share of the bench budget,
# SPARSEBERT_AUTOTUNE, GPU arguments, dry-run arguments). Quick autotuning keeps the compilations inside
# the nine minutes; --bench-autotune full tunes every config (a longer, dedicated run).
BENCHMARKS = [
    ("masked_linear", 60, 0.30, "quick", ["bench/bench_masked_linear_gpu.py", "--tokens", "512", "4096", "16384", "64"],
     ["bench/bench_masked_linear_gpu.py", "--smoke", "--backend", "torch"]),
    # the target cells first (tokens 1/16/64 and 4096; densities 0.5/0.3/0.1; bitmask, BSR-64, 2:4), each
    # also CUDA-graphed: the first GPU run's full sweep (465 rows, graphs at <= 64 tokens) ran out of time
    ("sparse_inference", 60, 0.50, "quick",
     ["bench/bench_sparse_inference.py", "--no-e2e", "--densities", "0.5", "0.3", "0.1", "--tokens", "1", "16", "64",
      "4096", "--formats", "bitmask", "bitmask-spmm", "bsr64", "torch-bsr64", "2:4"],
     ["bench/bench_sparse_inference.py", "--smoke", "--no-e2e", "--formats", "bitmask", "2:4"]),
    ("structured_speed", 25, 0.17, "quick",
     ["bench/bench_structured_speed.py", "--shape", "bert-base", "--flops-keep", "0.4", "--batches", "1", "32",
      "--seq", "128", "--attn", "sdpa"],
     ["bench/bench_structured_speed.py", "--smoke"]),
    # a mask-training step of BERT-base (32 x 128) against the like-for-like dense step, eager, as a loop runs it
    # (35 s: five bert-base models built on the GPU, the first steps' Triton compiles, 3 rounds of 3 steps each;
    # its rows are written only at the end, so a kill before then loses them all)
    ("mask_training_step", 35, 0.13, "quick",
     ["bench/bench_mask_training_step.py", "--rounds", "3", "--steps", "3", "--warmup", "2",
      "--variants", "dense", "masked", "masked-fused", "masked-unfused", "masked-checks-per-layer"],
     ["bench/bench_mask_training_step.py", "--smoke", "--variants", "dense", "masked"]),
    # the eager launch path of each op against F.linear, fast path on and off (rows streamed as op_overhead)
    ("op_overhead", 8, 0.03, "quick", ["bench/bench_op_overhead.py", "--calls", "300", "--repeats", "5"],
     ["bench/bench_op_overhead.py", "--smoke"]),
]

# seconds of the build budget kept for a build without CUTLASS when the CUTLASS build fails
CUTLASS_FALLBACK_S = 45.0

# seconds between the test stage's deadline for starting tests and its kill (a started test's time to finish)
TEST_DEADLINE_MARGIN_S = 30.0

# the crossover stage: (minimum seconds worth starting with, seconds kept between its deadline and the kill)
CROSSOVER_MIN_S, CROSSOVER_KILL_MARGIN_S = 20.0, 10.0

# the profile stage: seconds kept per case between its ncu limit and the next (a case is a fresh process that
# imports torch, compiles from the cache and replays its kernels once per ncu pass)
PROFILE_MIN_CASE_S = 10.0

# The dry run's CPU cost (issue 8: well under 60 s of CPU time; each child process pays ~3 s importing torch):
# one fp32 kernel test and the top-k test; the masked-linear script on the torch backend (the crossover
# stage runs the same fused Triton op under the interpreter); bitmask + 2:4 in the sparse sweep. The rest
# runs in CI's own tests (tests/test_sparse_format_kernels.py, test_triton_kernels.py under the interpreter).
DRY_RUN_TESTS = ["tests/test_triton_kernels.py", "-k", "against_ops_reference and float32 or topk_threshold_single"]


STAGES = ("build", "tests", "sanitize", "crossover", "bench", "profile")


def elapsed() -> float:
    return time.time() - START


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.work = Path(tempfile.mkdtemp(prefix="sparsebert-gpu-suite-"))
        self.env = environment()
        date = _dt.date.today().isoformat()
        self.stem = f"{slug(self.env['gpu'])}-{date}-{slug(self.env['git_sha'])}"
        out = args.out or os.environ.get("OUT") or str(RESULTS_DIR / f"suite-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / f"{self.stem}.log"
        self.log_path.write_text("")
        self.rows_path = self.work / "rows.jsonl"
        self.count_path = self.work / "compile_counts.jsonl"
        self.junit = self.out / f"{self.stem}.junit.xml"
        self.cache = Path(os.environ.get("TRITON_CACHE_DIR") or ROOT / ".triton-cache")
        self.cache.mkdir(parents=True, exist_ok=True)
        self.crossover_path = self.out / f"{self.stem}-crossover.json"
        self.stages: List[Dict] = []
        self.tests: Dict = {}

    # ---------------------------------------------------------------------------------------------
    def log(self, text: str, echo: bool = True) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        if echo:
            print(text, flush=True)

    def remaining(self) -> float:
        return self.args.total - elapsed()

    def cache_entries(self) -> int:
        return sum(1 for p in self.cache.rglob("*") if p.suffix in (".cubin", ".hsaco"))

    def child_env(self, autotune: str, count_compiles: bool = False) -> Dict[str, str]:
        """The environment of a stage's child. count_compiles: record every Triton launch's specialisation
        (CompileCounter wraps each launch in Python: tens of microseconds per launch, so never in a stage
        that times anything; the first GPU run's eager timings carried that cost)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH", "")) if p)
        env["TRITON_CACHE_DIR"] = str(self.cache)
        env["SPARSEBERT_AUTOTUNE"] = autotune
        env["SPARSEBERT_BENCH_STREAM"] = str(self.rows_path)
        if count_compiles:
            env["SPARSEBERT_COMPILE_COUNT"] = str(self.count_path)
        else:
            env.pop("SPARSEBERT_COMPILE_COUNT", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1" if self.dry else env.get("OMP_NUM_THREADS", "8"))
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
            env.pop("SPARSEBERT_TEST_GPU", None)
        else:
            env.pop("TRITON_INTERPRET", None)
            env["SPARSEBERT_TEST_GPU"] = "1"
        return env

    def run(self, cmd: List[str], budget: float, env: Dict[str, str]) -> Dict:
        """Runs cmd under `timeout` for at most `budget` s, its output into the log; returns what happened."""
        budget = max(1, int(min(budget, self.remaining())))
        self.log(f"$ {' '.join(cmd)}   (limit {budget} s)")
        t0, cpu0 = time.time(), _children_cpu_s()
        with open(self.log_path, "a") as f:
            proc = subprocess.run(["timeout", "-k", "5", str(budget), *cmd], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT)
        rc, took, cpu = proc.returncode, time.time() - t0, _children_cpu_s() - cpu0
        status = "ok" if rc == 0 else "timed out" if rc in (124, 137) else f"failed (rc {rc})"
        self.log(f"  -> {status} in {took:.1f} s ({cpu:.1f} s CPU)")
        return {"cmd": " ".join(cmd), "rc": rc, "status": status, "seconds": round(took, 2),
                "cpu_seconds": round(cpu, 2), "limit_s": budget}

    def stage(self, name: str, budget: float, steps) -> Dict:
        """Runs `steps(budget_left) -> list of command results` as one stage; records times and counts."""
        info = {"stage": name, "budget_s": round(budget, 1), "started_at_s": round(elapsed(), 1)}
        left = self.remaining()
        if left < self.args.min_stage:
            info.update(status="skipped", reason=f"only {left:.0f} s left of the total {self.args.total:.0f} s")
            self.log(f"== {name}: SKIPPED ({info['reason']})")
            self.stages.append(info)
            self.write()
            return info
        budget = min(budget, left)
        self.log(f"== {name} (budget {budget:.0f} s, {left:.0f} s left)")
        cache0 = self.cache_entries()
        counts0 = self._count_lines()
        t0 = time.time()
        info["steps"] = steps(budget)
        info["seconds"] = round(time.time() - t0, 2)
        info["cpu_seconds"] = round(sum(s.get("cpu_seconds", 0.0) for s in info["steps"]), 2)
        info["status"] = "ok" if all(s["status"] in ("ok", "skipped") for s in info["steps"]) else "failed"
        info["triton_cache_new_kernels"] = self.cache_entries() - cache0
        counts = self._count_lines()[len(counts0):]
        info["specialisations"] = sum(c["specialisations"] for c in counts)
        info["gpu_compiles_quick"] = sum(c["gpu_compiles_quick"] for c in counts)
        info["gpu_compiles_full"] = sum(c["gpu_compiles_full"] for c in counts)
        per_kernel: Dict[str, int] = {}
        for c in counts:
            for kernel, k in c["per_kernel"].items():
                per_kernel[kernel] = per_kernel.get(kernel, 0) + k
        info["specialisations_per_kernel"] = per_kernel
        self.log(f"== {name}: {info['status']} in {info['seconds']:.1f} s ({info['cpu_seconds']:.1f} s CPU); Triton: "
                 f"{info['specialisations']} kernel specialisations launched -> "
                 f"{info['gpu_compiles_quick']} GPU compilations (quick autotune), {info['gpu_compiles_full']} (full); "
                 f"{info['triton_cache_new_kernels']} new kernels in the cache")
        self.stages.append(info)
        self.write()
        return info

    def _count_lines(self) -> List[Dict]:
        if not self.count_path.exists():
            return []
        out = []
        for line in self.count_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
        return out

    # ---------------------------------------------------------------------------------------------
    def build_steps(self, budget: float) -> List[Dict]:
        env = self.child_env("quick")
        steps = []
        if self.dry:
            steps.append(self.run([sys.executable, "-c", "import sparsebert._C, sparsebert.kernels"], budget, env))
            steps[-1]["note"] = "dry run: imports the extension scripts/setup.sh built instead of rebuilding it"
            return steps
        env["TORCH_CUDA_ARCH_LIST"] = self.args.arch
        env["MAX_JOBS"] = str(os.cpu_count() or 1)
        # The CUTLASS GEMMs (csrc/cuda/cutlass_masked_gemm*.cu, one compile unit per element type, built side by
        # side; docs/CUTLASS.md): with --cutlass on, or auto and the nvidia-cutlass headers importable (the wheel
        # from .whl/). If that build fails or outruns its share, the extension is built again without them, so
        # the CUDA tests still have an extension.
        cutlass = self.cutlass_wanted()
        t0 = time.time()
        if cutlass:
            share = max(1.0, budget - CUTLASS_FALLBACK_S)
            steps.append(self.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], share, env))
            steps[-1]["cutlass"] = True
            if steps[-1]["rc"] == 0:
                return steps + self._import_step(budget - (time.time() - t0), env)
            self.log("  the CUTLASS build failed or ran out of its share: building without the CUTLASS GEMMs")
        env["SPARSEBERT_NO_CUTLASS"] = "1"
        steps.append(self.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                              budget - (time.time() - t0), env))
        if steps[-1]["rc"] != 0 and budget - (time.time() - t0) > 30:
            steps.append(self.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                   "-e", "."], budget - (time.time() - t0), env))
        return steps + self._import_step(budget - (time.time() - t0), env)

    def _import_step(self, left: float, env: Dict[str, str]) -> List[Dict]:
        if left <= 2:
            return []
        return [self.run([sys.executable, "-c", "import sparsebert._C as C; from sparsebert.ops import _ext; "
                          "print('sparsebert._C', C.__file__, 'cutlass', _ext.load() and _ext.has_cutlass())"],
                         left, env)]

    def cutlass_wanted(self) -> bool:
        if self.args.cutlass == "auto":
            return _has_module("cutlass_library")
        return self.args.cutlass == "on"

    def test_steps(self, budget: float) -> List[Dict]:
        """pytest -m cuda under a deadline (tests not started by then are skipped, so the JUnit report survives).
        The files that held failures in the newest committed GPU run (bench/results/*-tests.junit.xml) run
        first, so their fixes are confirmed even when the rest does not fit; then the other files. The two
        JUnit reports are merged into <stem>.junit.xml."""
        env = self.child_env("quick", count_compiles=True)
        env["SPARSEBERT_TEST_DEADLINE"] = f"{time.time() + max(1.0, budget - TEST_DEADLINE_MARGIN_S):.1f}"
        if self.dry:  # no GPU, so the cuda tests would all skip; a small interpreter subset runs instead
            groups = [self.args.test_args or DRY_RUN_TESTS]
        elif self.args.test_args:
            groups = [["-m", "cuda", *self.args.test_args]]
        else:
            first = previous_failure_files(Path(self.args.results_copy))
            groups = ([["-m", "cuda", *first]] if first else []) + [["-m", "cuda", *(f"--ignore={f}" for f in first)]]
        steps, reports, t0 = [], [], time.time()
        for i, select in enumerate(groups):
            left = budget - (time.time() - t0)
            if left < 5:
                steps.append({"cmd": "pytest " + " ".join(select), "status": "skipped", "reason": f"{left:.0f} s left"})
                continue
            if not self.dry and self.args.test_workers > 1 and _has_module("xdist"):
                # Triton compiles in the launching process: workers compile in parallel, one per core
                select = ["-n", str(self.args.test_workers), *select]
            report = self.work / f"junit-{i}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_compile_count",
                   f"--junitxml={report}", "-o", "junit_family=xunit2", *select]
            step = self.run(cmd, left, env)
            if step["rc"] == 5:  # pytest: no tests collected
                step["status"] = "ok"
            if i == 0 and len(groups) > 1:
                step["first"] = "the files with failures in the newest committed GPU run"
            steps.append(step)
            reports.append(report)
        merge_junit(reports, self.junit)
        self.tests = parse_junit(self.junit)
        self.log(f"  tests: {self.tests}")
        return steps

    def sanitize_steps(self, budget: float) -> List[Dict]:
        """bench/sanitize_kernels.py under compute-sanitizer: racecheck on the 8-warp persistent / stream-K
        tiles the first run found wrong (is it a shared-memory race?), memcheck on the format and CUDA kernels;
        each step's "ERROR SUMMARY" lands in the stage's record. Dry run (no sanitizer): the script on the
        interpreter."""
        env = self.child_env("quick")
        script = [sys.executable, "bench/sanitize_kernels.py"]
        sanitizer = None if self.dry else find_tool("compute-sanitizer")
        if sanitizer is None:
            step = self.run([*script, "--smoke", "--cases", "looping8", "formats"] if self.dry else script, budget, env)
            step["sanitizer"] = None if self.dry else "no compute-sanitizer found: the cases ran without it"
            return [step]
        steps, t0 = [], time.time()
        for tool, cases, share in (("racecheck", ["looping8"], 0.65), ("memcheck", ["formats", "cuda", "tiles8"], 1.0)):
            left = budget - (time.time() - t0)
            if left < 5:
                steps.append({"cmd": f"sanitize {tool}", "status": "skipped", "reason": f"{left:.0f} s left"})
                continue
            log_start = self.log_path.stat().st_size
            step = self.run([sanitizer, "--tool", tool, "--print-limit", "20", *script, "--cases", *cases],
                            left * share, env)
            tail = self.log_path.read_bytes()[log_start:].decode("utf-8", "replace")
            summaries = [line.strip() for line in tail.splitlines() if "ERROR SUMMARY" in line]
            step.update(sanitizer=tool, cases=cases, error_summary=summaries[-1] if summaries else None,
                        mismatches=[line for line in tail.splitlines() if line.startswith(("MISMATCH", "ERROR "))][:20])
            steps.append(step)
        return steps

    def crossover_steps(self, budget: float) -> List[Dict]:
        """bench/bench_crossover.py with a deadline inside the budget; its table lands in the output folder."""
        minimum = 1 if self.dry else CROSSOVER_MIN_S
        if budget < minimum:
            self.log(f"  crossover: SKIPPED (needs {minimum:.0f} s, {budget:.0f} s left)")
            return [{"cmd": "crossover", "status": "skipped", "reason": f"needs {minimum:.0f} s, {budget:.0f} s left"}]
        deadline = max(1.0, budget - (1.0 if self.dry else CROSSOVER_KILL_MARGIN_S))
        cmd = [sys.executable, "bench/bench_crossover.py", *(["--smoke"] if self.dry else []),
               "--deadline-s", f"{deadline:.0f}", "--table-out", str(self.crossover_path),
               "--results-dir", str(self.work / "raw")]
        step = self.run(cmd, budget, self.child_env(self.args.bench_autotune or "quick"))
        step["table_file"] = self.crossover_path.name if self.crossover_path.exists() else None
        return [step]

    def bench_steps(self, budget: float) -> List[Dict]:
        steps = []
        t0 = time.time()
        selected = [b for b in BENCHMARKS if not self.args.bench or b[0] in self.args.bench]
        share_left = sum(b[2] for b in selected)
        for name, minimum, share, autotune, gpu_args, dry_args in selected:
            left = budget - (time.time() - t0)
            slice_s = left * share / share_left if share_left else left
            share_left -= share
            if self.dry:
                minimum = 1
            if left < minimum:
                self.log(f"  {name}: SKIPPED (needs {minimum} s, {left:.0f} s left)")
                steps.append({"cmd": name, "status": "skipped", "reason": f"needs {minimum} s, {left:.0f} s left"})
                continue
            slice_s = max(slice_s, minimum)
            argv = dry_args if self.dry else gpu_args
            step = self.run([sys.executable, *argv, "--results-dir", str(self.work / "raw")],
                            slice_s, self.child_env(self.args.bench_autotune or autotune))
            step["benchmark"] = name
            steps.append(step)
            self.write()  # rows streamed so far land now, also when the script was killed
        return steps

    def profile_steps(self, budget: float) -> List[Dict]:
        """bench/profile_kernels.py, one ncu process per case in the script's order until the budget is
        spent; each step keeps the parsed kernels (bench/profile_kernels.parse_ncu_csv). Dry run, or no ncu
        on PATH: the cases run once without the profiler (--smoke on the CPU), so the script is exercised."""
        from profile_kernels import CASES, NCU_ARGS, parse_ncu_csv, summary_line

        env = self.child_env("quick")
        script = [sys.executable, "bench/profile_kernels.py"]
        ncu = None if self.dry else find_tool("ncu")
        if ncu is None:
            step = self.run([*script, "--case", "all", *(["--smoke"] if self.dry else [])], budget, env)
            step["profiler"] = None if self.dry else "no ncu (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, " \
                                                     "/opt/nvidia/nsight-compute): the cases ran without it"
            return [step]
        steps, t0 = [], time.time()
        cases = [c for c in CASES if not self.args.profile_cases or c in self.args.profile_cases]
        for i, case in enumerate(cases):
            left = budget - (time.time() - t0)
            if left < PROFILE_MIN_CASE_S:
                steps.append({"cmd": f"profile {case}", "status": "skipped", "reason": f"{left:.0f} s left"})
                continue
            report = self.work / f"ncu-{case}.csv"
            # an even share of what is left, but at least the minimum: the first case also compiles
            share = max(PROFILE_MIN_CASE_S, left / (len(cases) - i))
            step = self.run([ncu, *NCU_ARGS, "--log-file", str(report), *script, "--case", case], share, env)
            text = report.read_text(errors="replace") if report.exists() else ""
            kernels = parse_ncu_csv(text)
            step.update(case=case, kernels=kernels)
            if not kernels:
                step["ncu_tail"] = text[-1500:]
                if "ERR_NVGPUCTRPERM" in text:
                    step["reason"] = "the GPU's performance counters are not open to this user (ERR_NVGPUCTRPERM)"
                    steps.append(step)
                    break
            for k in kernels:
                self.log(f"  {case}: {summary_line(k)}")
            steps.append(step)
        return steps

    # ---------------------------------------------------------------------------------------------
    def rows(self) -> List[Dict]:
        rows = []
        if self.rows_path.exists():
            for line in self.rows_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed script
                    pass
        return rows

    def write(self, final: bool = False) -> None:
        """(Re)writes the result files atomically from everything measured so far."""
        rows = self.rows()
        verdicts = check(rows)
        doc = {"suite": "gpu_suite", "dry_run": self.dry, "environment": self.env, "total_budget_s": self.args.total,
               "elapsed_s": round(elapsed(), 1), "finished": final, "stages": self.stages, "tests": self.tests,
               "crossover": self.crossover_table(), "targets": verdicts, "rows": rows}
        _atomic_write(self.out / f"{self.stem}.json", json.dumps(doc, indent=1, default=str) + "\n")
        fields: List[str] = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        tmp = self.out / f".{self.stem}.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields or ["bench"], restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.out / f"{self.stem}.csv")
        if final:
            try:
                plot_speedups(rows, self.out / f"{self.stem}-speedup-vs-density.png",
                              self.out / f"{self.stem}-speedup-vs-tokens.png", self.env, basis=self.args.plot_basis)
            except Exception as exc:  # plots are a convenience: never lose the results over one
                self.log(f"plots failed: {type(exc).__name__}: {exc}")
        self.enforce_limits()

    def crossover_table(self) -> Optional[Dict]:
        """This GPU's entries of the crossover table the crossover stage wrote (None before it has)."""
        try:
            table = json.loads(self.crossover_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        gpu = self.env["gpu"]
        return {"file": self.crossover_path.name, "gpu": gpu, "tokens": table.get("gpus", {}).get(gpu, {}),
                "measured": table.get("measured", {}).get(gpu)}

    def enforce_limits(self) -> None:
        files = [p for p in self.out.iterdir() if p.is_file() and not p.name.startswith(".")]
        for p in files:
            if p.stat().st_size > MAX_FILE_BYTES and p.suffix == ".log":  # keep the log's end
                data = p.read_bytes()[-(MAX_FILE_BYTES - 1024):]
                _atomic_write(p, "[log truncated to its last 16 MiB]\n" + data.decode("utf-8", "replace"))
        if len(files) > MAX_FILES:
            raise RuntimeError(f"{self.out} holds {len(files)} files, more than {MAX_FILES}")

    def copy_to_results(self) -> None:
        dest = Path(self.args.results_copy)
        if self.out.resolve() == dest.resolve():
            return
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.out.iterdir():
            if p.is_file() and p.name.startswith(self.stem):
                shutil.copy2(p, dest / p.name)


def ensure_kernels_importable() -> None:
    """Without an install, sparsebert.kernels (setup.py maps it to kernels/) is reached through a link."""
    try:
        import sparsebert.kernels  # noqa: F401
        return
    except ImportError:
        pass
    link = ROOT / "sparsebert" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
        print("[gpu_suite] linked sparsebert/kernels -> ../kernels", flush=True)


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes so far (what a step cost the machine,
    apart from the waiting a loaded machine adds to its wall time)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_tool(name: str) -> Optional[str]:
    """An NVIDIA tool (ncu, compute-sanitizer): on PATH, else under $CUDA_HOME/bin, /usr/local/cuda/bin or
    the newest /opt/nvidia/nsight-compute/*/ (where the CUDA images install ncu); None when absent."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs += [Path("/usr/local/cuda/bin"), *sorted(Path("/opt/nvidia/nsight-compute").glob("*"), reverse=True)]
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def previous_failure_files(results_dir: Path) -> List[str]:
    """Test files (repo-relative) with a failure or error in the newest JUnit report under results_dir
    (<gpu>-<date>-<sha>[-tests].junit.xml: newest date in the name, then newest file); files that no longer
    exist are left out. [] when there is no such report."""
    import xml.etree.ElementTree as ET

    import re

    dated = [(m.group(1), p) for p in results_dir.glob("*.junit.xml")
             if (m := re.search(r"-(\d{4}-\d{2}-\d{2})-", p.name))]
    if not dated:
        return []
    newest = max(dated, key=lambda dp: (dp[0], dp[1].stat().st_mtime))[1]
    try:
        root = ET.parse(newest).getroot()
    except (ET.ParseError, OSError):
        return []
    files: List[str] = []
    for case in root.iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        parts = (case.get("classname") or "").split(".")
        for cut in range(len(parts), 0, -1):  # "tests.test_x" or "tests.test_x.TestClass"
            rel = "/".join(parts[:cut]) + ".py"
            if (ROOT / rel).is_file():
                if rel not in files:
                    files.append(rel)
                break
    return files


def merge_junit(reports: List[Path], out: Path) -> None:
    """One JUnit XML file (<testsuites>) holding the <testsuite> elements of every readable report."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites")
    for path in reports:
        try:
            r = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        root.extend([r] if r.tag == "testsuite" else list(r.findall("testsuite")))
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def parse_junit(path: Path) -> Dict:
    """Pass / fail / error / skip counts from a JUnit XML file (pytest --junitxml)."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"found": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"found": True, "error": f"unreadable JUnit XML: {exc}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"found": True, **total, "failed_tests": failed[:50]}


def _speedup(row: Dict, basis: str) -> Optional[float]:
    """A sparse-inference row's speedup over dense on `basis`: "graph" (CUDA-graph replay, the GPU time),
    "eager", or "auto" (graph where timed, else eager); None where not measured."""
    for key in (("graph_speedup",) if basis == "graph" else ("speedup",) if basis == "eager"
                else ("graph_speedup", "speedup")):
        try:
            v = float(row.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if v > 0 and v == v:
            return v
    return None


def _fused_speedup(row: Dict, basis: str) -> Optional[float]:
    """A masked-linear row's speedup over dense (1 / time_vs_dense) on `basis`, as `_speedup`."""
    for key in (("graph_time_vs_dense",) if basis == "graph" else ("time_vs_dense",) if basis == "eager"
                else ("graph_time_vs_dense", "time_vs_dense")):
        try:
            v = float(row.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if v > 0 and v == v:
            return 1.0 / v
    return None


def plot_speedups(rows: List[Dict], density_png: Path, tokens_png: Path, env: Dict, basis: str = "auto") -> None:
    """Two plots: speedup over dense vs density (sparse formats, geomean over shapes, per token count)
    and speedup vs tokens (every format and the fused score-masked linear). basis: "graph" (GPU time,
    CUDA-graph replays), "eager" (Python-launched calls), or "auto" (graph where a row has it, else eager;
    the title says which)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def geomean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    lin = [(r, _speedup(r, basis)) for r in rows if r.get("bench") == "sparse_inference" and r.get("kind") == "linear"
           and r.get("format") != "dense"]
    lin = [(r, v) for r, v in lin if v is not None]
    what = {"graph": "CUDA-graph replay (GPU time)", "eager": "eager calls",
            "auto": "CUDA graph where timed, else eager"}[basis]
    title = f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']} | {what}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for fmt in sorted({r["format"] for r, _ in lin}):
        for tok in sorted({r["tokens"] for r, _ in lin}):
            pts: Dict[float, list] = {}
            for r, v in lin:
                if r["format"] == fmt and r["tokens"] == tok:
                    pts.setdefault(float(r["density"]), []).append(v)
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [geomean(pts[d]) for d in xs], marker="o", label=f"{fmt} t={tok}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("density")
    ax.set_ylabel("speedup over dense (geomean of shapes)")
    ax.set_title(title, fontsize=6)
    if lin:
        ax.legend(fontsize=5, ncol=2)
    else:
        ax.text(0.5, 0.5, "no sparse-inference rows", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(density_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    series: Dict[str, Dict[int, list]] = {}
    for r, v in lin:
        series.setdefault(f"{r['format']} d={r['density']}", {}).setdefault(int(r["tokens"]), []).append(v)
    for r in rows:
        if r.get("bench") == "masked_linear" and r.get("version") == "fused":
            v = _fused_speedup(r, basis)
            if v is not None:
                series.setdefault(f"score-masked {r['mode']} vs dense", {}).setdefault(int(r["tokens"]), []).append(v)
    for label, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [geomean(pts[t]) for t in xs], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("speedup over dense (geomean of shapes)")
    ax.set_title(title, fontsize=6)
    if series:
        ax.legend(fontsize=5, ncol=2)
    else:
        ax.text(0.5, 0.5, "no rows", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(tokens_png, dpi=100)
    plt.close(fig)


def replot(json_path: Path, basis: str, out_prefix: Path) -> List[Path]:
    """The two plots of a committed suite JSON on another basis: <out_prefix>-speedup-vs-{density,tokens}.png."""
    doc = json.loads(Path(json_path).read_text())
    rows = doc["rows"]
    dense_graph = {(r.get("tokens"), r.get("shape"), r.get("mode")): r.get("graph_ms") for r in rows
                   if r.get("bench") == "masked_linear" and r.get("version") == "dense"}
    for r in rows:  # runs before graph_time_vs_dense was a column: derive it from graph_ms
        if r.get("bench") == "masked_linear" and "graph_time_vs_dense" not in r:
            d = dense_graph.get((r.get("tokens"), r.get("shape"), r.get("mode")))
            g = r.get("graph_ms")
            r["graph_time_vs_dense"] = g / d if d and g and d == d and g == g else float("nan")
    paths = [Path(f"{out_prefix}-speedup-vs-density.png"), Path(f"{out_prefix}-speedup-vs-tokens.png")]
    plot_speedups(rows, paths[0], paths[1], doc["environment"], basis=basis)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default: $OUT, else bench/results/suite-<stamp>)")
    p.add_argument("--dry-run", action="store_true", help="CPU run of the whole pipeline: interpreter, tiny shapes")
    p.add_argument("--total", type=float, default=570.0, help="seconds for everything (a call's 600 s limit less 30)")
    p.add_argument("--build-budget", type=float, default=180.0)
    p.add_argument("--test-budget", type=float, default=170.0)
    p.add_argument("--sanitize-budget", type=float, default=45.0)
    p.add_argument("--crossover-budget", type=float, default=50.0)
    p.add_argument("--profile-budget", type=float, default=60.0,
                   help="seconds kept from the benchmarks for the ncu profiles of the worst misses (last stage)")
    from profile_kernels import CASES as profile_cases
    p.add_argument("--profile-cases", nargs="+", choices=list(profile_cases),
                   help="only these cases of bench/profile_kernels.py (default: all, in its order)")
    p.add_argument("--test-workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="pytest-xdist workers of the test stage (GPU runs; 1 = no xdist)")
    p.add_argument("--min-stage", type=float, default=5.0, help="a stage with less time left is skipped")
    p.add_argument("--results-copy", default=str(RESULTS_DIR), help="also copy the files here (default: bench/results)")
    p.add_argument("--arch", default="9.0a", help="TORCH_CUDA_ARCH_LIST of the build")
    p.add_argument("--cutlass", choices=["auto", "on", "off"], default="auto",
                   help="build the CUTLASS GEMMs too: auto = when the nvidia-cutlass wheel is importable (from .whl/, "
                        "scripts/gpu_wheels.sh); falls back to a build without them if that build fails")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--bench", nargs="+", choices=[b[0] for b in BENCHMARKS], help="only these benchmarks")
    p.add_argument("--bench-autotune", choices=["quick", "full"], help="override every benchmark's autotuning")
    p.add_argument("--replot", metavar="SUITE_JSON",
                   help="only redraw the two plots of a suite JSON on --plot-basis, to --out (a file prefix)")
    p.add_argument("--plot-basis", choices=["auto", "graph", "eager"], default="auto",
                   help="speedups the plots show: CUDA-graph (GPU time), eager, or graph where timed (default)")
    p.add_argument("--test-args", nargs=argparse.REMAINDER, default=[],
                   help="arguments for pytest (default: the whole tests/ folder); must come last")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.replot:
        if not args.out:
            p.error("--replot needs --out, the prefix of the two PNG files")
        if not Path(args.replot).is_file():
            p.error(f"--replot: no such file {args.replot!r}")
        for path in replot(Path(args.replot), args.plot_basis, Path(args.out)):
            print(f"wrote {path}")
        return 0
    if args.total <= 0:
        p.error("--total must be positive")
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA GPU visible to torch: run with --dry-run on a CPU")

    ensure_kernels_importable()
    suite = Suite(args)
    suite.log(f"# gpu suite{' (DRY RUN)' if suite.dry else ''}: {suite.env['gpu']} | driver {suite.env['driver']} | "
              f"torch {suite.env['torch']} | triton {suite.env['triton']} | CUDA {suite.env['cuda']} | "
              f"sha {suite.env['git_sha']} | total budget {args.total:.0f} s, {elapsed():.1f} s used before start")
    suite.write()
    try:
        if "build" in args.stages:
            suite.stage("build", args.build_budget, suite.build_steps)
        if "tests" in args.stages:
            suite.stage("tests", args.test_budget, suite.test_steps)
        if "sanitize" in args.stages:
            suite.stage("sanitize", args.sanitize_budget, suite.sanitize_steps)
        if "crossover" in args.stages:
            suite.stage("crossover", args.crossover_budget, suite.crossover_steps)
        profile_budget = args.profile_budget if "profile" in args.stages else 0.0
        if "bench" in args.stages:
            suite.stage("bench", suite.remaining() - profile_budget, suite.bench_steps)
        if "profile" in args.stages:
            suite.stage("profile", suite.remaining(), suite.profile_steps)
    finally:
        suite.write(final=True)
        suite.copy_to_results()
        verdicts = check(suite.rows())  # before the rows' work folder goes (the first GPU run printed NOT RUN)
        shutil.rmtree(suite.work, ignore_errors=True)
    files = sorted(p.name for p in suite.out.iterdir() if p.is_file() and not p.name.startswith("."))
    summary = [f"stage times: " + ", ".join(f"{s['stage']} {s.get('seconds', 0):.0f} s ({s['status']})"
                                           for s in suite.stages) + f"; total {elapsed():.0f} s of {args.total:.0f} s",
               f"tests: {suite.tests.get('passed', '-')} passed, {suite.tests.get('failures', '-')} failed, "
               f"{suite.tests.get('errors', '-')} errors, {suite.tests.get('skipped', '-')} skipped",
               f"files ({len(files)}) in {suite.out}: {', '.join(files)}", "", table(verdicts)]
    suite.log("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
