"""sparsify / densify / sparsity_report on small random-init Hugging Face models."""
import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaForSequenceClassification

from sparsebert.nn import SparseLinear, densify, encoder_linears, head_linears, sparsify, sparsity_report
from _helpers import assert_close

CFG = dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=61, vocab_size=97,
           max_position_embeddings=40)


def _bert():
    return BertModel(BertConfig(**CFG)).eval()


def _ids():
    return torch.randint(0, 97, (3, 37)), torch.ones(3, 37, dtype=torch.long)


def test_density_one_gives_the_dense_outputs():
    model = _bert()
    ids, att = _ids()
    ref = model(input_ids=ids, attention_mask=att).last_hidden_state
    sparsify(model, mode="mask")
    assert len([m for m in model.modules() if isinstance(m, SparseLinear)]) == 6 * 2
    out = model(input_ids=ids, attention_mask=att).last_hidden_state
    assert_close(out, ref, torch.float32, "density 1")
    assert sparsity_report(model)["overall"] == 0.0


def test_density_03_equals_masked_dense_reference():
    model = _bert()
    ids, att = _ids()
    masks = {n: torch.rand_like(m.weight) < 0.3 for n, m in encoder_linears(model).items()}
    reference = _bert()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, m in encoder_linears(reference).items():
            m.weight.mul_(masks[n])
    sparsify(model, mode="mask")
    for n, m in encoder_linears(model).items():
        m.set_mask(masks[n])
    out = model(input_ids=ids, attention_mask=att).last_hidden_state
    ref = reference(input_ids=ids, attention_mask=att).last_hidden_state
    assert_close(out, ref, torch.float32, "density 0.3")
    rep = sparsity_report(model)
    assert rep["overall"] == pytest.approx(0.7, abs=0.02)
    assert set(rep["by_role"]) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert_close(model(input_ids=ids, attention_mask=att).last_hidden_state, ref, torch.float32, "densified")
    assert sparsity_report(model)["overall"] == pytest.approx(rep["overall"])


def test_roberta_and_classifier_option():
    cfg = RobertaConfig(**CFG, num_labels=3)
    model = RobertaForSequenceClassification(cfg)
    sparsify(model, mode="scores", include_classifier=True, target_sparsity=0.4)
    assert len(encoder_linears(model)) == 12
    assert set(head_linears(model)) == {"classifier.dense", "classifier.out_proj"}
    assert all(isinstance(m, SparseLinear) for m in head_linears(model).values())
    ids, att = _ids()
    ids = ids.clamp(min=3)  # avoid RoBERTa's padding id in positions
    logits = model(input_ids=ids, attention_mask=att).logits
    assert logits.shape == (3, 3)
    assert sparsity_report(model)["overall"] == pytest.approx(0.4, abs=1e-3)


def test_non_bert_model_is_refused():
    with pytest.raises(ValueError, match="no BERT-family encoder linears"):
        sparsify(torch.nn.Sequential(torch.nn.Linear(3, 3)))
