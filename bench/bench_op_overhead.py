"""Host overhead of an eager op call: the public ops against F.linear, with and without the eager fast path.

At BERT sizes and <= 64 tokens a GPU runs a linear in ~3.5 us, so an eager op is judged on its Python launch
path (the first GPU run: 100-400 us per sparse op call against ~7 us for cuBLAS F.linear,
bench/results/README.md). This script times that path on tiny shapes, where the arithmetic is negligible:

    F.linear                     the dense call every speedup is measured against
    <op>                         the public op as a user calls it (eager fast path, sparsebert/ops/_fastpath.py)
    <op> (registered op)         the same call forced through the torch.library op (the fast path off)

each the best of --repeats runs of --calls calls (best: the least disturbed by other work on the machine;
on a GPU each run ends with a synchronize). The ops' backend is "torch" on a CPU (the host path without a
kernel) and "triton" on a GPU. Writes bench/results/<device>-<date>-<sha>-op-overhead.{csv,json}
(and streams its rows into the GPU suite's files when run there).

    python bench/bench_op_overhead.py              # on this machine
    python bench/bench_op_overhead.py --smoke      # few calls; results to a temp dir
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS_DIR, environment, slug, stream_row  # noqa: E402

from sparsebert import ops  # noqa: E402
from sparsebert.ops import _fastpath  # noqa: E402
from sparsebert.ops import reference_formats as rf  # noqa: E402
from sparsebert.ops import sparse_formats as sf  # noqa: E402


def best_us(fn, calls: int, repeats: int, cuda: bool) -> float:
    for _ in range(min(calls, 20)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def cases(device, dtype, backend, tokens, k, n):
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    scores = torch.randn(n, k, device=device, dtype=dtype)
    tau = ops.topk_threshold([scores], 0.5, backend="torch" if device == "cpu" else "auto")
    keep = torch.rand(n, k, device=device) < 0.3
    packed = ops.pack_mask(keep)
    w_sparse = w * keep
    bitmask = rf.bitmask_encode(w_sparse, 32, 64)
    bsr = rf.bsr_encode(w * keep[::16].repeat_interleave(16, 0)[:, ::16].repeat_interleave(16, 1), 16)
    fmt_backend = "triton" if backend == "triton" else "torch"
    return {
        "F.linear": lambda: F.linear(x, w, b),
        "masked_linear": lambda: ops.masked_linear(x, w, b, packed, backend=backend),
        "score_masked_linear": lambda: ops.score_masked_linear(x, w, b, scores, tau, backend=backend),
        "bitmask_linear": lambda: sf.bitmask_linear(x, *bitmask, b, k, 32, 64, backend=fmt_backend),
        "bsr_linear": lambda: sf.bsr_linear(x, *bsr, b, k, backend=fmt_backend),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=2, default=[64, 64], metavar=("K", "N"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="few calls; results to a temp dir")
    args = p.parse_args(argv)
    if args.calls < 1 or args.repeats < 1 or args.tokens < 1 or min(args.shape) < 1:
        p.error("--calls, --repeats, --tokens and --shape must be positive")
    if args.smoke:
        args.calls, args.repeats = 20, 2
        args.results_dir = args.results_dir or tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    backend = "triton" if cuda else "torch"
    dtype = torch.bfloat16 if cuda else torch.float32
    k, n = args.shape
    fns = cases(args.device, dtype, backend, args.tokens, k, n)
    rows = []
    base = best_us(fns["F.linear"], args.calls, args.repeats, cuda)
    rows.append(dict(op="F.linear", path="dense", us=base, vs_linear=1.0))
    for name, fn in fns.items():
        if name == "F.linear":
            continue
        fast = best_us(fn, args.calls, args.repeats, cuda)
        _fastpath.ENABLED = False
        try:
            registered = best_us(fn, args.calls, args.repeats, cuda)
        finally:
            _fastpath.ENABLED = True
        rows.append(dict(op=name, path="eager fast path", us=fast, vs_linear=fast / base))
        rows.append(dict(op=name, path="registered op", us=registered, vs_linear=registered / base))
    env = environment()
    device_name = env["gpu"] if cuda else "cpu"
    print(f"# {device_name} | torch {env['torch']} | {args.tokens} tokens, {k}->{n}, {dtype}, backend {backend}, "
          f"best of {args.repeats} x {args.calls} calls")
    print(f"{'op':<22} {'path':<16} {'us/call':>9} {'vs F.linear':>12}")
    for r in rows:
        r.update(device=device_name, backend=backend, tokens=args.tokens, K=k, N=n, dtype=str(dtype).replace("torch.", ""),
                 torch=env["torch"], git_sha=env["git_sha"], threads=args.threads)
        print(f"{r['op']:<22} {r['path']:<16} {r['us']:>9.2f} {r['vs_linear']:>11.2f}x")
        stream_row("op_overhead", r)  # into the GPU suite's CSV/JSON when it runs this script
    out = Path(args.results_dir) if args.results_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(device_name)}-{time.strftime('%Y-%m-%d')}-{slug(env['git_sha'])}-op-overhead"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / stem}.csv and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
