"""Benchmark result files: bench/results/<gpu-name-slug>-<YYYY-MM-DD>.csv and .json.

Every benchmark script calls `save_results(benchmark_name, rows)`. Each row is a flat dict of one
measurement; the environment (GPU name, torch, triton and CUDA versions) is attached to every row, so rows
from different runs, scripts and software stacks can share a file and still be told apart. Files are
appended to, never overwritten: the CSV keeps the union of all columns seen, the JSON keeps one entry per
run: {"benchmark", "environment", "rows"}.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_FIELDS = ("gpu", "torch", "triton", "cuda", "python")


def device_name() -> str:
    """The CUDA device name ("NVIDIA H100 80GB HBM3"), or "cpu-<machine>" without a GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu-{platform.machine() or 'unknown'}"


def environment() -> Dict[str, str]:
    """GPU name and software versions that a result depends on."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton absent: CPU-only runs
        triton_version = "none"
    return {
        "gpu": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
    }


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_paths(env: Optional[Dict[str, str]] = None, date: Optional[str] = None,
                 results_dir: Optional[os.PathLike] = None) -> Tuple[Path, Path]:
    env = env or environment()
    date = date or _dt.date.today().isoformat()
    stem = Path(results_dir or RESULTS_DIR) / f"{slug(env['gpu'])}-{date}"
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
