"""GPU benchmark: the token-count crossover of size dispatch (sparsebert/ops/crossover.json).

For masked_linear and score_masked_linear at the BERT-base shapes (768->3072, 3072->768, 768->768) in bf16
and fp16 it times forward + backward of the two paths `backend="auto"` chooses between on CUDA:
  fused        the fused Triton kernels (`backend="triton"`);
  weight_pass  W * m written once by one elementwise kernel, then cuBLAS GEMMs
               (`masked_linear_weight_pass` / `score_masked_linear_weight_pass`),
at token counts 16384, 8192, ..., 16 (largest first), and derives per (op, dtype) the crossover: the
smallest measured M from which the weight pass is at least as fast at every larger measured M. "At least
as fast at M" unless the fused path is more than `--margin` (5%) faster at every shape, so noise falls
on the weight pass's side (the unfused reference's GEMMs with fewer elementwise passes). When the weight
pass holds down to the smallest M measured, the crossover is 0 (always the weight pass).

Rows stream to the GPU suite ($SPARSEBERT_BENCH_STREAM) as measured. The table (`--table-out`, default
bench/results/<gpu>-<date>-<sha>-crossover.json) is the package's crossover.json with this GPU's entries
replaced, rewritten atomically after every determined (op, dtype): copy it to sparsebert/ops/crossover.json
to commit it. `--deadline-s` stops measuring in time to write; an (op, dtype) whose crossover the
measured token counts do not yet determine is left out of the table and named.

    python bench/bench_crossover.py                  # GPU: the full sweep
    python bench/bench_crossover.py --smoke          # tiny shapes on the CPU: tests the script
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compile_count import counting_compiles  # noqa: E402
from _results import environment, result_paths, roofline, save_results, stream_row  # noqa: E402

from sparsebert import ops  # noqa: E402
from sparsebert.ops import _crossover  # noqa: E402
from sparsebert.ops.masked_linear import masked_linear_weight_pass  # noqa: E402
from sparsebert.ops.score_masked_linear import score_masked_linear_weight_pass  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LINEARS = [(768, 3072), (3072, 768), (768, 768)]  # (in_features K, out_features N)
TOKENS = [2 ** p for p in range(4, 15)]  # 16 .. 16384
PATHS = ("fused", "weight_pass")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_case(op: str, t: int, k: int, n: int, dtype: torch.dtype, scores_dtype: torch.dtype, device: str,
              fused_backend: str = "triton", sparsity: float = 0.5) -> Tuple[Dict[str, Callable[[], None]], List[torch.Tensor]]:
    """The two fwd+bwd closures ("fused", "weight_pass") of `op` at one shape, and the leaves whose .grad
    the timer resets. Inputs are random (the mask keeps about 1 - sparsity of the weights)."""
    x = torch.randn(t, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, n, device=device, dtype=dtype)
    if op == "masked_linear":
        mask = (torch.rand(n, k, device=device) >= sparsity).to(torch.uint8)  # SparseLinear's mask dtype
        leaves = [x, w, b]
        fns = {"fused": lambda: ops.masked_linear(x, w, b, mask, backend=fused_backend).backward(dy),
               "weight_pass": lambda: masked_linear_weight_pass(x, w, b, mask).backward(dy)}
    elif op == "score_masked_linear":
        scores = torch.randn(n, k, device=device, dtype=scores_dtype, requires_grad=True)
        tau = torch.quantile(scores.detach().float().flatten()[:16384], sparsity).to(device)  # 0-dim, on device
        leaves = [x, w, b, scores]
        fns = {"fused": lambda: ops.score_masked_linear(x, w, b, scores, tau, backend=fused_backend).backward(dy),
               "weight_pass": lambda: score_masked_linear_weight_pass(x, w, b, scores, tau).backward(dy)}
    else:
        raise ValueError(f"op must be one of {_crossover.OPS}, got {op!r}")
    return fns, leaves


def time_ms(fn: Callable[[], None], leaves: Sequence[torch.Tensor], cuda: bool, reps: int) -> float:
    """Median milliseconds of fn(): on a GPU triton's do_bench after one untimed run (compilation,
    autotuning; L2 flushed before each run; short warm-up and repetition windows, the sweep has 264
    points); on a CPU (the --smoke run, where the time means nothing) the median of `reps` runs."""
    if cuda:
        fn()
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=25, grad_to_none=list(leaves), return_mode="median")
    times = []
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def minimal_bytes(op: str, t: int, k: int, n: int, e: int, s: int) -> int:
    """Bytes fwd+bwd must move at least: x, W, mask/scores, b and y forward; dy, x, W, mask/scores in and
    dx, dW, db (and dscores) out backward."""
    m = n * k * (s if op == "score_masked_linear" else 1)
    fwd = t * k * e + n * k * e + m + n * e + t * n * e
    bwd = t * n * e + t * k * e + n * k * e + m + t * k * e + n * k * e + n * e
    return fwd + bwd + (m if op == "score_masked_linear" else 0)


def derive(points: Dict[Tuple[int, int, int], Tuple[float, float]], tokens: Sequence[int], shapes,
           margin: float) -> Tuple[Optional[int], Dict[int, bool]]:
    """points[(M, K, N)] = (fused ms, weight-pass ms) of one (op, dtype); tokens: the sweep's token counts.

    Returns (crossover, {M: fused wins at M}) over the top-down prefix of `tokens` measured at every shape.
    The fused path wins at M when it is more than `margin` faster at every shape. Crossover: the smallest
    measured M above the largest winning M; twice the largest M when the fused path wins there (the weight
    pass only above the sweep); 0 when it wins nowhere in the whole sweep; None while no win has been seen
    and the sweep is not finished (not determined)."""
    wins: Dict[int, bool] = {}
    for m in sorted(tokens, reverse=True):
        if not all((m, k, n) in points for k, n in shapes):
            break
        wins[m] = all(points[(m, k, n)][0] * (1.0 + margin) < points[(m, k, n)][1] for k, n in shapes)
    winning = [m for m, w in wins.items() if w]
    if not winning:
        return (0 if wins and len(wins) == len(set(tokens)) else None), wins
    above = [m for m in wins if m > max(winning)]
    return (min(above) if above else 2 * max(winning)), wins


def write_table(path: Path, gpu: str, found: Dict[Tuple[str, str], int], env: Dict[str, str], margin: float,
                tokens: Sequence[int]) -> dict:
    """The package table with this GPU's measured (op, dtype) entries replaced, validated, written atomically."""
    table = copy.deepcopy(_crossover.load_table(_crossover.TABLE_PATH))
    if not found:
        _atomic_json(path, table)
        return table
    entry = table["gpus"].setdefault(gpu, {})
    for (op, dt), tokens_at in sorted(found.items()):
        entry.setdefault(op, {})[dt] = int(tokens_at)
    table.setdefault("measured", {})[gpu] = {
        "date": _dt.date.today().isoformat(), "git_sha": env["git_sha"], "torch": env["torch"],
        "triton": env["triton"], "cuda": env["cuda"], "driver": env["driver"], "margin": margin,
        "tokens": list(tokens), "entries": [f"{op}/{dt}" for op, dt in sorted(found)], "by": "bench/bench_crossover.py"}
    _crossover.parse_table(table)
    _atomic_json(path, table)
    return table


