"""SRNet experiments at CPU scale (MiniLM backbone): run the planned sweep, then write results/srnet.

    python scripts/srnet_eval.py run [--stage teacher main highsparsity paradigms] [--out DIR]
    python scripts/srnet_eval.py report [--out DIR] [--report-dir results/srnet]

`run` executes the runs of each stage in priority order, one at a time, in this process (one thread:
OMP_NUM_THREADS=1); finished runs are skipped and interrupted ones resume (sparsebert.pruning.srnet.Runner).
Every run saves its per-example class probabilities (preds-step<N>.json next to run.json), from which
`report` computes 95% bootstrap intervals over seeds and examples.

One deviation from `sparsebert srnet`: every paradigm-a/b run starts from ONE dense teacher (seed
`teacher_seed`, default 0); the run seed varies the mask search only (data order, and the head for c).
Those runs carry the teacher in their identity and in their folder name (`...-seed1-t0`), so a plain
`sparsebert srnet` run with the same settings never mistakes one for its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsebert.checkpoint import atomic_write_text  # noqa: E402
from sparsebert.pruning.srnet import Runner, SRNetConfig  # noqa: E402

DEFAULT_OUT = "runs/srnet_cpu_v4"

# The CPU scale (see results/srnet/README.md). Shared by every run of the sweep.
# v4 (this scale): teacher 3 epochs (the 3-5); mask training 1/2 epoch (245 steps) at score lr 5e-4.
# Why these: with Adam a score moves about lr per step, so a weight whose gradient keeps its sign drifts ~lr*T
# and a noisy one ~lr*sqrt(T). The binary start leaves a 0.02 gap; v3's 62 steps at 2e-3 moved noisy scores
# across it (every run collapsed to one class), 62 steps at 5e-4 moved almost nothing. 245 steps at 5e-4 let
# consistently signed weights swap (~0.12) while noisy ones stay (~0.008).
MNLI = dict(task="mnli", model="minilm", epochs=3.0, mask_epochs=0.5, lr=1e-4, lr_scores=5e-4, batch_size=16,
            max_length=64, hans_per_subcase=30, eval_points=1)


@dataclass
class SharedTeacherConfig(SRNetConfig):
    """SRNetConfig whose paradigm-a/b runs start from the dense run of seed `teacher_seed`."""
    teacher_seed: int = 0

    def dense_dependency(self, loss=None):
        return dataclasses.replace(super().dense_dependency(loss), seed=self.teacher_seed)

    @property
    def run_name(self) -> str:
        name = super().run_name
        if self.paradigm == "dense":
            return name
        if not self.include_head:  # the pooler and classifier keep all their weights
            name += "-headunmasked"
        if self.lr_scores != MNLI["lr_scores"]:
            name += f"-lrs{self.lr_scores:g}"
        return name + f"-t{self.teacher_seed}" if self.paradigm in ("a", "b") else name


class PredictionSavingRunner(Runner):
    """Runner that also writes each evaluation's per-example probabilities (preds-step<N>.json)."""

    def _record(self, history, path, step, model, data, cfg, *, eligible: bool) -> None:
        import sparsebert.eval as ev
        captured: Dict[str, Any] = {}
        original = ev.predict

        def predict_and_keep(*args, **kwargs):
            probs, labels = original(*args, **kwargs)
            captured[kwargs.get("desc", f"split{len(captured)}")] = (probs, labels)
            return probs, labels

        ev.predict = predict_and_keep
        try:
            super()._record(history, path, step, model, data, cfg, eligible=eligible)
        finally:
            ev.predict = original
        out = {}
        for split, (probs, labels) in captured.items():
            examples = getattr(data, split)
            out[split] = {"probs": [[round(float(p), 5) for p in row] for row in probs.tolist()],
                          "labels": [int(v) for v in labels.tolist()],
                          "heuristic": [ex.meta.get("heuristic") for ex in examples],
                          "subcase": [ex.meta.get("subcase") for ex in examples]}
        atomic_write_text(json.dumps(out), path.parent / f"preds-step{step}.json")


