"""`sparsebert demo`: the main job on its embedded default, with no arguments.

What the library is for, measured on this machine. A random BERT (hidden 256, 2 layers; nothing is
downloaded) is fine-tuned on the synthetic task with a planted spurious feature (cross-entropy), then:

* SRNet: the fine-tuned model is mask-trained (paradigm a, product-of-experts debiasing loss, cubic
  schedule) to 70% sparsity through the fused score-masked kernels, and compressed with
  ``compress(format="auto")``, which keeps per layer whichever of dense and the sparse CPU format measures
  faster here;
* Kprune: the dense model is pruned without retraining to 50% of its encoder FLOPs and its heads and
  neurons are physically removed (``for_inference``).

It ends with one table on stdout: ID and OOD accuracy, sparsity or FLOPs kept, bytes of the weights,
and latency (median forward time at batch 1 and 32, the task's padded sequence length) with the speedup
against dense, on the GPU when there is one, else the CPU. The numbers also go to
``<out>/report/demo.json`` and ``demo.csv``, the picture to ``<out>/report/demo.png``. Progress goes to
stderr. The training runs are `sparsebert srnet` runs under ``<out>/srnet``: re-running resumes them and
skips finished ones; the pruning, compression and timing are redone each time (seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROWS = ("dense", "SRNet", "Kprune")
COLUMNS = ("model", "ID acc", "OOD acc", "pruned", "weight MB", "b1 ms", "b1 speedup", "b32 ms", "b32 speedup")
LATENCY_BATCHES = (1, 32)


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """Model size and schedule of one demo setting."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    epochs: float            # dense fine-tuning
    mask_epochs: float       # SRNet mask training
    lr: float
    lr_scores: float
    sparsity: float          # SRNet target sparsity
    flops_keep: float        # Kprune budget (fraction of encoder FLOPs kept)
    kprune_tokens: int       # Kprune's sample of training tokens (the paper's 100K would take minutes here)
    max_train: int | None
    max_eval: int | None
    reps: int                # latency repetitions per model and batch size


# "default": the main job (86 s of CPU time measured on this 2-core machine, 1 thread). Measured choices:
# at 80% and 90% sparsity this 3-epoch mask training collapses to chance (50/50), at 70% it reaches 100 ID /
# 97.6 OOD on the machine where it was tuned (on another, seed 0 collapses too: results/demo_seeds/README.md); the sparse CPU format wins at 90% on this width (18 of 26 layers, ~1.3-1.45x at 4 layers) but
# not at 70%, so the SRNet row's speedup is ~1.0x, as measured. Wider models would train too slowly here.
# "test": a seconds-long smoke setting for tests/test_demo.py (hidden flag); its latency means nothing.
# The dense fine-tuning's weight decay, part of this toy's measured recipe (like its lr 1e-3 and lr_scores 0.1):
# 0.01. With the authors' 0 (the library default since 2026-11-30) the dense model lands elsewhere (89.6 ID) and
# the 70% mask training from it collapses to chance, as 80% and 90% do with 0.01.
DEMO_WEIGHT_DECAY = 0.01

SIZES = {
    "default": DemoSize(hidden=256, layers=2, heads=4, ffn=1024, epochs=3, mask_epochs=3, lr=1e-3, lr_scores=0.1,
                        sparsity=0.7, flops_keep=0.5, kprune_tokens=8192, max_train=None, max_eval=None,
                        reps=20),
    "test": DemoSize(hidden=32, layers=2, heads=4, ffn=48, epochs=1, mask_epochs=1, lr=1e-3, lr_scores=0.1,
                     sparsity=0.9, flops_keep=0.5, kprune_tokens=1024, max_train=96, max_eval=64, reps=3),
}


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="dense vs SRNet subnetwork vs Kprune: accuracy, size and speed measured "
                                           "here (random BERT, synthetic task)")
    p.add_argument("--out", default="runs/demo", help="output folder (training runs, report)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help=argparse.SUPPRESS)  # tests only
    return p


# ------------------------------------------------------------------------------------------ the backbone
def _backbone_vocab() -> list:
    from ..data.synthetic import FILLER_WORDS, NEGATION_MARKER, TRIGGER_WORDS
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({*FILLER_WORDS, *TRIGGER_WORDS, NEGATION_MARKER})]


