"""compress()/decompress(), inference modules, footprints, save/load, and whole-model equivalence."""
import warnings

import pytest
import torch
import torch.nn as nn

from sparsebert.nn import SparseLinear, encoder_linears, sparsify
from sparsebert.nn.compress import (BitmaskLinear, BSRLinear, SemiStructuredLinear, compress, decompress,
                                    footprint_report, load_compressed, save_compressed)
from sparsebert.nn.granularity import granular_topk_mask

transformers = pytest.importorskip("transformers")

GRANULARITY = {"bitmask": "element", "bsr": ("block", 16), "2:4": "2:4", "dense": "element"}
SPARSITY = {"bitmask": 0.7, "bsr": 0.6, "2:4": 0.5, "dense": 0.7}


def tiny_bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=96, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=True).eval(), config


def pruned_bert(fmt):
    """Tiny BERT whose encoder linears are SparseLinear with masks of the format's granularity."""
    model, config = tiny_bert()
    sparsify(model, mode="mask")
    for lin in encoder_linears(model).values():
        lin.set_mask(granular_topk_mask(lin.weight.detach().abs(), SPARSITY[fmt], GRANULARITY[fmt]))
    return model, config


def layers(model):
    """The encoder's Q/K/V/attn-out/FFN-in/FFN-out modules, whatever their class (after compress too)."""
    roles = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    return {n: m for n, m in model.named_modules()
            if n.startswith("encoder.layer.") and n.split(".", 3)[-1] in roles}


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


