"""Latency / throughput of a physically pruned encoder (``remove_pruned``) against the dense one.

    python bench/bench_structured_speed.py --shape bert-base --flops-keep 0.4 --batches 1 32 128 --seq 128
    python bench/bench_structured_speed.py --shape minilm --device cpu --batches 1 32 --out bench/results/x.json
    python bench/bench_structured_speed.py --smoke        # a 2-layer toy on the CPU: tests the script

The pruned structure keeps the same fraction of heads and of neurons in every layer, chosen so that the
FLOPs model (``sparsebert.flops``) gives ``--flops-keep`` of the dense FLOPs (``--structure FILE`` loads
per-layer heads/neurons from a ``prune_structured`` report instead). Random weights: speed does not depend
on them. On CUDA the models run in bf16 (``--dtype``) with SDPA attention (``--attn``), timed with CUDA
events after warm-up; the default batches include the BERT-base bf16 32 x 128 row of the targets. The pruned
model is served as ``sparsebert.nn.inference.for_inference`` makes it (smaller layers + SDPA); each row also
times it zero-padded to the ``--round-to`` width multiples (default 8 and 64: columns ``speedup_round8``,
``speedup_round64``), the structure's neurons being unaligned by default (``--neuron-multiple``). Prints
the speedup and its ratio to the FLOPs ratio (1.0 = the speedup the FLOPs promise) and writes every row,
with the environment and the H200 roofline time of its FLOPs and weight bytes, to
bench/results/<gpu>-<date>-<sha>.{csv,json} (``--no-save`` to skip; ``--out`` also writes one JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.flops import encoder_flops
from sparsebert.nn.inference import for_inference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compile_count import counting_compiles  # noqa: E402
from _results import environment, roofline, save_results, stream_row  # noqa: E402

SHAPES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "toy": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
          "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def uniform_structure(cfg, seq, flops_keep, neuron_multiple=1):
    """Keep the same fraction r of heads and of neurons (neurons in multiples of `neuron_multiple`; 1, the
    default, leaves them as unaligned as a pruning mask does) in every layer, with r the largest such that
    the FLOPs model gives at most `flops_keep` of the dense FLOPs."""
    fl = encoder_flops(cfg, seq)
    H, N = cfg.num_attention_heads, cfg.intermediate_size
    for step in range(1000, -1, -1):
        r = step / 1000
        h, n = round(r * H), neuron_multiple * round(r * N / neuron_multiple)
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


def time_model_graph(model, batch, seq, device, reps):
    """(median seconds of one forward replayed from a CUDA graph, error text): the GPU time without the
    Python launch path, which at bert-base size is most of an eager forward (first GPU run: 4.1 ms eager at
    both batch 1 and 32). No attention mask (all ones in time_model too: the same computation, without the
    mask tensor whose checks may sync the host during capture). (NaN, reason) on a CPU or a failed capture."""
    if device.type != "cuda":
        return float("nan"), "no CUDA graphs on a CPU"
    ids = torch.randint(1000, 2000, (batch, seq), device=device)
    try:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
                for _ in range(3):
                    model(input_ids=ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(input_ids=ids)
            for _ in range(3):
                graph.replay()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), ""
    except Exception as exc:  # report it in the row; the eager number still stands
        return float("nan"), f"{type(exc).__name__}: {exc}"[:200]


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
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    p.add_argument("--round-to", type=int, nargs="*", default=[8, 64],
                   help="also time the pruned model zero-padded to these width multiples (for_inference(round_to=))")
    p.add_argument("--neuron-multiple", type=int, default=1,
                   help="uniform structure: neurons per layer in multiples of this (1: unaligned, as masks give)")
    p.add_argument("--out", help="also write the rows as one JSON here")
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    p.add_argument("--no-save", action="store_true", help="print only; write no result files")
    p.add_argument("--smoke", action="store_true", help="a 2-layer toy encoder on the CPU, results to a temp dir")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.batches, args.seq, args.reps = "toy", "cpu", [1, 2], 16, 2
        args.results_dir = args.results_dir or tempfile.mkdtemp(prefix="sparsebert-bench-smoke-")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reps = args.reps or (20 if device.type == "cuda" else 3)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2, attn_implementation=args.attn,
                     **SHAPES[args.shape])
    torch.manual_seed(0)
    dense = BertForSequenceClassification(cfg).eval()
    if args.structure:
        rep = json.loads(Path(args.structure).read_text())
        heads, neurons = rep["heads_per_layer"], rep["neurons_per_layer"]
    else:
        heads, neurons = uniform_structure(cfg, args.seq, args.flops_keep, args.neuron_multiple)
    import copy
    pruned = copy.deepcopy(dense)
    hm = torch.stack([(torch.arange(cfg.num_attention_heads) < h).float() for h in heads])
    nm = torch.stack([(torch.arange(cfg.intermediate_size) < n).float() for n in neurons])
    padded = {r: for_inference(copy.deepcopy(pruned), hm, nm, round_to=r, attn_implementation=args.attn)
              for r in args.round_to}
    for_inference(pruned, hm, nm, attn_implementation=args.attn)  # the served path: smaller layers + SDPA
    fl = encoder_flops(cfg, args.seq)
    flops_ratio = encoder_flops(pruned, args.seq).total / fl.total
    dense, pruned = dense.to(device, dtype), pruned.to(device, dtype)
    padded = {r: m.to(device, dtype) for r, m in padded.items()}
    elem = torch.finfo(dtype).bits // 8
    pruned_params = sum(t.numel() for t in pruned.parameters())
    structure = Path(args.structure).name if args.structure else "uniform"
    rows = []
    for b in args.batches:
        td, tp = time_model(dense, b, args.seq, device, reps), time_model(pruned, b, args.seq, device, reps)
        speedup = td / tp
        row = {"shape": args.shape, "structure": structure, "dtype": str(dtype).replace("torch.", ""),
               "attn": pruned.config._attn_implementation, "batch": b, "seq": args.seq, "tokens": b * args.seq,
               "dense_ms": td * 1e3, "pruned_ms": tp * 1e3,
               "dense_seq_per_s": b / td, "pruned_seq_per_s": b / tp, "speedup": speedup,
               "flops_ratio": flops_ratio, "speedup_over_flops_promise": speedup * flops_ratio}
        gd, gd_err = time_model_graph(dense, b, args.seq, device, reps)
        gp, gp_err = time_model_graph(pruned, b, args.seq, device, reps)
        row.update({"graph_dense_ms": gd * 1e3, "graph_pruned_ms": gp * 1e3, "graph_speedup": gd / gp,
                    "graph_error": gd_err or gp_err})
        for r, m in padded.items():  # extra columns, so the target row stays the default (unpadded) path
            t_r = time_model(m, b, args.seq, device, reps)
            row.update({f"pruned_round{r}_ms": t_r * 1e3, f"speedup_round{r}": td / t_r})
        # FLOPs: the FLOPs model (per sequence) x batch; bytes: the pruned weights once
        row.update(roofline(pruned_params * elem, encoder_flops(pruned, args.seq).total * b))
        rows.append(row)
        stream_row("structured_speed", row)
        print(f"batch {b:4d} x {args.seq}: dense {td * 1e3:9.2f} ms, pruned {tp * 1e3:9.2f} ms, speedup {speedup:.2f}x "
              f"(FLOPs kept {flops_ratio:.3f} -> promise {1 / flops_ratio:.2f}x)"
              + "".join(f"; padded to {r}: {row[f'speedup_round{r}']:.2f}x" for r in padded)
              + f"; CUDA graph: dense {gd * 1e3:.2f} ms, pruned {gp * 1e3:.2f} ms, {gd / gp:.2f}x"
              + (f" ({row['graph_error']})" if row["graph_error"] else ""), flush=True)
    meta = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype), "threads": torch.get_num_threads(), "heads_per_layer": heads,
            "neurons_per_layer": neurons, "flops_keep_target": args.flops_keep, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if not args.no_save:
        env = environment()
        flat = [{**row, "threads": meta["threads"], "flops_keep_target": args.flops_keep,
                 "heads_per_layer": json.dumps(heads), "neurons_per_layer": json.dumps(neurons)} for row in rows]
        csv_path, json_path = save_results("bench_structured_speed", flat, results_dir=args.results_dir, env=env)
        print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    with counting_compiles():
        status = main()
    raise SystemExit(status)
