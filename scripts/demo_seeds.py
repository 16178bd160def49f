"""Does the demo's SRNet result hold beyond its one seed? The demo's dense fine-tuning and PoE mask training
(`sparsebert.cli.demo.srnet_configs`, the embedded default size and recipe) rerun under several seeds; the
seed orders the data and seeds the classifier, the random backbone stays the demo's.

    python scripts/demo_seeds.py                          # seeds 0-4, runs/demo_seeds -> results/demo_seeds
    python scripts/demo_seeds.py --seeds 0 1 2 5 --report-dir results/demo_seeds

Resumable: a finished run is skipped (the runner keys runs by their whole configuration). Writes
`seeds.json` and `seeds.csv` (per seed and model: ID and OOD accuracy, one-class flags), `summary.md` (means
with 95% bootstrap intervals over seeds and examples, the majority-class baseline, how many seeds collapsed,
the subnetwork's difference from its dense model paired by seed and example)
and `seeds.png`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("dense", "SRNet")
SPLITS = ("id_test", "ood_test")


def seed_predictions(runner, size, backbone, device: str, seed: int, recipe: dict | None = None) -> dict:
    """Run (or reuse) the seed's dense and SRNet runs; per model and split the per-example correctness.
    `recipe`: SRNetConfig fields of the mask training that differ from the demo's (e.g. lr_scores)."""
    import dataclasses

    import torch

    from sparsebert.cli.demo import _dense_model, _subnetwork_model, srnet_configs
    from sparsebert.eval import classification_summary, predict

    dense_cfg, srnet_cfg = srnet_configs(runner.out, size, backbone, device, seed=seed)
    if recipe:
        srnet_cfg = dataclasses.replace(srnet_cfg, **recipe).validate()
    srnet_run = runner.run(srnet_cfg)
    data = runner.data(dense_cfg)
    models = {"dense": _dense_model(runner, dense_cfg, data), "SRNet": _subnetwork_model(runner, srnet_cfg, data)}
    out = {"seed": seed, "sparsity": float(srnet_run["sparsity"]), "models": {}}
    for name, model in models.items():
        model.to(device)
        out["models"][name] = {}
        for split in SPLITS:
            probs, labels = predict(model, data.loader(split, batch_size=64), device=device)
            pred = probs.argmax(-1)
            summary = classification_summary(pred, labels, probs.shape[-1])
            out["models"][name][split] = {"correct": (pred == labels).to(torch.int8).tolist(),
                                          "accuracy": summary["accuracy"],
                                          "majority_accuracy": summary["majority_accuracy"],
                                          "one_class": summary["one_class"]}
    return out


def summarize(per_seed: list) -> dict:
    """Means with 95% bootstrap intervals (seeds and examples resampled) per model and split, the
    majority-class baseline, and the seeds whose SRNet model predicts one class on ID; "SRNet-dense/<split>":
    the difference, paired by seed (the subnetwork and the dense model it was trained from) and example."""
    from sparsebert.eval import bootstrap_ci, bootstrap_diff_ci

    def correct(name, split):
        return [s["models"][name][split]["correct"] for s in per_seed]

    table = {}
    for split in SPLITS:
        for name in MODELS:
            cell = per_seed[0]["models"][name][split]
            table[f"{name}/{split}"] = {**bootstrap_ci(correct(name, split)),
                                        "majority_accuracy": cell["majority_accuracy"],
                                        "one_class_seeds": [s["seed"] for s in per_seed
                                                            if s["models"][name][split]["one_class"]]}
        table[f"SRNet-dense/{split}"] = bootstrap_diff_ci(correct("SRNet", split), correct("dense", split))
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(report_dir: Path, per_seed: list, settings: dict) -> list:
    from sparsebert.checkpoint import atomic_write_text
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(per_seed)
    rows = [{"seed": s["seed"], "model": name, "sparsity": s["sparsity"] if name == "SRNet" else 0.0,
             "id_acc": s["models"][name]["id_test"]["accuracy"], "ood_acc": s["models"][name]["ood_test"]["accuracy"],
             "id_one_class": s["models"][name]["id_test"]["one_class"],
             "ood_one_class": s["models"][name]["ood_test"]["one_class"]}
            for s in per_seed for name in MODELS]
    doc = {"settings": settings, "rows": rows, "summary": summary}
    paths = [report_dir / "seeds.json", report_dir / "seeds.csv", report_dir / "summary.md", report_dir / "seeds.png"]
    atomic_write_text(json.dumps(doc, indent=1), paths[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), paths[1])

    lines = [f"Seeds {', '.join(str(s['seed']) for s in per_seed)}; {summary['dense/id_test']['n_examples']} ID and "
             f"{summary['dense/ood_test']['n_examples']} OOD test examples; accuracy in %, mean [95% bootstrap interval "
             "over seeds and examples].", "",
             "| model | ID | OOD | ID majority class | OOD majority class | seeds one-class on ID |",
             "|---|---|---|---|---|---|"]
    for name in MODELS:
        i, o = summary[f"{name}/id_test"], summary[f"{name}/ood_test"]
        lines.append(f"| {name} | {_pct(i['mean'])} [{_pct(i['low'])}, {_pct(i['high'])}] "
                     f"| {_pct(o['mean'])} [{_pct(o['low'])}, {_pct(o['high'])}] | {_pct(i['majority_accuracy'])} "
                     f"| {_pct(o['majority_accuracy'])} | {len(i['one_class_seeds'])} of {len(per_seed)} |")
    i, o = summary["SRNet-dense/id_test"], summary["SRNet-dense/ood_test"]
    lines.append(f"| SRNet - dense (paired) | {_pct(i['mean'])} [{_pct(i['low'])}, {_pct(i['high'])}] "
                 f"| {_pct(o['mean'])} [{_pct(o['low'])}, {_pct(o['high'])}] | | | |")
    lines += ["", "| seed | dense ID | dense OOD | SRNet ID | SRNet OOD | SRNet sparsity |", "|---|---|---|---|---|---|"]
    for s in per_seed:
        d, m = s["models"]["dense"], s["models"]["SRNet"]
        flag = " (one class)" if m["id_test"]["one_class"] else ""
        lines.append(f"| {s['seed']} | {_pct(d['id_test']['accuracy'])} | {_pct(d['ood_test']['accuracy'])} "
                     f"| {_pct(m['id_test']['accuracy'])}{flag} | {_pct(m['ood_test']['accuracy'])} "
                     f"| {s['sparsity']:.2f} |")
    atomic_write_text("\n".join(lines) + "\n", paths[2])
    _plot(per_seed, summary, paths[3])
    return paths