def write_backbone(root: Path, size: DemoSize, seed: int = 0) -> Path:
    """A random BERT checkpoint folder of `size` with a word-level tokenizer over the synthetic task's words
    (the starting point of the SRNet runs). Its folder name holds the hash of what it is, so a changed size
    never reuses old runs; written to a temporary folder and renamed (a kill leaves no half folder)."""
    import torch
    import transformers
    vocab = _backbone_vocab()
    conf = dict(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                intermediate_size=size.ffn, vocab_size=len(vocab), max_position_embeddings=128)
    ident = hashlib.sha256(json.dumps({**conf, "vocab": vocab, "seed": seed, "format": 1},
                                      sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"backbone-h{size.hidden}-l{size.layers}-{ident}"
    if (path / "config.json").is_file():
        return path
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    transformers.BertModel(transformers.BertConfig(**conf)).save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(tmp / "vocab.txt"), do_lower_case=True).save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():
            raise
    return path


# ------------------------------------------------------------------------------------------ models
def _dense_model(runner, cfg, data):
    from ..checkpoint import load_checkpoint
    from ..pruning.srnet import MODEL_FILE, build_model
    model = build_model(cfg, data, cfg.seed)
    model.load_state_dict(load_checkpoint(runner.run_dir(cfg) / MODEL_FILE))
    return model


def _subnetwork_model(runner, cfg, data):
    """The mask-trained model as plain nn.Linear layers with the pruned weights zeroed."""
    import torch
    from ..checkpoint import load_checkpoint
    from ..pruning.srnet import MODEL_FILE, build_model
    state = load_checkpoint(runner.run_dir(cfg) / MODEL_FILE)
    masks = {k[:-len(".mask")]: v for k, v in state.items() if k.endswith(".mask")}
    if not masks:
        raise ValueError(f"{runner.run_dir(cfg) / MODEL_FILE}: no masks; expected a finished mask-training run")
    dense = {k: v for k, v in state.items() if not k.endswith(".mask")}
    for name, m in masks.items():
        dense[f"{name}.weight"] = dense[f"{name}.weight"] * m.to(torch.bool)
    model = build_model(cfg, data, cfg.seed)
    model.load_state_dict(dense)
    return model


def _state_nbytes(model) -> int:
    """Bytes of every tensor the model stores (parameters and buffers; shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _format_summary(choices: dict) -> dict:
    out: dict = {}
    for c in choices.values():
        out[c["format"]] = out.get(c["format"], 0) + 1
    return out


# ------------------------------------------------------------------------------------------ latency
def _latency_inputs(data, device):
    """The first 32 ID-test examples padded to the longest ID-test example (the demo's sequence length)."""
    batch = next(iter(data.loader("id_test", batch_size=len(data.id_test))))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    n = max(LATENCY_BATCHES)
    inputs = {k: batch[k][:n].to(device) for k in keys}
    if inputs["input_ids"].shape[0] < n:  # a small test setting: repeat rows up to the batch size
        reps = -(-n // inputs["input_ids"].shape[0])
        inputs = {k: v.repeat(reps, 1)[:n] for k, v in inputs.items()}
    return inputs


def measure_latency(models: dict, inputs: dict, batches=LATENCY_BATCHES, reps: int = 20, warmup: int = 2) -> dict:
    """{name: {batch: median seconds}} of each model's forward on the first `batch` rows of `inputs`. The
    models run interleaved (a, b, c, a, b, c, ...) so that a change of machine load hits them alike."""
    import torch
    dev = inputs["input_ids"].device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {name: {} for name in models}
    with torch.inference_mode():
        for b in batches:
            x = {k: v[:b] for k, v in inputs.items()}
            for m in models.values():
                for _ in range(warmup):
                    m(**x)
            times = {name: [] for name in models}
            order = list(models.items())
            for i in range(reps):
                for name, m in order[i % len(order):] + order[:i % len(order)]:  # each model leads in turn
                    sync()
                    t0 = time.perf_counter()
                    m(**x)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            for name in models:
                out[name][b] = statistics.median(times[name])
    return out


# ------------------------------------------------------------------------------------------ output
def _fmt_rows(rows: list) -> list:
    table = []
    for r in rows:
        lat = r["latency_ms"]
        sp = r["speedup"]
        table.append([r["model"], f"{100 * r['id_acc']:.1f}", f"{100 * r['ood_acc']:.1f}", r["pruned"],
                      f"{r['weight_bytes'] / 1e6:.2f}", f"{lat['1']:.2f}", f"{sp['1']:.2f}x", f"{lat['32']:.2f}",
                      f"{sp['32']:.2f}x"])
    return table


MAJORITY_ROW = "majority class"


def format_table(rows: list, majority: dict | None = None) -> str:
    """The closing table as aligned text; `majority` ({"id_acc", "ood_acc"}) adds the constant predictor's row."""
    body = _fmt_rows(rows)
    if majority is not None:
        body.append([MAJORITY_ROW, f"{100 * majority['id_acc']:.1f}", f"{100 * majority['ood_acc']:.1f}",
                     "constant prediction", "", "", "", "", ""])
    widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in body)) for i in range(len(COLUMNS))]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in body)])


