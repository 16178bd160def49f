"""Latency / throughput of a physically pruned encoder (``remove_pruned``) against the dense one.

    python bench/bench_structured_speed.py --shape bert-base --flops-keep 0.4 --batches 1 32 128 --seq 128
    python bench/bench_structured_speed.py --shape minilm --device cpu --batches 1 32 --out bench/results/x.json

The pruned structure keeps the same fraction of heads and of neurons in every layer, chosen so that the
FLOPs model (``sparsebert.flops``) gives ``--flops-keep`` of the dense FLOPs (``--structure FILE`` loads
per-layer heads/neurons from a ``prune_structured`` report instead). Random weights: speed does not depend
on them. On CUDA the models run in bf16 (``--dtype``), timed with CUDA events after warm-up. Prints and
writes the speedup and its ratio to the FLOPs ratio (1.0 = the speedup the FLOPs promise).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.flops import encoder_flops
from sparsebert.nn.structured import remove_pruned

SHAPES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def uniform_structure(cfg, seq, flops_keep):
    """Keep the same fraction r of heads and of neurons (neurons in multiples of 8) in every layer, with r
    the largest such that the FLOPs model gives at most `flops_keep` of the dense FLOPs."""
    fl = encoder_flops(cfg, seq)
    H, N = cfg.num_attention_heads, cfg.intermediate_size
    for step in range(1000, -1, -1):
        r = step / 1000
        h, n = round(r * H), 8 * round(r * N / 8)
        if (fl.fixed + fl.num_layers * (h * fl.per_head + n * fl.per_neuron)) / fl.total <= flops_keep:
            return [h] * cfg.num_hidden_layers, [n] * cfg.num_hidden_layers
    raise ValueError(f"flops_keep={flops_keep} is below what the embeddings and classifier alone cost")


def time_model(model, batch, seq, device, reps):
    ids = torch.randint(1000, 2000, (batch, seq), device=device)
    am = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, attention_mask=am)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(input_ids=ids, attention_mask=am)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=am)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="bert-base")
    p.add_argument("--flops-keep", type=float, default=0.4, help="fraction of FLOPs KEPT")
    p.add_argument("--structure", help="JSON report with heads_per_layer / neurons_per_layer")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write results JSON here (e.g. bench/results/<gpu>-<date>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reps = args.reps or (20 if device.type == "cuda" else 3)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2, **SHAPES[args.shape])
    torch.manual_seed(0)
    dense = BertForSequenceClassification(cfg).eval()
    if args.structure:
        rep = json.loads(Path(args.structure).read_text())
        heads, neurons = rep["heads_per_layer"], rep["neurons_per_layer"]
    else:
        heads, neurons = uniform_structure(cfg, args.seq, args.flops_keep)
    import copy
    pruned = copy.deepcopy(dense)
    hm = torch.stack([(torch.arange(cfg.num_attention_heads) < h).float() for h in heads])
    nm = torch.stack([(torch.arange(cfg.intermediate_size) < n).float() for n in neurons])
    remove_pruned(pruned, hm, nm)
    fl = encoder_flops(cfg, args.seq)
    flops_ratio = encoder_flops(pruned, args.seq).total / fl.total
    dense, pruned = dense.to(device, dtype), pruned.to(device, dtype)
    rows = []
    for b in args.batches:
        td, tp = time_model(dense, b, args.seq, device, reps), time_model(pruned, b, args.seq, device, reps)
        speedup = td / tp
        row = {"batch": b, "seq": args.seq, "dense_ms": td * 1e3, "pruned_ms": tp * 1e3,
               "dense_seq_per_s": b / td, "pruned_seq_per_s": b / tp, "speedup": speedup,
               "flops_ratio": flops_ratio, "speedup_over_flops_promise": speedup * flops_ratio}
        rows.append(row)
        print(f"batch {b:4d} x {args.seq}: dense {td * 1e3:9.2f} ms, pruned {tp * 1e3:9.2f} ms, speedup {speedup:.2f}x "
              f"(FLOPs kept {flops_ratio:.3f} -> promise {1 / flops_ratio:.2f}x)", flush=True)
    meta = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype), "threads": torch.get_num_threads(), "heads_per_layer": heads,
            "neurons_per_layer": neurons, "flops_keep_target": args.flops_keep, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
