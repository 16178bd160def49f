"""Structured head/neuron masks through hooks, physical removal and the save/load round trip."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from sparsebert.nn.structured import apply_masks, load_pruned, remove_pruned, save_pruned, structure_of

L, H, N, D = 3, 4, 37, 32


def tiny(kind="bert", attn="eager"):
    kw = dict(vocab_size=97, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
              max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        m = BertForSequenceClassification(BertConfig(**kw))
    else:
        m = RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw))
    m.config._attn_implementation = attn
    return m.eval()


def inputs(b=3, t=13):
    ids = torch.randint(2, 97, (b, t))
    am = torch.ones_like(ids)
    am[0, t - 4:] = 0
    return dict(input_ids=ids, attention_mask=am)


def random_masks():
    hm = torch.rand(L, H) + 0.5
    hm[torch.rand(L, H) < 0.4] = 0
    hm[1] = 0  # a layer without attention
    nm = torch.rand(L, N) + 0.5
    nm[torch.rand(L, N) < 0.5] = 0
    nm[2] = 0  # a layer without FFN
    return hm, nm


def manual_reference(model, hm, nm, x):
    """Masks folded into copies of the output-projection columns (no hooks)."""
    import copy
    ref = copy.deepcopy(model)
    dh = D // H
    with torch.no_grad():
        for l, layer in enumerate(ref.base_model.encoder.layer):
            layer.attention.output.dense.weight.mul_(hm[l].repeat_interleave(dh))
            layer.output.dense.weight.mul_(nm[l])
    return ref(**x).logits


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masked_forward_matches_reference(kind, attn):
    model, x = tiny(kind, attn), inputs()
    hm, nm = random_masks()
    with apply_masks(model, hm, nm):
        got = model(**x).logits
    torch.testing.assert_close(got, manual_reference(model, hm, nm, x), rtol=1e-5, atol=1e-6)
    # hooks are gone after the context
    torch.testing.assert_close(model(**x).logits, manual_reference(model, torch.ones(L, H), torch.ones(L, N), x),
                               rtol=1e-5, atol=1e-6)


def test_mask_gradients_match_finite_differences():
    model, x = tiny(), inputs()
    hm = torch.rand(L, H, dtype=torch.float64) + 0.5
    nm = torch.rand(L, N, dtype=torch.float64) + 0.5
    model = model.double()
    hm.requires_grad_(True)
    nm.requires_grad_(True)
    with apply_masks(model, hm, nm):
        model(**x).logits.square().sum().backward()
        assert hm.grad is not None and nm.grad is not None and hm.grad.abs().sum() > 0
        eps = 1e-6
        for (mask, idx) in ((hm, (1, 2)), (nm, (2, 5))):
            with torch.no_grad():
                mask[idx] += eps
                up = model(**x).logits.square().sum()
                mask[idx] -= 2 * eps
                down = model(**x).logits.square().sum()
                mask[idx] += eps
            torch.testing.assert_close(mask.grad[idx], (up - down) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_bad_mask_shapes():
    model = tiny()
    with pytest.raises(ValueError, match="head_mask"):
        apply_masks(model, torch.ones(L, H + 1), None)
    with pytest.raises(ValueError, match="neuron_mask"):
        apply_masks(model, None, torch.ones(L + 1, N))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_remove_pruned_equals_masked_model(kind):
    model, x = tiny(kind), inputs()
    hm, nm = random_masks()
    with apply_masks(model, hm, nm):
        want = model(**x).logits
    remove_pruned(model, hm, nm)
    heads, neurons = structure_of(model)
    assert heads == [int(v) for v in (hm != 0).sum(1)] and heads[1] == 0
    assert neurons == [int(v) for v in (nm != 0).sum(1)] and neurons[2] == 0
    torch.testing.assert_close(model(**x).logits, want, rtol=1e-5, atol=1e-6)
    n_params = sum(p.numel() for p in model.base_model.encoder.parameters())
    assert n_params < sum(p.numel() for p in tiny(kind).base_model.encoder.parameters())


def test_save_load_round_trip(tmp_path):
    model, x = tiny(), inputs()
    hm, nm = random_masks()
    remove_pruned(model, hm, nm)
    want = model(**x).logits
    save_pruned(model, str(tmp_path))
    back = load_pruned(str(tmp_path))
    assert structure_of(back) == structure_of(model)
    assert back.config.sparsebert_heads_per_layer == structure_of(model)[0]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    torch.testing.assert_close(back(**x).logits, want, rtol=1e-5, atol=1e-6)  # attention impl may differ


def test_remove_twice_composes():
    model, x = tiny(), inputs()
    hm1 = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float)
    remove_pruned(model, hm1, None)
    heads, _ = structure_of(model)
    hm2 = [torch.tensor([1.0, 0.0, 1.0]), torch.ones(4), torch.tensor([0.0, 0.0, 2.0])]
    with apply_masks(model, hm2, None):
        want = model(**x).logits
    remove_pruned(model, hm2, None)
    assert structure_of(model)[0] == [2, 4, 1]
    torch.testing.assert_close(model(**x).logits, want, rtol=1e-5, atol=1e-6)
