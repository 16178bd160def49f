"""Sparse inference benchmark: compressed formats vs dense cuBLAS, in one run.

Sweep (module level: the compressed modules' forward, what a user gets; --launcher times the kernels alone):
    density  1.0 0.5 0.3 0.1  x  tokens 1 16 64 512 4096  x  BERT-base linears (K -> N) 768->768,
    768->3072, 3072->768  x  formats:
      dense      F.linear on a full weight (cuBLAS), the baseline of every speedup;
      bitmask    sparsebert.kernels.bitmask_linear (unstructured weight at that density);
      bsr16/32/64  sparsebert.kernels.bsr_linear (block-structured weight at that block density; the
                 schedule bsr_linear_fwd's "auto" picks), bsr64-tiles the same kernel launcher forced to
                 the one-program-per-tile schedule (the persistent schedule's comparison);
      torch-bsr64  torch.sparse._triton_ops.bsr_dense_addmm (torch's Triton BSR kernel) on the same
                 weight as a torch BSR tensor, y^T = bias + W @ x^T (its output is N-major; the row times
                 the call, and returns the transposed view); CUDA only, skipped with a reason elsewhere;
      2:4        SemiStructuredLinear (policy "auto": timed probe, dense fallback when slower) and
      2:4-sparse torch's semi-structured kernel forced; only at density 0.5, their natural density.
End to end: a random-init BERT-base encoder (12 layers, bf16) pruned to each format's granularity,
compressed, and timed at (batch, seq) = (1,1) (1,16) (1,64) (4,128) (32,128), eager and CUDA-graph replay.

Times are medians of triton.testing.do_bench (L2 flushed between runs); rows up to --graph-max-tokens are also
timed as CUDA-graph replays (do_bench_cudagraph), beside the eager numbers. Each row carries the bytes of
the stored weight, its ratio to dense, the max error against the dense product of the same weight, the
H200 roofline time of its bytes and FLOPs, and the environment (git SHA, GPU, driver, torch, triton,
CUDA, cuBLAS reduced precision) via bench/_results.py. Writes bench/results/<gpu>-<date>.{csv,
json} and <gpu>-<date>-sparse-inference.png (speedup vs density, one panel per token count), prints the
issue's targets with PASS/MISS.

    python bench/bench_sparse_inference.py              # the full GPU run
    python bench/bench_sparse_inference.py --smoke      # tiny shapes on CPU, results to a temp dir
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compile_count import counting_compiles  # noqa: E402
from _results import environment, roofline, save_results, stream_row  # noqa: E402
from _timing import GRAPH_MAX_TOKENS, time_graph_us  # noqa: E402
from targets import check, table  # noqa: E402

from sparsebert.nn.compress import (BitmaskLinear, BSRLinear, SemiStructuredLinear, compress,  # noqa: E402
                                    footprint_report)
from sparsebert.ops import reference_formats as rf  # noqa: E402
from sparsebert.nn.granularity import granular_topk_mask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LINEARS = [(768, 768), (768, 3072), (3072, 768)]  # (K in_features, N out_features)
E2E_SHAPES = [(1, 1), (1, 16), (1, 64), (4, 128), (32, 128)]  # (batch, seq)


def timer(fn, cuda: bool) -> float:
    """Median microseconds of fn()."""
    if cuda:
        import triton.testing
        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def unstructured(n, k, density, dtype, device):
    w = torch.randn(n, k, device=device)
    return (w * granular_topk_mask(torch.rand(n, k, device=device), 1 - density)).to(dtype)


def block_sparse(n, k, block, density, dtype, device):
    w = torch.randn(n, k, device=device)
    return (w * granular_topk_mask(torch.rand(n, k, device=device), 1 - density, ("block", block))).to(dtype)


def two_four(n, k, dtype, device):
    w = torch.randn(n, k, device=device)
    return (w * granular_topk_mask(w.abs(), 0.5, "2:4")).to(dtype)


def linear_roofline(fmt, tokens, k, n, density, weight_bytes, elem):
    """H200 roofline of one sparse linear: activations, output, bias and the stored weight once; FLOPs
    of what the kernel multiplies (bitmask: every tile, dense; BSR: the kept blocks; 2:4: half)."""
    nbytes = (tokens * k + tokens * n + n) * elem + weight_bytes
    dense_flops = 2 * tokens * k * n
    frac = density if "bsr" in fmt else 0.5 if fmt.startswith("2:4") else 1.0
    return roofline(nbytes, dense_flops * frac)


class SpmmWeight:
    """A weight in the tc-bitmask format timed through sparsebert.ops.bitmask_spmm (the CUDA kernel on a GPU
    with fp16/bf16, else the Triton fallback): the bench's "bitmask-spmm" rows (issue 10 item 3)."""

    def __init__(self, w, bias):
        self.data, self.tile_offsets = rf.tc_bitmask_encode(w)
        self.bias, self.out_features, self.in_features = bias, w.shape[0], w.shape[1]

    def weight_nbytes(self):
        return rf.tc_bitmask_nbytes(self.data, self.tile_offsets)

    def __call__(self, x):
        from sparsebert.ops import bitmask_spmm
        return bitmask_spmm(x, self.data, self.tile_offsets, self.bias, self.out_features, self.in_features)


