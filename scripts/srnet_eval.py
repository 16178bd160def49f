"""SRNet experiments at CPU scale (MiniLM backbone): run the planned sweep, then write results/srnet.

    python scripts/srnet_eval.py run [--stage teacher main cecontrol highsparsity paradigms pawsqqp longmask] [--out DIR] [--match TEXT ...]
                                     [--seeds N ...] [--weight-decay WD] [--teacher-seed T]   # WD, T: own --out
    python scripts/srnet_eval.py report [--out DIR] [--report-dir results/srnet]
    python scripts/srnet_eval.py compare BEFORE/runs AFTER/runs [--write FILE]   # two reports, run by run
    python scripts/srnet_eval.py collapse --runs LABEL=DIR ... --match TEXT ... --report-dir DIR   # one-class runs per teacher
    python scripts/srnet_eval.py start --out DIR [--sparsity S ...] [--weight-decay WD] [--teacher-seed T] --write F
                                                           # the mask search's step 0, evaluated

`run` executes the runs of each stage in priority order, one at a time, in this process (one thread:
OMP_NUM_THREADS=1); finished runs are skipped and interrupted ones resume (sparsebert.pruning.srnet.Runner).
Every run saves its per-example class probabilities (preds-step<N>.json next to run.json), from which
`report` computes 95% bootstrap intervals over seeds and examples.

One deviation from `sparsebert srnet`: every paradigm-a/b run starts from ONE dense teacher (seed
`teacher_seed`, default 0); the run seed varies the mask search only (data order, and the head for c).
Those runs carry the teacher in their identity and in their folder name (`...-seed1-t0`), so a plain
`sparsebert srnet` run with the same settings never mistakes one for its own.

Stage `pawsqqp` is the controlled-bias test on real text (task paws_qqp_biased, see PAWS below); its
runs are also evaluated on the task's further OOD set (PAWS-QQP dev_and_test), whose predictions go to
the same preds files, and `report` writes its own tables (paws_qqp_biased_*) beside the mnli ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsebert.checkpoint import atomic_write_text  # noqa: E402
from sparsebert.cli.srnet import nonnegative_float, int_at_least  # noqa: E402
from sparsebert.pruning.srnet import Runner, SRNetConfig  # noqa: E402
from sparsebert.runs import RunLocked  # noqa: E402

DEFAULT_OUT = "runs/srnet_cpu_v4"

# The CPU scale (see results/srnet/README.md). Shared by every run of the sweep.
# v4 (this scale): teacher 3 epochs (the issue's 3-5); mask training 1/2 epoch (245 steps) at score lr 5e-4.
# Why these: with Adam a score moves about lr per step, so a weight whose gradient keeps its sign drifts ~lr*T
# and a noisy one ~lr*sqrt(T). The binary start leaves a 0.02 gap; v3's 62 steps at 2e-3 moved noisy scores
# across it (every run collapsed to one class), 62 steps at 5e-4 moved almost nothing. 245 steps at 5e-4 let
# consistently signed weights swap (~0.12) while noisy ones stay (~0.008).
MNLI = dict(task="mnli", model="minilm", epochs=3.0, mask_epochs=0.5, lr=1e-4, lr_scores=5e-4, batch_size=16,
            max_length=64, hans_per_subcase=30, eval_points=1)

# Stage pawsqqp: PAWS-QQP with a controlled bias (task paws_qqp_biased, sparsebert/data/tasks.py). Train = 8,561
# pairs of train.tsv on which "word-bigram overlap >= 0.667 -> paraphrase" agrees with the label 80% of the time;
# ID = the held-out 951 pairs of that subset (same mix); OOD = the 2,476 anti-correlated pairs (the cue is wrong on
# all); a second OOD set: PAWS-QQP dev_and_test (677). MNLI's recipe (lr, lr_scores, batch 16, length 64, one
# evaluation point). Sized for one core at ~1.25 s per training step and ~30 ms per evaluated pair:
#   teacher 1.1 epochs = 590 steps ~ 12.3 min; each mask run 0.45 epoch = 242 steps ~ 5.0 min (MNLI's v4 mask runs
#   have 245); one evaluation = 600 ID + 1,000 OOD + 677 dev_and_test pairs ~ 1.1 min;
#   teacher + 7 mask runs ~ 12.3 + 7 x 5.0 + 8 x 1.1 ~ 56 min (plus loading, tokenizing, the bias model: ~1-2 min).
PAWS = dict({k: v for k, v in MNLI.items() if k != "hans_per_subcase"}, task="paws_qqp_biased", epochs=1.1,
            mask_epochs=0.45, max_eval=600, max_ood=1000)


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
        recipe = PAWS if self.task == PAWS["task"] else MNLI
        if self.mask_epochs != recipe["mask_epochs"]:  # a longer or shorter mask search is another run
            name += f"-me{self.mask_epochs:g}"
        return name + f"-t{self.teacher_seed}" if self.paradigm in ("a", "b") else name


class PredictionSavingRunner(Runner):
    """Runner that also writes each evaluation's per-example probabilities (preds-step<N>.json), and
    evaluates the task's further OOD sets (`TaskSplits.extra_ood`) there too."""

    def data(self, cfg):
        data = super().data(cfg)
        if not hasattr(data, "extra_ood"):
            from sparsebert.data import load_task
            kwargs = {"hans_per_subcase": cfg.hans_per_subcase} if cfg.task == "mnli" else {}
            extra = load_task(cfg.task, "all", seed=cfg.data_seed, **kwargs).extra_ood or {}
            for name, examples in extra.items():
                if hasattr(data, name):
                    raise ValueError(f"task {cfg.task!r}: extra OOD set {name!r} collides with a TaskData field")
                setattr(data, name, examples)  # data.loader(name) reads it
            data.extra_ood = tuple(extra)
        return data

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
            for name in getattr(data, "extra_ood", ()):
                ev.evaluate(model, data.loader(name, batch_size=max(64, cfg.batch_size)), metric=data.ood_spec.metric,
                            device=cfg.device, desc=name)
        finally:
            ev.predict = original
        out = {}
        for split, (probs, labels) in captured.items():
            examples = getattr(data, split)
            out[split] = {"probs": [[round(float(p), 5) for p in row] for row in probs.tolist()],
                          "labels": [int(v) for v in labels.tolist()],
                          "heuristic": [ex.meta.get("heuristic") for ex in examples],
                          "subcase": [ex.meta.get("subcase") for ex in examples]}
            if any("cue_agrees" in ex.meta for ex in examples):  # paws_qqp_biased: the cue predicts the label
                out[split]["cue_agrees"] = [ex.meta.get("cue_agrees") for ex in examples]
        atomic_write_text(json.dumps(out), path.parent / f"preds-step{step}.json")