def write_outputs(report_dir: Path, result: dict) -> list:
    """demo.json, demo.csv and demo.png under report_dir (each written atomically); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..checkpoint import atomic_write_bytes
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = [report_dir / "demo.json", report_dir / "demo.csv", report_dir / "demo.png"]
    atomic_write_bytes(json.dumps(result, indent=1).encode(), paths[0])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "id_acc", "ood_acc", "one_class", "pruned", "sparsity", "flops_keep", "weight_bytes",
                *[f"b{b}_ms" for b in LATENCY_BATCHES], *[f"b{b}_speedup" for b in LATENCY_BATCHES]])
    for r in rows:
        w.writerow([r["model"], r["id_acc"], r["ood_acc"], r["one_class"], r["pruned"], r["sparsity"], r["flops_keep"],
                    r["weight_bytes"], *[r["latency_ms"][str(b)] for b in LATENCY_BATCHES],
                    *[r["speedup"][str(b)] for b in LATENCY_BATCHES]])
    w.writerow([MAJORITY_ROW, result["majority"]["id_acc"], result["majority"]["ood_acc"], True, "constant prediction",
                *[""] * (3 + 2 * len(LATENCY_BATCHES))])
    atomic_write_bytes(buf.getvalue().encode(), paths[1])

    names = [r["model"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    for k, (key, label) in enumerate((("id_acc", "ID"), ("ood_acc", "OOD"))):
        vals = [100 * r[key] for r in rows]
        bars = ax1.bar([x + (k - 0.5) * 0.38 for x in xs], vals, 0.38, label=label)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(list(xs), names)
    ax1.set_ylim(0, 122)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title(f"{result['task']}: in distribution vs out of distribution")
    ax1.legend(loc="upper center", ncols=2)
    for k, b in enumerate(LATENCY_BATCHES):
        vals = [r["speedup"][str(b)] for r in rows]
        bars = ax2.bar([x + (k - 0.5) * 0.38 for x in xs], vals, 0.38, label=f"batch {b}")
        ax2.bar_label(bars, labels=[f"{v:.2f}x\n{r['latency_ms'][str(b)]:.1f} ms" for v, r in zip(vals, rows)],
                      fontsize=7)
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylabel("speedup vs dense (median forward time)")
    ax2.set_ylim(0, max(1.5, 1.3 * max(max(r["speedup"].values()) for r in rows)))
    ax2.set_title(f"measured on {result['device']['name']}, seq {result['seq_len']}")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png.getvalue(), paths[2])
    return paths


# ------------------------------------------------------------------------------------------ the job
def _device_info(device: str) -> dict:
    import platform

    import torch
    if device == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(0)}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return {"type": "cpu", "name": f"{name}, {n} thread{'s' if n != 1 else ''}"}


def srnet_configs(out, size: DemoSize, backbone, device: str, seed: int = 0):
    """The demo's two SRNet runs: dense CE fine-tuning of `backbone`, then paradigm-(a) PoE mask training of it
    to `size.sparsity`. `seed` orders the data and seeds the classifier (the demo itself: 0)."""
    from ..pruning.srnet import SRNetConfig
    common = dict(task="synthetic", model=str(backbone), seed=seed, epochs=size.epochs, mask_epochs=size.mask_epochs,
                  lr=size.lr, lr_scores=size.lr_scores, weight_decay=DEMO_WEIGHT_DECAY, max_train=size.max_train,
                  max_eval=size.max_eval, max_ood=size.max_eval, device=device, out=str(out))
    dense_cfg = SRNetConfig(paradigm="dense", loss="ce", **common).validate()
    srnet_cfg = SRNetConfig(paradigm="a", source="ce", loss="poe", sparsity=size.sparsity, schedule="cubic",
                            **common).validate()
    return dense_cfg, srnet_cfg


def run_demo(out, size: DemoSize, *, progress: bool = False) -> dict:
    """The whole demo; returns the result dict (rows, device, settings) and writes the report files."""
    import torch

    from ..flops import encoder_flops
    from ..nn import compress, for_inference
    from ..pruning.srnet import Runner, evaluate_all
    from ..pruning.structured_api import prune_structured

    out = Path(out)
    t_start, c_start = time.perf_counter(), time.process_time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = write_backbone(out, size)
    log.info(f"demo: random BERT hidden {size.hidden}, {size.layers} layers, FFN {size.ffn} at {backbone}; "
             f"device {device}")
    dense_cfg, srnet_cfg = srnet_configs(out / "srnet", size, backbone, device)
    runner = Runner(out / "srnet", progress=progress, log_fn=log.info)
    log.info("demo: SRNet runs (dense CE fine-tuning, then mask training with PoE; resumable)")
    srnet_run = runner.run(srnet_cfg)
    data = runner.data(dense_cfg)

    dense = for_inference(_dense_model(runner, dense_cfg, data)).to(device)
    inputs = _latency_inputs(data, device)
    seq_len = int(inputs["input_ids"].shape[1])
    tokens = tuple(b * seq_len for b in LATENCY_BATCHES)

    log.info(f"demo: compressing the SRNet subnetwork (format='auto': per layer, dense or sparse, by measurement "
             f"at {list(tokens)} tokens)")
    sub = _subnetwork_model(runner, srnet_cfg, data).to(device)
    sparsity = float(srnet_run["sparsity"])
    compress(sub, format="auto", tokens=tokens)
    sub = for_inference(sub)
    formats = _format_summary(sub.compress_choices)

    log.info(f"demo: Kprune to {size.flops_keep:.0%} of the encoder FLOPs (no retraining), heads/neurons removed")
    batches = data.loader("train", batch_size=32)
    kp, rep = prune_structured(_dense_model(runner, dense_cfg, data).to(device), batches,
                               flops_keep=size.flops_keep, method="kprune", seq_len=seq_len,
                               num_tokens=size.kprune_tokens, progress=log.info)
    kp = for_inference(kp)

    models = {"dense": dense, "SRNet": sub, "Kprune": kp}
    log.info("demo: ID / OOD accuracy of the three models")
    acc = {name: evaluate_all(m, data, dense_cfg, splits=("id_test", "ood_test")) for name, m in models.items()}
    log.info(f"demo: latency, {size.reps} interleaved reps per model at batch {' and '.join(map(str, LATENCY_BATCHES))}"
             f" x seq {seq_len}")
    lat = measure_latency(models, inputs, reps=size.reps)

    fl = encoder_flops(dense, seq_len)
    n_sparse = sum(v for k, v in formats.items() if k != "dense")
    pruned = {"dense": "nothing (100% FLOPs)",
              "SRNet": f"{sparsity:.0%} weights zero ({n_sparse}/{sum(formats.values())} layers sparse)",
              "Kprune": f"{rep['flops_keep_reached']:.0%} FLOPs kept"}
    rows = []
    for name, m in models.items():
        rows.append({
            "model": name, "id_acc": acc[name]["id_test"]["value"], "ood_acc": acc[name]["ood_test"]["value"],
            "one_class": bool(acc[name]["id_test"]["summary"]["one_class"]),  # one label for every ID test example
            "pruned": pruned[name],
            "sparsity": sparsity if name == "SRNet" else 0.0,
            "flops_keep": rep["flops_keep_reached"] if name == "Kprune" else 1.0,
            "weight_bytes": _state_nbytes(m),
            "latency_ms": {str(b): 1e3 * lat[name][b] for b in LATENCY_BATCHES},
            "speedup": {str(b): lat["dense"][b] / lat[name][b] for b in LATENCY_BATCHES},
        })
    result = {
        "task": "synthetic", "device": _device_info(device), "seq_len": seq_len, "size": dataclasses.asdict(size),
        "backbone": str(backbone), "rows": rows, "srnet_formats": formats,
        "majority": {split.split("_")[0] + "_acc": acc["dense"][split]["summary"]["majority_accuracy"]
                     for split in ("id_test", "ood_test")},
        "srnet_compress_choices": {k: {**v, "speedups": {str(t): s for t, s in v["speedups"].items()}}
                                   for k, v in sub.compress_choices.items()},
        "kprune": {"heads_per_layer": rep["heads_per_layer"], "neurons_per_layer": rep["neurons_per_layer"],
                   "flops_keep_reached": rep["flops_keep_reached"], "flops_dense": fl.total},
        "srnet_run": str(runner.run_dir(srnet_cfg)), "dense_run": str(runner.run_dir(dense_cfg)),
        "seconds": {"wall": time.perf_counter() - t_start, "cpu": time.process_time() - c_start},
        "torch": torch.__version__,
    }
    result["files"] = [str(p) for p in write_outputs(out / "report", result)]
    return result


def format_notes(result: dict) -> str:
    """The lines under the table: what each row is, and which format the SRNet layers got."""
    fm = result["srnet_formats"]
    s = result["size"]
    sparse_layers = sum(v for k, v in fm.items() if k != "dense")
    verdict = ("the sparse CPU format measured faster than dense for those layers" if sparse_layers else
               "no layer's sparse format measured faster than dense here, so all stay dense (speedup ~1.0x is the "
               "honest result)")
    collapsed = [r["model"] for r in result["rows"] if r["one_class"]]
    warning = ([f"{' and '.join(collapsed)} predicts one class for every ID test example: its accuracy is the majority "
                f"class's, not a result. The demo's {s['sparsity']:.0%} PoE mask training collapses like this on some seeds and "
                f"machines (results/demo_seeds/README.md); its sparsity and speed columns still hold."]
               if collapsed else [])
    return "\n".join(warning + [
        f"Random BERT (hidden {s['hidden']}, {s['layers']} layers, FFN {s['ffn']}) on the synthetic task; ID = "
        f"spurious feature agrees 90% of the time, OOD = independent of the label.",
        f"SRNet: mask-trained to {s['sparsity']:.0%} sparsity (PoE loss) from the dense CE model, compressed with "
        f"format='auto': " + ", ".join(f"{k} x{v}" for k, v in sorted(fm.items())) + f" linear layers ({verdict}).",
        f"Kprune: {s['flops_keep']:.0%} of the encoder FLOPs kept, no retraining, heads/neurons physically removed.",
        f"Latency: median forward time on {result['device']['name']} ({result['device']['type']}), batch 1 and 32 at "
        f"seq {result['seq_len']}; speedup = dense time / model time. Weight MB: every stored tensor.",
        f"Files: " + ", ".join(result["files"]) + f"  ({result['seconds']['wall']:.0f} s wall, "
        f"{result['seconds']['cpu']:.0f} s CPU)",
    ])


@contextlib.contextmanager
def _quiet_layer_choices(verbose: int):
    """compress(auto)'s per-layer lines only with -v (the notes summarise them); no weight-loading bars."""
    import transformers
    logger = logging.getLogger("sparsebert.nn.compress")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def run(args) -> int:
    size = SIZES[args.size]
    try:
        from .srnet import _check_out
        _check_out(args.out)
    except ValueError as exc:
        print(f"sparsebert demo: error: {exc}", file=sys.stderr)
        return 2
    with _quiet_layer_choices(getattr(args, "verbose", 0)):
        result = run_demo(args.out, size, progress=sys.stderr.isatty())
    print(format_table(result["rows"], result["majority"]))
    print()
    print(format_notes(result))
    return 0