class TorchBSRWeight:
    """A block-sparse weight timed through torch's Triton BSR kernel (torch.sparse._triton_ops
    .bsr_dense_addmm): the bench's "torch-bsr64" rows (issue 10 item 4). CUDA only."""

    def __init__(self, w, bias, block):
        from torch.sparse._triton_ops import bsr_dense_addmm
        self._addmm = bsr_dense_addmm
        self.bsr = w.to_sparse_bsr((block, block))
        self.bias = bias

    def weight_nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.bsr.values(), self.bsr.crow_indices(),
                                                          self.bsr.col_indices()))

    def __call__(self, x):
        bias = self.bias[:, None].expand(self.bias.shape[0], x.shape[0])
        return self._addmm(bias, self.bsr, x.t()).t()


def kernel_fn(fmt, module, x, cuda, launcher=False):
    """The call to time: the module (what a user gets), or with `launcher` on a GPU the kernel launcher
    itself (no validation)."""
    if fmt.endswith("-tiles"):  # the BSR launcher with its schedule forced
        from sparsebert.kernels.bsr_linear import bsr_linear_fwd
        m = module
        return lambda: bsr_linear_fwd(x, m.values, m.crow_indices, m.col_indices, m.bias, m.in_features,
                                      schedule="tiles")
    if not (cuda and launcher):
        return lambda: module(x)
    if fmt == "bitmask":
        from sparsebert.kernels.bitmask_linear import bitmask_linear_fwd
        m = module
        return lambda: bitmask_linear_fwd(x, m.values, m.bitmask, m.tile_offsets, m.bias, m.in_features,
                                          m.tile_n, m.tile_k)
    if fmt.startswith("bsr"):
        from sparsebert.kernels.bsr_linear import bsr_linear_fwd
        m = module
        return lambda: bsr_linear_fwd(x, m.values, m.crow_indices, m.col_indices, m.bias, m.in_features)
    return lambda: module(x)


