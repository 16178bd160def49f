"""GPU benchmark: fused Triton score-masked linear vs the unfused movement-pruning code vs dense F.linear.

At BERT-base shapes (tokens 512 / 4096 / 16384 / 64 / 8; linears 768->768, 768->3072, 3072->768; bf16) it times,
with triton.testing.do_bench (median), in one run:
  dense    F.linear (cuBLAS), autograd for the backward (dx, dW, db);
  unfused  m = STE(scores >= tau); W_eff = W * m; F.linear(x, W_eff, b), autograd through it: what
           movement-pruning code does (mask and W * m materialized, backward through elementwise ops);
  fused    sparsebert.ops.score_masked_linear, the public op with its autograd (what a user gets):
           forward kernel; backward = bwd_input + ONE bwd_weight_scores GEMM writing dscores and dW,
           plus db = dy.sum(0).
  fused-tiles / fused-persistent / fused-streamk  (forward only, where the Triton kernels run) the
           Triton forward called directly (sparsebert.kernels.score_masked_linear_fwd, no op dispatch)
           on each grid schedule: one program per (tile, K split), the persistent grid of min(items,
           #SMs) programs with TMA loads of x and W where available, and stream-K (#SMs programs sharing
           all tiles' K-iterations, plus its fixup launch) (issue 10 item 2: the rows compare the
           schedules; split_k_for's split in the first two, stream-K splits K itself).
for the forward alone and forward + backward, with the bytes each version moves (counted analytically:
every tensor each launched kernel reads or writes, once) and the H200 roofline time of those bytes and
FLOPs beside its time; forward rows (up to --graph-max-tokens) are also timed as CUDA-graph replays. Prints a
table, checks the issue targets (bench/targets.py), and writes bench/results/<gpu>-<date>-<sha>.{csv,json}
via bench/_results.py.

    python bench/bench_masked_linear_gpu.py [--scores-dtype bf16|fp32] [--tokens 512 4096 16384 64 8]
    python bench/bench_masked_linear_gpu.py --smoke        # tiny shapes on the CPU: tests the script
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import environment, roofline, save_results, stream_row  # noqa: E402
from _compile_count import counting_compiles  # noqa: E402
from _timing import GRAPH_MAX_TOKENS, time_graph_us, time_us  # noqa: E402
from targets import check, table  # noqa: E402

from sparsebert import ops  # noqa: E402
from sparsebert.kernels._interpreter import INTERPRET  # noqa: E402
from sparsebert.kernels.score_masked_linear import score_masked_linear_fwd  # noqa: E402
# The unfused baseline is the ops layer's reference: W * [s >= tau] materialized (STE), then F.linear.
from sparsebert.ops.reference import score_masked_linear as unfused_linear  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LINEARS = [(768, 768), (768, 3072), (3072, 768)]  # (in_features K, out_features N)


# --------------------------------------------------------------------------------------------------
# analytic bytes: sum over the kernels each version launches of the tensors they read and write
# --------------------------------------------------------------------------------------------------
def bytes_moved(version, mode, t, k, n, e, s):
    """t tokens, k in, n out, e activation/weight element size, s scores element size."""
    x, y, w, sc, b = t * k * e, t * n * e, n * k * e, n * k * s, n * e
    nk = n * k
    if version == "dense":
        fwd = x + w + b + y
        bwd = (y + w + x) + (y + x + w) + (y + b)  # dx = dy W; dW = dy^T x; db = sum(dy)
    elif version in ("fused", "fused-tiles", "fused-persistent", "fused-streamk"):
        fwd = x + w + sc + b + y
        # bwd_input; bwd_weight_scores with db reduced from the dY tiles it already loads (only db's write)
        bwd = (y + w + sc + x) + (y + x + w + sc + sc + w) + b
    elif version == "unfused":
        to_w = (nk * s + nk * e) if s != e else 0  # m.to(weight.dtype)
        # scores >= tau (bool out); .to(scores dtype); .to(weight dtype); W * m; linear
        fwd = (nk * s + nk) + (nk + nk * s) + to_w + (2 * w + w) + (x + w + b + y)
        bwd = (y + w + x) + (y + x + w) + (y + b)  # linear backward on W_eff
        bwd += (2 * w + w) + (2 * w + w)  # mul backward: dW = dWeff * m, dm = dWeff * W
        bwd += (nk * e + nk * s) if s != e else 0  # dm cast back to the scores' dtype
    else:
        raise ValueError(version)
    return fwd if mode == "fwd" else fwd + bwd


def flops(mode, t, k, n):
    return 2 * t * k * n * (1 if mode == "fwd" else 3)


# --------------------------------------------------------------------------------------------------
def run_case(t, k, n, dtype, scores_dtype, sparsity, cuda, backend, graph_max_tokens=GRAPH_MAX_TOKENS):
    """Times dense, unfused and fused forward and forward+backward at one shape; returns the rows."""
    dev = "cuda" if cuda else "cpu"
    x = torch.randn(t, k, device=dev, dtype=dtype)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=dev, dtype=dtype)
    scores = torch.randn(n, k, device=dev, dtype=scores_dtype)
    dy = torch.randn(t, n, device=dev, dtype=dtype)
    tau = ops.topk_threshold([scores], sparsity, backend=backend)

    xg, wg, bg, sg = (v.clone().requires_grad_() for v in (x, w, b, scores))
    grads = [xg, wg, bg, sg]

    # the fused path is the public op, autograd included: what a user calling it gets
    fns = {
        ("dense", "fwd"): lambda: F.linear(x, w, b),
        ("dense", "fwd+bwd"): lambda: F.linear(xg, wg, bg).backward(dy),
        ("unfused", "fwd"): lambda: unfused_linear(x, w, b, scores, tau),
        ("unfused", "fwd+bwd"): lambda: unfused_linear(xg, wg, bg, sg, tau).backward(dy),
        ("fused", "fwd"): lambda: ops.score_masked_linear(x, w, b, scores, tau, backend=backend),
        ("fused", "fwd+bwd"): lambda: ops.score_masked_linear(xg, wg, bg, sg, tau, backend=backend).backward(dy),
    }
    if cuda or (INTERPRET and backend == "triton"):  # the Triton forward on each grid schedule, called directly
        for schedule in ("tiles", "persistent", "streamk"):
            fns[(f"fused-{schedule}", "fwd")] = lambda schedule=schedule: score_masked_linear_fwd(
                x, w, b, scores, tau, schedule=schedule)

    # correctness of the fused op against the unfused path before timing anything
    y_ref = unfused_linear(xg, wg, bg, sg, tau)
    y_ref.backward(dy)
    ref = {"y": y_ref.detach(), "dx": xg.grad, "dscores": sg.grad, "dw": wg.grad, "db": bg.grad}
    for g in grads:
        g.grad = None
    y = ops.score_masked_linear(xg, wg, bg, sg, tau, backend=backend)
    y.backward(dy)
    got = {"y": y.detach(), "dx": xg.grad, "dscores": sg.grad, "dw": wg.grad, "db": bg.grad}
    max_err = max(((got[name].float() - ref[name].float()).abs().max()
                   / ref[name].float().abs().max().clamp_min(1e-30)).item() for name in ref)
    for g in grads:
        g.grad = None
    schedule_err = {}  # the schedule rows' forward against the unfused one, checked before timing too
    for (version, mode), fn in fns.items():
        if version.startswith("fused-"):
            schedule_err[version] = ((fn().float() - ref["y"].float()).abs().max()
                                     / ref["y"].float().abs().max().clamp_min(1e-30)).item()

    rows = []
    e, s = torch.finfo(dtype).bits // 8, torch.finfo(scores_dtype).bits // 8
    for (version, mode), fn in fns.items():
        fn()  # compile / autotune outside the timed region
        us = time_us(fn, cuda, grad_to_none=grads if mode == "fwd+bwd" else None)
        graph_us = float("nan")
        if cuda and mode == "fwd" and t <= graph_max_tokens:
            graph_us = time_graph_us(fn, cuda)
        nbytes, nflops = bytes_moved(version, mode, t, k, n, e, s), flops(mode, t, k, n)
        ms = us / 1000
        row = {
            "tokens": t, "in_features": k, "out_features": n, "shape": f"{k}x{n}",
            "dtype": str(dtype).replace("torch.", ""), "scores_dtype": str(scores_dtype).replace("torch.", ""),
            "sparsity": sparsity, "mode": mode, "version": version, "backend": backend, "ms": ms,
            "graph_ms": graph_us / 1000, "tflops": nflops / ms / 1e9, "bytes": nbytes, "gbps": nbytes / ms / 1e6,
            "max_rel_err_vs_unfused": max_err if version == "fused" else schedule_err.get(version, 0.0),
        }
        row.update(roofline(nbytes, nflops))
        rows.append(row)
    for mode in ("fwd", "fwd+bwd"):
        by = {r["version"]: r["ms"] for r in rows if r["mode"] == mode}  # fused-* rows: fwd only
        for r in rows:
            if r["mode"] == mode:
                r["speedup_vs_unfused"] = by["unfused"] / r["ms"]
                r["time_vs_dense"] = r["ms"] / by["dense"]
    graph_dense = {r["mode"]: r["graph_ms"] for r in rows if r["version"] == "dense"}
    for r in rows:  # NaN where not graphed (fwd+bwd rows, and above --graph-max-tokens)
        r["graph_time_vs_dense"] = r["graph_ms"] / graph_dense[r["mode"]]
    for r in rows:
        stream_row("masked_linear", r)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384, 64, 8],
                        help="token counts, in order (the issue targets' counts first)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activations and weights")
    parser.add_argument("--scores-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights pruned by the scores")
    parser.add_argument("--backend", default="auto", help="backend of the fused op (auto = what a user gets)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shapes on the CPU (Triton interpreter when TRITON_INTERPRET=1): tests the script")
    parser.add_argument("--graph-max-tokens", type=int, default=GRAPH_MAX_TOKENS,
                        help="forward rows up to this many tokens are also timed as CUDA-graph replays")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    args = parser.parse_args(argv)

    if not 0.0 <= args.sparsity < 1.0:
        parser.error("--sparsity must be in [0, 1)")
    cuda = torch.cuda.is_available() and not args.smoke
    linears = LINEARS
    dtype, scores_dtype = DTYPES[args.dtype], DTYPES[args.scores_dtype]
    if args.smoke:
        linears, args.tokens, dtype, scores_dtype = [(48, 40)], [33], torch.float32, torch.float32
        if os.environ.get("TRITON_INTERPRET") == "1" and args.backend == "auto":
            args.backend = "triton"
    elif not torch.cuda.is_available():
        print("bench_masked_linear_gpu.py needs a CUDA GPU and none is visible to torch; nothing to measure "
              "(--smoke runs tiny shapes on the CPU).", file=sys.stderr)
        return 2
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels.", file=sys.stderr)
        return 2

    env = environment()
    print(f"# {env['gpu']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda']} | sha {env['git_sha']} | bf16 reduced-precision cuBLAS "
          f"{env['cublas_bf16_reduced_precision']}")
    rows = []
    header = (f"{'tokens':>6} {'K->N':>10} {'mode':>8} {'version':>16} {'ms':>9} {'graph ms':>9} {'roofline':>9} "
              f"{'TFLOP/s':>8} {'GB/s':>7} {'vs unfused':>10} {'vs dense':>9} {'max rel err':>11}")
    print(header)
    print("-" * len(header))
    for t in args.tokens:
        for k, n in linears:
            case = run_case(t, k, n, dtype, scores_dtype, args.sparsity, cuda, args.backend, args.graph_max_tokens)
            for r in case:
                print(f"{t:>6} {f'{k}->{n}':>10} {r['mode']:>8} {r['version']:>16} {r['ms']:>9.4f} "
                      f"{r['graph_ms']:>9.4f} {r['roofline_us'] / 1000:>9.4f} {r['tflops']:>8.2f} {r['gbps']:>7.0f} "
                      f"{r['speedup_vs_unfused']:>9.2f}x {r['time_vs_dense']:>8.2f}x "
                      f"{r['max_rel_err_vs_unfused']:>11.1e}", flush=True)
            rows.extend(case)
            if cuda:
                torch.cuda.empty_cache()
    verdicts = check([{"bench": "masked_linear", **r} for r in rows])
    print("\nissue targets (H100/H200, bf16):")
    print(table([v for v in verdicts if v["status"] != "NOT RUN"]))
    if not args.no_save:
        results_dir = args.results_dir
        if args.smoke and results_dir is None:
            results_dir = tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
        csv_path, json_path = save_results("bench_masked_linear_gpu", rows, results_dir=results_dir, env=env)
        print(f"\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    with counting_compiles():
        status = main()
    sys.exit(status)
