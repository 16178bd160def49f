"""SparseLinear as a drop-in for nn.Linear, its modes, state dict, and a short mask-training run."""
import pytest
import torch
from torch import nn

from sparsebert.nn import SparseLinear, encoder_linears, sparsify, sparsity_report
from sparsebert.ops import reference as R
from _helpers import assert_close


def test_same_constructor_and_state_dict_keys_as_linear():
    lin = nn.Linear(61, 97)
    sp = SparseLinear(61, 97)
    assert set(sp.state_dict()) == set(lin.state_dict())
    sp.load_state_dict(lin.state_dict())
    x = torch.randn(3, 37, 61)
    assert torch.equal(sp(x), lin(x))
    assert isinstance(sp, nn.Linear)


def test_from_linear_shares_parameters_and_masks():
    lin = nn.Linear(61, 97)
    m = torch.rand(97, 61) < 0.3
    sp = SparseLinear.from_linear(lin, mode="mask", mask=m)
    assert sp.weight is lin.weight and sp.bias is lin.bias
    assert set(sp.state_dict()) == {"weight", "bias", "mask"}
    x = torch.randn(5, 61)
    assert_close(sp(x), R.masked_linear(x.double(), lin.weight.double(), lin.bias.double(), m), torch.float32, "y")
    assert sp.sparsity() == pytest.approx(1 - m.float().mean().item())
    dense = sp.to_linear()
    assert torch.equal(dense(x), sp(x))


def test_mask_mode_keeps_pruned_weights_fixed_under_training():
    sp = SparseLinear(20, 10, mode="mask", mask=torch.rand(10, 20) < 0.5)
    before = sp.weight.detach().clone()
    opt = torch.optim.SGD(sp.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sp(torch.randn(8, 20)).pow(2).sum().backward()
        opt.step()
    pruned = ~sp.mask.bool()
    assert torch.equal(sp.weight.detach()[pruned], before[pruned])
    assert not torch.equal(sp.weight.detach()[~pruned], before[~pruned])


def test_scores_mode_state_dict_roundtrip_switches_mode():
    a = SparseLinear(16, 8, mode="scores", target_sparsity=0.5)
    b = SparseLinear(16, 8)
    b.load_state_dict(a.state_dict())
    assert b.mode == "scores" and torch.equal(b.scores, a.scores)
    c = SparseLinear(16, 8)
    c.load_state_dict(a.freeze_mask().state_dict())
    assert c.mode == "mask" and c.sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("how", ["magnitude", "constant", "kaiming"])
def test_score_init(how):
    sp = SparseLinear(16, 8, mode="scores", score_init=how, target_sparsity=0.25)
    if how == "magnitude":
        assert torch.equal(sp.scores.detach(), sp.weight.detach().abs())
    assert sp.scores.requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        SparseLinear(4, 4, mode="sparse")
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        SparseLinear(4, 4, mode="mask", mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparseLinear(4, 4, mode="scores", target_sparsity=1.5)
    with pytest.raises(ValueError, match="score_init must be one of"):
        SparseLinear(4, 4, mode="scores", score_init="zeros")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))


def _tiny_bert(num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification
    # Frozen random weights: a wide init so that masks alone can move the logits; no dropout noise.
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
                     vocab_size=50, max_position_embeddings=32, num_labels=num_labels, initializer_range=0.3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def test_mask_training_on_tiny_bert_lowers_loss_and_reaches_sparsity_exactly():
    torch.manual_seed(1)
    model = _tiny_bert()
    ids = torch.randint(1, 50, (16, 12))
    labels = (ids[:, 1] > 25).long()  # a rule the model can fit through its masks
    sparsify(model, mode="scores", target_sparsity=0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    scores = [m.scores for m in encoder_linears(model).values()]
    for s in scores:
        s.requires_grad_(True)
    opt = torch.optim.Adam(scores, lr=0.05)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    report = sparsity_report(model)
    for name, lin in encoder_linears(model).items():
        n = lin.weight.numel()
        assert int(lin.effective_mask().sum()) == n - round(0.5 * n), name
    assert report["overall"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("granularity", [("block", 4), "block:8", "2:4"])
def test_structured_granularity_scores_mode(granularity):
    sp = SparseLinear(64, 24, mode="scores", target_sparsity=0.5, granularity=granularity)
    x = torch.randn(5, 64)
    y = sp(x)
    m = sp.effective_mask()
    assert_close(y, R.masked_linear(x.double(), sp.weight.double(), sp.bias.double(), m), torch.float32, "y")
    if granularity == "2:4":
        assert torch.all(m.reshape(24, 16, 4).sum(-1) == 2)
    else:
        b = 4 if granularity == ("block", 4) else 8
        blocks = m.reshape(24 // b, b, 64 // b, b).float().mean((1, 3))
        assert torch.all((blocks == 0) | (blocks == 1)) and blocks.mean() == 0.5
    g = torch.randn_like(y)
    y.backward(g)
    # Straight-through: dScores = (dY^T X) * W, as at element granularity.
    assert_close(sp.scores.grad, (g.double().t() @ x.double()) * sp.weight.double(), torch.float32, "dscores")
    assert sp.freeze_mask().mode == "mask" and torch.equal(sp.mask.bool(), m)
    with pytest.raises(RuntimeError, match="set_target_sparsity"):
        SparseLinear(64, 24, mode="scores", granularity="2:4")(x)
