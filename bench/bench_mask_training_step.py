"""One mask-training step of a BERT against one dense fine-tuning step of the same model, in the same run.

Mask training ("Win-win Deal", llyx97/sparse-and-robust-PLM) trains a score per weight with frozen weights:
its backward still needs dX through every layer and dScores (the size of dW), so the step it must match is
dense fine-tuning (dX and dW), not inference. Each step is zero_grad + forward with labels + backward +
AdamW step (+ `MaskScheduler.step()` for the masked variants), timed eagerly, as a training loop runs it:

    dense             nn.Linear (cuBLAS / MKL), the same matrices trained as the masked variants train
                      scores for (the encoder's six linears per layer, the pooler and the classifier), the
                      rest frozen: the same dX, a dW for each dScores, AdamW over as many elements
    dense-all         full fine-tuning (every parameter, embeddings included): context, not the ratio basis
    masked            MaskScheduler(backend="auto"): the library's path (on a GPU the weight pass: W * m
                      written once per step, shared by the forward and input-gradient GEMMs, cuBLAS; below
                      the measured crossover the fused kernels; on a CPU the fused C++ ops, as masked-fused)
    masked-fused      the same with the fused kernels forced (backend "cpp" on a CPU, "triton" on a GPU): the
                      mask built in the forward and again in the input gradient, no W * m kept between them
    masked-unfused    the same with backend="torch": W * [s >= tau] materialized, F.linear, autograd's
                      GEMMs (what the paper's MaskedLinear does)
    masked-checks-per-layer
                      "masked" with the NaN check of the scores left to every layer's forward (4 launches
                      per layer per step) instead of one check per optimizer step in `MaskScheduler.step`:
                      the A/B of that change

Variants run interleaved (round r times every variant once over --steps steps), so drift hits them alike;
each row has the median step time over the rounds and its ratio to dense. On a GPU each row also counts the
kernels one step launches (torch.profiler, one untimed step after the warm-up). Rows go to bench/results/<device>-<date>-<sha>.
{csv,json} (benchmark "bench_mask_training_step") and to the GPU suite's stream.

    python bench/bench_mask_training_step.py                      # bert-base, batch 32 x 128 (GPU default)
    python bench/bench_mask_training_step.py --shape minilm --batch 8 --seq 64 --threads 2   # this CPU
    python bench/bench_mask_training_step.py --smoke              # a toy on the CPU: tests the script
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compile_count import counting_compiles  # noqa: E402
from _results import environment, roofline, save_results, stream_row  # noqa: E402

from sparsebert.flops import encoder_flops  # noqa: E402
from sparsebert.nn.sparsify import prunable_linears  # noqa: E402
from sparsebert.pruning import MaskScheduler  # noqa: E402
from sparsebert.pruning import scheduler as scheduler_module  # noqa: E402

SHAPES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "toy": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
VARIANTS = ("dense", "dense-all", "masked", "masked-fused", "masked-unfused", "masked-checks-per-layer")


@contextlib.contextmanager
def checks_per_layer(on: bool):
    """With `on`, MaskScheduler.step leaves the scores unchecked, so each layer's forward checks its own."""
    saved = scheduler_module.check_scores_for_nan
    if on:
        scheduler_module.check_scores_for_nan = lambda layers: None
    try:
        yield
    finally:
        scheduler_module.check_scores_for_nan = saved


class Trainer:
    """One variant: its model, optimizer and (masked) scheduler, and a `step()` on a fixed batch."""

    def __init__(self, variant, cfg, batch, device, dtype, sparsity):
        torch.manual_seed(0)
        self.variant = variant
        with torch.device(device):  # initialized where it runs (a bert-base init on the host takes seconds)
            self.model = BertForSequenceClassification(cfg).to(dtype).train()
        self.sched = None
        if variant == "dense-all":
            params = list(self.model.parameters())
        elif variant == "dense":
            params = [lin.weight for lin in prunable_linears(self.model, True).values()]
            for prm in self.model.parameters():
                prm.requires_grad_(False)
            for prm in params:
                prm.requires_grad_(True)
        else:
            backend = {"masked-unfused": "torch", "masked-fused": "triton" if device.type == "cuda" else "cpp"
                       }.get(variant, "auto")
            # total_steps: the paper's MNLI length, so no threshold refresh (every 1,000 steps) falls inside
            # the timed steps; a refresh is one top-k per matrix, amortized over 1,000 steps
            self.sched = MaskScheduler(self.model, sparsity=sparsity, total_steps=61360, backend=backend)
            params = self.sched.scores()
        self.opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        self.batch = batch

    def step(self):
        with checks_per_layer(self.variant == "masked-checks-per-layer"):
            self.opt.zero_grad(set_to_none=True)
            self.model(**self.batch).loss.backward()
            self.opt.step()
            if self.sched is not None:
                self.sched.step()