def _plot(per_seed: list, summary: dict, path: Path) -> None:
    import matplotlib
    from sparsebert.checkpoint import atomic_write_bytes
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, split, title in zip(axes, SPLITS, ("ID test", "OOD test")):
        for k, name in enumerate(MODELS):
            ys = [100 * s["models"][name][split]["accuracy"] for s in per_seed]
            ax.scatter([k + 0.06 * (j - len(ys) / 2) for j in range(len(ys))], ys, s=18, label=name)
            ci = summary[f"{name}/{split}"]
            ax.errorbar([k + 0.3], [100 * ci["mean"]], yerr=[[100 * (ci["mean"] - ci["low"])],
                                                             [100 * (ci["high"] - ci["mean"])]],
                        fmt="k_", capsize=4)
        ax.axhline(100 * summary[f"dense/{split}"]["majority_accuracy"], color="grey", ls="--", lw=1,
                   label="majority class")
        ax.set_xticks(range(len(MODELS)), MODELS)
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle("dots: one seed each; bars: mean and 95% bootstrap interval", fontsize=8)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png.getvalue(), path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/demo_seeds", help="run folder (resumable)")
    p.add_argument("--report-dir", default="results/demo_seeds")
    p.add_argument("--size", default="default", help=argparse.SUPPRESS)  # "test": the demo's seconds-long size
    p.add_argument("--lr-scores", type=float, default=None, help="mask training's score lr (default: the demo's)")
    p.add_argument("--mask-epochs", type=float, default=None, help="mask training's epochs (default: the demo's)")
    args = p.parse_args(argv)
    from sparsebert.cli.demo import SIZES, write_backbone
    if args.size not in SIZES:
        p.error(f"--size: expected one of {sorted(SIZES)}, got {args.size!r}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        p.error(f"--seeds: expected distinct seeds >= 0, got {args.seeds}")
    for name in ("lr_scores", "mask_epochs"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and v == v and v != float("inf")):
            p.error(f"--{name.replace('_', '-')}: expected a finite number > 0, got {v}")
    recipe = {k: v for k, v in (("lr_scores", args.lr_scores), ("mask_epochs", args.mask_epochs)) if v is not None}
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    import torch

    from sparsebert.pruning.srnet import Runner
    size = SIZES[args.size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    backbone = write_backbone(out, size)
    # another recipe gets its own run folder: a run folder's name does not hold these fields
    folder = "srnet" + "".join(f"-{k}{v:g}" for k, v in sorted(recipe.items()))
    runner = Runner(out / folder, progress=False, log_fn=logging.getLogger("demo_seeds").info)
    per_seed = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        per_seed.append(seed_predictions(runner, size, backbone, device, seed, recipe))
        m = per_seed[-1]["models"]
        print(f"seed {seed}: dense ID {_pct(m['dense']['id_test']['accuracy'])} OOD "
              f"{_pct(m['dense']['ood_test']['accuracy'])} | SRNet ID {_pct(m['SRNet']['id_test']['accuracy'])} OOD "
              f"{_pct(m['SRNet']['ood_test']['accuracy'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    settings = {"size": args.size, "seeds": args.seeds, "device": device, "backbone": backbone.name,
                "recipe": "sparsebert.cli.demo.srnet_configs", "recipe_changes": recipe}
    for path in write_report(Path(args.report_dir), per_seed, settings):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