def mnli_cfg(out: str, **kw) -> SharedTeacherConfig:
    return SharedTeacherConfig(out=out, **{**MNLI, **kw}).validate()


def plan(stage: str, out: str) -> List[SharedTeacherConfig]:
    """The runs of a stage, in the order they execute (seed-major, so a cut leaves balanced cells)."""
    if stage == "teacher":
        return [mnli_cfg(out, paradigm="dense", loss="ce", seed=0)]
    if stage == "main":
        return [mnli_cfg(out, paradigm="a", source="ce", loss=loss, sparsity=s, seed=seed)
                for s in (0.5, 0.7) for seed in (0, 1, 2) for loss in ("poe", "reweight")]
    if stage == "cecontrol":  # CE mask training at 50%: what the mask search alone does, without debiasing
        return [mnli_cfg(out, paradigm="a", source="ce", loss="ce", sparsity=0.5, seed=seed) for seed in (0, 1, 2)]
    if stage == "highsparsity":
        return [mnli_cfg(out, paradigm="a", source="ce", loss="poe", sparsity=0.9, seed=seed, **sched)
                for seed in (0, 1, 2) for sched in (dict(schedule="cubic", initial_sparsity=0.7),
                                                    dict(schedule="constant"))]
    if stage == "paradigms":
        return [mnli_cfg(out, paradigm="c", loss="poe", sparsity=0.5, seed=0),
                mnli_cfg(out, paradigm="b", source="ce", loss="poe", sparsity=0.5, seed=0, mask_from="mask_training")]
    raise ValueError(f"--stage: expected teacher, main, highsparsity or paradigms, got {stage!r}")


STAGES = ("teacher", "main", "cecontrol", "highsparsity", "paradigms")


def cmd_run(args) -> int:
    import logging
    import time
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    runner = PredictionSavingRunner(args.out, progress=False, log_fn=logging.getLogger("srnet_eval").info)
    t0 = time.time()
    for stage in args.stage:
        for cfg in plan(stage, args.out):
            r = runner.run(cfg)
            print(f"[{(time.time() - t0) / 60:6.1f} min] {stage:12s} {r['run']:45s} ID {r['last']['id']:.4f} "
                  f"OOD {r['last']['ood']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the sweep (resumable)")
    r.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    r.add_argument("--out", default=DEFAULT_OUT)
    rep = sub.add_parser("report", help="tables, intervals and pictures from the finished runs")
    rep.add_argument("--out", default=DEFAULT_OUT)
    rep.add_argument("--report-dir", default="results/srnet")
    mag = sub.add_parser("magnitude", help="the teacher pruned by magnitude alone, no training (test halves)")
    mag.add_argument("--out", default=DEFAULT_OUT)
    mag.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    mag.add_argument("--report-dir", default="results/srnet")
    args = p.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "magnitude":
        return cmd_magnitude(args)
    return cmd_report(args)


