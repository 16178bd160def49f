"""`sparsebert kprune`: retraining-free structured pruning of a fine-tuned encoder to a FLOPs budget.

    sparsebert kprune --model PATH --data FILE_OR_TASK --flops-keep 0.5 --out DIR [--method kwon|kcm]

--data is a task name known to ``sparsebert.data.load_task`` (its training split is the sample) or a
text file with one input per line (a tab separates a sentence pair). The pruned model is saved with
``save_pruned`` (reload with ``sparsebert.nn.structured.load_pruned``); ``DIR/prune_report.json`` holds
the report.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("kprune", help="retraining-free structured pruning (Kprune, Kwon et al., KCM)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="fine-tuned HF sequence-classification model folder")
    p.add_argument("--data", required=True, help="task name (sst2, mrpc, mnli, paws_qqp, ...) or a text file")
    p.add_argument("--flops-keep", type=float, required=True, help="fraction of FLOPs KEPT, in (0, 1)")
    p.add_argument("--out", required=True, help="output folder for the pruned model")
    p.add_argument("--method", default="kprune", choices=("kprune", "kwon", "kcm"))
    p.add_argument("--num-tokens", type=int, default=100_000, help="tokens in the pruning sample")
    p.add_argument("--max-length", type=int, default=128, help="sequence length (tokenizer and FLOPs model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def _texts(data: str):
    path = Path(data)
    if path.is_file():
        rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(r[0], r[1] if len(r) > 1 else None) for r in rows], None
    from ..data import load_task
    exs = load_task(data, "train")
    return [(e.text_a, e.text_b) for e in exs], exs


def run(args) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..nn.structured import save_pruned
    from ..pruning.structured_api import format_report, prune_structured

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        pairs, _ = _texts(args.data)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    batches, seen = [], 0
    for i in range(0, len(order), args.batch_size):
        chunk = [pairs[j] for j in order[i:i + args.batch_size]]
        a = [c[0] for c in chunk]
        b = [c[1] for c in chunk] if all(c[1] is not None for c in chunk) else None
        enc = tok(a, b, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        batches.append(dict(enc))
        seen += int(enc["attention_mask"].sum())
        if seen >= args.num_tokens:
            break
    say(f"loaded model and {seen} sample tokens in {time.perf_counter() - t0:.1f}s")
    try:
        pruned, rep = prune_structured(model, batches, args.flops_keep, method=args.method,
                                       seq_len=args.max_length, num_tokens=args.num_tokens, progress=say)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    save_pruned(pruned, str(out))
    tok.save_pretrained(str(out))
    (out / "prune_report.json").write_text(json.dumps(rep, indent=1))
    print(format_report(rep))
    print(f"saved to {out}")
    return 0