def mnli_cfg(out: str, **kw) -> SharedTeacherConfig:
    return SharedTeacherConfig(out=out, **{**MNLI, **kw}).validate()



SEEDS = (0, 1, 2)


def plan(stage: str, out: str, seeds: Sequence[int] = SEEDS, weight_decay: float = 0.0,
         teacher_seed: int = 0) -> List[SharedTeacherConfig]:
    """The runs of a stage, in the order they execute (seed-major, so a cut leaves balanced cells).
    `seeds`: the mask-search seeds of the seeded stages (the teacher and the one-seed paradigms stage keep
    seed 0; more seeds add runs beside the existing ones, which keep their names and are reused; a repeated
    seed is one run). `weight_decay`: AdamW decay of the model weights in every run of the plan (the teacher's
    fine-tuning, paradigm b's retraining; paradigm a's mask search freezes the weights, so there it acts through
    the teacher only). The default is the authors' 0; v4 ran with 0.01. It is part of each run's identity, so a
    plan with another decay needs its own --out (the runner refuses a folder holding another configuration).
    `teacher_seed`: the seed of the dense teacher (its head's initialisation, dropout and data order) that every
    paradigm-a/b run of the plan starts from; the mask runs carry it in their names (`-t<T>`). Default 0, the
    teacher of every earlier study."""
    seeds = tuple(dict.fromkeys(seeds))
    if stage == "pawsqqp":
        return paws_plan(out, seeds=seeds, weight_decay=weight_decay, teacher_seed=teacher_seed)

    def cfg(**kw) -> SharedTeacherConfig:
        return mnli_cfg(out, weight_decay=weight_decay, teacher_seed=teacher_seed, **kw)

    if stage == "teacher":
        return [cfg(paradigm="dense", loss="ce", seed=teacher_seed)]
    if stage == "main":
        return [cfg(paradigm="a", source="ce", loss=loss, sparsity=s, seed=seed)
                for s in (0.5, 0.7) for seed in seeds for loss in ("poe", "reweight")]
    if stage == "cecontrol":  # CE mask training at 50%: what the mask search alone does, without debiasing
        return [cfg(paradigm="a", source="ce", loss="ce", sparsity=0.5, seed=seed) for seed in seeds]
    if stage == "highsparsity":
        return [cfg(paradigm="a", source="ce", loss="poe", sparsity=0.9, seed=seed, **sched)
                for seed in seeds for sched in (dict(schedule="cubic", initial_sparsity=0.7),
                                                dict(schedule="constant"))]
    if stage == "paradigms":
        return [cfg(paradigm="c", loss="poe", sparsity=0.5, seed=0),
                cfg(paradigm="b", source="ce", loss="poe", sparsity=0.5, seed=0, mask_from="mask_training")]
    if stage == "longmask":  # 4x the mask steps (980): does the 245-step picture change with a longer search?
        return [cfg(paradigm="a", source="ce", loss=loss, sparsity=0.5, seed=seed, mask_epochs=2.0)
                for seed in seeds for loss in ("poe", "ce", "reweight")]
    raise ValueError(f"--stage: expected one of {', '.join(STAGES)}, got {stage!r}")


def paws_plan(out: str, seeds: Sequence[int] = SEEDS, **recipe) -> List[SharedTeacherConfig]:
    """Stage pawsqqp: the dense CE teacher on the biased subset, then paradigm-a mask training of that one
    teacher at 50%: poe and reweight for `seeds` (default 0, 1, 2; seed-major), and ce for seed 0 (the control
    without debiasing). `recipe` overrides PAWS (tests: a tiny model)."""
    def cfg(**kw) -> SharedTeacherConfig:
        return SharedTeacherConfig(out=out, **{**PAWS, **recipe, **kw}).validate()

    masks = [cfg(paradigm="a", source="ce", loss=loss, sparsity=0.5, seed=seed)
             for seed in seeds for loss in (("poe", "reweight", "ce") if seed == 0 else ("poe", "reweight"))]
    return [cfg(paradigm="dense", loss="ce", seed=recipe.get("teacher_seed", 0))] + masks


STAGES = ("teacher", "main", "cecontrol", "highsparsity", "paradigms", "pawsqqp", "longmask")


def selected(cfgs: List[SharedTeacherConfig], match: Optional[List[str]]) -> List[SharedTeacherConfig]:
    """The runs whose name contains one of `match` (all when None), with the dense runs they start from:
    a mask run needs its teacher, so a selection never cuts it off."""
    if not match:
        return cfgs
    return [c for c in cfgs if c.paradigm == "dense" or any(m in c.run_name for m in match)]


