"""`sparsebert bench`: run the benchmark suites of the checkout's bench/ folder.

On a GPU it runs the timing scripts (triton.testing.do_bench, ratios against cuBLAS and the unfused
references, results written to bench/results/<gpu>-<date>.{csv,json}); on the CPU it runs the
pytest-benchmark entries. The bench/ folder ships with the source tree, not with a wheel.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import torch

GPU_SUITES = {
    "masked_linear": "bench_masked_linear_gpu.py",
    "sparse_inference": "bench_sparse_inference.py",
    "structured": "bench_structured_speed.py",
}


def bench_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "bench"
    if not here.is_dir():
        raise FileNotFoundError(f"no bench/ folder at {here}: `sparsebert bench` runs from a source checkout "
                                "(git clone, then pip install -e .)")
    return here


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="run the benchmark suites (GPU timing scripts, or CPU pytest-benchmark)")
    p.add_argument("--suite", choices=sorted(GPU_SUITES) + ["all"], default="all")
    p.add_argument("--cpu", action="store_true", help="run the CPU pytest-benchmark entries even when a GPU is present")
    p.add_argument("extra", nargs="*", help="arguments passed to the suite script (after --)")
    return p


def run(args) -> int:
    root = bench_dir()
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
