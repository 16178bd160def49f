"""save_pretrained / from_pretrained (sparse, compressed, pruned models), save_compressed / load_compressed
(safetensors, no pickle), compress() and sparsity_report on compressed models, export."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import sparsebert
from sparsebert.nn import SparseLinear, compress, encoder_linears, sparsify, sparsity_report
from sparsebert.nn.compress import load_compressed, save_compressed
from sparsebert.nn.granularity import granular_topk_mask
from sparsebert.nn.structured import remove_pruned, structure_of

transformers = pytest.importorskip("transformers")

GRANULARITY = {"bitmask": "element", "bsr": ("block", 16), "2:4": "2:4"}
SPARSITY = {"bitmask": 0.7, "bsr": 0.5, "2:4": 0.5}
KIND = {"bitmask": "BitmaskLinear", "bsr": "BSRLinear", "2:4": "SemiStructuredLinear"}


def tiny(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=96, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def sparse_model():
    """Encoder linears in scores mode (per-layer target 0.7, one layer with 2:4 groups) and in mask mode."""
    model = tiny()
    sparsify(model, mode="scores", target_sparsity=0.7, score_init="kaiming")
    lins = list(encoder_linears(model).values())
    lins[1].set_granularity("2:4")
    lins[1].set_target_sparsity(0.5)
    for lin in lins[6:]:  # layer 1: fixed masks
        lin.set_mask(torch.rand(lin.weight.shape) > 0.6)
    lins[-1].init_scores("magnitude")  # a scores layer with a global threshold instead of a target
    lins[-1].set_threshold(0.02)
    return model


def compressed_model(fmt):
    model = tiny()
    sparsify(model, mode="mask")
    for lin in encoder_linears(model).values():
        lin.set_mask(granular_topk_mask(lin.weight.detach().abs(), SPARSITY[fmt], GRANULARITY[fmt]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 2:4 CPU fallback warns once
        compress(model, fmt, block_size=16, tile=(16, 32))
    return model


def pruned_model(heads_layer1=(0, 0, 0, 0)):
    model = tiny()
    hm = torch.tensor([[1, 0, 1, 1], list(heads_layer1)], dtype=torch.float)
    nm = (torch.rand(2, 96, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    return remove_pruned(model, hm, nm)


# ------------------------------------------------------------------------------------------ sparse models
def test_sparse_model_round_trip_keeps_modes_settings_and_state(tmp_path):
    model = sparse_model()
    want = logits(model)
    sparsebert.save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "sparsebert.json", "sparsebert_state.safetensors"} <= set(os.listdir(tmp_path))
    back = sparsebert.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(back), want, rtol=0, atol=0)
    old, new = encoder_linears(model), encoder_linears(back)
    for name, a in old.items():
        b = new[name]
        assert isinstance(b, SparseLinear) and b.mode == a.mode, name
        assert b.target_sparsity == a.target_sparsity and b.granularity == a.granularity, name
        assert torch.equal(b.effective_mask(), a.effective_mask()), name
        if a.mode == "scores":  # exact trainable state: scores, threshold and the unmasked weights
            assert torch.equal(b.scores, a.scores) and b.scores.dtype == a.scores.dtype
            assert torch.equal(b.threshold, a.threshold) and torch.equal(b.weight, a.weight)
        else:  # mask mode: pruned weights come back as zeros (never read by forward or the masked gradient)
            assert torch.equal(b.weight, a.weight * a.mask)
    assert new["bert.encoder.layer.0.attention.self.query"].target_sparsity == 0.7
    # the restored model trains: a scores gradient reaches the reloaded layer
    back.train()
    back(input_ids=IDS).logits.sum().backward()
    assert new["bert.encoder.layer.0.attention.self.query"].scores.grad.abs().sum() > 0


def test_stock_from_pretrained_gets_the_sparse_model(tmp_path):
    model = sparse_model()
    want = logits(model)
    report = sparsity_report(model)
    sparsebert.save_pretrained(model, tmp_path)
    stock = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SparseLinear) for m in stock.modules())
    torch.testing.assert_close(logits(stock), want, rtol=1e-5, atol=1e-6)
    assert sparsity_report(stock)["overall"] == pytest.approx(report["overall"])
    assert sparsity_report(stock)["overall"] > 0.6


def test_saving_again_replaces_the_previous_checkpoint(tmp_path):
    sparsebert.save_pretrained(compressed_model("bitmask"), tmp_path, stock_weights=True)
    model = sparse_model()
    sparsebert.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "sparsebert.json").read_text())
    assert "sparsebert_base.safetensors" not in os.listdir(tmp_path)
    assert all(e["type"] == "SparseLinear" for e in meta["modules"].values())
    torch.testing.assert_close(logits(sparsebert.from_pretrained(tmp_path)), logits(model), rtol=0, atol=0)
    # and a compressed save without stock weights removes the stale model.safetensors
    sparsebert.save_pretrained(compressed_model("bsr"), tmp_path)
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".sparsebert-save-")]


def test_files_get_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        sparsebert.save_pretrained(sparse_model(), tmp_path / "m")
        save_compressed(compressed_model("bitmask"), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for f in list((tmp_path / "m").iterdir()) + [tmp_path / "c.safetensors"]:
        assert (f.stat().st_mode & 0o777) == 0o640, f


# ------------------------------------------------------------------------------------------ compressed models
@pytest.mark.parametrize("fmt", ["bitmask", "bsr", "2:4"])
def test_compressed_model_reloads_without_a_skeleton(fmt, tmp_path):
    model = compressed_model(fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = logits(model)
        sparsebert.save_pretrained(model, tmp_path / "small")
        assert "model.safetensors" not in os.listdir(tmp_path / "small")
        with pytest.raises(OSError):  # a stock loader cannot silently get something else
            transformers.BertForSequenceClassification.from_pretrained(tmp_path / "small")
        back = sparsebert.from_pretrained(tmp_path / "small")
        assert {type(m).__name__ for m in encoder_linears_any(back).values()} == {KIND[fmt]}
        torch.testing.assert_close(logits(back), want, rtol=0, atol=0)

        sparsebert.save_pretrained(model, tmp_path / "both", stock_weights=True)
        stock = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "both").eval()
        torch.testing.assert_close(logits(stock), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits(sparsebert.from_pretrained(tmp_path / "both")), want, rtol=0, atol=0)


def encoder_linears_any(model):
    roles = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    return {n: m for n, m in model.named_modules() if ".encoder.layer." in n and n.split(".", 4)[-1] in roles}


@pytest.mark.parametrize("fmt", ["bitmask", "bsr", "2:4"])
def test_save_compressed_is_one_safetensors_file_and_loads_without_skeleton(fmt, tmp_path):
    model = compressed_model(fmt)
    path = tmp_path / "model.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = logits(model)
        save_compressed(model, path)
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["manifest"])["bert.encoder.layer.0.attention.self.query"]["format"] == fmt
        back = load_compressed(path)
        assert type(back).__name__ == "BertForSequenceClassification"
        torch.testing.assert_close(logits(back), want, rtol=0, atol=0)
        torch.testing.assert_close(logits(load_compressed(path, tiny(seed=5))), want, rtol=0, atol=0)


def test_load_compressed_refuses_pickles_and_damaged_tensors(tmp_path):
    model = compressed_model("bitmask")
    torch.save({"sparsebert_compressed": 1, "manifest": {}, "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_compressed(tmp_path / "old.pt")

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    save_compressed(model, tmp_path / "ok.safetensors")
    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(tmp_path / "ok.safetensors"))
    key = "bert.encoder.layer.1.output.dense.tile_offsets"
    state[key] = state[key].flip(0).contiguous()  # offsets out of order: decodes, but not to this encoding
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.output\.dense.*tile_offsets"):
        load_compressed(tmp_path / "bad.safetensors")
    state = load_file(str(tmp_path / "ok.safetensors"))
    key = "bert.encoder.layer.0.intermediate.dense.values"
    state[key] = state[key][:-3].contiguous()  # fewer values than set bits
    save_file(state, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense.*invalid"):
        load_compressed(tmp_path / "bad2.safetensors")


def test_damaged_manifest_is_a_clear_error(tmp_path):
    sparsebert.save_pretrained(sparse_model(), tmp_path)
    meta = json.loads((tmp_path / "sparsebert.json").read_text())
    (tmp_path / "sparsebert.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        sparsebert.from_pretrained(tmp_path)
    (tmp_path / "sparsebert.json").write_text(json.dumps({**meta, "model_class": "os.system"}))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        sparsebert.from_pretrained(tmp_path)
    name = "bert.encoder.layer.0.attention.self.query"
    bad = json.loads(json.dumps(meta))
    bad["modules"][name]["mode"] = "magic"
    (tmp_path / "sparsebert.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"attention\.self\.query.*mode"):
        sparsebert.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ pruned models
def test_pruned_model_round_trip(tmp_path):
    model = pruned_model()
    want = logits(model)
    sparsebert.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sparsebert_heads_per_layer"] == [3, 0]
    assert "pruned_heads" not in config
    back = sparsebert.from_pretrained(tmp_path)
    assert structure_of(back) == structure_of(model)
    torch.testing.assert_close(logits(back), want, rtol=1e-5, atol=1e-6)
    with pytest.raises((RuntimeError, ValueError, OSError)):  # stock loaders refuse the smaller shapes
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)


def test_pruned_then_sparsified_model_round_trip(tmp_path):
    model = pruned_model(heads_layer1=(0, 1, 0, 0))
    sparsify(model, mode="scores", target_sparsity=0.5)
    want = logits(model)
    sparsebert.save_pretrained(model, tmp_path)
    back = sparsebert.from_pretrained(tmp_path)
    assert structure_of(back) == structure_of(model)
    assert all(m.target_sparsity == 0.5 for m in encoder_linears(back).values())
    torch.testing.assert_close(logits(back), want, rtol=0, atol=0)


def test_every_kind_reloads_in_a_fresh_process(tmp_path):
    kinds = {"sparse": sparse_model(), "bsr": compressed_model("bsr"), "pruned": pruned_model()}
    from safetensors.torch import save_file
    want = {}
    for kind, model in kinds.items():
        sparsebert.save_pretrained(model, tmp_path / kind)
        want[kind] = logits(model)
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        from safetensors.torch import load_file, save_file
        root = {str(tmp_path)!r}
        ids = load_file(root + "/ids.safetensors")["ids"]
        run = lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach()
        out = {{"stock": run(transformers.AutoModelForSequenceClassification.from_pretrained(root + "/sparse").eval())}}
        assert "sparsebert" not in sys.modules  # the stock load above needs no sparsebert
        import sparsebert
        for kind in ("sparse", "bsr", "pruned"):
            out[kind] = run(sparsebert.from_pretrained(root + "/" + kind))
        save_file(out, root + "/out.safetensors")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "out.safetensors"))
    for kind in kinds:
        torch.testing.assert_close(got[kind], want[kind], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["stock"], want["sparse"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ compress / report
def test_compress_on_an_unpruned_model_warns_with_the_density():
    model = tiny()
    with pytest.warns(UserWarning, match=r"changed nothing.*density 1\.0000"):
        compress(model, "bitmask")


def test_sparsity_report_after_compress():
    model = tiny()
    sparsify(model, mode="mask")
    for lin in encoder_linears(model).values():
        lin.set_mask(granular_topk_mask(lin.weight.detach().abs(), 0.5, ("block", 16)))
    before = sparsity_report(model)
    compress(model, "bsr", block_size=16)
    after = sparsity_report(model)
    assert after["overall"] == pytest.approx(before["overall"]) and after["overall"] > 0.45
    assert after["layers"].keys() == before["layers"].keys()
    assert after["by_role"] == pytest.approx(before["by_role"])


# ------------------------------------------------------------------------------------------ export
def test_torch_export_keeps_the_backend_unresolved():
    lin = SparseLinear.from_linear(torch.nn.Linear(24, 10), mode="mask", mask=torch.rand(10, 24) > 0.5)
    ep = torch.export.export(lin, (torch.randn(3, 24),))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "sparsebert" in str(n.target)]
    assert calls and all("auto" in n.args for n in calls), [n.args for n in calls]
    x = torch.randn(3, 24)
    torch.testing.assert_close(ep.module()(x), lin(x))
    scores = SparseLinear.from_linear(torch.nn.Linear(24, 10), mode="scores", target_sparsity=0.6)
    ep = torch.export.export(scores, (x,))
    calls = [n for g in ep.graph_module.modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes
             if n.op == "call_function" and "sparsebert" in str(n.target)]  # top-k sits in a no_grad subgraph
    assert len(calls) == 2 and all("auto" in n.args for n in calls), [n.args for n in calls]  # top-k + product
    torch.testing.assert_close(ep.module()(x), scores(x))


def test_export_onnx_without_onnx_says_what_to_install():
    pytest.importorskip("transformers")
    try:
        import onnx  # noqa: F401
        pytest.skip("onnx is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install onnx"):
        sparsebert.nn.export_onnx(compressed_model("bitmask"), (IDS,), "/nonexistent/model.onnx")