def cmd_run(args) -> int:
    import logging
    import time
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    runner = PredictionSavingRunner(args.out, progress=False, log_fn=logging.getLogger("srnet_eval").info)
    t0 = time.time()
    for stage in args.stage:
        for cfg in selected(plan(stage, args.out, args.seeds, args.weight_decay, args.teacher_seed), args.match):
            try:
                r = runner.run(cfg)
            except RunLocked as e:  # another `run` process holds it: take the next one (two processes share a stage)
                print(f"[{(time.time() - t0) / 60:6.1f} min] {stage:12s} {cfg.run_name:45s} skipped: {e}", flush=True)
                continue
            print(f"[{(time.time() - t0) / 60:6.1f} min] {stage:12s} {r['run']:45s} ID {r['last']['id']:.4f} "
                  f"OOD {r['last']['ood']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the sweep (resumable)")
    r.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    r.add_argument("--out", default=DEFAULT_OUT)
    r.add_argument("--match", nargs="+", metavar="TEXT",
                   help="only the stages' runs whose name contains one of these (e.g. +poe-s0.5 +ce-s0.5); "
                        "their teachers run as needed")
    r.add_argument("--seeds", nargs="+", type=int_at_least(0, "a non-negative integer seed"),
                   default=list(SEEDS), metavar="N",
                   help="mask-search seeds of the seeded stages (default 0 1 2); e.g. --seeds 3 4 5 adds runs to "
                        "cells that have 0-2, and the report pools every seed it finds")
    r.add_argument("--weight-decay", type=nonnegative_float, default=0.0, metavar="WD",
                   help="AdamW decay of the model weights in every run (default 0, the authors'; v4 ran 0.01). "
                        "Another decay is another configuration: give it its own --out")
    r.add_argument("--teacher-seed", type=int_at_least(0, "a non-negative integer seed"), default=0, metavar="T",
                   help="seed of the dense teacher every mask search starts from (default 0, every earlier study's); "
                        "the mask runs are named -t<T>. Give each teacher its own --out so `collapse` and `report` "
                        "read one teacher per folder")
    rep = sub.add_parser("report", help="tables, intervals and pictures from the finished runs")
    rep.add_argument("--out", default=DEFAULT_OUT)
    rep.add_argument("--report-dir", default="results/srnet")
    mag = sub.add_parser("magnitude", help="the teacher pruned by magnitude alone, no training (test halves)")
    mag.add_argument("--out", default=DEFAULT_OUT)
    mag.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    mag.add_argument("--report-dir", default="results/srnet")
    st = sub.add_parser("start", help="the paradigm-a mask search's starting point (its step 0: the teacher under the "
                                      "scheduler's binary magnitude masks, head included), evaluated per sparsity")
    st.add_argument("--out", default=DEFAULT_OUT)
    st.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    st.add_argument("--weight-decay", type=nonnegative_float, default=0.0, metavar="WD",
                    help="the teacher's decay, as given to `run` for this --out")
    st.add_argument("--teacher-seed", type=int_at_least(0, "a non-negative integer seed"), default=0, metavar="T",
                    help="the teacher's seed, as given to `run` for this --out")
    st.add_argument("--write", required=True, metavar="FILE", help="the JSON to write (one row per sparsity)")
    cmp = sub.add_parser("compare", help="two reports' run JSONs side by side, run by run (e.g. before and after "
                                         "a change of defaults): last ID, HANS-style and its halves, test halves")
    cmp.add_argument("before", help="a report's runs/ folder (run JSONs)")
    cmp.add_argument("after", help="another report's runs/ folder")
    cmp.add_argument("--write", help="also write the table (markdown) to this file")
    col = sub.add_parser("collapse", help="how many mask searches collapse to one class, teacher by teacher (one "
                                          "folder per teacher), with Fisher's exact test between them")
    col.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR",
                     help="one folder of runs per teacher, e.g. decay0=runs/srnet_cpu_v5 decay0.01=runs/srnet_cpu_wd01; "
                          "GROUP/NAME labels (decay0/t0 decay0/t1 ...) also pool the teachers of each group")
    col.add_argument("--match", nargs="+", required=True, metavar="TEXT", help="the cells' runs, e.g. +poe-s0.7")
    col.add_argument("--report-dir", required=True)
    args = p.parse_args(argv)
    if args.cmd == "collapse":
        return cmd_collapse(args)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "compare":
        return cmd_compare(args)
    if args.cmd == "magnitude":
        return cmd_magnitude(args)
    if args.cmd == "start":
        return cmd_start(args)
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


