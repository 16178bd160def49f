"""The speed targets of the GPU benchmarks (issue 9), as data, and their check against result rows.

One list, read by the GPU suite's closing PASS/MISS table (bench/gpu_suite.py) and quoted by the README.
A target selects rows by field values (`where`: field -> allowed values), reads one metric from each and
takes the worst: for "<=" targets the largest value, for ">=" the smallest. No matching row: NOT RUN.
Ratios: `time_vs_dense` = time / dense time (lower is better), `speedup*` = baseline time / time.

Two timings per row where the benchmark has both: eager (each call launched from Python, what a script
calling the op gets) and CUDA-graph replay (`graph_metric`: the same launches replayed without Python, what
a served model gets under torch.compile(mode="reduce-overhead") or a captured graph). A target with a
graph metric is judged on the graph numbers when every row it selects has one (`basis` says which), and
both worst values are reported. The first GPU run (bench/results/README.md) showed why: at <= 64 tokens a
dense cuBLAS call is ~7 us eager and ~3.5 us of GPU time, so any Python-launched op is judged on its launch
path there rather than on its kernel unless the graph numbers are used.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

WIDE = ["768x3072", "3072x768"]  # the 3072-wide BERT-base linears, "KxN"
SQUARE = ["768x768"]

TARGETS: List[Dict] = [
    dict(id="sml-fwd-vs-cublas", text="score-masked linear fwd within 1.05x of cuBLAS at 4096/16384 tokens",
         where=dict(bench="masked_linear", version="fused", mode="fwd", tokens=[4096, 16384]),
         metric="time_vs_dense", graph_metric="graph_time_vs_dense", op="<=", value=1.05),
    dict(id="sml-fwdbwd-vs-dense", text="score-masked linear fwd+bwd within 1.05x of dense fwd+bwd at 4096/16384 tokens",
         where=dict(bench="masked_linear", version="fused", mode="fwd+bwd", tokens=[4096, 16384]),
         metric="time_vs_dense", op="<=", value=1.05),
    dict(id="sml-512-vs-unfused", text="score-masked linear fwd+bwd at 512 tokens >= 1.5x faster than unfused",
         where=dict(bench="masked_linear", version="fused", mode="fwd+bwd", tokens=[512]),
         metric="speedup_vs_unfused", op=">=", value=1.5),
    dict(id="bitmask-10-wide", text="bitmask 10% density, <= 64 tokens, 768->3072 and 3072->768: >= 2x",
         where=dict(bench="sparse_inference", kind="linear", format="bitmask", density=[0.1],
                    tokens=[1, 16, 64], shape=WIDE), metric="speedup", graph_metric="graph_speedup", op=">=", value=2.0),
    dict(id="bitmask-10-square", text="bitmask 10% density, <= 64 tokens, 768->768: >= 1.4x",
         where=dict(bench="sparse_inference", kind="linear", format="bitmask", density=[0.1],
                    tokens=[1, 16, 64], shape=SQUARE), metric="speedup", graph_metric="graph_speedup", op=">=", value=1.4),
    dict(id="bitmask-30-wide", text="bitmask 30% density, <= 64 tokens, 3072-wide: >= 1.4x",
         where=dict(bench="sparse_inference", kind="linear", format="bitmask", density=[0.3],
                    tokens=[1, 16, 64], shape=WIDE), metric="speedup", graph_metric="graph_speedup", op=">=", value=1.4),
    dict(id="bitmask-30-square", text="bitmask 30% density, <= 64 tokens, 768->768: >= 1.2x",
         where=dict(bench="sparse_inference", kind="linear", format="bitmask", density=[0.3],
                    tokens=[1, 16, 64], shape=SQUARE), metric="speedup", graph_metric="graph_speedup", op=">=", value=1.2),
    dict(id="bsr64-10-wide", text="BSR-64 10% density, 4096 tokens, 3072-wide: >= 3x",
         where=dict(bench="sparse_inference", kind="linear", format="bsr64", density=[0.1], tokens=[4096],
                    shape=WIDE), metric="speedup", graph_metric="graph_speedup", op=">=", value=3.0),
    dict(id="bsr64-10-square", text="BSR-64 10% density, 4096 tokens, 768->768: >= 2.5x",
         where=dict(bench="sparse_inference", kind="linear", format="bsr64", density=[0.1], tokens=[4096],
                    shape=SQUARE), metric="speedup", graph_metric="graph_speedup", op=">=", value=2.5),
    dict(id="2:4-wide", text="2:4 (auto) >= 1.1x at >= 4096 tokens on 3072-wide layers",
         where=dict(bench="sparse_inference", kind="linear", format="2:4", tokens=[4096, 16384], shape=WIDE),
         metric="speedup", graph_metric="graph_speedup", op=">=", value=1.1),
    dict(id="2:4-never-slower", text="2:4 (auto) never slower than dense (3% timing noise allowed)",
         where=dict(bench="sparse_inference", kind="linear", format="2:4"), metric="speedup", graph_metric="graph_speedup", op=">=", value=0.97),
    dict(id="kprune-bert-base", text="pruned BERT-base, 40% FLOPs kept, batch 32x128 bf16: >= 2.3x end to end",
         where=dict(bench="structured_speed", shape="bert-base", batch=[32], seq=[128], dtype="bfloat16"),
         metric="speedup", graph_metric="graph_speedup", op=">=", value=2.3),
]


def _matches(row: Dict, where: Dict) -> bool:
    for field, allowed in where.items():
        allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        value = row.get(field)
        if value is None:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not any(isinstance(a, (int, float)) and abs(value - a) < 1e-9 for a in allowed):
                return False
        elif value not in allowed:
            return False
    return True


def _values(rows: List[Dict], target: Dict, metric: str) -> List[float]:
    out = []
    for r in rows:
        if not _matches(r, target["where"]) or r.get(metric) in (None, ""):
            continue
        v = float(r[metric])
        if v == v:  # NaN: not measured
            out.append(v)
    return out


def check(rows: Iterable[Dict], targets: List[Dict] = TARGETS) -> List[Dict]:
    """One verdict per target: id, text, status (PASS / MISS / NOT RUN), measured (worst value of the basis),
    basis ("graph" or "eager"), measured_eager, measured_graph (None where not timed), n_rows."""
    rows = list(rows)
    out = []
    for t in targets:
        goal = f"{t['metric']} {t['op']} {t['value']}"
        n_selected = sum(1 for r in rows if _matches(r, t["where"]))
        eager = _values(rows, t, t["metric"])
        graph = _values(rows, t, t["graph_metric"]) if t.get("graph_metric") else []
        worst = (lambda xs: max(xs)) if t["op"] == "<=" else (lambda xs: min(xs))
        measured_eager = worst(eager) if eager else None
        measured_graph = worst(graph) if graph else None
        if graph and len(graph) == n_selected:
            basis, measured, n = "graph", measured_graph, len(graph)
        elif eager:
            basis, measured, n = "eager", measured_eager, len(eager)
        else:
            out.append(dict(id=t["id"], text=t["text"], status="NOT RUN", measured=None, basis=None,
                            measured_eager=None, measured_graph=None, n_rows=0, goal=goal))
            continue
        ok = measured <= t["value"] if t["op"] == "<=" else measured >= t["value"]
        out.append(dict(id=t["id"], text=t["text"], status="PASS" if ok else "MISS", measured=measured, basis=basis,
                        measured_eager=measured_eager, measured_graph=measured_graph, n_rows=n, goal=goal))
    return out


def table(verdicts: List[Dict]) -> str:
    """The short closing table: target, measured ratio (of the basis), eager and graph values, PASS/MISS."""
    def fmt(x):
        return "-" if x is None else f"{x:.3f}x"

    lines = [f"{'target':<22} {'measured':>9} {'basis':>6} {'eager':>9} {'graph':>9} {'goal':>26}  verdict"]
    for v in verdicts:
        lines.append(f"{v['id']:<22} {fmt(v['measured']):>9} {v.get('basis') or '-':>6} {fmt(v.get('measured_eager')):>9} "
                     f"{fmt(v.get('measured_graph')):>9} {v['goal']:>26}  {v['status']}")
    return "\n".join(lines)


def markdown() -> str:
    """The target list as a Markdown bullet list (for the README)."""
    return "\n".join(f"- `{t['id']}`: {t['text']}" for t in TARGETS)