def _atomic_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], default=["bf16", "fp16"])
    p.add_argument("--ops", nargs="+", choices=list(_crossover.OPS), default=list(_crossover.OPS))
    p.add_argument("--scores-dtype", choices=["fp32", "same"], default="fp32",
                   help="score_masked_linear's scores: fp32 (SparseLinear's default) or the weight's dtype")
    p.add_argument("--margin", type=float, default=0.05,
                   help="the fused path wins at M only when more than this fraction faster at every shape")
    p.add_argument("--full", action="store_true",
                   help="measure every token count (default: stop an (op, dtype) once its crossover is determined)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop measuring after this many seconds")
    p.add_argument("--table-out", default=None, help="crossover table to write (default: next to the results)")
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    p.add_argument("--smoke", action="store_true",
                   help="tiny fp32 shapes on the CPU (Triton interpreter when TRITON_INTERPRET=1): tests the script")
    args = p.parse_args(argv)
    if not 0.0 <= args.margin < 1.0:
        p.error("--margin must be in [0, 1)")
    if any(t < 1 for t in args.tokens):
        p.error("--tokens must be positive")
    tokens = sorted(set(args.tokens), reverse=True)
    t_start = time.time()

    cuda = torch.cuda.is_available() and not args.smoke
    shapes, dtypes, reps = LINEARS, [DTYPES[d] for d in args.dtypes], 1
    if args.smoke:
        shapes, tokens, dtypes, reps = [(32, 48)], [32, 16], [torch.float32], 1
        args.results_dir = args.results_dir or tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
    elif not torch.cuda.is_available():
        print("bench_crossover.py needs a CUDA GPU and none is visible to torch (--smoke runs tiny shapes on "
              "the CPU).", file=sys.stderr)
        return 2
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels.", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    # the fused kernels are Triton's; a CPU smoke run without the interpreter times the torch backend instead
    fused_backend = "triton" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    env = environment()
    gpu = env["gpu"]
    csv_path, _ = result_paths(env, results_dir=args.results_dir)
    table_out = Path(args.table_out) if args.table_out else Path(str(csv_path)[: -len(".csv")] + "-crossover.json")
    print(f"# crossover sweep: {gpu} | torch {env['torch']} | triton {env['triton']} | sha {env['git_sha']} | "
          f"margin {args.margin:.0%}")
    print(f"{'op':>20} {'dtype':>8} {'tokens':>6} {'K->N':>10} {'fused ms':>9} {'weight ms':>9} {'fused/weight':>12}")

    torch.manual_seed(0)
    rows: List[Dict] = []
    found: Dict[Tuple[str, str], int] = {}
    undetermined: List[str] = []
    out_of_time = False
    for dtype in dtypes:
        scores_dtype = torch.float32 if args.scores_dtype == "fp32" else dtype
        e, s = torch.finfo(dtype).bits // 8, torch.finfo(scores_dtype).bits // 8
        for op in args.ops:
            points: Dict[Tuple[int, int, int], Tuple[float, float]] = {}
            crossover = None
            for t in tokens:
                for k, n in shapes:
                    if args.deadline_s is not None and time.time() - t_start > args.deadline_s:
                        out_of_time = True
                        break
                    fns, leaves = make_case(op, t, k, n, dtype, scores_dtype, device, fused_backend)
                    fused_ms = time_ms(fns["fused"], leaves, cuda, reps)
                    weight_ms = time_ms(fns["weight_pass"], leaves, cuda, reps)
                    points[(t, k, n)] = (fused_ms, weight_ms)
                    row = {"op": op, "fused_backend": fused_backend, "dtype": dtype_name(dtype), "scores_dtype": dtype_name(scores_dtype),
                           "tokens": t, "in_features": k, "out_features": n, "shape": f"{k}x{n}", "mode": "fwd+bwd",
                           "fused_ms": fused_ms, "weight_pass_ms": weight_ms,
                           "fused_over_weight_pass": fused_ms / weight_ms,
                           "fused_wins": fused_ms * (1.0 + args.margin) < weight_ms}
                    row.update(roofline(minimal_bytes(op, t, k, n, e, s), 6 * t * k * n))
                    rows.append(row)
                    stream_row("crossover", row)
                    print(f"{op:>20} {dtype_name(dtype):>8} {t:>6} {f'{k}->{n}':>10} {fused_ms:>9.4f} "
                          f"{weight_ms:>9.4f} {fused_ms / weight_ms:>12.3f}", flush=True)
                    del fns, leaves
                if out_of_time:
                    break
                crossover, _ = derive(points, tokens, shapes, args.margin)
                if crossover is not None and not args.full:
                    break
            crossover, wins = derive(points, tokens, shapes, args.margin)
            key = f"{op}/{dtype_name(dtype)}"
            if crossover is None:
                undetermined.append(key)
                print(f"  {key}: crossover not determined ({len(wins)} of {len(tokens)} token counts measured)")
            else:
                found[(op, dtype_name(dtype))] = crossover
                write_table(table_out, gpu, found, env, args.margin, tokens)
                print(f"  {key}: crossover {crossover} tokens (weight pass at and above)")
            if cuda:
                torch.cuda.empty_cache()
            if out_of_time:
                break
        if out_of_time:
            break
    if out_of_time:
        print(f"deadline of {args.deadline_s:.0f} s reached: stopped measuring")
    for dtype in dtypes:
        for op in args.ops:
            key = f"{op}/{dtype_name(dtype)}"
            if (op, dtype_name(dtype)) not in found and key not in undetermined:
                undetermined.append(key)
    table = write_table(table_out, gpu, found, env, args.margin, tokens)
    summary = {"gpu": gpu, "crossover": table["gpus"].get(gpu, {}), "undetermined": undetermined,
               "table_file": str(table_out)}
    print("crossover:", json.dumps(summary))
    if undetermined:
        print("not determined (no entry written; `auto` keeps default_tokens for them): " + ", ".join(undetermined))
    print(f"wrote {table_out}: copy it to sparsebert/ops/crossover.json to commit this GPU's crossover")
    if rows:
        csv_path, json_path = save_results("bench_crossover", rows, results_dir=args.results_dir, env=env)
        print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    with counting_compiles():
        status = main()
    sys.exit(status)