def timed_steps(trainer, steps, cuda):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def kernels_per_step(trainer):
    """CUDA kernels one step launches (torch.profiler; None off CUDA or when the profiler fails)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as exc:  # reported as missing, the times still stand
        print(f"  kernel count failed for {trainer.variant}: {type(exc).__name__}: {exc}", flush=True)
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="bert-base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 10 GPU, 2 CPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (autotuning, caches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    p.add_argument("--smoke", action="store_true", help="a toy on the CPU, 2 rounds; results to a temp dir")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.batch, args.seq, args.rounds, args.steps, args.warmup = "toy", "cpu", 2, 8, 2, 1, 1
        args.results_dir = args.results_dir or tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
    for name in ("batch", "seq", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1)")
    if "dense" not in args.variants:
        p.error("--variants must include dense: every ratio is against it")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    steps = args.steps or (10 if cuda else 2)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=3, attn_implementation="sdpa",
                     **SHAPES[args.shape])
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 2000, (args.batch, args.seq), generator=g).to(device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, 3, (args.batch,), generator=g).to(device)}
    trainers = [Trainer(v, cfg, batch, device, dtype, args.sparsity) for v in args.variants]
    kernels = {}
    for tr in trainers:
        for _ in range(args.warmup):
            tr.step()
        # one more untimed step, under the profiler on a GPU (so the count costs no step of its own)
        kernels[tr.variant] = kernels_per_step(tr) if cuda else None
    times = {tr.variant: [] for tr in trainers}
    for _ in range(args.rounds):
        for tr in trainers:
            times[tr.variant].append(timed_steps(tr, steps, cuda))
    env = environment()
    # the dense step's least time on an H200: 3x the forward FLOPs (forward, dX, dW) and the weights read
    # three times (the bytes of the activations and optimizer states left out: a lower bound)
    elem = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in trainers[0].model.parameters())
    bound = roofline(3 * weights * elem, 3 * encoder_flops(cfg, args.seq).total * args.batch)
    dense_ms = statistics.median(times["dense"]) * 1e3
    rows = []
    print(f"# {env['gpu'] if cuda else 'cpu'} | {args.shape}, batch {args.batch} x {args.seq}, {str(dtype)[6:]}, "
          f"sparsity {args.sparsity}, threads {torch.get_num_threads()} | median of {args.rounds} rounds x {steps} steps")
    print(f"{'variant':<26} {'ms/step':>9} {'vs dense':>9} {'kernels/step':>13}")
    for tr in trainers:
        ms = statistics.median(times[tr.variant]) * 1e3
        row = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "tokens": args.batch * args.seq,
               "dtype": str(dtype).replace("torch.", ""), "sparsity": args.sparsity, "variant": tr.variant,
               "step_ms": ms, "step_ms_min": min(times[tr.variant]) * 1e3, "step_ms_max": max(times[tr.variant]) * 1e3,
               "time_vs_dense": ms / dense_ms, "rounds": args.rounds, "steps_per_round": steps,
               "threads": torch.get_num_threads(), "kernels_per_step": kernels[tr.variant],
               **bound}
        rows.append(row)
        stream_row("mask_training_step", row)
        count = "" if row["kernels_per_step"] is None else str(row["kernels_per_step"])
        print(f"{tr.variant:<26} {ms:>9.2f} {ms / dense_ms:>8.2f}x {count:>13}", flush=True)
    csv_path, json_path = save_results("bench_mask_training_step", rows, results_dir=args.results_dir, env=env)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    with counting_compiles():
        status = main()
    raise SystemExit(status)
