"""The worst misses of the first H200 run, one call each, for Nsight Compute: what bounds each kernel.

The first GPU run measured *that* the bitmask kernels lose to cuBLAS at <= 64 tokens, not *why*: the CUDA
bitmask SpMM took ~36 us of GPU time at 64 tokens whatever the layer (768x768 or 3072x768, split-K 6 or
16), the Triton bitmask kernel 8-21 us with no dependence on density, the score-masked op 9-16 us more than
its bare kernel. Each case below builds its inputs, warms up (compiles, autotunes), then makes one call
between cudaProfilerStart/Stop, so that

    ncu --profile-from-start off --clock-control none --csv --page raw \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        python bench/profile_kernels.py --case spmm64

profiles exactly the launches of that call (the GPU suite's "profile" stage does this per case and keeps
duration, SM and memory throughput, occupancy and the top warp-stall reasons per kernel: `parse_ncu_csv`).

    python bench/profile_kernels.py --list
    TRITON_INTERPRET=1 python bench/profile_kernels.py --smoke --case all   # CPU: the cases' code (CI)

Every case checks its output against F.linear on the decoded weight (an fp64 product's bound), so a profile
of a wrong answer says so.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# name -> (what it profiles, K, N, tokens, density); bf16 on the GPU, fp32 and tiny shapes in --smoke
CASES: Dict[str, Tuple[str, int, int, int, float]] = {
    "spmm64": ("bitmask SpMM (CUDA kernel via sparsebert.ops.bitmask_spmm), 64 tokens, 768x768, 10%: ~36 us "
               "graphed against 3.5 for cuBLAS, the same at 3072x768", 768, 768, 64, 0.1),
    "bitmask16": ("bitmask_linear (Triton), 16 tokens, 3072x768, 10%: 21 us graphed against 6.7, flat in density",
                  3072, 768, 16, 0.1),
    "scorefwd64": ("score_masked_linear forward through the op, 64 tokens, 768x3072: 9-16 us more GPU time than "
                   "its bare kernel", 768, 3072, 64, 0.5),
    "dense64": ("F.linear (cuBLAS), 64 tokens, 768x768: what a 3.5 us kernel of this shape looks like",
                768, 768, 64, 1.0),
    "spmm1": ("bitmask SpMM (CUDA), 1 token, 3072x768, 10%: 10.3 us against 6.5", 3072, 768, 1, 0.1),
    "bsr4096": ("bsr_linear (Triton, BSR-64), 4096 tokens, 3072x768, 10%: its GPU time was never graphed",
                3072, 768, 4096, 0.1),
}

# metrics kept from ncu's raw page (the sections above): name -> short label
NCU_METRICS = {
    "gpu__time_duration.sum": "duration",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
    "launch__registers_per_thread": "regs",
    "launch__shared_mem_per_block_static": "smem_static",
    "launch__shared_mem_per_block_dynamic": "smem_dynamic",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles_per_issue",
}
_STALL_PREFIX, _STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"

NCU_ARGS = ["--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
            "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy",
            "--section", "WarpStateStats"]


def _float(text: str) -> Optional[float]:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> List[Dict]:
    """Kernels of an `ncu --csv --page raw` report: one dict per profiled launch with its name, the
    NCU_METRICS that are present (numbers where they parse; duration in the unit of its units row) and
    `stalls`, the three largest warp-stall reasons (cycles per issued instruction). Lines before the
    header (==PROF== messages, the program's own output) are skipped; [] when there is no table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    table = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = table[0]
    units = table[1] if len(table) > 1 and not (table[1] and _float(table[1][0]) is not None) else None
    body = table[2:] if units is not None else table[1:]
    col = {name: i for i, name in enumerate(header)}
    kernels = []
    for row in body:
        if len(row) != len(header):
            continue
        k: Dict = {"kernel": row[col["Kernel Name"]] if "Kernel Name" in col else "?"}
        for metric, label in NCU_METRICS.items():
            if metric in col:
                v = _float(row[col[metric]])
                k[label] = v if v is not None else row[col[metric]]
                if units is not None and label == "duration":
                    k["duration_unit"] = units[col[metric]]
        stalls = {}
        for name, i in col.items():
            if name.startswith(_STALL_PREFIX) and name.endswith(_STALL_SUFFIX):
                v = _float(row[i])
                if v is not None and v > 0:
                    stalls[name[len(_STALL_PREFIX):-len(_STALL_SUFFIX)]] = round(v, 2)
        k["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
        kernels.append(k)
    return kernels


def summary_line(k: Dict) -> str:
    """One line per kernel for the suite's log."""
    dur = k.get("duration")
    unit = k.get("duration_unit", "")
    parts = [f"{k['kernel'][:60]}", f"{dur} {unit}".strip() if dur is not None else "duration ?"]
    for label in ("sm_pct", "mem_pct", "occupancy_pct"):
        if isinstance(k.get(label), float):
            parts.append(f"{label} {k[label]:.0f}")
    if k.get("grid") is not None:
        parts.append(f"grid {k['grid']:.0f} x {k.get('block', 0):.0f}")
    if k.get("stalls"):
        parts.append("stalls " + ", ".join(f"{r} {v}" for r, v in k["stalls"].items()))
    return " | ".join(parts)


def _weights(name: str, k: int, n: int, density: float, dtype, device):
    import torch

    from bench_sparse_inference import block_sparse, unstructured

    if name.startswith("bsr"):
        return block_sparse(n, k, 64, density, dtype, device)
    if name.startswith("dense"):
        return torch.randn(n, k, device=device, dtype=dtype)
    return unstructured(n, k, density, dtype, device)


def build_case(name: str, device: str, smoke: bool) -> Tuple[Callable, Callable[[], float]]:
    """(the call to profile, a check returning max error / bound: <= 1 passes)."""
    import torch
    import torch.nn.functional as F

    from sparsebert import ops
    from sparsebert.nn.compress import BitmaskLinear, BSRLinear
    from sparsebert.ops import reference_formats as rf

    _, k, n, tokens, density = CASES[name]
    if smoke:
        k, n, tokens = min(k, 192), min(n, 128), min(tokens, 5)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    w = _weights(name, k, n, density, dtype, device)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    w_eff = w  # the weight the output must match
    if name.startswith("spmm"):
        data, offsets = rf.tc_bitmask_encode(w)
        fn = lambda: ops.bitmask_spmm(x, data, offsets, bias, n, k)  # noqa: E731
    elif name.startswith("bitmask"):
        module = BitmaskLinear(w, bias)
        fn = lambda: module(x)  # noqa: E731
    elif name.startswith("bsr"):
        module = BSRLinear(w, bias, block_size=64 if not smoke else 32)
        fn = lambda: module(x)  # noqa: E731
    elif name.startswith("scorefwd"):
        scores = torch.rand(n, k, generator=gen).to(device, torch.float32)
        fn = lambda: ops.score_masked_linear(x, w, bias, scores, 1.0 - density)  # noqa: E731
        w_eff = w * (scores >= 1.0 - density).to(w.dtype)
    else:
        fn = lambda: F.linear(x, w, bias)  # noqa: E731

    def check() -> float:
        out = fn().double()
        xd, wd, bd = x.double(), w_eff.double(), bias.double()
        exact = xd @ wd.t() + bd
        spread = xd.abs() @ wd.abs().t() + bd.abs()
        tol = torch.finfo(dtype).eps * exact.abs() + (k + 2) * torch.finfo(torch.float32).eps * spread
        if dtype != torch.float32:  # a 16-bit product rounds each input once more on the tensor cores
            tol = tol + 2 * torch.finfo(dtype).eps * spread
        return float(((out - exact).abs() / tol.clamp_min(1e-30)).max())

    return fn, check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=[*CASES, "all"], help="the case to run (all: every case, one after another)")
    p.add_argument("--list", action="store_true", help="print the cases in the suite's order and exit")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny fp32 shapes: tests the script")
    p.add_argument("--warmup", type=int, default=3, help="calls before the profiled one (compiles, autotunes)")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, *_) in CASES.items():
            print(f"{name:<11} {what}")
        return 0
    if not args.case:
        p.error("--case is required (or --list)")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the profiled call must not compile), got {args.warmup}")
    import torch

    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU visible to torch: run with --smoke on a CPU")
    device = "cpu" if args.smoke else "cuda"
    bad = 0
    for name in (list(CASES) if args.case == "all" else [args.case]):
        fn, check = build_case(name, device, args.smoke)
        for _ in range(args.warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        excess = check()
        ok = excess <= 1.0
        bad += not ok
        print(f"{'OK' if ok else 'MISMATCH':<9} {name}: max error / bound = {excess:.3g}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