def cmd_magnitude(args) -> int:
    """One-shot magnitude pruning of the teacher (no mask training): the starting point of every
    paradigm-a run with score_init magnitude_binary. Per encoder matrix, the smallest |W| zeroed."""
    import torch
    from sparsebert.checkpoint import load_checkpoint
    from sparsebert.nn.sparsify import prunable_linears
    from sparsebert.pruning.srnet import MODEL_FILE, build_model, evaluate_all
    teacher = plan("teacher", args.out)[0]
    runner = Runner(args.out, progress=False)
    if not runner.finished(teacher):
        print(f"srnet_eval magnitude: the teacher {teacher.run_name} is not finished under {args.out}", file=sys.stderr)
        return 2
    data = runner.data(teacher)
    state = load_checkpoint(runner.run_dir(teacher) / MODEL_FILE)
    rows = []
    for sparsity in args.sparsity:
        model = build_model(teacher, data, 0)
        model.load_state_dict(state)
        with torch.no_grad():
            for lin in prunable_linears(model).values():
                w = lin.weight
                k = round(sparsity * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w.mul_((w.abs() > cut).to(w.dtype))
        m = evaluate_all(model, data, teacher, splits=("id_test", "ood_test"))
        rows.append({"sparsity": sparsity, "id_test_accuracy": m["id_test"]["value"],
                     "id_test_pred_counts": m["id_test"]["summary"]["pred_counts"],
                     "ood_test_accuracy": m["ood_test"]["value"],
                     "ood_test_pred_counts": m["ood_test"]["summary"]["pred_counts"],
                     "n_id_test": m["id_test"]["n"], "n_ood_test": m["ood_test"]["n"]})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.report_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"teacher": teacher.run_name, "rule": "per encoder matrix, smallest |W| set to 0; "
                                  "head untouched; no training", "rows": rows}, indent=1),
                      Path(args.report_dir) / "magnitude_only.json")
    return 0


# ------------------------------------------------------------------------------------------ report
N_BOOT = 2000


def _load_runs(out: Path) -> List[Dict[str, Any]]:
    """Finished mnli runs with their per-example predictions on the whole held-out ID set and the whole
    HANS-style eval part (dev + test halves: with one evaluation point nothing is selected on them)."""
    import torch
    from sparsebert.data import mnli_to_hans_preds
    runs = []
    for rj in sorted((out / "mnli").glob("*/run.json")):
        run = json.loads(rj.read_text())
        step = run["last"]["step"]
        preds_file = rj.parent / f"preds-step{step}.json"
        if not preds_file.is_file():
            raise FileNotFoundError(f"{preds_file} is missing (runs must be made by `srnet_eval.py run`)")
        preds = json.loads(preds_file.read_text())
        id_probs = torch.tensor(preds["id_dev"]["probs"] + preds["id_test"]["probs"])
        id_labels = torch.tensor(preds["id_dev"]["labels"] + preds["id_test"]["labels"])
        ood_probs = torch.tensor(preds["ood_dev"]["probs"] + preds["ood_test"]["probs"])
        ood_labels = torch.tensor(preds["ood_dev"]["labels"] + preds["ood_test"]["labels"])
        heur = preds["ood_dev"]["heuristic"] + preds["ood_test"]["heuristic"]
        ood_preds = mnli_to_hans_preds(ood_probs, run["config"]["hans_rule"])
        run["_id"] = (id_probs.argmax(-1), id_labels)
        run["_ood"] = (ood_preds, ood_labels, heur)
        runs.append(run)
    return runs


def _group_key(run) -> tuple:
    c = run["config"]
    if run["paradigm"] == "dense":
        return ("dense", c["loss"], "", 0.0, "")
    sched = c["schedule"] if c["schedule"] == "constant" else f"cubic {c['initial_sparsity']:g}->{c['sparsity']:g}"
    extra = f"masks from a, rewind {c['rewind']}" if run["paradigm"] == "b" else ""
    if not c.get("include_head", True):
        extra = (extra + ", " if extra else "") + "head unmasked"
    extra = (extra + ", " if extra else "") + f"lr_scores {c['lr_scores']:g}"
    return (run["paradigm"], f"{c['source']}->{c['loss']}" if run["paradigm"] in ("a", "b") else c["loss"],
            sched, c["sparsity"], extra)


def _label(key) -> str:
    paradigm, loss, sched, sparsity, extra = key
    if paradigm == "dense":
        return f"dense {loss} (teacher)"
    return f"{paradigm}: {loss}, {sched}{', ' + extra if extra else ''}"


def _ci(correct_per_seed, mask=None) -> Dict[str, float]:
    from sparsebert.eval import bootstrap_ci
    rows = [c[mask] if mask is not None else c for c in correct_per_seed]
    return bootstrap_ci([r.long() for r in rows], n_boot=N_BOOT, seed=0)