def cmd_start(args) -> int:
    """Where a paradigm-a mask search (stage main, constant schedule) starts: the teacher with every masked matrix
    (encoder, pooler and classifier, per layer) binarized by magnitude at the target sparsity, as the scheduler
    builds it before step 0, evaluated on the whole held-out ID and HANS-style sets. Does a search that ends in one
    class already start there?"""
    import torch
    from sparsebert.nn import sparsity_report
    from sparsebert.pruning.scheduler import MaskScheduler
    from sparsebert.pruning.srnet import evaluate_all
    for s in args.sparsity:
        if not 0.0 < s < 1.0:
            print(f"srnet_eval start: --sparsity: expected values in (0, 1), got {s!r}", file=sys.stderr)
            return 2
    teacher = plan("teacher", args.out, weight_decay=args.weight_decay, teacher_seed=args.teacher_seed)[0]
    runner = Runner(args.out, progress=False)
    if not runner.finished(teacher):
        print(f"srnet_eval start: the teacher {teacher.run_name} (weight decay {args.weight_decay:g}) is not finished "
              f"under {args.out}", file=sys.stderr)
        return 2
    search = next(c for c in plan("main", args.out, seeds=[0], weight_decay=args.weight_decay,
                                  teacher_seed=args.teacher_seed) if c.loss == "poe")
    data = runner.data(teacher)
    rows = []
    for sparsity in args.sparsity:
        cfg = dataclasses.replace(search, sparsity=sparsity)
        model = runner._starting_model(cfg, data)
        sched = MaskScheduler(model, sparsity=cfg.sparsity, total_steps=1, schedule=cfg.schedule,
                              initial_sparsity=cfg.initial_sparsity, end_frac=cfg.end_frac, scope=cfg.scope,
                              threshold_refresh_steps=cfg.threshold_refresh_steps, score_init=cfg.score_init,
                              include_head=cfg.include_head, train_head=cfg.train_head, granularity=cfg.granularity)
        model.eval()
        with torch.no_grad(), sched.exact_sparsity():
            m = evaluate_all(model, data, cfg)
            measured = sparsity_report(model)["overall"]
        row = {"sparsity": sparsity, "search": cfg.run_name, "measured_sparsity": measured}
        for name, parts in (("id", ("id_dev", "id_test")), ("ood", ("ood_dev", "ood_test"))):
            n = sum(m[p]["n"] for p in parts)
            counts = [sum(c) for c in zip(*(m[p]["summary"]["pred_counts"] for p in parts))]
            row.update({f"{name}_accuracy": sum(m[p]["accuracy"] * m[p]["n"] for p in parts) / n, f"n_{name}": n,
                        f"{name}_pred_counts": counts, f"{name}_top_share": max(counts) / n,
                        f"{name}_one_class": sum(1 for c in counts if c) == 1})
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = Path(args.write)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"teacher": teacher.run_name, "weight_decay": args.weight_decay,
                                  "teacher_seed": args.teacher_seed,
                                  "rule": "the mask search's step 0: per layer, the top (1 - sparsity) of |W| kept in "
                                          "the encoder, pooler and classifier (include_head), no training; whole "
                                          "held-out ID and HANS-style sets", "rows": rows}, indent=1), path)
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
    extra = (extra + ", " if extra else "") + f"lr_scores {c['lr_scores']:g}, {run['last']['step']} steps"
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
    group's seeds and (shared, paired) the examples. `reference`: one model's vector, or a list with one
    vector per seed of the group (a control run with the same seed: the seeds are resampled as pairs)."""
    import torch
    x = torch.stack([(c[mask] if mask is not None else c).double() for c in correct_per_seed])
    if isinstance(reference, (list, tuple)):  # one reference per seed: paired by seed and by example
        if len(reference) != len(correct_per_seed):
            raise ValueError(f"reference: expected {len(correct_per_seed)} per-seed vectors, got {len(reference)}")
        ref = torch.stack([(c[mask] if mask is not None else c).double() for c in reference])
    else:
        ref = (reference[mask] if mask is not None else reference).double()
    d = x - ref
    from sparsebert.eval import seed_example_bootstrap
    ci = seed_example_bootstrap(d, N_BOOT, level, seed=1)
    return {"mean": ci["mean"], "low": ci["low"], "high": ci["high"]}


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
    rows, per_seed = [], {}
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
            row["vs_teacher"] = _diffs(id_correct, ood_correct, ref_id, ref_ood, ent, non)
        per_seed[key] = (row, {r["seed"]: (i, o) for r, i, o in zip(rs, id_correct, ood_correct)}, ent, non)
        rows.append(row)
    for key, (row, by_seed, ent, non) in per_seed.items():
        control = per_seed.get(_ce_control_key(key))
        seeds = sorted(by_seed.keys() & control[1].keys()) if control else []
        if seeds:
            ctrl = control[1]
            row["vs_ce_mask"] = {"control": control[0]["group"], "seeds": seeds, **_diffs(
                [by_seed[s][0] for s in seeds], [by_seed[s][1] for s in seeds],
                [ctrl[s][0] for s in seeds], [ctrl[s][1] for s in seeds], ent, non)}
    return rows


def _diffs(id_correct, ood_correct, ref_id, ref_ood, ent, non) -> Dict[str, Dict[str, float]]:
    """ID, HANS-style and its entailed / non-entailed halves: group minus reference (`_diff_ci`)."""
    return {"id": _diff_ci(id_correct, ref_id), "ood": _diff_ci(ood_correct, ref_ood),
            "ood_entailed": _diff_ci(ood_correct, ref_ood, ent), "ood_non_entailed": _diff_ci(ood_correct, ref_ood, non)}


def _ce_control_key(key):
    """The CE mask-training group that controls a debiased one: same paradigm, teacher, schedule, sparsity,
    steps and head rule, loss ce (what the mask search alone does, without the debiasing loss)."""
    paradigm, loss, sched, sparsity, extra = key
    if paradigm != "a" or "->" not in loss:
        return None
    source, mask_loss = loss.split("->")
    return None if mask_loss == "ce" else (paradigm, f"{source}->ce", sched, sparsity, extra)


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
    for field, title in (("vs_teacher", "Difference from the dense CE teacher (points, 95% interval; paired over "
                                        "examples)"),
                         ("vs_ce_mask", "Debiasing loss vs CE mask training (the control: same teacher, sparsity, "
                                        "steps; points, 95% interval; paired by seed and example)")):
        diff = [r for r in rows if field in r]
        if not diff:
            continue
        lines += ["", f"## {title}", "",
                  "| model | seeds | sparsity | ID | HANS-style | ent. | non-ent. |", "|---|---|---|---|---|---|---|"]
        for r in diff:
            v = r[field]
            lines.append(f"| {r['group']} | {len(v.get('seeds', r['seeds']))} | {r['target_sparsity']:g} | "
                         f"{_signed(v['id'])} | {_signed(v['ood'])} | {_signed(v['ood_entailed'])} | "
                         f"{_signed(v['ood_non_entailed'])} |")
    lines += ["", "## HANS-style accuracy by heuristic (mean over seeds; entailed / non-entailed)", "",
              "| model | sparsity | " + " | ".join(sorted(rows[0]["by_heuristic"])) + " |" if rows else "",
              "|---|---|" + "---|" * (len(rows[0]["by_heuristic"]) if rows else 0)]
    for r in rows:
        cells = [f"{100 * v['entailed']:.0f} / {100 * v['non_entailed']:.0f}" for _, v in sorted(r["by_heuristic"].items())]
        lines.append(f"| {r['group']} | {r['target_sparsity']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Predicted class counts per seed (ID: entailment/neutral/contradiction; HANS-style: ent./non-ent.)", "",
              "| model | sparsity | ID | HANS-style |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['target_sparsity']:g} | {r['id_pred_counts']} | {r['ood_pred_counts']} |")
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


COMPARE_FIELDS = (("id", "ID"), ("ood", "HANS-style"), ("ood_entailed", "entailed"),
                  ("ood_non_entailed", "non-entailed"))


def compare_runs(before: Path, after: Path) -> str:
    """Markdown: for every run JSON present in both folders (same run name), the last evaluation's numbers
    before -> after (test halves, as the run JSONs hold them); the runs in one folder only are counted (the
    ones only after are named: a rerun's new runs)."""
    for d, name in ((before, "before"), (after, "after")):
        if not d.is_dir():
            raise FileNotFoundError(f"{name}: {d} is not a folder of run JSONs")
    a, b = ({p.stem: p for p in sorted(d.glob("*.json"))} for d in (before, after))
    both = [k for k in a if k in b]
    last = {k: (json.loads(a[k].read_text())["last"], json.loads(b[k].read_text())["last"]) for k in both}
    lines = ["| run | " + " | ".join(f"{title} before -> after" for _, title in COMPARE_FIELDS) + " |",
             "|---|" + "---|" * len(COMPARE_FIELDS)]
    for k in both:
        cells = []
        for field, _ in COMPARE_FIELDS:
            x, y = (side.get(field) for side in last[k])
            cells.append("" if x is None or y is None else f"{100 * x:.1f} -> {100 * y:.1f} ({100 * (y - x):+.1f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    a_only, b_only = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if a_only or b_only:
        lines += ["", f"Not compared: {len(a_only)} runs only before" +
                  (f"; only after: {', '.join(b_only)}" if b_only else "") + "."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- collapse (teachers compared)
def _labelled_dirs(specs: Sequence[str]) -> List[tuple]:
    """LABEL=DIR arguments -> [(label, Path)], refusing a malformed one, a repeated label or a missing folder."""
    out = []
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--runs: expected LABEL=DIR (e.g. decay0=runs/srnet_cpu_v5), got {spec!r}")
        if label in [l for l, _ in out]:
            raise ValueError(f"--runs: label {label!r} given twice")
        if not (Path(folder) / "mnli").is_dir():
            raise FileNotFoundError(f"--runs: {folder}/mnli is not a folder of srnet_eval runs")
        out.append((label, Path(folder)))
    return out


def _run_row(run) -> Dict[str, Any]:
    from sparsebert.eval import classification_summary
    id_pred, id_labels = run["_id"]
    ood_pred, ood_labels, _ = run["_ood"]
    ids, oods = classification_summary(id_pred, id_labels, 3), classification_summary(ood_pred, ood_labels, 2)
    ent, non = ood_labels == 0, ood_labels == 1
    ood_ok = ood_pred == ood_labels
    return {"run": run["run"], "seed": run["seed"], "id": ids["accuracy"], "ood": oods["accuracy"],
            "ood_entailed": float(ood_ok[ent].double().mean()), "ood_non_entailed": float(ood_ok[non].double().mean()),
            "id_pred_counts": ids["pred_counts"], "id_top_share": max(ids["pred_counts"]) / int(id_labels.numel()),
            "one_class": ids["one_class"] or oods["one_class"], "id_one_class": ids["one_class"],
            "id_majority_accuracy": ids["majority_accuracy"]}


def collapse_study(labelled: Sequence[tuple], match: Sequence[str]) -> Dict[str, Any]:
    """Per folder (one teacher each): its teacher, and every finished mask run whose name contains one of `match`,
    grouped by cell; per cell, how many seeds collapsed to one class (ID or HANS-style), and Fisher's exact test
    of the first folder's collapse rate against each other folder's in the same cell, with the mean ID and
    HANS-style accuracy differences (other - first) over the seeds both have, paired by seed (the same mask seed
    draws the same data order from either teacher) and by example."""
    from sparsebert.eval import bootstrap_diff_ci, fisher_exact_2x2
    groups, correct = [], {}
    for label, folder in labelled:
        runs = _load_runs(folder)
        teachers = [r for r in runs if r["paradigm"] == "dense"]
        if len(teachers) != 1:
            raise ValueError(f"{folder}: expected one dense teacher run, found {len(teachers)}")
        teacher = teachers[0]
        cells: Dict[str, List[Dict[str, Any]]] = {}
        for r in runs:
            if r["paradigm"] != "dense" and any(m in r["run"] for m in match):
                cell = _label(_group_key(r))
                cells.setdefault(cell, []).append(_run_row(r))
                correct[(label, cell, r["seed"])] = (r["_id"][0] == r["_id"][1], r["_ood"][0] == r["_ood"][1])
        if not cells:
            raise ValueError(f"{folder}: no finished mask run matches {' '.join(match)}")
        groups.append({"label": label, "folder": str(folder),
                       "teacher_weight_decay": teacher["config"].get("weight_decay"),
                       "teacher": _run_row(teacher),
                       "cells": {cell: {"runs": sorted(rows, key=lambda x: x["seed"]),
                                        "collapsed": sum(x["one_class"] for x in rows),
                                        "collapsed_id": sum(x["id_one_class"] for x in rows), "seeds": len(rows)}
                                 for cell, rows in sorted(cells.items())}})
    tests = []
    first = groups[0]
    for other in groups[1:]:
        for cell in sorted(first["cells"].keys() & other["cells"].keys()):
            a, b = first["cells"][cell], other["cells"][cell]
            strict = fisher_exact_2x2(a["collapsed_id"], a["seeds"], b["collapsed_id"], b["seeds"])
            seeds = sorted({x["seed"] for x in a["runs"]} & {x["seed"] for x in b["runs"]})
            diffs = {"id_diff": None, "ood_diff": None}
            for i, key in enumerate(("id", "ood") if seeds else ()):
                ci = bootstrap_diff_ci([correct[(other["label"], cell, sd)][i] for sd in seeds],
                                       [correct[(first["label"], cell, sd)][i] for sd in seeds], n_boot=N_BOOT, seed=1)
                diffs[f"{key}_diff"] = {k: ci[k] for k in ("mean", "low", "high")}
            tests.append({"cell": cell, "a": first["label"], "b": other["label"],
                          **fisher_exact_2x2(a["collapsed"], a["seeds"], b["collapsed"], b["seeds"]),
                          "id_only_p_value": strict["p_value"], "paired_seeds": seeds, **diffs})
    for g in groups:  # every matched run of the folder, the cells pooled
        g["pooled"] = {k: sum(c[k] for c in g["cells"].values()) for k in ("collapsed", "collapsed_id", "seeds")}
    pooled = [{"a": a["label"], "b": b["label"], **_fisher_pooled(a["pooled"], b["pooled"])}
              for i, a in enumerate(groups) for b in groups[i + 1:]]
    by_group: Dict[str, Dict[str, Any]] = {}
    for g in groups:
        if "/" in g["label"]:  # GROUP/NAME: one of several teachers of GROUP (e.g. decay0/t1)
            agg = by_group.setdefault(g["label"].split("/", 1)[0], {"teachers": [], "collapsed": 0, "collapsed_id": 0,
                                                                    "seeds": 0, "per_teacher": [], "per_teacher_id": []})
            agg["teachers"].append(g["label"])
            agg["per_teacher"].append([g["pooled"]["collapsed"], g["pooled"]["seeds"]])
            agg["per_teacher_id"].append([g["pooled"]["collapsed_id"], g["pooled"]["seeds"]])
            for k in ("collapsed", "collapsed_id", "seeds"):
                agg[k] += g["pooled"][k]
    names = sorted(by_group)
    group_tests = [{"a": a, "b": b, **_fisher_pooled(by_group[a], by_group[b]),
                    "teacher_permutation": _teacher_permutation(by_group[a], by_group[b], "per_teacher"),
                    "teacher_permutation_id": _teacher_permutation(by_group[a], by_group[b], "per_teacher_id")}
                   for i, a in enumerate(names) for b in names[i + 1:]] if len(names) > 1 else []
    return {"match": list(match), "collapse": "every prediction on the ID set or on the HANS-style set is one class "
                                              "(collapsed_id, id_only_p_value: on the ID set alone)",
            "groups": groups, "fisher_exact": tests, "pooled_fisher_exact": pooled,
            "by_group": [{"group": n, **by_group[n]} for n in names], "by_group_fisher_exact": group_tests}


def _teacher_permutation(a: Dict[str, Any], b: Dict[str, Any], key: str) -> Dict[str, Any]:
    """The group difference tested with the teacher as the unit: teachers, each with all its runs, exchanged."""
    from sparsebert.eval import cluster_permutation_test
    r = cluster_permutation_test([tuple(c) for c in a[key]], [tuple(c) for c in b[key]])
    return {k: r[k] for k in ("p_value", "min_p_value", "splits")}


def _fisher_pooled(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, Any]:
    from sparsebert.eval import fisher_exact_2x2
    return {**fisher_exact_2x2(a["collapsed"], a["seeds"], b["collapsed"], b["seeds"]),
            "id_only_p_value": fisher_exact_2x2(a["collapsed_id"], a["seeds"], b["collapsed_id"], b["seeds"])["p_value"]}


def collapse_markdown(study) -> str:
    lines = ["# Mask searches that collapse to one class, teacher by teacher", "",
             f"Runs whose name contains {', '.join(study['match'])}; collapsed = {study['collapse']}. ID and "
             "HANS-style over the whole held-out sets (dev + test halves).", ""]
    for g in study["groups"]:
        t = g["teacher"]
        lines += [f"## {g['label']} ({g['folder']}; teacher weight decay {g['teacher_weight_decay']})", "",
                  f"Teacher: ID {100 * t['id']:.1f}, HANS-style {100 * t['ood']:.1f}, non-entailed "
                  f"{100 * t['ood_non_entailed']:.1f} (majority class ID {100 * t['id_majority_accuracy']:.1f}, "
                  "constant predictor HANS-style 50.0).", ""]
        for cell, c in g["cells"].items():
            lines += [f"**{cell}**: {c['collapsed']} of {c['seeds']} collapsed ({c['collapsed_id']} of them to one "
                      "class on ID too).", "",
                      "| seed | ID | HANS-style | entailed | non-entailed | ID predicted (ent/neu/con) | largest share | one class |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in c["runs"]:
                lines.append(f"| {r['seed']} | {100 * r['id']:.1f} | {100 * r['ood']:.1f} | {100 * r['ood_entailed']:.1f} | "
                             f"{100 * r['ood_non_entailed']:.1f} | {'/'.join(map(str, r['id_pred_counts']))} | "
                             f"{100 * r['id_top_share']:.1f}% | {'**yes**' if r['one_class'] else 'no'} |")
            lines.append("")
    if study["fisher_exact"]:
        lines += ["## Collapse rates compared (Fisher's exact test, two-sided)", "",
                  "| cell | a | collapsed (on ID too) | b | collapsed (on ID too) | p | p, ID alone | "
                  "ID b - a (paired seeds) | HANS-style b - a |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in study["fisher_exact"]:
            ca = next(g for g in study["groups"] if g["label"] == t["a"])["cells"][t["cell"]]
            cb = next(g for g in study["groups"] if g["label"] == t["b"])["cells"][t["cell"]]
            lines.append(f"| {t['cell']} | {t['a']} | {ca['collapsed']}/{ca['seeds']} ({ca['collapsed_id']}) | {t['b']} | "
                         f"{cb['collapsed']}/{cb['seeds']} ({cb['collapsed_id']}) | {t['p_value']:.3f} | "
                         f"{t['id_only_p_value']:.3f} | "
                         + (f"{_signed(t['id_diff'])} ({len(t['paired_seeds'])}) | {_signed(t['ood_diff'])} |"
                            if t["paired_seeds"] else "no common seed | |"))
        lines.append("")
    if study["pooled_fisher_exact"]:
        counts = {g["label"]: g["pooled"] for g in study["groups"]}
        lines += ["## The cells pooled, every pair of teachers (Fisher's exact test, two-sided)", "",
                  "| a | collapsed (on ID too) | b | collapsed (on ID too) | p | p, ID alone |", "|---|---|---|---|---|---|"]
        lines += [_pooled_row(t, counts[t["a"]], counts[t["b"]]) for t in study["pooled_fisher_exact"]]
        lines.append("")
    if study["by_group_fisher_exact"]:
        counts = {g["group"]: g for g in study["by_group"]}
        lines += ["## Teachers pooled by group (the label before '/')", "",
                  "Every run counted as independent, although the runs of one teacher share it: the teacher is the unit "
                  "a group effect has to generalise over, and with few teachers per group these p-values overstate the "
                  "evidence. Compare the spread between the teachers of one group (table above) with the gap between "
                  "groups. The last two columns test the same difference with the teacher as the unit: every split "
                  "of the teachers (each with all its runs) into groups of these sizes, p the share of splits whose "
                  "pooled rates differ at least as much as observed; in brackets the smallest p any split of these "
                  "teachers could give.", "",
                  "| a | collapsed per teacher | pooled (on ID too) | b | collapsed per teacher | pooled (on ID too) | "
                  "p, runs as units (Fisher) | p, ID alone | p, teachers as units (least possible) | p, ID alone |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        def per(g):
            return ", ".join(f"{h}/{n}" for h, n in g["per_teacher"])
        for t in study["by_group_fisher_exact"]:
            a, b = counts[t["a"]], counts[t["b"]]
            tp, tpi = t["teacher_permutation"], t["teacher_permutation_id"]
            lines.append(f"| {t['a']} | {per(a)} | {a['collapsed']}/{a['seeds']} ({a['collapsed_id']}) | "
                         f"{t['b']} | {per(b)} | {b['collapsed']}/{b['seeds']} ({b['collapsed_id']}) | "
                         f"{t['p_value']:.3f} | {t['id_only_p_value']:.3f} | "
                         f"{tp['p_value']:.3f} ({tp['min_p_value']:.3f}) | {tpi['p_value']:.3f} ({tpi['min_p_value']:.3f}) |")
        lines.append("")
    return "\n".join(lines)


def _pooled_row(t, a, b) -> str:
    return (f"| {t['a']} | {a['collapsed']}/{a['seeds']} ({a['collapsed_id']}) | {t['b']} | "
            f"{b['collapsed']}/{b['seeds']} ({b['collapsed_id']}) | {t['p_value']:.3f} | {t['id_only_p_value']:.3f} |")


def collapse_plot(study, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import io
    from sparsebert.checkpoint import atomic_write_bytes
    columns = sum(len(g["cells"]) for g in study["groups"])
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 1.6 * columns), 4.6))
    ticks, names = [], []
    x = 0
    for g in study["groups"]:
        for cell, c in g["cells"].items():
            for ax, key in zip(axes, ("id", "ood_non_entailed")):
                for i, r in enumerate(c["runs"]):
                    xx = x + 0.5 * (i / max(1, len(c["runs"]) - 1) - 0.5)
                    ax.plot(xx, 100 * r[key], "x" if r["one_class"] else "o", color="tab:red" if r["one_class"] else "tab:blue",
                            ms=7, label="collapsed to one class" if r["one_class"] else "mask search, one seed")
                ax.hlines(100 * g["teacher"][key], x - 0.35, x + 0.35, color="k", lw=2, label="its teacher")
            ticks.append(x)
            names.append(f"{g['label']}\n{cell.split(',')[0].split('->')[-1]}\n{c['collapsed']}/{c['seeds']} collapsed")
            x += 1
    first = study["groups"][0]["teacher"]
    axes[0].axhline(100 * first["id_majority_accuracy"], color="r", ls=":", lw=1, label="majority class")
    for ax, title in zip(axes, ("ID: MNLI held-out accuracy (%)", "HANS-style non-entailed accuracy (%)")):
        ax.set_xticks(ticks, names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.6, x - 0.4)
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    title = f"Mask searches ({', '.join(study['match'])}) from each teacher, one point per seed"
    width = max(60, int(fig.get_figwidth() * 14))  # a long --match list wraps instead of running off the figure
    fig.suptitle("\n".join(textwrap.wrap(title, width=width)), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def cmd_collapse(args) -> int:
    try:
        study = collapse_study(_labelled_dirs(args.runs), args.match)
    except (ValueError, FileNotFoundError) as e:
        print(f"srnet_eval collapse: {e}", file=sys.stderr)
        return 2
    rdir = Path(args.report_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(study, indent=1), rdir / "collapse.json")
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["folder", "teacher_weight_decay", "cell", "run", "seed", "id", "ood", "ood_entailed",
                "ood_non_entailed", "id_top_share", "one_class", "id_one_class"])
    for g in study["groups"]:
        for cell, c in g["cells"].items():
            for r in c["runs"]:
                w.writerow([g["label"], g["teacher_weight_decay"], cell, r["run"], r["seed"]]
                           + [f"{r[k]:.6f}" for k in ("id", "ood", "ood_entailed", "ood_non_entailed", "id_top_share")]
                           + [r["one_class"], r["id_one_class"]])
    atomic_write_text(buf.getvalue(), rdir / "collapse.csv")
    text = collapse_markdown(study)
    atomic_write_text(text, rdir / "collapse.md")
    collapse_plot(study, rdir / "collapse.png")
    print(text, end="")
    return 0


def cmd_compare(args) -> int:
    try:
        text = compare_runs(Path(args.before), Path(args.after))
    except FileNotFoundError as e:
        print(f"srnet_eval compare: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.write:
        atomic_write_text(text, Path(args.write))
    return 0


def cmd_report(args) -> int:
    out, rdir = Path(args.out), Path(args.report_dir)
    runs, paws_runs = _load_runs(out), _load_paws_runs(out)
    if not runs and not paws_runs:
        print(f"srnet_eval report: no finished runs under {out}/mnli or {out}/{PAWS['task']}", file=sys.stderr)
        return 2
    rdir.mkdir(parents=True, exist_ok=True)
    if runs:
        report_mnli(runs, rdir)
    if paws_runs:
        report_paws(paws_runs, rdir)
    return 0


def report_mnli(runs, rdir: Path) -> None:
    import csv
    rows = summarize_groups(runs)
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


# ------------------------------------------------------------------------------ report: PAWS-QQP biased
# (key, prediction splits pooled, column title): with one evaluation point nothing is selected on a dev half
PAWS_SPLITS = (("id", ("id_dev", "id_test"), "ID"), ("ood", ("ood_dev", "ood_test"), "OOD anti-corr."),
               ("paws", ("paws_dev_and_test",), "PAWS dev+test"))


def _load_paws_runs(out: Path) -> List[Dict[str, Any]]:
    """Finished paws_qqp_biased runs with per-example predictions, labels and cue agreement per PAWS_SPLITS key."""
    import torch
    runs = []
    for rj in sorted((out / PAWS["task"]).glob("*/run.json")):
        run = json.loads(rj.read_text())
        preds_file = rj.parent / f"preds-step{run['last']['step']}.json"
        if not preds_file.is_file():
            raise FileNotFoundError(f"{preds_file} is missing (runs must be made by `srnet_eval.py run`)")
        preds = json.loads(preds_file.read_text())
        run["_splits"] = {}
        for key, parts, _ in PAWS_SPLITS:
            missing = [part for part in parts if part not in preds]
            if missing:
                raise ValueError(f"{preds_file}: no predictions for {missing} (runs must be made by `srnet_eval.py run`)")
            probs = torch.tensor([row for part in parts for row in preds[part]["probs"]])
            labels = torch.tensor([y for part in parts for y in preds[part]["labels"]])
            cue = [c for part in parts for c in preds[part].get("cue_agrees", [None] * len(preds[part]["labels"]))]
            run["_splits"][key] = (probs.argmax(-1), labels,
                                   None if None in cue else torch.tensor(cue, dtype=torch.bool))
        runs.append(run)
    return runs


def _f1_ci(preds_per_seed, labels, reference=None, level: float = 0.95) -> Dict[str, float]:
    """F1 of the paraphrase class (1), mean over seeds, with a bootstrap interval over seeds and examples;
    with `reference` (one model's predictions), of F1 minus the reference's F1 on the same resampled examples."""
    import torch
    p, y = torch.stack([x.long() for x in preds_per_seed]), labels.long()

    def f1(pred, lab):  # (..., n) -> (...); 0 without true positives, as sparsebert.eval.f1_score
        tp = ((pred == 1) & (lab == 1)).sum(-1).double()
        wrong = (pred != lab).sum(-1).double()
        return torch.where(tp > 0, 2 * tp / (2 * tp + wrong).clamp(min=1), torch.zeros_like(tp))

    ref = reference.long() if reference is not None else None
    point = f1(p, y) - (f1(ref, y) if ref is not None else 0.0)
    g = torch.Generator().manual_seed(2)
    s, n = p.shape
    seed_idx = torch.randint(0, s, (N_BOOT, s), generator=g)
    ex_idx = torch.randint(0, n, (N_BOOT, n), generator=g)
    reps = []
    for i in range(0, N_BOOT, 256):
        idx = ex_idx[i:i + 256]
        v = f1(p[:, idx], y[idx])  # (S, chunk)
        if ref is not None:
            v = v - f1(ref[idx], y[idx])
        reps.append(v.T)
    means = torch.cat(reps).gather(1, seed_idx).mean(1)
    a = (1 - level) / 2
    return {"mean": float(point.mean()), "low": float(torch.quantile(means, a)), "high": float(torch.quantile(means, 1 - a))}


def summarize_paws(runs) -> List[Dict[str, Any]]:
    """One row per group of seeds: per split accuracy and F1 with intervals, baselines, one-class flags,
    accuracy where the cue agrees / disagrees, and paired differences from the dense CE teacher."""
    from collections import defaultdict
    from sparsebert.eval import classification_summary
    groups = defaultdict(list)
    for r in runs:
        groups[_group_key(r)].append(r)
    teacher = groups.get(("dense", "ce", "", 0.0, ""))
    ref = sorted(teacher, key=lambda r: r["seed"])[0]["_splits"] if teacher else None
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][0], kv[0][3], kv[0][1], kv[0][2])):
        rs = sorted(rs, key=lambda r: r["seed"])
        bias = rs[0].get("data", {}).get("bias_split", {})
        row = {"group": _label(key), "paradigm": key[0], "loss": key[1], "schedule": key[2], "variant": key[4],
               "target_sparsity": key[3], "seeds": [r["seed"] for r in rs],
               "measured_sparsity": sum(r["sparsity"] for r in rs) / len(rs),
               "train_cue_agreement": bias.get("agree_fraction"), "cue_threshold": bias.get("threshold"),
               "runs": [r["run"] for r in rs], "minutes": [round(r["seconds"] / 60, 1) for r in rs]}
        for split, _, _ in PAWS_SPLITS:
            labels, cue = rs[0]["_splits"][split][1], rs[0]["_splits"][split][2]
            for r in rs[1:]:
                if not torch_equal(r["_splits"][split][1], labels):
                    raise ValueError(f"{split}: runs {rs[0]['run']} and {r['run']} were evaluated on different examples")
            preds = [r["_splits"][split][0] for r in rs]
            correct = [pr == labels for pr in preds]
            sums = [classification_summary(pr, labels, 2) for pr in preds]
            cell = {"accuracy": _ci(correct), "f1": _f1_ci(preds, labels), "n": int(labels.numel()),
                    "paraphrase_fraction": float(labels.float().mean()),
                    "majority_accuracy": sums[0]["majority_accuracy"], "constant_f1": sums[0]["constant_f1"],
                    "one_class": [x["one_class"] for x in sums], "pred_counts": [x["pred_counts"] for x in sums]}
            if cue is not None:
                cell["cue_agreement"] = float(cue.float().mean())
                for name, sel in (("accuracy_cue_agrees", cue), ("accuracy_cue_wrong", ~cue)):
                    cell[name] = _ci(correct, sel)["mean"] if bool(sel.any()) else None
            if ref is not None and key[0] != "dense":
                ref_pred, ref_labels = ref[split][0], ref[split][1]
                if not torch_equal(ref_labels, labels):
                    raise ValueError(f"{split}: {rs[0]['run']} and the teacher were evaluated on different examples")
                cell["vs_teacher"] = {"accuracy": _diff_ci(correct, ref_pred == ref_labels),
                                      "f1": _f1_ci(preds, labels, reference=ref_pred)}
            row[split] = cell
        rows.append(row)
    return rows


def torch_equal(a, b) -> bool:
    import torch
    return a.shape == b.shape and bool(torch.equal(a, b))


def _opt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def paws_markdown(rows) -> str:
    names = [title for _, _, title in PAWS_SPLITS]
    r0 = rows[0]
    agree = r0["train_cue_agreement"]
    lines = ["## PAWS-QQP with a controlled bias: accuracy and F1 with 95% bootstrap intervals (seeds and examples "
             "resampled)", "",
             f"Task paws_qqp_biased: trained on PAWS-QQP train.tsv pairs on which the cue \"word-bigram overlap >= "
             f"{'?' if r0['cue_threshold'] is None else format(r0['cue_threshold'], '.3g')} -> paraphrase\" agrees with the "
             f"label on {_opt_pct(agree)}% (measured on the training pairs). ID = the held-out part of that subset "
             f"(cue agrees on {_opt_pct(r0['id'].get('cue_agreement'))}%); OOD anti-corr. = the rest of train.tsv, "
             f"where the cue is always wrong; PAWS dev+test = PAWS-QQP dev_and_test.tsv (cue agrees on "
             f"{_opt_pct(r0['paws'].get('cue_agreement'))}%). F1 of the paraphrase class. Baselines: majority-class "
             "accuracy, F1 of the constant predictor (always paraphrase).", "",
             "| model | seeds | sparsity | " + " | ".join(f"{n} acc | {n} F1" for n in names) + " | one class? |",
             "|---|---|---|" + "---|---|" * len(names) + "---|"]
    for r in rows:
        flagged = [title for key, _, title in PAWS_SPLITS if any(r[key]["one_class"])]
        oc = f"**ONE CLASS**: {', '.join(flagged)}" if flagged else "no"
        lines.append(f"| {r['group']} | {len(r['seeds'])} | {r['measured_sparsity']:.3f} | " +
                     " | ".join(f"{_pct(r[k]['accuracy'])} | {_pct(r[k]['f1'])}" for k, _, _ in PAWS_SPLITS) + f" | {oc} |")
    lines.append("| majority class / constant predictor | - | - | " +
                 " | ".join(f"{100 * r0[k]['majority_accuracy']:.1f} | {100 * r0[k]['constant_f1']:.1f}"
                            for k, _, _ in PAWS_SPLITS) + " | - |")
    lines += ["", "n: " + ", ".join(f"{title} {r0[k]['n']} pairs ({100 * r0[k]['paraphrase_fraction']:.1f}% paraphrase)"
                                    for k, _, title in PAWS_SPLITS) + "."]
    diff = [r for r in rows if "vs_teacher" in r["id"]]
    if diff:
        lines += ["", "## Difference from the dense CE teacher (points, 95% interval; paired over examples)", "",
                  "| model | seeds | " + " | ".join(f"{n} acc | {n} F1" for n in names) + " |",
                  "|---|---|" + "---|---|" * len(names)]
        for r in diff:
            lines.append(f"| {r['group']} | {len(r['seeds'])} | " + " | ".join(
                f"{_signed(r[k]['vs_teacher']['accuracy'])} | {_signed(r[k]['vs_teacher']['f1'])}" for k, _, _ in PAWS_SPLITS)
                + " |")
    lines += ["", "## Accuracy where the cue agrees / is wrong (mean over seeds; OOD anti-corr.: wrong on every pair)", "",
              "| model | " + " | ".join(f"{n} cue agrees | {n} cue wrong" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['group']} | " + " | ".join(
            f"{_opt_pct(r[k].get('accuracy_cue_agrees'))} | {_opt_pct(r[k].get('accuracy_cue_wrong'))}"
            for k, _, _ in PAWS_SPLITS) + " |")
    lines += ["", "## Predicted class counts per seed (not paraphrase, paraphrase)", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['group']} | " + " | ".join(str(r[k]["pred_counts"]) for k, _, _ in PAWS_SPLITS) + " |")
    return "\n".join(lines) + "\n"


def report_paws(runs, rdir: Path) -> None:
    import csv
    task = PAWS["task"]
    rows = summarize_paws(runs)
    atomic_write_text(json.dumps(rows, indent=1), rdir / f"{task}_summary.json")
    fields = ["group", "paradigm", "loss", "schedule", "target_sparsity", "measured_sparsity", "seeds"]
    tmp = rdir / f"{task}_summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        stats = [(k, m) for k, _, _ in PAWS_SPLITS for m in ("accuracy", "f1")]
        w.writerow(fields + [f"{k}_{m}_{p}" for k, m in stats for p in ("mean", "low", "high")] +
                   [f"{k}_majority_accuracy" for k, _, _ in PAWS_SPLITS] + ["one_class"])
        for r in rows:
            w.writerow([r[k] if k != "seeds" else len(r[k]) for k in fields] +
                       [round(r[k][m][p], 4) for k, m in stats for p in ("mean", "low", "high")] +
                       [round(r[k]["majority_accuracy"], 4) for k, _, _ in PAWS_SPLITS] +
                       [any(any(r[k]["one_class"]) for k, _, _ in PAWS_SPLITS)])
    os.replace(tmp, rdir / f"{task}_summary.csv")
    atomic_write_text(paws_markdown(rows), rdir / f"{task}_tables.md")
    runs_dir = rdir / "runs"
    runs_dir.mkdir(exist_ok=True)
    for r in runs:
        clean = {k: v for k, v in r.items() if not k.startswith("_")}
        atomic_write_text(json.dumps(clean, indent=1), runs_dir / f"{task}-{r['run']}.json")
    for suffix in ("tables.md", "summary.csv", "summary.json"):
        print(f"report: {rdir / f'{task}_{suffix}'}")


if __name__ == "__main__":
    sys.exit(main())
