"""`sparsebert demo`: the main job on its embedded default, with no arguments.

An end-to-end sparse-and-robust-subnetwork run on a small random BERT and the synthetic task with a
planted spurious feature (nothing is downloaded): dense fine-tuning with cross-entropy and with the
product-of-experts debiasing loss, then mask training on each fine-tuned model's frozen weights
(paradigm a) through the fused score-masked kernels to 50% and 70% sparsity, with the cubic schedule.
It prints loss and sparsity as it trains, then ID and OOD accuracy per run, and writes run JSONs and
the report picture. (Paradigm c, masks on frozen *pre-trained* weights, needs a pre-trained backbone:
on a random one every input looks alike; run it with `--model minilm`.)
Equivalent to `sparsebert srnet` with the arguments below; re-running resumes and skips finished runs.
"""
from __future__ import annotations

DEMO_ARGS = ["--model", "tiny", "--task", "synthetic", "--paradigm", "dense", "a", "--loss", "ce", "poe",
             "--sparsity", "0.5", "0.7", "--seeds", "1", "--epochs", "5", "--lr", "1e-3", "--lr-scores", "0.1"]


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="end-to-end SRNet run on the embedded default (tiny BERT, synthetic task)")
    p.add_argument("--out", default="runs/demo", help="output folder (run JSONs, checkpoints, report)")
    return p


def run(args) -> int:
    from . import main
    print("sparsebert demo: sparsebert srnet " + " ".join(DEMO_ARGS + ["--out", args.out]), flush=True)
    return main(["srnet", *DEMO_ARGS, "--out", args.out])
