"""Reports of SRNet runs: ID and OOD metric against sparsity for each method, one PNG per task, written
next to the numbers (JSON, CSV and a Markdown table). Mean ± std over seeds.

Reads every ``<out>/<task>/<run>/run.json``. The ID-selected numbers ("last" = end of training, and the
checkpoint chosen on ID dev) are the results; "select_by_ood_dev" (the checkpoint picked by OOD-dev
score) uses OOD data for selection and is kept in its own columns, never mixed with the others. Every
row also shows accuracy beside F1 (paraphrase tasks), the majority-class accuracy and constant-predictor
F1 of the test sets, and flags a model whose predictions are all one class.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from .checkpoint import atomic_write_text
from .eval import format_mean_std, mean_std

SELECTIONS = ("last", "id_selected", "select_by_ood_dev")
_OLD_NAMES = {"select_by_ood_dev": "ood_selected_upper_bound"}  # run JSONs written before the rename


def _selection(run: Dict[str, Any], sel: str) -> Dict[str, Any]:
    return run[sel] if sel in run else run[_OLD_NAMES[sel]]


def baseline_columns(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Accuracy, F1, majority-class accuracy, constant-predictor F1 (test sets, "last" checkpoint, mean
    over seeds) and `one_class` (True when any seed predicts a single class) for ID and OOD."""
    out: Dict[str, Any] = {}
    for key in ("id", "ood"):
        sums = [r["last"].get(f"{key}_baselines") for r in runs]
        if any(x is None for x in sums):
            out[key] = None  # run JSONs written before baselines were recorded
            continue
        col = {name: mean_std([x[name] for x in sums]) if sums[0][name] is not None else None
               for name in ("accuracy", "f1", "majority_accuracy", "constant_f1")}
        col["one_class"] = any(x["one_class"] for x in sums)
        out[key] = col
    return out


