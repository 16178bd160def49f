"""`sparsebert kprune`: retraining-free structured pruning of a fine-tuned encoder to a FLOPs budget.

    sparsebert kprune --model PATH --data FILE_OR_TASK --flops-keep 0.5 --out DIR [--method kwon|kcm]
    sparsebert kprune --model PATH --data FILE_OR_TASK --latency-keep 0.5 --method kwon --out DIR

--data is a task name known to ``sparsebert.data.load_task`` (its training split is the sample) or the
user's own file: ``.tsv``/``.csv`` with a header, or ``.jsonl``, with a text column (``text_a``,
``sentence``, ``sentence1``, ``question`` or ``text``), an optional second text column (``text_b``,
``sentence2``, ``context``) and an optional ``label`` column (ints = classes, decimals = regression
scores); a ``.txt`` file holds one input per line (a tab separates a sentence pair), unlabelled. Labels are
passed to the methods (Kwon et al. requires them). ``--max-length`` truncates the inputs; ``--seq-len`` is
the sequence length of the FLOPs model (default ``average``: the sample's mean real length, as the
authors; ``max``: --max-length; or a number). The pruned model is served as ``sparsebert.nn.inference.
for_inference`` makes it (physically smaller layers, SDPA attention; ``--round-to 8|64`` zero-pads the widths,
exactly) and saved atomically with ``save_pruned`` (reload with ``sparsebert.nn.structured.load_pruned``);
``DIR/prune_report.json`` holds the report.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_TEXT_A = ("text_a", "sentence", "sentence1", "question", "text")
_TEXT_B = ("text_b", "sentence2", "context")
_FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".txt")


def add_parser(subparsers):
    p = subparsers.add_parser("kprune", help="retraining-free structured pruning (Kprune, Kwon et al., KCM)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="fine-tuned HF sequence-classification model folder")
    p.add_argument("--data", required=True, help="task name (sst2, mrpc, mnli, paws_qqp, ...) or a .tsv/.csv/.jsonl/.txt file")
    p.add_argument("--flops-keep", type=float, default=None, help="fraction of FLOPs KEPT, in (0, 1)")
    p.add_argument("--latency-keep", type=float, default=None,
                   help="--method kwon, instead of --flops-keep: fraction of the encoder's latency KEPT, by a latency "
                        "table measured on this device (Kwon et al.'s latency search)")
    p.add_argument("--latency-batch-size", type=int, default=32,
                   help="batch size at which the latency table is measured (sequence length: --seq-len)")
    p.add_argument("--latency-cache-dir", default=None,
                   help="folder of cached latency tables (default ~/.cache/sparsebert/latency)")
    p.add_argument("--out", required=True, help="output folder for the pruned model")
    p.add_argument("--method", default="kprune", choices=("kprune", "kwon", "kcm"))
    p.add_argument("--num-tokens", type=int, default=100_000, help="tokens in the pruning sample")
    p.add_argument("--max-length", type=int, default=128, help="truncation length of the tokenizer")
    p.add_argument("--seq-len", default="average",
                   help="sequence length of the FLOPs model: 'average' (default), 'max' or a positive int")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pseudo-labels", action="store_true",
                   help="kwon on unlabelled data: use the model's own predictions as labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, default=None,
                   help="zero-pad every layer's attention/FFN width up to a multiple of this (e.g. 8 or 64) in the "
                        "saved model; exact (padded units add zeros), faster where the GEMMs prefer aligned widths")
    return p


class UsageError(ValueError):
    """A bad command-line argument (exit code 2, one line)."""


def _looks_like_path(data: str) -> bool:
    return os.sep in data or "/" in data or data.lower().endswith(_FILE_SUFFIXES)


def _label_value(raw, where: str):
    if raw is None or raw == "":
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return raw
    try:
        return int(raw)
    except ValueError:
        try:
            v = float(raw)
        except ValueError:
            raise UsageError(f"--data: {where}: label {raw!r} is not a number") from None
        if not math.isfinite(v):
            raise UsageError(f"--data: {where}: label {raw!r} is not finite")
        return v


def _rows_from_file(path: Path) -> list[dict]:
    from ..data.tasks import read_text

    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise UsageError(f"--data: {path}: unknown file type {suffix or '(no suffix)'!r}; expected a task name or a "
                         f"{'/'.join(_FILE_SUFFIXES)} file")
    try:
        text = read_text(path, "a data file")  # UTF-8; a leading BOM is dropped
    except ValueError as e:
        raise UsageError(f"--data: {e}") from None
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"--data: {path}:{i}: not JSON ({e.msg})") from None
        return rows
    if suffix in (".tsv", ".csv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return [{"text_a": r[0], **({"text_b": r[1]} if len(r) > 1 else {})} for r in rows]


def read_examples(data: str) -> list[tuple]:
    """``(text_a, text_b or None, label or None)`` from a task name or the user's file (see module doc)."""
    if _looks_like_path(data) or Path(data).is_file():
        path = Path(data)
        if not path.is_file():
            raise UsageError(f"--data: file not found: {data}")
        rows = _rows_from_file(path)
        if not rows:
            raise UsageError(f"--data: {data} holds no examples")
        cols = set(rows[0])
        a_col = next((c for c in _TEXT_A if c in cols), None)
        if a_col is None:
            raise UsageError(f"--data: {data}: no text column; expected one of {_TEXT_A}, found {sorted(cols)}")
        b_col = next((c for c in _TEXT_B if c in cols), None)
        out = []
        for i, r in enumerate(rows, 1):
            label = _label_value(r.get("label"), f"{data} row {i}")
            out.append((str(r[a_col]), str(r[b_col]) if b_col and r.get(b_col) not in (None, "") else None, label))
        return out
    from ..data import load_task
    try:
        exs = load_task(data, "train")
    except ValueError as e:
        raise UsageError(f"--data: {e}") from None
    return [(e.text_a, e.text_b, e.label) for e in exs]