def sweep(args, device, dtype, cuda):
    rows, skipped = [], set()
    for k, n in args.linears:
        dense_w = torch.randn(n, k, device=device, dtype=dtype)
        bias = torch.randn(n, device=device, dtype=dtype)
        dense_bytes = rf.dense_nbytes(n, k, dtype)
        for tokens in args.tokens:
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            elem = torch.finfo(dtype).bits // 8
            dense_fn = lambda: F.linear(x, dense_w, bias)  # noqa: E731
            t_dense = timer(dense_fn, cuda)
            graphs = cuda and tokens <= args.graph_max_tokens and not args.no_graphs
            g_dense = time_graph_us(dense_fn, cuda) if graphs else float("nan")
            row = dict(kind="linear", shape=f"{k}x{n}", K=k, N=n, tokens=tokens, density=1.0,
                       format="dense", time_us=t_dense, dense_time_us=t_dense, speedup=1.0,
                       graph_time_us=g_dense, graph_dense_time_us=g_dense, graph_speedup=1.0 if graphs else float("nan"),
                       bytes=dense_bytes, dense_bytes=dense_bytes, bytes_ratio=1.0, max_abs_err=0.0,
                       **linear_roofline("dense", tokens, k, n, 1.0, dense_bytes, elem))
            rows.append(row)
            stream_row("sparse_inference", row)
            cases = []
            for density in args.densities:
                if "bitmask" in args.formats:
                    w = unstructured(n, k, density, dtype, device)
                    cases.append(("bitmask", density, w, BitmaskLinear(w, bias, tile=tuple(args.tile))))
                if "bitmask-spmm" in args.formats:
                    w = unstructured(n, k, density, dtype, device)
                    cases.append(("bitmask-spmm", density, w, SpmmWeight(w, bias)))
                for block in (16, 32, 64):
                    wanted = [f for f in (f"bsr{block}", f"bsr{block}-tiles", f"torch-bsr{block}") if f in args.formats]
                    if not wanted or n % block or k % block:
                        continue
                    w = block_sparse(n, k, block, density, dtype, device)
                    for fmt in wanted:
                        if fmt.startswith("torch-") and not cuda:
                            skipped.add(f"{fmt}: torch's bsr_dense_addmm is a CUDA Triton kernel (no GPU here)")
                            continue
                        if fmt.endswith("-tiles") and not cuda:
                            skipped.add(f"{fmt}: times the Triton launcher, which needs a GPU")
                            continue
                        module = TorchBSRWeight(w, bias, block) if fmt.startswith("torch-") else \
                            BSRLinear(w, bias, block_size=block)
                        cases.append((fmt, density, w, module))
            if "2:4" in args.formats:
                w = two_four(n, k, dtype, device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    cases.append(("2:4", 0.5, w, SemiStructuredLinear(w, bias, policy="auto")))
                    cases.append(("2:4-sparse", 0.5, w, SemiStructuredLinear(w, bias, policy="sparse")))
            for fmt, density, w, module in cases:
                fn = kernel_fn(fmt, module, x, cuda, args.launcher)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    y = fn()
                    t = timer(fn, cuda)
                    g, graph_error = float("nan"), ""
                    if graphs:
                        try:
                            g = time_graph_us(fn, cuda)
                        except Exception as exc:  # report, keep going: the eager number still stands
                            graph_error = f"{type(exc).__name__}: {exc}"[:200]
                err = (y.float() - F.linear(x.float(), w.float(), bias.float())).abs().max().item()
                row = dict(kind="linear", shape=f"{k}x{n}", K=k, N=n, tokens=tokens, density=density, format=fmt,
                           time_us=t, dense_time_us=t_dense, speedup=t_dense / t, graph_time_us=g,
                           graph_dense_time_us=g_dense, graph_speedup=g_dense / g, graph_error=graph_error,
                           bytes=module.weight_nbytes(), dense_bytes=dense_bytes,
                           bytes_ratio=module.weight_nbytes() / dense_bytes, max_abs_err=err,
                           **linear_roofline(fmt, tokens, k, n, density, module.weight_nbytes(), elem))
                if isinstance(module, SemiStructuredLinear):
                    row["plan"] = json.dumps(module.plan)
                    row["fallback_reason"] = module.fallback_reason or ""
                    row["sparse_impl"] = type(module._sparse).__name__ if module._sparse is not None else ""
                rows.append(row)
                stream_row("sparse_inference", row)
                print(f"{k:>5}x{n:<5} t={tokens:<5} d={density:<4} {fmt:<11} {t:9.2f} us  dense {t_dense:9.2f} us"
                      f"  x{t_dense / t:5.2f}  graph x{row['graph_speedup']:5.2f}  roofline {row['roofline_us']:8.2f} us"
                      f"  bytes x{row['bytes_ratio']:.3f}  err {err:.2e}", flush=True)
    for reason in sorted(skipped):
        print(f"skipped {reason}")
    return rows


def end_to_end(args, device, dtype, cuda):
    import transformers
    config = transformers.BertConfig(**args.e2e_config)
    base = transformers.BertModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    variants = [("dense", 1.0, None, {})]
    for density in [d for d in args.densities if d < 1.0]:
        variants.append(("bitmask", density, "element", {"tile": tuple(args.tile)}))
        variants.append(("bsr", density, ("block", args.e2e_block), {"block_size": args.e2e_block}))
    variants.append(("2:4", 0.5, "2:4", {}))
    rows, dense_times = [], {}
    for fmt, density, granularity, kwargs in variants:
        model = copy.deepcopy(base)
        if granularity is not None:
            with torch.no_grad():
                for name in targets:
                    lin = model.get_submodule(name)
                    lin.weight.mul_(granular_topk_mask(lin.weight.float().abs(), 1 - density, granularity))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                compress(model, fmt, modules=targets, **kwargs)
        report = footprint_report(model)
        for batch, seq in args.e2e_shapes:
            ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                run = lambda: model(input_ids=ids).last_hidden_state  # noqa: E731
                run()
                t_eager = timer(run, cuda)
                t_graph, graph_error = float("nan"), ""
                if cuda and not args.no_graphs:
                    try:
                        stream = torch.cuda.Stream()
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            for _ in range(3):
                                run()
                        torch.cuda.current_stream().wait_stream(stream)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            run()
                        t_graph = timer(graph.replay, cuda)
                    except Exception as exc:  # report, keep going: eager numbers still stand
                        graph_error = f"{type(exc).__name__}: {exc}"[:200]
            key = (batch, seq)
            if fmt == "dense":
                dense_times[key] = (t_eager, t_graph)
            de, dg = dense_times[key]
            rows.append(dict(kind="encoder", shape=f"bert{config.num_hidden_layers}L-{config.hidden_size}",
                             tokens=batch * seq, batch=batch, seq=seq, density=density,
                             format=fmt if fmt != "bsr" else f"bsr{args.e2e_block}", time_us=t_eager,
                             dense_time_us=de, speedup=de / t_eager, graph_time_us=t_graph,
                             graph_dense_time_us=dg, graph_speedup=dg / t_graph if t_graph == t_graph else float("nan"),
                             bytes=report["total_bytes"], dense_bytes=report["dense_bytes"],
                             bytes_ratio=report["ratio"], graph_error=graph_error))
            stream_row("sparse_inference", rows[-1])
            print(f"encoder {fmt:<8} d={density:<4} {batch}x{seq:<4} eager {t_eager:10.1f} us (x{de / t_eager:5.2f})"
                  f"  graph {t_graph:10.1f} us  bytes x{report['ratio']:.3f} {graph_error}", flush=True)
        del model
    return rows


def check_targets(rows):
    """The issue's targets, each as (name, passed, detail)."""
    lin = [r for r in rows if r["kind"] == "linear"]

    def speedups(fmt, density, tok_ok):
        return [r["speedup"] for r in lin if r["format"] == fmt and abs(r["density"] - density) < 1e-9
                and tok_ok(r["tokens"])]

    out = []
    for name, fmt, dens, tok_ok, need in [
        ("bitmask 10% density, <=64 tokens: >= 2x", "bitmask", 0.1, lambda t: t <= 64, 2.0),
        ("bitmask 30% density, <=64 tokens: >= 1.4x", "bitmask", 0.3, lambda t: t <= 64, 1.4),
        ("bitmask-spmm 10% density, <=64 tokens: >= 2x", "bitmask-spmm", 0.1, lambda t: t <= 64, 2.0),
        ("bitmask-spmm 30% density, <=64 tokens: >= 1.4x", "bitmask-spmm", 0.3, lambda t: t <= 64, 1.4),
        ("bsr64 10% density, 4096 tokens: >= 3x", "bsr64", 0.1, lambda t: t >= 4096, 3.0),
        ("2:4 (auto), >= 4096 tokens: >= 1.1x", "2:4", 0.5, lambda t: t >= 4096, 1.1),
        ("2:4 (auto) never slower than dense (5% noise)", "2:4", 0.5, lambda t: True, 0.95),
    ]:
        s = speedups(fmt, dens, tok_ok)
        if s:
            out.append((name, min(s) >= need, f"min x{min(s):.2f}, max x{max(s):.2f} over {len(s)} rows"))
    mem = [r["bytes_ratio"] for r in lin if r["format"] == "bitmask" and abs(r["density"] - 0.3) < 1e-9]
    if mem:
        out.append(("bitmask 30% density bytes <= 0.45x dense", max(mem) <= 0.45, f"max x{max(mem):.3f}"))
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lin = [r for r in rows if r["kind"] == "linear" and r["format"] != "dense"]
    tokens = sorted({r["tokens"] for r in lin})
    fig, axes = plt.subplots(1, len(tokens), figsize=(4 * len(tokens), 3.6), sharey=True, squeeze=False)
    for ax, tok in zip(axes[0], tokens):
        for fmt in sorted({r["format"] for r in lin}):
            pts = {}
            for r in lin:
                if r["format"] == fmt and r["tokens"] == tok:
                    pts.setdefault(r["density"], []).append(math.log(r["speedup"]))
            xs = sorted(pts)
            ys = [math.exp(sum(pts[d]) / len(pts[d])) for d in xs]  # geometric mean over the shapes
            ax.plot(xs, ys, marker="o", label=fmt)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{tok} tokens")
        ax.set_xlabel("density")
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.3, 0.5, 1.0], ["0.1", "0.3", "0.5", "1"])
    axes[0][0].set_ylabel("speedup over dense (geomean of shapes)")
    axes[0][-1].legend(fontsize=7)
    env = environment()
    fig.suptitle(f"sparse inference vs dense cuBLAS: {env['gpu']}, torch {env['torch']}, triton {env['triton']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 512, 4096])
    p.add_argument("--formats", nargs="+", default=["bitmask", "bitmask-spmm", "bsr16", "bsr32", "bsr64", "bsr64-tiles",
                                                    "torch-bsr64", "2:4"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tile", type=int, nargs=2, default=[32, 64], help="bitmask (TILE_N, TILE_K)")
    p.add_argument("--e2e-block", type=int, default=64, help="BSR block size of the end-to-end encoder")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings (linears, end to end)")
    p.add_argument("--graph-max-tokens", type=int, default=GRAPH_MAX_TOKENS,
                   help="linear rows up to this many tokens are also timed as CUDA-graph replays")
    p.add_argument("--launcher", action="store_true",
                   help="time the bitmask/BSR kernel launchers instead of the modules (no Python validation)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU; results go to a temp dir")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    args.linears = LINEARS
    args.e2e_config = {}  # BertConfig defaults = BERT-base
    args.e2e_shapes = E2E_SHAPES
    results_dir = args.results_dir
    if args.smoke:
        dtype = torch.float32
        args.linears, args.tokens, args.tile = [(64, 128), (128, 64)], [1, 16], [16, 32]
        args.densities = [1.0, 0.3]
        args.e2e_config = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                               vocab_size=100)
        args.e2e_shapes, args.e2e_block = [(1, 4), (2, 8)], 32
        results_dir = results_dir or tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
    elif not cuda:
        p.error("no CUDA GPU visible: the sweep is a GPU benchmark (use --smoke for a CPU run of the script)")

    torch.manual_seed(0)
    rows = sweep(args, device, dtype, cuda)
    if not args.no_e2e:
        rows += end_to_end(args, device, dtype, cuda)
    for r in rows:
        r["dtype"] = args.dtype if not args.smoke else "fp32"
    csv_path, json_path = save_results("sparse_inference", rows, results_dir=results_dir)
    png = Path(str(csv_path)[: -len(".csv")] + "-sparse-inference.png")
    plot(rows, png)
    print(f"\nwrote {csv_path}\n      {json_path}\n      {png}")
    print("\ntargets (issue 5):")
    for name, ok, detail in check_targets(rows):
        print(f"  [{'PASS' if ok else 'MISS'}] {name}: {detail}")
    verdicts = [v for v in check({"bench": "sparse_inference", **r} for r in rows) if v["status"] != "NOT RUN"]
    print("\ntargets (issue 9, bench/targets.py):\n" + table(verdicts))
    return 0


if __name__ == "__main__":
    with counting_compiles():
        status = main()
    sys.exit(status)