def _diff_ci(correct_per_seed, reference, mask=None, level: float = 0.95) -> Dict[str, float]:
    """Interval of mean(correct of the group) - mean(correct of the reference model), resampling the
    group's seeds and (shared, paired) the examples."""
    import torch
    x = torch.stack([(c[mask] if mask is not None else c).double() for c in correct_per_seed])
    ref = (reference[mask] if mask is not None else reference).double()
    d = x - ref
    g = torch.Generator().manual_seed(1)
    s, n = d.shape
    seed_idx = torch.randint(0, s, (N_BOOT, s), generator=g)
    ex_idx = torch.randint(0, n, (N_BOOT, n), generator=g)
    per_seed = torch.cat([d[:, ex_idx[i:i + 256]].mean(-1).T for i in range(0, N_BOOT, 256)])
    means = per_seed.gather(1, seed_idx).mean(1)
    a = (1 - level) / 2
    return {"mean": float(d.mean()), "low": float(torch.quantile(means, a)), "high": float(torch.quantile(means, 1 - a))}


def _macro_f1(preds, labels, k: int) -> float:
    from sparsebert.eval import f1_score
    import torch
    return sum(f1_score((preds == c).long(), (labels == c).long()) for c in range(k)) / k


def summarize_groups(runs) -> List[Dict[str, Any]]:
    import torch
    from collections import defaultdict
    from sparsebert.eval import classification_summary, f1_score
    groups = defaultdict(list)
    for r in runs:
        groups[_group_key(r)].append(r)
    teacher = groups.get(("dense", "ce", "", 0.0, ""))
    ref_id = ref_ood = None
    if teacher:
        t = sorted(teacher, key=lambda r: r["seed"])[0]
        ref_id = t["_id"][0] == t["_id"][1]
        ref_ood = t["_ood"][0] == t["_ood"][1]
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][0], kv[0][3], kv[0][1], kv[0][2])):
        rs = sorted(rs, key=lambda r: r["seed"])
        id_labels, (_, ood_labels, heur) = rs[0]["_id"][1], rs[0]["_ood"]
        id_correct = [r["_id"][0] == r["_id"][1] for r in rs]
        ood_correct = [r["_ood"][0] == r["_ood"][1] for r in rs]
        ent, non = ood_labels == 0, ood_labels == 1
        id_sum = [classification_summary(r["_id"][0], id_labels, 3) for r in rs]
        ood_sum = [classification_summary(r["_ood"][0], ood_labels, 2) for r in rs]
        row = {"group": _label(key), "paradigm": key[0], "loss": key[1], "schedule": key[2], "variant": key[4],
               "target_sparsity": key[3], "seeds": [r["seed"] for r in rs],
               "measured_sparsity": sum(r["sparsity"] for r in rs) / len(rs),
               "id": _ci(id_correct), "ood": _ci(ood_correct),
               "ood_entailed": _ci(ood_correct, ent), "ood_non_entailed": _ci(ood_correct, non),
               "id_macro_f1": sum(_macro_f1(r["_id"][0], id_labels, 3) for r in rs) / len(rs),
               "ood_f1_non_entailed": sum(s["f1"] for s in ood_sum) / len(rs),
               "id_majority_accuracy": id_sum[0]["majority_accuracy"],
               "ood_majority_accuracy": ood_sum[0]["majority_accuracy"],
               "ood_constant_f1": ood_sum[0]["constant_f1"],
               "one_class": {"id": [s["one_class"] for s in id_sum], "ood": [s["one_class"] for s in ood_sum]},
               "id_pred_counts": [s["pred_counts"] for s in id_sum], "ood_pred_counts": [s["pred_counts"] for s in ood_sum],
               "n_id": int(id_labels.numel()), "n_ood": int(ood_labels.numel()),
               "by_heuristic": {}, "runs": [r["run"] for r in rs],
               "minutes": [round(r["seconds"] / 60, 1) for r in rs]}
        for h in sorted(set(heur)):
            in_h = torch.tensor([x == h for x in heur])
            row["by_heuristic"][h] = {"entailed": _ci(ood_correct, in_h & ent)["mean"],
                                      "non_entailed": _ci(ood_correct, in_h & non)["mean"]}
        if ref_id is not None and key[0] != "dense":
            row["vs_teacher"] = {"id": _diff_ci(id_correct, ref_id), "ood": _diff_ci(ood_correct, ref_ood),
                                 "ood_non_entailed": _diff_ci(ood_correct, ref_ood, non),
                                 "ood_entailed": _diff_ci(ood_correct, ref_ood, ent)}
        rows.append(row)
    return rows