def check_args(args) -> None:
    """Every check that needs no model: raise UsageError naming the argument."""
    for name in ("batch_size", "max_length", "num_tokens"):
        v = getattr(args, name)
        if v <= 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
    if getattr(args, "round_to", None) is not None and args.round_to <= 0:
        raise UsageError(f"--round-to: expected a positive int (e.g. 8 or 64), got {args.round_to}")
    if (args.flops_keep is None) == (args.latency_keep is None):
        raise UsageError("--flops-keep / --latency-keep: give exactly one budget")
    if args.latency_keep is not None:
        if args.method != "kwon":
            raise UsageError(f"--latency-keep: only with --method kwon, got --method {args.method}")
        if not 0.0 < args.latency_keep < 1.0:
            raise UsageError(f"--latency-keep: expected a fraction in (0, 1), got {args.latency_keep}")
        if args.latency_batch_size <= 0:
            raise UsageError(f"--latency-batch-size: expected a positive int, got {args.latency_batch_size}")
    elif not 0.0 < args.flops_keep < 1.0:
        raise UsageError(f"--flops-keep: expected a fraction in (0, 1), got {args.flops_keep}")
    if args.seq_len not in ("average", "max"):
        try:
            n = int(args.seq_len)
        except ValueError:
            n = 0
        if n <= 0:
            raise UsageError(f"--seq-len: expected 'average', 'max' or a positive int, got {args.seq_len!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out: {out} is not writable")
    if not Path(args.model).exists():
        raise UsageError(f"--model: file not found: {args.model}")


