"""Bad-input audit: about a hundred kinds of bad input through the CLI and the Python API, each classified.

    python scripts/bad_input_audit.py [--out results/bad_input_audit.json] [--only PREFIX ...] [--subprocess]

Outcomes:
* clear: an error (CLI: exit code != 0, one "error" line naming the argument, no traceback; API: an
  exception whose message names the argument or tensor), or, for a case marked `ok`, the right answer;
* unclear: an error that names nothing the user passed, or several error lines;
* silent: exit code 0 / no exception where an error was due, or a wrong answer for an `ok` case;
* traceback: "Traceback" on the CLI's stderr, or an API exception raised deep inside torch/transformers
  (or an AttributeError/IndexError-like crash) without naming the argument.
CLI cases run in this process through `sparsebert.cli.main` (stdout/stderr captured) unless
--subprocess, which starts `python -m sparsebert` per case (slower: ~100 torch imports). Prints the four
counts and writes every case's outcome and message to the JSON file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Sequence

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("clear", "unclear", "silent", "traceback")
DEEP_ERRORS = (AttributeError, IndexError, ZeroDivisionError, AssertionError, NameError, UnboundLocalError,
               RecursionError, UnicodeDecodeError)


@dataclass
class Case:
    id: str
    kind: str                 # "cli" | "api"
    names: Sequence[str]      # a clear message names one of these (case-insensitive)
    run: Callable             # cli: () -> argv list; api: () -> None (raise) or a bool for `ok` cases
    ok: bool = False          # the input is valid (or must be handled): success is the right answer
    warn: bool = False        # api: a warning naming `names` is the right answer
    owner: str = ""           # the file responsible for the behaviour
    slow: bool = False


@dataclass
class Result:
    id: str
    kind: str
    outcome: str
    detail: str
    owner: str
    seconds: float
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ fixtures
class Fixtures:
    """Tiny model folder, data files and scratch paths under one temporary folder."""

    WORDS = [f"w{i}" for i in range(40)]

    def __init__(self, root: Path):
        self.root = root
        self._model = None

    def path(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str, text: str = "x\n", encoding="utf-8") -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding=encoding)
        return p

    def model_dir(self, nan: bool = False) -> Path:
        import torch
        from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
        d = self.root / ("model_nan" if nan else "model")
        if d.is_dir():
            return d
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=5 + len(self.WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, num_labels=3)
        m = BertForSequenceClassification(cfg).eval()
        if nan:
            with torch.no_grad():
                m.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
        m.save_pretrained(d)
        vocab = self.file("vocab.txt", "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *self.WORDS]) + "\n")
        BertTokenizer(str(vocab)).save_pretrained(d)
        return d

    def data(self, name="data.tsv", n=24, header="sentence1\tsentence2\tlabel", label=lambda i: str(i % 3),
             encoding="utf-8", bom=False) -> Path:
        rows = [header] + [f"{self.WORDS[i % 40]} {self.WORDS[(3 * i) % 40]}\t{self.WORDS[(7 * i) % 40]}\t{label(i)}"
                           for i in range(n)]
        return self.file(name, ("\ufeff" if bom else "") + "\n".join(rows) + "\n", encoding)

    def tiny_bert(self, cls="BertModel"):
        import torch
        import transformers
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, num_labels=3)
        return getattr(transformers, cls)(cfg).eval()


# ------------------------------------------------------------------------------------------ runners
def run_cli_inprocess(argv: List[str]):
    from sparsebert.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what a user would see as a traceback
            err.write(traceback.format_exc())
            code = 1
    return code, out.getvalue(), err.getvalue()


def run_cli_subprocess(argv: List[str]):
    p = subprocess.run([sys.executable, "-m", "sparsebert", *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _names(text: str, names: Sequence[str]) -> bool:
    low = text.lower()
    return any(n.lower() in low for n in names)


def classify_cli(case: Case, code, out: str, err: str):
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1]
    if case.ok:
        return ("clear", "accepted") if code == 0 else ("unclear", f"exit {code}: {err.strip()[-300:]}")
    if code == 0:
        return "silent", f"exit 0; stdout: {out.strip()[-200:]!r}"
    lines = [l for l in err.strip().splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()] or lines[-1:]
    if len(errors) == 1 and _names(errors[0], case.names):
        return "clear", errors[0]
    return "unclear", f"exit {code}: " + " | ".join(errors)[-300:]


def classify_api(case: Case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = case.run()
        except BaseException as exc:  # noqa: BLE001 - classify everything
            if isinstance(exc, KeyboardInterrupt):
                raise
            msg = f"{type(exc).__name__}: {exc}".strip()
            first = msg.splitlines()[0][:300] if msg else type(exc).__name__
            if case.ok:
                return "unclear" if not isinstance(exc, DEEP_ERRORS) else "traceback", first
            tb = traceback.extract_tb(exc.__traceback__)
            inner = tb[-1].filename if tb else ""
            ours = "sparsebert" in inner.replace(os.sep, "/").split("/site-packages/")[-1] or \
                inner.startswith(str(ROOT))
            if isinstance(exc, DEEP_ERRORS) or "INTERNAL ASSERT" in msg:
                return "traceback", first
            if _names(msg, case.names):
                return "clear", first
            return ("unclear" if ours else "traceback"), first
    warned = [str(w.message) for w in caught]
    if case.warn:
        hit = [w for w in warned if _names(w, case.names)]
        return ("clear", hit[0][:300]) if hit else ("silent", "no warning naming " + "/".join(case.names))
    if case.ok:
        return ("clear", "right answer") if value is not False else ("silent", "wrong answer")
    return "silent", "no exception" + (f" (warnings: {warned[0][:200]})" if warned else "")


# ------------------------------------------------------------------------------------------ cases
def cli_cases(fx: Fixtures) -> List[Case]:
    cases: List[Case] = []
    srnet_out = str(fx.path("srnet_out"))
    base = ["srnet", "--model", "tiny", "--task", "synthetic", "--dry-run", "--no-progress", "--out", srnet_out]
    a_file = str(fx.file("a_file.txt"))
    under_file = str(Path(a_file) / "sub")
    empty_dir = fx.path("empty_dir")
    empty_dir.mkdir(exist_ok=True)

    def srnet(cid, extra, names, ok=False, base_argv=base):
        cases.append(Case(f"cli.srnet.{cid}", "cli", names, lambda: [*base_argv, *extra], ok=ok,
                          owner="sparsebert/cli/srnet.py"))

    srnet("sparsity_above_1", ["--sparsity", "1.5"], ["--sparsity"])
    srnet("sparsity_text", ["--sparsity", "abc"], ["--sparsity"])
    srnet("sparsity_zero", ["--sparsity", "0"], ["--sparsity"])
    srnet("seeds_zero", ["--seeds", "0"], ["--seeds"])
    srnet("seeds_text", ["--seeds", "two"], ["--seeds"])
    srnet("seed_offset_negative", ["--seed-offset", "-1"], ["--seed-offset"])
    srnet("paradigm_unknown", ["--paradigm", "z"], ["--paradigm"])
    srnet("loss_unknown", ["--loss", "focal"], ["--loss"])
    srnet("task_unknown", ["--task", "imagenet"], ["--task"])
    srnet("lr_negative", ["--lr", "-1"], ["--lr"])
    srnet("lr_nan", ["--lr", "nan"], ["--lr"])
    srnet("epochs_zero", ["--epochs", "0"], ["--epochs"])
    srnet("batch_size_zero", ["--batch-size", "0"], ["--batch-size"])
    srnet("max_length_3", ["--max-length", "3"], ["--max-length"])
    srnet("max_length_0", ["--max-length", "0"], ["--max-length"])
    srnet("max_train_zero", ["--max-train", "0"], ["--max-train"])
    srnet("granularity_unknown", ["--granularity", "rows"], ["--granularity"])
    srnet("granularity_block_0", ["--granularity", "block:0"], ["--granularity"])
    srnet("granularity_2of4_sparsity_07", ["--granularity", "2:4", "--sparsity", "0.7", "--paradigm", "dense", "a"],
          ["--sparsity", "2:4"])
    srnet("granularity_2of4_sparsity_05_ok", ["--granularity", "2:4", "--sparsity", "0.5", "--paradigm", "dense", "a"],
          [], ok=True)
    srnet("device_cuda_without_gpu", ["--device", "cuda"], ["--device"])
    srnet("device_unknown", ["--device", "tpu"], ["--device"])
    srnet("device_bad_index", ["--device", "cuda:7"], ["--device"])
    srnet("out_existing_file", [], ["--out"], base_argv=[*base[:-1], a_file])
    srnet("out_under_a_file", [], ["--out"], base_argv=[*base[:-1], under_file])
    srnet("model_missing", ["--model", str(fx.path("no_such_model"))], ["model"])
    srnet("model_is_a_file", ["--model", a_file], ["model"])
    srnet("search_from_2", ["--search-from", "2", "--paradigm", "a"], ["--search-from"])
    srnet("search_from_without_a", ["--search-from", "0.5", "--paradigm", "c"], ["--search-from"])
    srnet("initial_sparsity_1_5", ["--initial-sparsity", "1.5"], ["--initial-sparsity"])
    srnet("end_frac_zero", ["--end-frac", "0"], ["--end-frac"])
    srnet("imp_rate_2", ["--imp-rate", "2"], ["--imp-rate"])
    srnet("imp_rounds_zero", ["--imp-rounds", "0"], ["--imp-rounds"])
    srnet("hans_rule_unknown", ["--hans-rule", "bogus"], ["--hans-rule"])
    srnet("hans_per_subcase_zero", ["--hans-per-subcase", "0"], ["--hans-per-subcase"])
    srnet("eval_points_zero", ["--eval-points", "0"], ["--eval-points"])
    srnet("mask_epochs_zero", ["--mask-epochs", "0"], ["--mask-epochs"])
    srnet("lr_scores_zero", ["--lr-scores", "0"], ["--lr-scores"])
    srnet("ood_informed_synthetic", ["--ood-informed", "--paradigm", "c"], ["ood"])
    srnet("mask_from_without_b", ["--mask-from", "mask_training", "--paradigm", "dense", "a"], ["--mask-from"])
    srnet("rewind_without_b", ["--rewind", "early", "--paradigm", "dense", "a"], ["--rewind"])
    srnet("method_imp_without_a", ["--method", "imp", "--paradigm", "dense", "c"], ["--method"])
    srnet("unknown_flag", ["--sparsity-target", "0.5"], ["--sparsity-target"])
    cases.append(Case("cli.demo.out_existing_file", "cli", ["--out"], lambda: ["demo", "--out", a_file],
                      owner="sparsebert/cli/srnet.py"))

    def report(cid, argv, names, owner="sparsebert/cli/report.py"):
        cases.append(Case(f"cli.report.{cid}", "cli", names, argv, owner=owner))

    report("missing_folder", lambda: ["report", str(fx.path("no_such_runs"))], ["no_such_runs", "folder"])
    report("a_file", lambda: ["report", a_file], ["a_file", "folder"])
    report("empty_folder", lambda: ["report", str(empty_dir)], ["empty_dir", "run"])

    def corrupt_runs():
        d = fx.path("corrupt_runs/synthetic/dense-ce-seed0")
        d.mkdir(parents=True, exist_ok=True)
        (d / "run.json").write_text("{not json")
        return ["report", str(fx.path("corrupt_runs")), "--report-dir", str(fx.path("corrupt_report"))]
    report("corrupt_run_json", corrupt_runs, ["run.json"])
    report("report_dir_is_a_file", lambda: ["report", str(empty_dir), "--report-dir", a_file],
           ["--report-dir", "a_file"])

    def kprune(cid, extra, names, data=None, out=None, model=None, ok=False, slow=False):
        def argv():
            return ["kprune", "--model", str(model() if model else fx.model_dir()),
                    "--data", str(data() if data else fx.data()), "--out", str(out or fx.path(f"kp_{cid}")),
                    *(["--flops-keep", "0.6"] if not any(a.startswith("--flops-keep") for a in extra) else []), *extra]
        cases.append(Case(f"cli.kprune.{cid}", "cli", names, argv, ok=ok, owner="sparsebert/cli/kprune.py", slow=slow))

    kprune("flops_keep_1_5", ["--flops-keep", "1.5"], ["--flops-keep"])
    kprune("flops_keep_zero", ["--flops-keep", "0"], ["--flops-keep"])
    kprune("flops_keep_text", ["--flops-keep", "half"], ["--flops-keep"])
    kprune("batch_size_zero", ["--batch-size", "0"], ["--batch-size"])
    kprune("max_length_zero", ["--max-length", "0"], ["--max-length"])
    kprune("num_tokens_zero", ["--num-tokens", "0"], ["--num-tokens"])
    kprune("seq_len_negative", ["--seq-len", "-3"], ["--seq-len"])
    kprune("seq_len_text", ["--seq-len", "long"], ["--seq-len"])
    kprune("method_unknown", ["--method", "magnitude"], ["--method"])
    kprune("out_existing_file", [], ["--out"], out=a_file)
    kprune("out_under_a_file", [], ["--out"], out=under_file)
    kprune("model_missing", [], ["model", "no_such_model"], model=lambda: fx.path("no_such_model"))
    kprune("model_empty_folder", [], ["model", "config.json", "empty_dir"], model=lambda: empty_dir)
    kprune("data_missing_file", [], ["--data", "missing.tsv"], data=lambda: fx.path("missing.tsv"))
    kprune("data_unknown_task", [], ["--data", "no_such_task"], data=lambda: "no_such_task")
    kprune("data_empty_file", [], ["--data", "empty.tsv"], data=lambda: fx.file("empty.tsv", ""))
    kprune("data_header_only", [], ["--data", "header_only.tsv"],
           data=lambda: fx.file("header_only.tsv", "sentence1\tsentence2\tlabel\n"))
    kprune("data_no_text_column", [], ["--data", "column"],
           data=lambda: fx.data("nocol.tsv", header="foo\tbar\tlabel"))
    kprune("data_label_text", [], ["--data", "label"], data=lambda: fx.data("badlabel.tsv", label=lambda i: "yes"))
    kprune("data_label_nan", [], ["--data", "label"], data=lambda: fx.data("nanlabel.tsv", label=lambda i: "nan"))
    kprune("data_bom_ok", [], [], data=lambda: fx.data("bom.tsv", bom=True), ok=True, slow=True)
    kprune("data_jsonl_malformed", [], ["--data", "line"],
           data=lambda: fx.file("bad.jsonl", '{"text": "w1 w2", "label": 0}\n{"text": \n'))
    kprune("data_unknown_suffix", [], ["--data"], data=lambda: fx.file("data.xlsx", "a,b\n"))
    kprune("data_binary_file", [], ["--data"], data=lambda: _binary(fx.path("binary.tsv")))
    kprune("nan_weights", [], ["NaN or inf", "non-finite", "not finite", "NaN/inf"], model=lambda: fx.model_dir(nan=True), slow=True)

    cases.append(Case("cli.top.unknown_command", "cli", ["bogus"], lambda: ["bogus"], owner="sparsebert/cli/__init__.py"))
    cases.append(Case("cli.info.unknown_flag", "cli", ["--bogus"], lambda: ["info", "--bogus"],
                      owner="sparsebert/cli/info.py"))
    cases.append(Case("cli.bench.suite_unknown", "cli", ["--suite"], lambda: ["bench", "--suite", "bogus"],
                      owner="sparsebert/cli/bench.py"))
    return cases


def _binary(p: Path) -> Path:
    p.write_bytes(bytes(range(256)) * 8)
    return p


def api_cases(fx: Fixtures) -> List[Case]:
    import torch
    import sparsebert
    from sparsebert import ops
    from sparsebert.nn import SparseLinear, compress, sparsify, sparsity_report
    cases: List[Case] = []

    def api(cid, fn, names, owner, ok=False, warn=False):
        cases.append(Case(f"api.{cid}", "api", names, fn, ok=ok, warn=warn, owner=owner))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    w = torch.randn(3, 7, generator=g)
    b = torch.randn(3, generator=g)
    m = torch.rand(3, 7, generator=g) < 0.5
    s = torch.randn(3, 7, generator=g)
    ML = "sparsebert/ops/masked_linear.py + _validate.py"
    SML = "sparsebert/ops/score_masked_linear.py + _validate.py"

    api("ops.masked_linear.x_int", lambda: ops.masked_linear(x.long(), w, b, m), ["x"], ML)
    api("ops.masked_linear.dtype_mismatch", lambda: ops.masked_linear(x.double(), w, b, m), ["x", "weight", "dtype"], ML)
    api("ops.masked_linear.k_mismatch", lambda: ops.masked_linear(torch.randn(5, 6), w, b, m), ["x", "weight"], ML)
    api("ops.masked_linear.mask_shape", lambda: ops.masked_linear(x, w, b, m[:, :5]), ["mask"], ML)
    api("ops.masked_linear.mask_float_probabilities", lambda: ops.masked_linear(x, w, b, torch.rand(3, 7)), ["mask"], ML)
    api("ops.masked_linear.mask_int64", lambda: ops.masked_linear(x, w, b, m.long()), ["mask"], ML)
    api("ops.masked_linear.bias_shape", lambda: ops.masked_linear(x, w, torch.randn(4), m), ["bias"], ML)
    api("ops.masked_linear.weight_1d", lambda: ops.masked_linear(x, w[0], b, m), ["weight"], ML)
    api("ops.masked_linear.x_0d", lambda: ops.masked_linear(torch.tensor(1.0), w, b, m), ["x"], ML)
    api("ops.masked_linear.meta_device", lambda: ops.masked_linear(x.to("meta"), w, b, m), ["device", "x"], ML)
    api("ops.masked_linear.backend_unknown", lambda: ops.masked_linear(x, w, b, m, backend="bogus"), ["backend"], ML)
    api("ops.masked_linear.backend_cuda_on_cpu", lambda: ops.masked_linear(x, w, b, m, backend="cuda"),
        ["backend", "cuda"], ML)
    api("ops.masked_linear.not_a_tensor", lambda: ops.masked_linear(x.tolist(), w, b, m), ["x"], ML)

    def noncontig_ok():
        xt = torch.randn(7, 5, generator=g).t()
        return torch.allclose(ops.masked_linear(xt, w, b, m), ops.reference.masked_linear(xt, w, b, m), atol=1e-5)
    api("ops.masked_linear.noncontiguous_ok", noncontig_ok, [], ML, ok=True)

    def empty_ok():
        y = ops.masked_linear(torch.randn(0, 7), w, b, m)
        return y.shape == (0, 3)
    api("ops.masked_linear.empty_batch_ok", empty_ok, [], ML, ok=True)

    def packed_ok():
        return torch.allclose(ops.masked_linear(x, w, b, ops.pack_mask(m)), ops.reference.masked_linear(x, w, b, m),
                              atol=1e-5)
    api("ops.masked_linear.packed_mask_ok", packed_ok, [], ML, ok=True)

    s_nan = s.clone()
    s_nan[0, 0] = float("nan")
    api("ops.score_masked_linear.nan_scores", lambda: ops.score_masked_linear(x, w, b, s_nan, 0.0), ["scores"], SML)
    api("ops.score_masked_linear.scores_shape", lambda: ops.score_masked_linear(x, w, b, s[:, :4], 0.0), ["scores"], SML)
    api("ops.score_masked_linear.nan_threshold", lambda: ops.score_masked_linear(x, w, b, s, float("nan")),
        ["threshold"], SML)
    api("ops.score_masked_linear.threshold_vector", lambda: ops.score_masked_linear(x, w, b, s, torch.zeros(3)),
        ["threshold"], SML)
    api("ops.score_masked_linear.scores_int", lambda: ops.score_masked_linear(x, w, b, s.long(), 0.0), ["scores"], SML)
    TK = "sparsebert/ops/topk_threshold.py"
    api("ops.topk_threshold.sparsity_1_5", lambda: ops.topk_threshold(s, 1.5), ["sparsity"], TK)
    api("ops.topk_threshold.sparsity_nan", lambda: ops.topk_threshold(s, float("nan")), ["sparsity"], TK)
    api("ops.topk_threshold.empty_list", lambda: ops.topk_threshold([], 0.5), ["scores"], TK)
    api("ops.topk_threshold.empty_tensor", lambda: ops.topk_threshold(torch.empty(0), 0.5), ["scores"], TK)
    api("ops.topk_threshold.nan_scores", lambda: ops.topk_threshold(s_nan, 0.5), ["scores"], TK)
    api("ops.topk_threshold.int_scores", lambda: ops.topk_threshold(s.long(), 0.5), ["scores"], TK)
    PM = "sparsebert/ops (pack_mask / unpack_mask)"
    api("ops.pack_mask.float_mask", lambda: ops.pack_mask(torch.rand(3, 7)), ["mask"], PM)
    api("ops.pack_mask.mask_1d", lambda: ops.pack_mask(m[0]), ["mask"], PM)
    api("ops.unpack_mask.in_features_too_large", lambda: ops.unpack_mask(ops.pack_mask(m), 99), ["in_features"], PM)
    api("ops.unpack_mask.not_int32", lambda: ops.unpack_mask(ops.pack_mask(m).long(), 7), ["packed"], PM)

    SL = "sparsebert/nn/sparse_linear.py"
    lin = torch.nn.Linear(7, 3)
    api("nn.SparseLinear.mode_unknown", lambda: SparseLinear(7, 3, mode="bogus"), ["mode"], SL)
    api("nn.SparseLinear.target_sparsity_1_5",
        lambda: SparseLinear.from_linear(lin, mode="scores", target_sparsity=1.5), ["target_sparsity"], SL)
    api("nn.SparseLinear.target_sparsity_nan",
        lambda: SparseLinear.from_linear(lin, mode="scores", target_sparsity=float("nan")), ["target_sparsity"], SL)
    api("nn.SparseLinear.set_mask_shape", lambda: SparseLinear.from_linear(lin).set_mask(m[:, :5]), ["mask"], SL)
    api("nn.SparseLinear.set_mask_float_probabilities",
        lambda: SparseLinear.from_linear(lin).set_mask(torch.rand(3, 7)), ["mask"], SL)
    api("nn.SparseLinear.from_conv", lambda: SparseLinear.from_linear(torch.nn.Conv1d(3, 3, 1)), ["linear"], SL)
    api("nn.SparseLinear.set_threshold_in_mask_mode", lambda: SparseLinear.from_linear(lin).set_threshold(0.0),
        ["set_threshold", "scores"], SL)
    api("nn.SparseLinear.forward_wrong_features", lambda: SparseLinear.from_linear(lin)(torch.randn(2, 5)),
        ["x", "in_features", "7"], SL)
    api("nn.SparseLinear.forward_int_input", lambda: SparseLinear.from_linear(lin)(torch.ones(2, 7, dtype=torch.long)),
        ["x", "dtype"], SL)
    api("nn.SparseLinear.backend_unknown", lambda: SparseLinear.from_linear(lin, backend="bogus"), ["backend"], SL)
    api("nn.SparseLinear.granularity_2of4_sparsity_07",
        lambda: SparseLinear.from_linear(torch.nn.Linear(8, 4), mode="scores", target_sparsity=0.7, granularity="2:4"),
        ["2:4", "sparsity"], SL)
    api("nn.SparseLinear.granularity_unknown",
        lambda: SparseLinear.from_linear(lin, mode="scores", target_sparsity=0.5, granularity="rows"),
        ["granularity"], SL)

    SP = "sparsebert/nn/sparsify.py"

    def twice():
        model = fx.tiny_bert()
        sparsify(model, mode="scores", target_sparsity=0.5)
        sparsify(model, mode="scores", target_sparsity=0.7)
    api("nn.sparsify.called_twice", twice, ["already sparsified"], SP)

    def deberta_v1():
        import transformers
        cfg = transformers.DebertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=64)
        sparsify(transformers.DebertaModel(cfg), mode="scores", target_sparsity=0.5)
    api("nn.sparsify.deberta_v1_fused_in_proj", deberta_v1, ["in_proj"], SP)

    def deberta_v2_ok():
        import transformers
        cfg = transformers.DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=64)
        model = transformers.DebertaV2Model(cfg).eval()
        sparsify(model, mode="scores", target_sparsity=0.5)
        rep = sparsity_report(model)
        return rep["by_role"].get("query") == 0.5 and len(rep["layers"]) == 12 and \
            abs(rep["overall"] - 0.5) < 1e-3
    api("nn.sparsify.deberta_v2_query_proj_ok", deberta_v2_ok, [], SP, ok=True)

    def mpnet():
        import transformers
        cfg = transformers.MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=64)
        sparsify(transformers.MPNetModel(cfg), mode="scores", target_sparsity=0.5)
    api("nn.sparsify.mpnet_unknown_attention_names", mpnet, ["attn.q", "attention.attn"], SP)
    api("nn.sparsify.not_bert", lambda: sparsify(torch.nn.Sequential(torch.nn.Linear(3, 3))), ["encoder"], SP)
    api("nn.sparsify.mode_unknown", lambda: sparsify(fx.tiny_bert(), mode="bogus"), ["mode"], SP)
    api("nn.sparsify.include_head_text", lambda: sparsify(fx.tiny_bert(), include_head="yes"), ["include_head"], SP)
    api("nn.sparsify.not_a_module", lambda: sparsify({"a": 1}), ["model", "module"], SP)
    api("nn.sparsity_report.not_bert", lambda: sparsity_report(torch.nn.Linear(3, 3)), ["encoder"], SP)

    CP = "sparsebert/nn/compress.py"
    api("nn.compress.format_unknown", lambda: compress(fx.tiny_bert(), format="bogus"), ["format"], CP)

    def unpruned():
        compress(fx.tiny_bert(), format="bitmask")
    api("nn.compress.unpruned_model_warns", unpruned, ["density", "sparsity", "changed nothing"], CP, warn=True)
    api("nn.compress.bsr_block_7",
        lambda: compress(sparsify(fx.tiny_bert(), mode="scores", target_sparsity=0.5), format="bsr", block_size=7),
        ["block_size"], CP)

    def report_after_compress_ok():
        model = sparsify(fx.tiny_bert(), mode="scores", target_sparsity=0.6)
        before = sparsity_report(model)["overall"]
        compress(model, format="bitmask", speed_check=False)
        return abs(sparsity_report(model)["overall"] - before) < 1e-6
    api("nn.sparsity_report.after_compress_ok", report_after_compress_ok, [], CP + " + sparsify.sparsity_report",
        ok=True)

    PS = "sparsebert/nn/persistence.py"
    api("nn.from_pretrained.missing_dir", lambda: sparsebert.from_pretrained(str(fx.path("no_such_ckpt"))),
        ["no_such_ckpt"], PS)

    def pickle_only():
        d = fx.path("pickle_ckpt")
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(fx.tiny_bert().config.to_dict()))
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        sparsebert.from_pretrained(str(d))
    api("nn.from_pretrained.pickle_only", pickle_only, ["safetensors", "pickle", "pytorch_model.bin"], PS)

    def corrupt_manifest():
        d = fx.path("corrupt_manifest")
        sparsebert.save_pretrained(sparsify(fx.tiny_bert(), mode="scores", target_sparsity=0.5), str(d))
        (d / "sparsebert.json").write_text("{oops")
        sparsebert.from_pretrained(str(d))
    api("nn.from_pretrained.corrupt_sparsebert_json", corrupt_manifest, ["sparsebert.json"], PS)

    def future_version():
        d = fx.path("future_manifest")
        sparsebert.save_pretrained(sparsify(fx.tiny_bert(), mode="scores", target_sparsity=0.5), str(d))
        meta = json.loads((d / "sparsebert.json").read_text())
        key = next((k for k in meta if "version" in k), "format_version")
        meta[key] = 999
        (d / "sparsebert.json").write_text(json.dumps(meta))
        sparsebert.from_pretrained(str(d))
    api("nn.from_pretrained.future_format_version", future_version, ["version"], PS)

    def save_to_file():
        sparsebert.save_pretrained(sparsify(fx.tiny_bert(), mode="mask"), str(fx.file("ckpt_is_file.txt")))
    api("nn.save_pretrained.path_is_a_file", save_to_file, ["ckpt_is_file"], PS)
    api("nn.load_compressed.missing_file",
        lambda: sparsebert.nn.load_compressed(str(fx.path("nope.safetensors"))), ["nope.safetensors"], CP)
    api("nn.load_compressed.not_safetensors",
        lambda: sparsebert.nn.load_compressed(str(fx.file("junk.safetensors", "junk"))), ["junk.safetensors"], CP)

    ST = "sparsebert/nn/structured.py"
    from sparsebert.nn import structured
    api("nn.structured.head_mask_wrong_length",
        lambda: structured.remove_pruned(fx.tiny_bert(), head_mask=[torch.ones(3), torch.ones(4)]), ["head_mask"], ST)
    api("nn.structured.neuron_mask_too_few_layers",
        lambda: structured.apply_masks(fx.tiny_bert(), neuron_mask=[torch.ones(48)]), ["neuron_mask"], ST)
    api("nn.structured.not_bert", lambda: structured.apply_masks(torch.nn.Linear(2, 2)), ["model"], ST)

    DT = "sparsebert/data/tasks.py"
    from sparsebert import data
    fixtures = ROOT / "tests" / "fixtures"
    api("data.load_mnli.missing_file", lambda: data.load_mnli(fx.path("nope.tsv")), ["nope.tsv"], DT)
    api("data.load_mnli.bad_fields", lambda: data.load_mnli(fixtures / "mnli_bad_fields.tsv"), ["mnli_bad_fields"], DT)
    api("data.load_mnli.bad_label", lambda: data.load_mnli(fixtures / "mnli_bad_label.tsv"), ["label"], DT)
    api("data.load_mnli.empty_file", lambda: data.load_mnli(fx.file("empty_mnli.tsv", "")), ["empty_mnli"], DT)
    api("data.load_mnli.binary_file", lambda: data.load_mnli(_binary(fx.path("binary_mnli.tsv"))), ["binary_mnli"], DT)
    api("data.load_mrpc.bom_ok", lambda: len(data.load_mrpc(fixtures / "mrpc_bom.tsv")) > 0, [], DT, ok=True)
    api("data.load_paws.crlf_ok", lambda: len(data.load_paws(fixtures / "paws_crlf.tsv")) > 0, [], DT, ok=True)
    api("data.load_fever.bad_json", lambda: data.load_fever(fixtures / "fever_bad_json.jsonl"), ["fever_bad_json"], DT)
    api("data.load_fever.missing_key", lambda: data.load_fever(fixtures / "fever_missing_key.jsonl"),
        ["fever_missing_key"], DT)
    api("data.load_hans.wrong_columns", lambda: data.load_hans(fixtures / "sst2.tsv"), ["sst2.tsv"], DT)
    api("data.load_task.unknown", lambda: data.load_task("bogus"), ["bogus"], DT)
    api("data.split_examples.sizes_over_1",
        lambda: data.split_examples(data.load_sst2(fixtures / "sst2.tsv"), [0.5, 0.7]), ["sizes"], DT)

    EV = "sparsebert/eval.py"
    from sparsebert import eval as ev
    api("eval.evaluate.metric_unknown",
        lambda: ev.evaluate(fx.tiny_bert("BertForSequenceClassification"),
                            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}],
                            metric="bogus"), ["metric"], EV)
    api("eval.predict.empty_loader", lambda: ev.predict(fx.tiny_bert("BertForSequenceClassification"), []),
        ["loader"], EV)
    api("eval.evaluate.labels_out_of_range",
        lambda: ev.evaluate(fx.tiny_bert("BertForSequenceClassification"),
                            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([0, 7])}],
                            metric="accuracy"), ["label"], EV)

    KP = "sparsebert/pruning/structured_api.py"
    from sparsebert.pruning.structured_api import prune_structured
    batch = {"input_ids": torch.randint(5, 45, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}
    api("pruning.prune_structured.flops_keep_1_5",
        lambda: prune_structured(fx.tiny_bert("BertForSequenceClassification"), [batch], 1.5), ["flops_keep"], KP)
    api("pruning.prune_structured.method_unknown",
        lambda: prune_structured(fx.tiny_bert("BertForSequenceClassification"), [batch], 0.5, method="bogus"),
        ["method"], KP)
    api("pruning.prune_structured.no_batches",
        lambda: prune_structured(fx.tiny_bert("BertForSequenceClassification"), [], 0.5), ["batches"], KP)

    def nan_weights():
        model = fx.tiny_bert("BertForSequenceClassification")
        with torch.no_grad():
            model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
        prune_structured(model, [batch], 0.5)
    api("pruning.prune_structured.nan_weights", nan_weights, ["NaN or inf", "non-finite", "not finite", "NaN/inf"], KP)
    return cases


# ------------------------------------------------------------------------------------------ main
def run_audit(only: Sequence[str] = (), use_subprocess: bool = False, skip_slow: bool = False,
              tmp: Path | None = None) -> List[Result]:
    import torch
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        root = Path(tmp) if tmp else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bad_input_")))
        fx = Fixtures(root)
        cases = cli_cases(fx) + api_cases(fx)
        if only:
            cases = [c for c in cases if any(c.id.startswith(p) for p in only)]
        if skip_slow:
            cases = [c for c in cases if not c.slow]
        results = []
        for case in cases:
            t0 = time.perf_counter()
            extra = {}
            try:
                if case.kind == "cli":
                    argv = [str(a) for a in case.run()]
                    extra["argv"] = argv
                    code, out, err = (run_cli_subprocess if use_subprocess else run_cli_inprocess)(argv)
                    extra["exit_code"] = code
                    outcome, detail = classify_cli(case, code, out, err)
                else:
                    outcome, detail = classify_api(case)
            except Exception as exc:  # a broken fixture: report it, never hide it
                outcome, detail = "traceback", f"audit harness: {type(exc).__name__}: {exc}"
            results.append(Result(case.id, case.kind, outcome, detail, case.owner,
                                  round(time.perf_counter() - t0, 3), extra))
        return results


def counts(results: Sequence[Result]) -> dict:
    return {o: sum(r.outcome == o for r in results) for o in OUTCOMES}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Classify ~100 kinds of bad input (clear / unclear / silent / traceback).")
    p.add_argument("--out", default=str(ROOT / "results" / "bad_input_audit.json"), help="JSON file to write")
    p.add_argument("--only", nargs="*", default=[], help="case id prefixes (e.g. cli.srnet api.ops)")
    p.add_argument("--subprocess", action="store_true", help="run each CLI case as `python -m sparsebert`")
    p.add_argument("--skip-slow", action="store_true", help="leave out the cases that prune a model")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = run_audit(args.only, args.subprocess, args.skip_slow)
    c = counts(results)
    for r in results:
        if r.outcome != "clear":
            print(f"{r.outcome:9s} {r.id}: {r.detail[:160]}  [{r.owner}]")
    print(f"{len(results)} kinds of bad input: " + ", ".join(f"{c[o]} {o}" for o in OUTCOMES) +
          f" ({time.perf_counter() - t0:.0f}s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"counts": c, "total": len(results), "cli_mode": "subprocess" if args.subprocess
                               else "in-process", "cases": [r.__dict__ for r in results]}, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