def _pct(ci) -> str:
    return f"{100 * ci['mean']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def _signed(ci) -> str:
    return f"{100 * ci['mean']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def markdown_tables(rows) -> str:
    lines = ["## Accuracy with 95% bootstrap intervals (seeds and examples resampled)", "",
             "ID = MNLI held-out 20% of dev-matched (all of it); HANS-style = the generated eval part (all of it); "
             "ent. / non-ent. = its entailed / non-entailed halves. F1: ID macro-F1 over 3 classes; HANS-style F1 of "
             "non-entailment. Baselines: majority-class accuracy, constant predictor (always non-entailment) F1.", "",
             "| model | seeds | sparsity | ID acc | ID macro-F1 | HANS-style acc | ent. | non-ent. | HANS F1 | one class? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        oc = "**ONE CLASS**" if any(r["one_class"]["id"]) or any(r["one_class"]["ood"]) else "no"
        lines.append(f"| {r['group']} | {len(r['seeds'])} | {r['measured_sparsity']:.3f} | {_pct(r['id'])} | "
                     f"{100 * r['id_macro_f1']:.1f} | {_pct(r['ood'])} | {_pct(r['ood_entailed'])} | "
                     f"{_pct(r['ood_non_entailed'])} | {100 * r['ood_f1_non_entailed']:.1f} | {oc} |")
    if rows:
        r = rows[0]
        lines.append(f"| majority class / constant predictor | - | - | {100 * r['id_majority_accuracy']:.1f} | - | "
                     f"{100 * r['ood_majority_accuracy']:.1f} | - | - | {100 * r['ood_constant_f1']:.1f} | - |")
        lines += ["", f"n: ID {r['n_id']} pairs, HANS-style {r['n_ood']} pairs."]
    diff = [r for r in rows if "vs_teacher" in r]
    if diff:
        lines += ["", "## Difference from the dense CE teacher (points, 95% interval; paired over examples)", "",
                  "| model | seeds | ID | HANS-style | ent. | non-ent. |", "|---|---|---|---|---|---|"]
        for r in diff:
            v = r["vs_teacher"]
            lines.append(f"| {r['group']} | {len(r['seeds'])} | {_signed(v['id'])} | {_signed(v['ood'])} | "
                         f"{_signed(v['ood_entailed'])} | {_signed(v['ood_non_entailed'])} |")
    lines += ["", "## HANS-style accuracy by heuristic (mean over seeds; entailed / non-entailed)", "",
              "| model | " + " | ".join(sorted(rows[0]["by_heuristic"])) + " |" if rows else "",
              "|---|" + "---|" * (len(rows[0]["by_heuristic"]) if rows else 0)]
    for r in rows:
        cells = [f"{100 * v['entailed']:.0f} / {100 * v['non_entailed']:.0f}" for _, v in sorted(r["by_heuristic"].items())]
        lines.append(f"| {r['group']} | " + " | ".join(cells) + " |")
    lines += ["", "## Predicted class counts per seed (ID: entailment/neutral/contradiction; HANS-style: ent./non-ent.)", "",
              "| model | ID | HANS-style |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['id_pred_counts']} | {r['ood_pred_counts']} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    teacher = [r for r in rows if r["paradigm"] == "dense"]
    series = {}
    for r in rows:
        if r["paradigm"] == "dense":
            continue
        series.setdefault((r["paradigm"], r["loss"], r["schedule"], r["variant"]), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, title in zip(axes, ("id", "ood", "ood_non_entailed"),
                              ("ID: MNLI held-out accuracy", "OOD: HANS-style accuracy", "HANS-style non-entailed")):
        for t in teacher:
            ax.axhline(100 * t[key]["mean"], color="k", ls="--", lw=1)
            ax.errorbar([0], [100 * t[key]["mean"]], capsize=3, color="k", marker="s", label="dense CE teacher",
                        yerr=[[100 * (t[key]["mean"] - t[key]["low"])], [100 * (t[key]["high"] - t[key]["mean"])]])
        for i, ((paradigm, loss, sched, variant), rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["target_sparsity"])
            xs = [100 * r["measured_sparsity"] + 1.2 * (i - (len(series) - 1) / 2) for r in rs]
            ys = [100 * r[key]["mean"] for r in rs]
            err = [[100 * (r[key]["mean"] - r[key]["low"]) for r in rs], [100 * (r[key]["high"] - r[key]["mean"]) for r in rs]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[i % len(colors)],
                        ls="-" if len(rs) > 1 else "none",
                        label=f"{paradigm}: {loss}, {sched}, {variant} ({'/'.join(str(len(r['seeds'])) for r in rs)} seeds)")
        ax.set_xlim(-4, 94)
        ax.set_xlabel("sparsity of the encoder linears (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if rows:
        axes[0].axhline(100 * rows[0]["id_majority_accuracy"], color="r", ls=":", lw=1, label="majority class")
        axes[1].axhline(50, color="r", ls=":", lw=1, label="constant predictor")
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, l in zip(h2, l2):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle("MNLI -> HANS-style, MiniLM, CPU scale: mean with 95% bootstrap interval over seeds and examples",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> int:
    import csv
    out, rdir = Path(args.out), Path(args.report_dir)
    runs = _load_runs(out)
    if not runs:
        print(f"srnet_eval report: no finished runs under {out}/mnli", file=sys.stderr)
        return 2
    rows = summarize_groups(runs)
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(rows, indent=1), rdir / "mnli_summary.json")
    fields = ["group", "paradigm", "loss", "schedule", "target_sparsity", "measured_sparsity", "seeds"]
    with open(rdir / "mnli_summary.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        stats = ("id", "ood", "ood_entailed", "ood_non_entailed")
        w.writerow(fields + [f"{s}_{p}" for s in stats for p in ("mean", "low", "high")] + ["id_macro_f1", "ood_f1_non_entailed", "one_class"])
        for r in rows:
            w.writerow([r[k] if k != "seeds" else len(r[k]) for k in fields] +
                       [round(r[s][p], 4) for s in stats for p in ("mean", "low", "high")] +
                       [round(r["id_macro_f1"], 4), round(r["ood_f1_non_entailed"], 4),
                        any(r["one_class"]["id"]) or any(r["one_class"]["ood"])])
    os.replace(rdir / "mnli_summary.csv.tmp", rdir / "mnli_summary.csv")
    atomic_write_text(markdown_tables(rows), rdir / "mnli_tables.md")
    plot(rows, rdir / "mnli.png")
    runs_dir = rdir / "runs"
    runs_dir.mkdir(exist_ok=True)
    for r in runs:  # the run JSONs (configuration + library numbers on the test halves)
        clean = {k: v for k, v in r.items() if not k.startswith("_")}
        atomic_write_text(json.dumps(clean, indent=1), runs_dir / f"{r['run']}.json")
    for name in ("mnli_tables.md", "mnli_summary.csv", "mnli_summary.json", "mnli.png"):
        print(f"report: {rdir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
