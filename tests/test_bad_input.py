"""Bad input gets a clear error, early (issue 13, section 6): sparsify's model checks, the srnet / report
argument checks, --version, --help text, logging to stderr, and a subset of scripts/bad_input_audit.py."""
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
import transformers

from sparsebert.cli import build_parser, main, setup_logging
from sparsebert.nn import SparseLinear, densify, encoder_linears, sparsify, sparsity_report

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**SMALL)).eval()


# ------------------------------------------------------------------------------------------ sparsify
def test_deberta_v2_query_key_value_proj_are_sparsified_and_counted():
    model = transformers.DebertaV2Model(transformers.DebertaV2Config(**SMALL)).eval()
    ids = torch.randint(0, 50, (2, 11))
    sparsify(model, mode="scores", target_sparsity=0.5)
    lins = encoder_linears(model)
    assert len(lins) == 12 and all(isinstance(m, SparseLinear) for m in lins.values())
    rep = sparsity_report(model)
    assert set(rep["by_role"]) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
    assert rep["by_role"]["query"] == pytest.approx(0.5) and rep["overall"] == pytest.approx(0.5)
    out = model(input_ids=ids).last_hidden_state
    densify(model)  # the masked model equals plain linears holding W * m
    assert torch.allclose(model(input_ids=ids).last_hidden_state, out, atol=1e-5)


