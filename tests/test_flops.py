"""FLOPs model and budget validation (sparsebert.flops)."""
import pytest
import torch
from transformers import BertConfig

from sparsebert.flops import check_flops_keep, encoder_flops, masked_flops, prunable_budget


def _cfg(**kw):
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                num_labels=3)
    base.update(kw)
    return BertConfig(**base)


def test_per_unit_flops_by_hand():
    fl = encoder_flops(_cfg(), 11)
    L, d, dh = 11, 32, 8
    assert fl.per_head == 3 * 2 * L * d * dh + 2 * L * L * dh + 2 * L * L * dh + 2 * L * dh * d
    assert fl.per_neuron == 2 * L * d + 2 * L * d
    assert fl.total == fl.fixed + 3 * 4 * fl.per_head + 3 * 37 * fl.per_neuron
    assert 0 < fl.fixed < 0.2 * fl.total


def test_attention_share_grows_with_seq_len():
    short, long = encoder_flops(_cfg(), 16), encoder_flops(_cfg(), 512)
    assert long.per_head / long.per_neuron > short.per_head / short.per_neuron


def test_masked_flops_and_per_layer_widths():
    fl = encoder_flops(_cfg(), 9)
    hm = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    nm = torch.zeros(3, 37)
    nm[0, :5] = 0.3  # real-valued (tuned) masks count as kept
    assert masked_flops(fl, hm, nm) == fl.fixed + 6 * fl.per_head + 5 * fl.per_neuron
    pruned = encoder_flops(_cfg(), 9, heads_per_layer=[2, 0, 4], neurons_per_layer=[5, 0, 0])
    assert pruned.total == masked_flops(fl, hm, nm)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_budget_out_of_range(bad):
    with pytest.raises(ValueError, match="flops_keep"):
        check_flops_keep(bad, encoder_flops(_cfg(), 8))


def test_budget_below_fixed_cost():
    fl = encoder_flops(_cfg(), 8)
    floor = fl.fixed / fl.total
    with pytest.raises(ValueError, match="embeddings"):
        prunable_budget(floor * 0.9, fl)
    assert prunable_budget(0.5, fl) == pytest.approx(0.5 * fl.total - fl.fixed)


def test_budget_type_and_seq_len_errors():
    with pytest.raises(TypeError, match="flops_keep"):
        check_flops_keep("0.5", encoder_flops(_cfg(), 8))
    with pytest.raises(ValueError, match="seq_len"):
        encoder_flops(_cfg(), 0)
