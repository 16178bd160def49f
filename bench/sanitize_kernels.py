"""Kernels under NVIDIA's compute-sanitizer: each case launches one kernel configuration on a small, awkward
shape and checks its result against an fp64 product; the GPU suite runs this script under
`compute-sanitizer --tool racecheck` (shared-memory hazards) and `--tool memcheck` (out-of-bounds accesses).

Cases (`--cases`, default all):
  looping8   the persistent and stream-K forwards with the 8-warp tiles that the first H200 run found
             computing wrong tiles (bench/results/README.md) and that kernels/_gemm.py no longer autotunes:
             forced here, one config per launch, to test the lead that two warpgroups race on shared memory
             across the items of a persistent loop (racecheck reports such hazards);
  looping4   the same kernels with the 4-warp tiles they do use;
  tiles8     the one-tile-per-program forward with the same 8-warp tiles (passed the first run's sweep);
  formats    the bitmask and BSR kernels (Triton), one launch each;
  cuda       the CUDA extension's masked linear forward, when sparsebert._C has CUDA kernels.
Prints one line per case: OK / MISMATCH with the max error over its bound; exits 1 on a mismatch.

    compute-sanitizer --tool racecheck python bench/sanitize_kernels.py --cases looping8
    python bench/sanitize_kernels.py --smoke        # CPU, interpreter: the script itself (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("looping8", "looping4", "tiles8", "formats", "cuda")


def _exact(x: torch.Tensor, w: torch.Tensor, b) -> Tuple[torch.Tensor, torch.Tensor]:
    xd, wd = x.double(), w.double()
    y, s = xd @ wd.t(), xd.abs() @ wd.abs().t()
    if b is not None:
        y, s = y + b.double(), s + b.double().abs()
    return y, s


def _max_excess(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> float:
    """max over elements of |out - exact| / bound (<= 1 passes); bound = eps_out |y| + (K + 2) eps32 sum|x w|."""
    y, s = _exact(x, w, b)
    tol = torch.finfo(out.dtype).eps * y.abs() + (x.shape[1] + 2) * torch.finfo(torch.float32).eps * s
    return float(((out.double() - y).abs() / tol.clamp_min(1e-30)).max())


def _gemm_cases(which: str, device: str, smoke: bool) -> List[Tuple[str, Callable[[], float]]]:
    import triton

    from sparsebert import ops
    from sparsebert.kernels import _gemm
    from sparsebert.kernels._autotune import forced_config

    m, k, n = (37, 72, 53) if smoke else (257, 200, 129)  # tails for every tile (the first run's failing shape)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, torch.float32 if smoke else torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(device, x.dtype)
    b = torch.randn(n, generator=gen).to(device, x.dtype)
    keep = (torch.rand(n, k, generator=gen) < 0.4).to(device)
    packed = ops.pack_mask(keep)
    w_eff = w * keep

    if smoke:  # the interpreter ignores warps and stages: its one small tile stands for every case
        tiles = [(32, 32, 32, 1, 1)]
    else:
        warps = {"looping8": 8, "tiles8": 8, "looping4": 4}[which]
        tiles = [t for t in _gemm._GPU_TILES if t[3] == warps]
    schedules = ("tiles",) if which == "tiles8" else ("persistent", "streamk")
    kernels = {"tiles": _gemm.linear_fwd_kernel, "persistent": _gemm.linear_fwd_persistent_kernel,
               "streamk": _gemm.linear_fwd_streamk_kernel}
    out = []
    for schedule in schedules:
        for bm, bn, bk, nw, ns in tiles:
            hook = None if schedule == "tiles" else _gemm._set_tma_blocks
            cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw,
                                num_stages=ns, pre_hook=hook)

            def run(schedule=schedule, cfg=cfg):
                with forced_config(kernels[schedule], cfg):
                    kw = {} if schedule == "tiles" else {"num_sms": 3}  # several items per program
                    y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, (k + 31) // 32, 0.0, None,
                                  split_k=None if schedule == "streamk" else 2, schedule=schedule, **kw)
                return _max_excess(y, x, w_eff, b)
            out.append((f"{schedule} {bm}x{bn}x{bk} w{nw} s{ns}", run))
    return out


def _format_cases(device: str, smoke: bool) -> List[Tuple[str, Callable[[], float]]]:
    from sparsebert.ops import reference_formats as rf
    from sparsebert.ops import sparse_formats as sf

    m, k, n = (5, 64, 48) if smoke else (37, 768, 200)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < 0.1)).to(device, dtype)
    keep = (torch.rand(n // 16, k // 16, generator=gen) < 0.3).repeat_interleave(16, 0).repeat_interleave(16, 1)
    wb = (torch.randn(n // 16 * 16, k, generator=gen) * keep).to(device, dtype)
    bb = b[: wb.shape[0]]
    return [
        ("bitmask_linear", lambda: _max_excess(
            sf.bitmask_linear(x, *rf.bitmask_encode(w, 32, 64), b, k, 32, 64, backend="triton"), x, w, b)),
        ("bsr_linear 16", lambda: _max_excess(
            sf.bsr_linear(x, *rf.bsr_encode(wb, 16), bb, k, backend="triton"), x, wb, bb)),
    ]


def _cuda_cases(device: str) -> List[Tuple[str, Callable[[], float]]]:
    from sparsebert import ops
    from sparsebert.ops import _ext

    if device != "cuda" or not (_ext.load() and _ext.has_cuda()):
        return []
    gen = torch.Generator(device="cpu").manual_seed(2)
    m, k, n = 37, 200, 129
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
    b = torch.randn(n, generator=gen).to(device, torch.bfloat16)
    keep = (torch.rand(n, k, generator=gen) < 0.4).to(device)
    return [("cuda masked_linear", lambda: _max_excess(ops.masked_linear(x, w, b, keep, backend="cuda"), x, w * keep, b))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: tests the script")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU visible to torch: run with --smoke on a CPU")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    cases: List[Tuple[str, Callable[[], float]]] = []
    for which in args.cases:
        if which in ("looping8", "looping4", "tiles8"):
            cases += [(f"{which}: {name}", fn) for name, fn in _gemm_cases(which, device, args.smoke)]
        elif which == "formats":
            cases += [(f"formats: {name}", fn) for name, fn in _format_cases(device, args.smoke)]
        elif which == "cuda":
            cases += [(f"cuda: {name}", fn) for name, fn in _cuda_cases(device)]
    bad = 0
    results: Dict[str, float] = {}
    for name, fn in cases:
        try:
            excess = fn()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # a launch error is reported and the other cases still run
            print(f"ERROR     {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            bad += 1
            continue
        results[name] = excess
        ok = excess <= 1.0
        bad += not ok
        print(f"{'OK' if ok else 'MISMATCH':<9} {name}: max error / bound = {excess:.3g}", flush=True)
    print(f"sanitize_kernels: {len(cases)} cases, {bad} mismatched or failed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