def test_deberta_v1_fused_in_proj_is_refused_by_name():
    model = transformers.DebertaModel(transformers.DebertaConfig(**SMALL))
    with pytest.raises(ValueError, match=r"attention\.self\.in_proj"):
        sparsify(model, mode="scores", target_sparsity=0.5)
    with pytest.raises(ValueError, match="in_proj"):
        sparsity_report(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_sparsify_twice_is_refused_and_keep_leaves_layers_alone():
    model = sparsify(_bert(), mode="scores", target_sparsity=0.5)
    with pytest.raises(ValueError, match=r"already sparsified.*mode 'scores'"):
        sparsify(model, mode="scores", target_sparsity=0.7)
    assert sparsity_report(model)["overall"] == pytest.approx(0.5)
    sparsify(model, mode="mask", existing="keep")  # opt-in: existing SparseLinear layers stay as they are
    assert {m.mode for m in encoder_linears(model).values()} == {"scores"}
    sparsify(densify(model), mode="scores", target_sparsity=0.7)  # densify first: starts over
    assert sparsity_report(model)["overall"] == pytest.approx(0.7, abs=1e-3)
    with pytest.raises(ValueError, match="existing"):
        sparsify(_bert(), existing="replace")


def test_sparsify_a_non_module_is_a_type_error_naming_model():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        sparsify({"weight": torch.ones(2, 2)})


# ------------------------------------------------------------------------------------------ srnet CLI
SRNET = ["srnet", "--model", "tiny", "--task", "synthetic", "--dry-run", "--no-progress"]


@pytest.mark.parametrize("extra, flag", [
    (["--granularity", "2:4", "--sparsity", "0.7", "--paradigm", "dense", "a"], "--sparsity"),
    (["--max-length", "3"], "--max-length"),
    (["--seed-offset", "-1"], "--seed-offset"),
    (["--initial-sparsity", "1.5"], "--initial-sparsity"),
    (["--end-frac", "0"], "--end-frac"),
    (["--mask-from", "mask_training", "--paradigm", "dense", "a"], "--mask-from"),
    (["--rewind", "early", "--paradigm", "dense", "a"], "--rewind"),
    (["--method", "imp", "--paradigm", "dense", "c"], "--method"),
    (["--device", "tpu"], "--device"),
    (["--granularity", "block:0"], "--granularity"),
])
def test_srnet_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, extra, flag):
    out = tmp_path / "runs"
    assert main([*SRNET, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsebert srnet: error: " + flag), err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_srnet_device_cuda_without_cuda(tmp_path, capsys):
    assert main([*SRNET, "--out", str(tmp_path / "runs"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "no CUDA GPU" in err[0]


def test_srnet_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert main([*SRNET, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0], err
    assert f.read_text() == "x"


def test_srnet_2of4_at_half_sparsity_is_accepted(tmp_path, capsys):
    assert main([*SRNET, "--out", str(tmp_path / "runs"), "--granularity", "2:4", "--sparsity", "0.5",
                 "--paradigm", "dense", "a"]) == 0
    assert "to run" in capsys.readouterr().out


def test_srnet_max_length_beyond_the_checkpoint_positions(tmp_path, capsys):
    d = tmp_path / "ckpt"
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(d)
    assert main([*SRNET, "--model", str(d), "--out", str(tmp_path / "runs"), "--max-length", "65"]) == 2
    assert "--max-length" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ report CLI
def test_report_corrupt_run_json_and_report_dir_file(tmp_path, capsys):
    run = tmp_path / "runs" / "synthetic" / "dense-ce-seed0"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{not json")
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json" in err[0] and "Traceback" not in err[0]
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["report", str(tmp_path / "runs"), "--report-dir", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-dir" in err[0]


# ------------------------------------------------------------------------------------------ CLI surface
def test_version(capsys):
    from sparsebert import __version__
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"sparsebert {__version__}"


def test_help_has_no_markup(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    texts = {"": parser.format_help()}
    texts.update({name: p.format_help() for name, p in sub.choices.items()})
    assert {"srnet", "report", "kprune", "info"} <= set(texts)
    for name, text in texts.items():
        assert "`" not in text and "%(" not in text and "**" not in text, (name, text)
    assert "\n    sparsebert kprune --model PATH" in texts["kprune"]  # the usage example keeps its own line


def test_logging_goes_to_stderr_and_respects_quiet(capsys):
    log = logging.getLogger("sparsebert.test_bad_input")
    try:
        setup_logging(0)
        log.info("progress line")
        captured = capsys.readouterr()
        assert "progress line" in captured.err and captured.out == ""
        setup_logging(0, quiet=True)
        log.info("hidden line")
        log.warning("warned line")
        err = capsys.readouterr().err
        assert "hidden line" not in err and "warning" in err and "warned line" in err
    finally:
        setup_logging(0)


# ------------------------------------------------------------------------------------------ the audit
def _audit_module():
    spec = importlib.util.spec_from_file_location("bad_input_audit", ROOT / "scripts" / "bad_input_audit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_audit_subset_runs_and_classifies(tmp_path):
    audit = _audit_module()
    results = audit.run_audit(only=["cli.srnet.granularity_2of4", "cli.srnet.device_unknown", "cli.srnet.out_",
                                    "cli.report.corrupt", "api.nn.sparsify."], tmp=tmp_path)
    by_id = {r.id: r for r in results}
    assert len(results) >= 10 and "api.nn.sparsify.called_twice" in by_id
    assert all(r.outcome == "clear" for r in results), [(r.id, r.outcome, r.detail) for r in results]
    # the classifier itself: exit 0 where an error is due is silent; a traceback is a traceback
    case = audit.Case("x", "cli", ["--flag"], lambda: [])
    assert audit.classify_cli(case, 0, "", "")[0] == "silent"
    assert audit.classify_cli(case, 1, "", "Traceback (most recent call last):\n  ...\nKeyError: 'a'")[0] == "traceback"
    assert audit.classify_cli(case, 2, "", "error: something went wrong")[0] == "unclear"
    assert audit.classify_cli(case, 2, "", "usage: x\nx: error: argument --flag: bad")[0] == "clear"
    assert audit.classify_api(audit.Case("y", "api", ["mask"], lambda: None))[0] == "silent"
    assert audit.classify_api(audit.Case("y", "api", ["mask"], lambda: [][1]))[0] == "traceback"


# ------------------------------------------------------------------------------------------ issue 13 §6 leftovers
def test_score_masked_linear_refuses_nan_scores():
    from sparsebert import ops
    g = torch.Generator().manual_seed(3)
    x, w, s = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    s[1, 4] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN"):
        ops.score_masked_linear(x, w, None, s, 0.0)


def test_pack_and_unpack_mask_refuse_bad_input_by_name():
    from sparsebert import ops
    m = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) < 0.5
    with pytest.raises(TypeError, match="mask must be a bool or uint8"):
        ops.pack_mask(torch.rand(3, 7))
    with pytest.raises(ValueError, match="mask must be 2-D"):
        ops.pack_mask(m[0])
    packed = ops.pack_mask(m)
    with pytest.raises(ValueError, match=r"in_features = 99 needs packed of shape \(N, 4\)"):
        ops.unpack_mask(packed, 99)
    with pytest.raises(TypeError, match="packed must be an int32"):
        ops.unpack_mask(packed.long(), 7)
    with pytest.raises(ValueError, match="in_features must be an int"):
        ops.unpack_mask(packed, -1)
    assert torch.equal(ops.unpack_mask(packed, 7), m) and torch.equal(ops.unpack_mask(ops.pack_mask(m.byte()), 7), m)


def test_sparse_linear_refuses_unknown_backend_and_names_target_sparsity():
    lin = torch.nn.Linear(7, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseLinear.from_linear(lin, backend="bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseLinear(7, 3, backend="bogus")
    layer = SparseLinear.from_linear(lin, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "bogus"
    assert layer.backend == "torch"
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
            SparseLinear.from_linear(lin, mode="scores", target_sparsity=bad)
        with pytest.raises(ValueError, match="target_sparsity"):
            SparseLinear(7, 3, mode="scores", target_sparsity=bad)


def test_sparse_linear_2of4_needs_target_sparsity_half():
    with pytest.raises(ValueError, match="target_sparsity must be 0.5 with granularity '2:4'"):
        SparseLinear.from_linear(torch.nn.Linear(8, 4), mode="scores", target_sparsity=0.7, granularity="2:4")
    layer = SparseLinear.from_linear(torch.nn.Linear(8, 4), mode="scores", target_sparsity=0.5, granularity="2:4")
    with pytest.raises(ValueError, match="target_sparsity must be 0.5"):
        layer.set_target_sparsity(0.3)
    assert layer.target_sparsity == 0.5 and layer.sparsity() == pytest.approx(0.5)


def test_kprune_data_file_type_encoding_and_bom(tmp_path, capsys):
    from sparsebert.cli.kprune import UsageError, read_examples
    rows = "sentence1\tsentence2\tlabel\nw1 w2\tw3\t1\nw4\tw5 w6\t0\n"
    bom = tmp_path / "bom.tsv"
    bom.write_text("\ufeff" + rows, encoding="utf-8")
    assert read_examples(str(bom)) == [("w1 w2", "w3", 1), ("w4", "w5 w6", 0)]
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_text("a,b\n")
    with pytest.raises(UsageError, match=r"--data: .*data\.xlsx: unknown file type '\.xlsx'"):
        read_examples(str(xlsx))
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UsageError, match=r"--data: .*binary\.tsv, line 2: expected .*UTF-8 text, got byte 0x80"):
        read_examples(str(binary))
    # end to end: one error line naming --data, exit 2, before the model is read
    assert main(["kprune", "--model", str(tmp_path / "no_model_needed"), "--data", str(xlsx), "--flops-keep", "0.5",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--" in err[0] and "Traceback" not in err[0], err


def test_data_loaders_name_a_binary_file(tmp_path):
    from sparsebert import data
    for loader in (data.load_mnli, data.load_mrpc, data.load_fever):
        p = tmp_path / f"binary_{loader.__name__}.tsv"
        p.write_bytes(b"sentence1\tsentence2\tlabel\n" + bytes(range(128, 256)))
        with pytest.raises(data.DataFormatError, match=rf"binary_{loader.__name__}\.tsv, line 2: expected .*UTF-8 text"):
            loader(p)
    bom = tmp_path / "fever_bom.jsonl"
    bom.write_text('\ufeff{"claim": "c", "evidence": "e", "label": "SUPPORTS"}\n', encoding="utf-8")
    assert [(e.text_a, e.text_b, e.label) for e in data.load_fever(bom)] == [("e", "c", 0)]


def test_prune_structured_refuses_nan_weights_by_parameter_name():
    from sparsebert.pruning.structured_api import prune_structured
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("inf")
    batch = {"input_ids": torch.randint(5, 45, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}
    for method in ("kprune", "kwon", "kcm"):
        with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.output\.dense\.weight holds NaN or inf"):
            prune_structured(model, [batch], 0.5, method=method)


def test_sparsify_skips_zero_width_layers_left_by_remove_pruned():
    from sparsebert.nn.structured import remove_pruned
    model = remove_pruned(_bert(), head_mask=[torch.zeros(4), torch.ones(4)],
                          neuron_mask=[torch.ones(48), torch.zeros(48)])
    empty = {n for n, m in encoder_linears(model).items() if m.weight.numel() == 0}
    assert empty == {"encoder.layer.0.attention.output.dense", "encoder.layer.1.output.dense"}
    ids = torch.randint(0, 50, (2, 9))
    sparsify(model, mode="scores", target_sparsity=0.5)
    lins = encoder_linears(model)
    assert all(isinstance(m, SparseLinear) == (n not in empty) for n, m in lins.items())
    assert model(input_ids=ids).last_hidden_state.isfinite().all()
    rep = sparsity_report(model)
    assert rep["overall"] == pytest.approx(0.5) and all(rep["layers"][n]["numel"] == 0 for n in empty)


def test_sparse_rows_layers_round_trip_through_save_compressed_and_save_pretrained(tmp_path):
    import sparsebert
    from sparsebert.nn import SparseRowsLinear, compress, load_compressed, save_compressed
    model = sparsify(_bert(), mode="scores", target_sparsity=0.7)
    with torch.no_grad():
        for lin in encoder_linears(model).values():
            lin.weight.normal_()  # fresh values
            lin.scores.copy_(lin.weight.abs())
    compress(model, format="sparse-rows", speed_check=False)
    rows = {n: m for n, m in model.named_modules() if isinstance(m, SparseRowsLinear)}
    assert len(rows) == 12
    ids = torch.randint(0, 50, (2, 9))
    want = model(input_ids=ids).last_hidden_state
    save_compressed(model, tmp_path / "c.safetensors")
    sparsebert.save_pretrained(model, str(tmp_path / "p"))
    for back in (load_compressed(tmp_path / "c.safetensors"), sparsebert.from_pretrained(str(tmp_path / "p"))):
        got = {n: m for n, m in back.named_modules() if isinstance(m, SparseRowsLinear)}
        assert got.keys() == rows.keys()
        for n, m in got.items():
            for key in ("values", "col_indices", "row_offsets", "bias"):
                a, b = getattr(m, key), getattr(rows[n], key)
                assert a.dtype == b.dtype and torch.equal(a, b), (n, key)
        assert torch.equal(back(input_ids=ids).last_hidden_state, want)