def collect_runs(out) -> List[Dict[str, Any]]:
    """Every finished run JSON under `out` (sorted by task and run name)."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a folder of SRNet runs")
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/run.json"))]
    return sorted(runs, key=lambda r: (r["task"], r["run"]))


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (task, method, target sparsity): mean ± std over seeds of sparsity, ID and OOD."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["task"], r["method"], r["target_sparsity"])].append(r)
    rows = []
    for (task, method, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        row = {"task": task, "method": method, "target_sparsity": target, "seeds": sorted(r["seed"] for r in rs),
               "metric": rs[0]["metric"], "ood_metric": rs[0]["ood_metric"],
               "sparsity": mean_std([r["sparsity"] for r in rs]),
               "source": sorted({r.get("source", r.get("loss")) for r in rs}),
               "teacher": sorted({r["teacher"]["run"] for r in rs if r.get("teacher")}),
               "baselines": baseline_columns(rs)}
        for sel in SELECTIONS:
            row[sel] = {k: mean_std([_selection(r, sel)[k] for r in rs]) for k in ("id", "ood")}
        if rs[0]["last"].get("ood_entailed") is not None:
            row["last"]["ood_entailed"] = mean_std([r["last"]["ood_entailed"] for r in rs])
            row["last"]["ood_non_entailed"] = mean_std([r["last"]["ood_non_entailed"] for r in rs])
        rows.append(row)
    return rows


def _csv_rows(rows):
    for row in rows:
        flat = {"task": row["task"], "method": row["method"], "target_sparsity": row["target_sparsity"],
                "n_seeds": len(row["seeds"]), "sparsity": row["sparsity"]["mean"],
                "metric": row["metric"], "ood_metric": row["ood_metric"]}
        for sel in SELECTIONS:
            for k, st in row[sel].items():
                flat[f"{sel}_{k}_mean"], flat[f"{sel}_{k}_std"] = st["mean"], st["std"]
        yield flat


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """Results in percent: ID-selected columns, then the OOD-selected upper bound apart."""
    has_hans = any("ood_entailed" in r["last"] for r in rows)
    head = ["method", "sparsity", "ID (last)", "OOD (last)"]
    if has_hans:
        head += ["OOD ent.", "OOD non-ent."]
    head += ["ID (ID-sel.)", "OOD (ID-sel.)", "selected by OOD dev: ID", "selected by OOD dev: OOD",
             "ID acc / F1 / majority / const-F1", "OOD acc / F1 / majority / const-F1", "one class"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['sparsity']['mean']:.3f}", format_mean_std(r["last"]["id"]),
                 format_mean_std(r["last"]["ood"])]
        if has_hans:
            cells += [format_mean_std(r["last"].get("ood_entailed", {"n": 0})),
                      format_mean_std(r["last"].get("ood_non_entailed", {"n": 0}))]
        cells += [format_mean_std(r["id_selected"]["id"]), format_mean_std(r["id_selected"]["ood"]),
                  format_mean_std(r["select_by_ood_dev"]["id"]),
                  format_mean_std(r["select_by_ood_dev"]["ood"])]
        cells += [_baseline_cell(r.get("baselines", {}).get(k)) for k in ("id", "ood")]
        flags = [k.upper() for k in ("id", "ood") if (r.get("baselines", {}).get(k) or {}).get("one_class")]
        cells.append("**ONE CLASS: " + ", ".join(flags) + "**" if flags else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _baseline_cell(col: Optional[Dict[str, Any]]) -> str:
    if col is None:
        return "n/a"
    return " / ".join(format_mean_std(col[k]) if col[k] is not None else "-"
                      for k in ("accuracy", "f1", "majority_accuracy", "constant_f1"))


def plot_task(rows: List[Dict[str, Any]], path, *, selection: str = "last") -> Path:
    """ID (left) and OOD (right) metric against measured sparsity, one line per method; dense methods are
    horizontal dashed lines. Saved as PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    task = rows[0]["task"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, rs) in enumerate(sorted(by_method.items())):
        rs = sorted(rs, key=lambda r: r["sparsity"]["mean"])
        color = colors[i % len(colors)]
        for ax, key in zip(axes, ("id", "ood")):
            xs = [r["sparsity"]["mean"] for r in rs]
            ys = [100 * r[selection][key]["mean"] for r in rs]
            es = [100 * r[selection][key]["std"] for r in rs]
            if method.startswith("dense"):
                ax.axhline(ys[0], color=color, linestyle="--", label=method)
                ax.plot(xs, ys, "o", color=color)
            else:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=color, label=method)
    for ax, key, metric in zip(axes, ("ID", "OOD"), (rows[0]["metric"], rows[0]["ood_metric"])):
        ax.set_xlabel("sparsity of the encoder linears")
        ax.set_ylabel(f"{key} {metric} (%)")
        ax.set_title(f"{task}: {key}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    seeds = sorted({len(r["seeds"]) for r in rows})
    fig.suptitle(f"{task}: {selection.replace('_', ' ')} checkpoint, mean ± std over {'/'.join(map(str, seeds))} seed(s)",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out, report_dir: Optional[str] = None) -> List[Path]:
    """Write `<report_dir or out/report>/<task>.png`, `<task>.md`, `summary.csv`, `summary.json`."""
    runs = collect_runs(out)
    if not runs:
        raise FileNotFoundError(f"no finished runs (*/*/run.json) under {out}")
    rdir = Path(report_dir) if report_dir is not None else Path(out) / "report"
    rows = summarize(runs)
    written = []
    for task in sorted({r["task"] for r in rows}):
        trows = [r for r in rows if r["task"] == task]
        written.append(plot_task(trows, rdir / f"{task}.png"))
        written.append(atomic_write_text(f"# {task}\n\nPercent; ID = {trows[0]['metric']}, OOD = "
                                         f"{trows[0]['ood_metric']} on the held-out test halves.\n\n"
                                         + markdown_table(trows), rdir / f"{task}.md"))
    written.append(atomic_write_text(json.dumps(rows, indent=1), rdir / "summary.json"))
    flat = list(_csv_rows(rows))
    rdir.mkdir(parents=True, exist_ok=True)
    with open(rdir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    written.append(rdir / "summary.csv")
    return written
