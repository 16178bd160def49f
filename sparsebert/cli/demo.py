"""`sparsebert demo`: the main job on its embedded default, with no arguments.

An end-to-end sparse-and-robust-subnetwork run on a small random BERT and the synthetic task with a
planted spurious feature (nothing is downloaded): dense fine-tuning with cross-entropy and with the
product-of-experts debiasing loss, then PoE mask training on the frozen weights (paradigm c) through
the fused score-masked kernels at 50% and 70% sparsity, with the cubic schedule. It prints loss and
sparsity as it trains, then ID and OOD accuracy per run, and writes run JSONs and the report picture.
Equivalent to `sparsebert srnet` with the arguments below; re-running resumes and skips finished runs.
"""
from __future__ import annotations

DEMO_ARGS = ["--model", "tiny", "--task", "synthetic", "--paradigm", "dense", "c", "--loss", "ce", "poe",
             "--sparsity", "0.5", "0.7", "--seeds", "1"]


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="end-to-end SRNet run on the embedded default (tiny BERT, synthetic task)")
    p.add_argument("--out", default="runs/demo", help="output folder (run JSONs, checkpoints, report)")
    return p


def run(args) -> int:
    from . import main
    print("sparsebert demo: sparsebert srnet " + " ".join(DEMO_ARGS + ["--out", args.out]), flush=True)
    return main(["srnet", *DEMO_ARGS, "--out", args.out])