def check_finite_weights(model) -> None:
    from ..pruning.kprune import check_finite_weights as check
    try:
        check(model)
    except ValueError as e:
        raise UsageError(f"--model: {str(e).removeprefix('model: ')}") from None


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False when the
    platform or file system does not support it (nothing is changed then)."""
    import ctypes
    import errno
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def save_atomically(write, out: Path) -> None:
    """``write(tmp_dir)`` into a temporary folder beside ``out``, then move it into place. An existing
    ``out`` is swapped with the new folder in one atomic step where the OS supports it (so a kill at any
    point leaves the complete old folder or the complete new one); elsewhere it is renamed aside first and
    deleted only once the new one is in place (a kill between the two renames leaves it aside)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir() and not out.is_symlink() and exchange_paths(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _measured_speedup(dense, pruned, batches, reps: int = 3) -> float:
    import torch

    from ..pruning.kprune import model_inputs

    def timed(m):
        best = float("inf")
        with torch.no_grad():
            for _ in range(reps):
                t0 = time.perf_counter()
                for b in batches:
                    m(**model_inputs(b))
                best = min(best, time.perf_counter() - t0)
        return best

    return timed(dense) / max(timed(pruned), 1e-12)


def run(args) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..nn.inference import for_inference
    from ..nn.structured import save_pruned, structure_of
    from ..pruning.structured_api import format_report, prune_structured

    say = logging.getLogger(__name__).info  # progress lines: stderr, through logging

    t0 = time.perf_counter()
    try:
        check_args(args)
        rows = read_examples(args.data)
        model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        check_finite_weights(model)
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labelled = all(r[2] is not None for r in rows)
    if args.method == "kwon" and not labelled and not args.pseudo_labels:
        print("error: --data: Kwon et al. needs labelled data (a 'label' column); pass --pseudo-labels to use "
              "the model's own predictions", file=sys.stderr)
        return 2
    regression = labelled and any(isinstance(r[2], float) for r in rows)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    batches, seen = [], 0
    for i in range(0, len(order), args.batch_size):
        chunk = [rows[j] for j in order[i:i + args.batch_size]]
        a = [c[0] for c in chunk]
        b = [c[1] for c in chunk] if all(c[1] is not None for c in chunk) else None
        enc = dict(tok(a, b, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))
        if labelled:
            enc["labels"] = torch.tensor([c[2] for c in chunk], dtype=torch.float32 if regression else torch.long)
        batches.append(enc)
        seen += int(enc["attention_mask"].sum())
        if seen >= args.num_tokens:
            break
    say(f"loaded model and {seen} sample tokens ({'labelled' if labelled else 'unlabelled'}) in "
        f"{time.perf_counter() - t0:.1f}s")
    seq_len = args.seq_len if args.seq_len == "average" else (
        args.max_length if args.seq_len == "max" else int(args.seq_len))
    cfg = {"pseudo_labels": True} if args.method == "kwon" and args.pseudo_labels else {}
    if args.latency_keep is not None:
        cfg.update(latency_keep=args.latency_keep, latency_batch_size=args.latency_batch_size,
                   latency_cache_dir=args.latency_cache_dir)
    try:
        pruned, rep = prune_structured(model, batches, args.flops_keep, method=args.method, seq_len=seq_len,
                                       num_tokens=args.num_tokens, progress=say, **cfg)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the inference path: smaller layers + SDPA, widths zero-padded to --round-to when given (exact)
    round_to = getattr(args, "round_to", None)
    for_inference(pruned, round_to=round_to)
    rep["round_to"] = round_to
    rep["served_heads_per_layer"], rep["served_neurons_per_layer"] = structure_of(pruned)
    rep["predicted_speedup"] = rep["flops_dense"] / rep["flops_pruned"]
    rep["measured_speedup"] = _measured_speedup(model, pruned, batches[:4])
    rep["max_length"] = args.max_length
    out = Path(args.out)

    def write(tmp: Path):
        save_pruned(pruned, str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "prune_report.json").write_text(json.dumps(rep, indent=1))

    save_atomically(write, out)
    print(format_report(rep))
    print(f"speedup: predicted {rep['predicted_speedup']:.2f}x (FLOPs), measured {rep['measured_speedup']:.2f}x "
          f"({next(model.parameters()).device.type}, {min(4, len(batches))} sample batches)")
    print(f"saved to {out}")
    return 0
