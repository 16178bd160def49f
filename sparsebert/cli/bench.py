"""`sparsebert bench`: run the benchmark suites of the checkout's bench/ folder.

On a GPU it runs the timing scripts (triton.testing.do_bench, ratios against cuBLAS and the unfused
references, results written to bench/results/<gpu>-<date>.{csv,json}); on the CPU it runs the
pytest-benchmark entries. `--suite gpu` runs the whole self-timed GPU suite (bench/gpu_suite.py: build,
GPU tests, crossover, benchmarks); with `--dry-run` its CPU rehearsal. The bench/ folder ships with the
source tree, not with a wheel.

    sparsebert bench --suite gpu [--dry-run] [--out DIR] [-- SUITE ARGS]
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

GPU_SUITES = {
    "masked_linear": "bench_masked_linear_gpu.py",
    "sparse_inference": "bench_sparse_inference.py",
    "structured": "bench_structured_speed.py",
}


def bench_dir(root: Optional[Path] = None) -> Path:
    """The checkout's bench/ folder (root: the repository; default: the one this package was loaded from)."""
    here = (Path(root) if root is not None else Path(__file__).resolve().parents[2]) / "bench"
    if not here.is_dir():
        raise FileNotFoundError(f"no bench/ folder at {here}: `sparsebert bench` runs from a source checkout "
                                "(git clone, then pip install -e .)")
    return here


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="run the benchmark suites (GPU timing scripts, or CPU pytest-benchmark)")
    p.add_argument("--suite", choices=sorted(GPU_SUITES) + ["all", "gpu"], default="all",
                   help="one GPU timing script, all of them, or gpu: the whole GPU suite (bench/gpu_suite.py)")
    p.add_argument("--cpu", action="store_true", help="run the CPU pytest-benchmark entries even when a GPU is present")
    p.add_argument("--dry-run", action="store_true",
                   help="with --suite gpu: the suite's CPU rehearsal (Triton interpreter, tiny shapes)")
    p.add_argument("--out", help="with --suite gpu: output folder (default: $OUT, else bench/results/suite-<stamp>)")
    p.add_argument("extra", nargs="*", help="arguments passed to the suite script (after --)")
    return p


def suite_command(args, root: Path) -> List[str]:
    """The command line of `--suite gpu`: bench/gpu_suite.py under this interpreter."""
    cmd = [sys.executable, str(root / "gpu_suite.py")]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.out:
        cmd += ["--out", str(Path(args.out).expanduser().resolve())]
    return cmd + list(args.extra)


def check_args(args) -> None:
    """ValueError for options that do not go together."""
    if args.suite != "gpu" and (args.dry_run or args.out):
        raise ValueError("--dry-run and --out apply to --suite gpu only")
    if args.suite == "gpu" and args.cpu:
        raise ValueError("--cpu does not apply to --suite gpu (use --dry-run for its CPU rehearsal)")


def run(args) -> int:
    try:
        check_args(args)
        root = bench_dir()
        if args.suite == "gpu" and not (root / "gpu_suite.py").is_file():
            raise FileNotFoundError(f"no gpu_suite.py in {root}: `sparsebert bench --suite gpu` needs the "
                                    "repository's bench/ folder")
    except (ValueError, FileNotFoundError) as exc:
        print(f"sparsebert bench: error: {exc}", file=sys.stderr)
        return 2
    if args.suite == "gpu":
        if not args.dry_run and not torch.cuda.is_available():
            print("sparsebert bench: error: no CUDA GPU visible to torch: add --dry-run for the CPU rehearsal",
                  file=sys.stderr)
            return 2
        return subprocess.call(suite_command(args, root), cwd=root.parent)
    suites = sorted(GPU_SUITES) if args.suite == "all" else [args.suite]
    if args.cpu or not torch.cuda.is_available():
        if not args.cpu:
            logging.getLogger(__name__).info("no CUDA GPU visible: running the CPU pytest-benchmark entries")
        files = sorted(str(p) for p in root.glob("test_bench_*.py"))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-enable",
               "--benchmark-columns=min,median,mean,rounds", *files, *args.extra]
        return subprocess.call(cmd, cwd=root.parent)
    status = 0
    for name in suites:
        script = root / GPU_SUITES[name]
        logging.getLogger(__name__).info(f"== {name}: {script.name}")
        status |= subprocess.call([sys.executable, str(script), *args.extra], cwd=root.parent)
    return status