@pytest.mark.parametrize("fmt", ["bitmask", "bsr", "2:4", "dense"])
def test_whole_model_equivalence_and_save_load(fmt, tmp_path):
    model, config = pruned_bert(fmt)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    expected = run(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 2:4 CPU fallback warns once
        compress(model, fmt, block_size=16, tile=(16, 32))
        got = run(model, ids)
    kinds = {type(m).__name__ for m in layers(model).values()}
    assert kinds == {{"bitmask": "BitmaskLinear", "bsr": "BSRLinear", "2:4": "SemiStructuredLinear",
                      "dense": "Linear"}[fmt]}
    assert isinstance(model.pooler.dense, nn.Linear)  # dense layers without zeros are left alone
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    save_compressed(model, tmp_path / "model.pt")
    skeleton, _ = tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loaded = load_compressed(tmp_path / "model.pt", skeleton)
        torch.testing.assert_close(run(loaded, ids), got, rtol=0, atol=0)
    assert footprint_report(loaded)["total_bytes"] == footprint_report(model)["total_bytes"]


def test_bf16_model_compresses_and_meets_the_memory_target():
    model, config = tiny_bert()
    model = model.to(torch.bfloat16)
    for lin in layers(model).values():
        with torch.no_grad():
            lin.weight.mul_(granular_topk_mask(lin.weight.float().abs(), 0.7, "element"))
    ids = torch.randint(0, config.vocab_size, (1, 5))
    expected = run(model, ids).float()
    compress(model, "bitmask", tile=(32, 64))
    torch.testing.assert_close(run(model, ids).float(), expected, rtol=2e-2, atol=2e-2)
    report = footprint_report(model)
    for name in layers(model):
        row = report["modules"][name]
        assert row["format"] == "bitmask" and row["dtype"] == "bfloat16"
        assert row["ratio"] <= 0.45, (name, row)
        assert row["bytes_per_weight"] == pytest.approx(getattr(model.get_submodule(name), "bytes_per_weight"))
    assert report["modules"]["pooler.dense"]["format"] == "dense"
    assert report["modules"]["pooler.dense"]["ratio"] == 1.0


def test_decompress_round_trip_and_format_change():
    model, config = pruned_bert("bsr")
    ids = torch.randint(0, config.vocab_size, (2, 6))
    expected = run(model, ids)
    masks = {n: m.effective_mask().clone() for n, m in layers(model).items()}
    compress(model, "bsr", block_size=16)
    compress(model, "bitmask", tile=(16, 32))  # compressed modules convert between formats
    assert all(isinstance(m, BitmaskLinear) for m in layers(model).values())
    decompress(model, to="sparse")
    for name, lin in layers(model).items():
        assert isinstance(lin, SparseLinear) and lin.mode == "mask"
        assert bool((lin.effective_mask() <= masks[name]).all())  # kept set = stored nonzeros
    torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)
    compress(model, "bitmask")
    decompress(model)
    assert all(type(m) is nn.Linear for m in layers(model).values())
    torch.testing.assert_close(run(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_match_dense_and_report_bytes(dtype):
    w = torch.randn(64, 96)
    w = (w * granular_topk_mask(w.abs(), 0.75, ("block", 32))).to(dtype)
    b = torch.randn(64).to(dtype)
    x = torch.randn(3, 5, 96).to(dtype)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    bm, bsr = BitmaskLinear(w, b, tile=(32, 64)), BSRLinear(w, b, block_size=32)
    for mod in (bm, bsr):
        torch.testing.assert_close(mod(x).float(), ref, **tol)
        assert mod.dense_weight().equal(w)
        assert mod.nbytes() == mod.weight_nbytes() + b.numel() * b.element_size()
    esize = w.element_size()
    assert bm.bytes_per_weight == pytest.approx((int((w != 0).sum()) * esize + 64 * 3 * 4 + 2 * 2 * 4) / w.numel())
    assert bsr.bytes_per_weight == pytest.approx((bsr.values.shape[0] * 32 * 32 * esize
                                                  + (bsr.values.shape[0] + 3) * 4) / w.numel())
    assert bsr.block_density() == pytest.approx(0.25, abs=0.2)


def test_semi_structured_on_cpu_falls_back_with_a_clear_message():
    w = torch.randn(32, 64)
    w = w * granular_topk_mask(w.abs(), 0.5, "2:4")
    b = torch.randn(32)
    mod = SemiStructuredLinear(w, b)
    assert mod.bytes_per_weight == pytest.approx((32 * 32 * 4 + 32 * 8) / (32 * 64))
    x = torch.randn(4, 64)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        y = mod(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    assert "CUDA" in mod.fallback_reason
    with pytest.raises(ValueError, match="in_features"):
        mod(torch.randn(4, 60))


def test_compress_refuses_what_a_format_cannot_serve():
    model, _ = pruned_bert("bitmask")  # unstructured masks
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\..*not 2:4"):
        compress(model, "2:4")
    with pytest.raises(ValueError, match="divisible by 64"):
        compress(pruned_bert("bsr")[0], "bsr", block_size=64)  # intermediate size 96
    with pytest.raises(ValueError, match="format"):
        compress(model, "csr")
    with pytest.raises(ValueError, match="block_size"):
        compress(model, "bsr", block_size=8)
    with pytest.raises(ValueError, match="not linear layers"):
        compress(model, "bitmask", modules=["embeddings"])
    with pytest.raises(ValueError, match="policy"):
        SemiStructuredLinear(torch.zeros(4, 8), policy="fast")
    with pytest.raises(ValueError, match="not a sparsebert compressed checkpoint"):
        load_compressed({"state_dict": {}}, model)


def test_compress_selects_modules_by_name_and_predicate():
    model, _ = pruned_bert("bitmask")
    compress(model, "bitmask", modules=["encoder.layer.0.attention.self.query"])
    kinds = [type(m).__name__ for m in layers(model).values()]
    assert kinds.count("BitmaskLinear") == 1
    compress(model, "bitmask", modules=lambda name, m: name.startswith("encoder.layer.1."))
    assert [type(m).__name__ for m in layers(model).values()].count("BitmaskLinear") == 7


@pytest.mark.cuda
def test_semi_structured_on_gpu_uses_sparse_kernels_and_plans():
    w = torch.randn(256, 512, device="cuda")
    w = (w * granular_topk_mask(w.abs(), 0.5, "2:4")).to(torch.bfloat16)
    mod = SemiStructuredLinear(w, None)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    y = mod(x)
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), w.float()), rtol=1e-2, atol=1e-1)
    if mod.fallback_reason is None:
        assert mod.released and mod.plan and mod.bytes_per_weight < 2.0
        state = mod.state_dict()
        assert state["values"].shape == (256, 256)
