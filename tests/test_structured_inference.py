"""The structured inference path (sparsebert.nn.inference): removal + optional zero padding + SDPA equals the
masked model; widths, attention implementation, save/load, bad input."""
import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from sparsebert.nn.inference import for_inference, pad_widths, padded_width
from sparsebert.nn.structured import apply_masks, load_pruned, remove_pruned, save_pruned, structure_of

L, H, D, N = 3, 6, 48, 37  # head size 8: round_to=16 pads odd head counts, round_to=8 leaves heads alone


def tiny(kind="bert", attn="eager"):
    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=97, dim=D, n_layers=L, n_heads=H, hidden_dim=N, max_position_embeddings=64,
                               num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
        m = DistilBertForSequenceClassification(cfg)
    else:
        kw = dict(vocab_size=97, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        m = (BertForSequenceClassification(BertConfig(**kw)) if kind == "bert"
             else RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw)))
    m.set_attn_implementation(attn)
    return m.eval()


def inputs(b=3, t=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (b, t), generator=g)
    am = torch.ones_like(ids)
    am[0, t - 4:] = 0
    am[2, 5:] = 0
    return dict(input_ids=ids, attention_mask=am)


def masks(seed=0):
    """Real-valued masks with a different number of kept heads/neurons per layer, one layer without attention
    and one without FFN; kept heads (5, 0, 3), neurons (34, 21, 0) are not multiples of 8 or 16."""
    g = torch.Generator().manual_seed(seed)
    hm = torch.rand(L, H, generator=g) + 0.5
    hm[0, 2] = 0
    hm[1] = 0
    hm[2, [0, 3, 5]] = 0
    nm = torch.rand(L, N, generator=g) + 0.5
    nm[0, [1, 7, 30]] = 0
    nm[1, torch.randperm(N, generator=g)[:16]] = 0
    nm[2] = 0
    return hm, nm


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("round_to", [None, 8, 16, 64])
def test_for_inference_equals_masked_model(kind, round_to):
    model, x = tiny(kind), inputs()
    hm, nm = masks()
    with apply_masks(model, hm, nm), torch.no_grad():
        want = model(**x).logits
    served = for_inference(copy.deepcopy(model), hm, nm, round_to=round_to)
    assert served.config._attn_implementation == "sdpa" and not served.training
    heads, neurons = structure_of(served)
    kept_h, kept_n = [int(v) for v in (hm != 0).sum(1)], [int(v) for v in (nm != 0).sum(1)]
    assert [padded_width(h, D // H, round_to or 1, H) for h in kept_h] == heads
    assert [padded_width(n, 1, round_to or 1, N) for n in kept_n] == neurons
    assert served.config.sparsebert_heads_per_layer == heads and served.config.sparsebert_neurons_per_layer == neurons
    with torch.no_grad():
        got = served(**x).logits
    # fp32, only the order of the sums differs (padded units add exact zeros)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_widths():
    # head size 8: heads pad to even counts for 16, to multiples of 8 heads for 64 (capped at the dense 6)
    assert [padded_width(h, 8, 16, 6) for h in (0, 1, 2, 3, 5, 6)] == [0, 2, 2, 4, 6, 6]
    assert [padded_width(h, 8, 64, 6) for h in (0, 1, 5)] == [0, 6, 6]
    assert [padded_width(n, 1, 8, 37) for n in (0, 1, 8, 9, 33, 37)] == [0, 8, 8, 16, 37, 37]
    assert padded_width(1229, 1, 64, 3072) == 1280 and padded_width(1229, 1, 8, 3072) == 1232
    model = tiny()
    remove_pruned(model, *masks())
    before = structure_of(model)
    pad_widths(model, 16)
    assert structure_of(model) == ([6, 0, 4], [37, 32, 0]) and before == ([5, 0, 3], [34, 21, 0])


def test_sdpa_with_per_layer_heads_matches_eager():
    """The removed model's SDPA attention (per-layer head counts, padded keys) equals its eager attention."""
    model, x = tiny(), inputs()
    hm, nm = masks()
    served = for_inference(model, hm, nm, round_to=16)
    with torch.no_grad():
        got = served(**x).logits
        served.set_attn_implementation("eager")
        want = served(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_no_less_accurate_than_masked_bf16():
    """bf16: the served model's error against the fp64 masked model is within 2x the masked bf16 model's own
    error plus a few bf16 ulps of the output scale (the two differ only in summation order)."""
    model, x = tiny(), inputs()
    hm, nm = masks()
    ref = copy.deepcopy(model).double()
    with apply_masks(ref, hm.double(), nm.double()), torch.no_grad():
        exact = ref(**x).logits
    masked_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with apply_masks(masked_bf16, hm, nm), torch.no_grad():
        err_masked = (masked_bf16(**x).logits.double() - exact).abs().max()
    served = for_inference(copy.deepcopy(model), hm, nm, round_to=16).to(torch.bfloat16)
    with torch.no_grad():
        got = served(**x).logits
    assert got.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().max()
    assert (got.double() - exact).abs().max() <= 2 * err_masked + 4 * ulp


def test_already_removed_model_and_save_load(tmp_path):
    model, x = tiny(), inputs()
    hm, nm = masks()
    remove_pruned(model, hm, nm)
    with torch.no_grad():
        want = model(**x).logits
    served = for_inference(model, round_to=16)  # no masks: pad + SDPA only
    save_pruned(served, str(tmp_path))
    back = load_pruned(str(tmp_path))
    assert structure_of(back) == structure_of(served) == ([6, 0, 4], [37, 32, 0])
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, want, rtol=1e-5, atol=1e-5)


def test_padding_is_zero():
    model = tiny()
    hm, nm = masks()
    remove_pruned(model, hm, nm)
    w_before = model.bert.encoder.layer[1].output.dense.weight.clone()
    pad_widths(model, 16)
    lay = model.bert.encoder.layer[1]
    assert torch.equal(lay.output.dense.weight[:, :21], w_before)
    assert not lay.output.dense.weight[:, 21:].any() and not lay.intermediate.dense.weight[21:].any()
    assert not lay.intermediate.dense.bias[21:].any()
    att = model.bert.encoder.layer[0].attention
    assert att.self.num_attention_heads == 6 and att.self.all_head_size == 48
    for lin in (att.self.query, att.self.key, att.self.value):
        assert not lin.weight[40:].any() and not lin.bias[40:].any()
    assert not att.output.dense.weight[:, 40:].any()


@pytest.mark.parametrize("bad", [0, -8, 8.0, True, "8"])
def test_bad_round_to(bad):
    model = tiny()
    with pytest.raises(ValueError, match="round_to"):
        for_inference(model, round_to=bad)
    assert structure_of(model) == ([H] * L, [N] * L)  # refused before any change


def test_unsupported_model():
    with pytest.raises(TypeError, match="model"):
        for_inference(torch.nn.Linear(3, 3))


WORDS = [f"w{i}" for i in range(40)]


def _cli(*argv):
    import argparse

    from sparsebert.cli import kprune as sub
    parser = argparse.ArgumentParser(prog="sparsebert")
    sub.add_parser(parser.add_subparsers(dest="command"))
    return sub.run(parser.parse_args(["kprune", *argv]))


def test_kprune_cli_saves_the_served_model(tmp_path, capsys):
    """`sparsebert kprune --round-to 16` saves the zero-padded SDPA model; it gives the unpadded one's output."""
    import json

    from transformers import BertTokenizer
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
        max_position_embeddings=64, num_labels=3)).eval()
    model.save_pretrained(tmp_path / "model")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    lines = ["sentence1\tsentence2\tlabel"] + [
        "\t".join([" ".join(WORDS[int(i)] for i in torch.randint(0, 40, (5,), generator=g)),
                   " ".join(WORDS[int(i)] for i in torch.randint(0, 40, (4,), generator=g)), str(k % 3)])
        for k in range(40)]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    base = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.tsv"), "--flops-keep", "0.5",
            "--method", "kwon", "--batch-size", "8"]
    assert _cli(*base, "--out", str(tmp_path / "bad"), "--round-to", "0") == 2
    assert "--round-to" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert _cli(*base, "--out", str(tmp_path / "plain")) == 0
    assert _cli(*base, "--out", str(tmp_path / "padded"), "--round-to", "16") == 0
    rep = json.loads((tmp_path / "padded" / "prune_report.json").read_text())
    plain, padded = load_pruned(str(tmp_path / "plain")), load_pruned(str(tmp_path / "padded"))
    heads, neurons = structure_of(padded)
    assert rep["round_to"] == 16 and [rep["served_heads_per_layer"], rep["served_neurons_per_layer"]] == [heads, neurons]
    assert structure_of(plain) == (rep["heads_per_layer"], rep["neurons_per_layer"])
    assert all(h % 2 == 0 or h == H for h in heads) and all(n % 16 == 0 or n == N for n in neurons)
    assert padded.config._attn_implementation == "sdpa"
    x = inputs()
    x["input_ids"] = x["input_ids"] % (len(WORDS) + 5)
    with torch.no_grad():
        torch.testing.assert_close(padded(**x).logits, plain(**x).logits, rtol=1e-5, atol=1e-5)
