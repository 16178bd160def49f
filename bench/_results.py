"""Benchmark result files: bench/results/<gpu-name-slug>-<YYYY-MM-DD>.csv and .json.

Every benchmark script calls `save_results(benchmark_name, rows)`. Each row is a flat dict of one
measurement; the environment (git SHA, GPU name, driver, torch, triton and CUDA versions, cuBLAS
reduced-precision setting) is attached to every row, so rows from different runs, scripts and software
stacks can share a file and still be told apart. Files are appended to, never overwritten: the CSV keeps
the union of all columns seen, the JSON keeps one entry per run: {"benchmark", "environment", "rows"}.
With a git SHA in the environment the files are named <gpu>-<date>-<sha>.

`stream_row` appends each row, as it is measured, to the JSON-lines file named by the environment
variable SPARSEBERT_BENCH_STREAM (the GPU suite's), so a run killed midway keeps what it measured.
`roofline` gives the time a row's bytes and FLOPs need at least on an H200.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_FIELDS = ("gpu", "driver", "torch", "triton", "cuda", "python", "git_sha", "cublas_bf16_reduced_precision",
              "cublas_fp16_reduced_precision")
# H200 rates measured on the project's device (KINDS.md): device-to-device copy, dense bf16 GEMM
H200_COPY_BYTES_PER_S = 4.3e12
H200_BF16_FLOPS_PER_S = 790e12
STREAM_ENV = "SPARSEBERT_BENCH_STREAM"


def device_name() -> str:
    """The CUDA device name ("NVIDIA H100 80GB HBM3"), or "cpu-<machine>" without a GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu-{platform.machine() or 'unknown'}"


@lru_cache(maxsize=1)
def git_sha() -> str:
    """$SPARSEBERT_GIT_SHA when set (a copy without .git, e.g. on the GPU machine), else the short SHA of
    the checkout's HEAD ("+dirty" when tracked files changed), else "unknown"."""
    if os.environ.get("SPARSEBERT_GIT_SHA"):
        return os.environ["SPARSEBERT_GIT_SHA"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


@lru_cache(maxsize=1)
def driver_version() -> str:
    """The NVIDIA driver version (nvidia-smi), or "none"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.splitlines()[0].strip() if out else "none"


def roofline(nbytes: float, flops: float) -> Dict[str, float]:
    """Least time on an H200 for moving `nbytes` through HBM and doing `flops` bf16 FLOPs (the larger
    of the two, in microseconds) and which one binds."""
    t_mem, t_math = nbytes / H200_COPY_BYTES_PER_S * 1e6, flops / H200_BF16_FLOPS_PER_S * 1e6
    return {"roofline_bytes": nbytes, "roofline_flops": flops, "roofline_us": max(t_mem, t_math),
            "roofline_bound": "memory" if t_mem >= t_math else "compute"}


def stream_row(benchmark: str, row: Dict) -> None:
    """Appends one measured row to $SPARSEBERT_BENCH_STREAM (JSON lines), when that variable is set."""
    path = os.environ.get(STREAM_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"bench": benchmark, **environment(), **row}, default=str) + "\n")
        f.flush()


def environment() -> Dict[str, str]:
    """Git SHA, GPU name, driver and software versions, cuBLAS reduced-precision flags: what a result
    depends on."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton absent: CPU-only runs
        triton_version = "none"
    matmul = torch.backends.cuda.matmul
    return {
        "gpu": device_name(),
        "driver": driver_version() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "cublas_bf16_reduced_precision": str(bool(matmul.allow_bf16_reduced_precision_reduction)),
        "cublas_fp16_reduced_precision": str(bool(matmul.allow_fp16_reduced_precision_reduction)),
    }


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_paths(env: Optional[Dict[str, str]] = None, date: Optional[str] = None,
                 results_dir: Optional[os.PathLike] = None) -> Tuple[Path, Path]:
    env = env or environment()
    date = date or _dt.date.today().isoformat()
    sha = f"-{slug(env['git_sha'])}" if env.get("git_sha") else ""
    stem = Path(results_dir or RESULTS_DIR) / f"{slug(env['gpu'])}-{date}{sha}"
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def save_results(benchmark: str, rows: Iterable[Dict], *, results_dir: Optional[os.PathLike] = None,
                 env: Optional[Dict[str, str]] = None, date: Optional[str] = None) -> Tuple[Path, Path]:
    """Appends `rows` (flat dicts) of benchmark `benchmark` to the CSV and JSON files; returns their paths."""
    if not isinstance(benchmark, str) or not benchmark:
        raise ValueError("benchmark must be a non-empty string naming the benchmark script")
    rows = [dict(r) for r in rows]
    env = env or environment()
    timestamp = _dt.datetime.now().isoformat(timespec="seconds")
    csv_path, json_path = result_paths(env, date, results_dir)
    csv_path.parent.mkdir(parents=True, exist_ok=True)

    flat: List[Dict] = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            flat = list(csv.DictReader(f))
    for row in rows:
        flat.append({"benchmark": benchmark, "timestamp": timestamp, **env, **row})
    fields: List[str] = []
    for row in flat:
        fields.extend(k for k in row if k not in fields)
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(flat)
    os.replace(tmp, csv_path)

    runs = json.loads(json_path.read_text())["runs"] if json_path.exists() else []
    runs.append({"benchmark": benchmark, "timestamp": timestamp, "environment": env, "rows": rows})
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n")
    os.replace(tmp, json_path)
    return csv_path, json_path
