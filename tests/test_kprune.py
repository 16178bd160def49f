"""Kprune, Kwon et al. and KCM through prune_structured, on a tiny random BERT."""
import itertools

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.flops import encoder_flops
from sparsebert.nn.structured import structure_of
from sparsebert.pruning.kcm import convex_merge, representative_ranking
from sparsebert.pruning.kwon import mask_search, rearrange_layer
from sparsebert.pruning.structured_api import prune_structured

L, H, N, SEQ = 2, 4, 37, 12


def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    m = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # peaked predictions, so that the KL to the teacher is informative
        m.classifier.weight.mul_(40)
    return m


def sample(n_batches=4, b=6):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, 97, (b, SEQ), generator=g)
        am = torch.ones_like(ids)
        am[0, SEQ - 3:] = 0
        out.append(dict(input_ids=ids, attention_mask=am, labels=torch.randint(0, 3, (b,), generator=g)))
    return out


def hidden_error(teacher, student, batches):
    """Squared error of the last hidden states on the real tokens (what the pruned model must keep)."""
    tot = 0.0
    with torch.no_grad():
        for bt in batches:
            x = {k: bt[k] for k in ("input_ids", "attention_mask")}
            keep = bt["attention_mask"].bool()
            a = teacher.base_model(**x).last_hidden_state[keep]
            b = student.base_model(**x).last_hidden_state[keep]
            tot += (a - b).pow(2).sum().item()
    return tot


@pytest.mark.parametrize("method", ["kprune", "kwon", "kcm"])
def test_budget_is_met_and_model_is_smaller(method):
    model, data = tiny(), sample()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = 0.75
    pruned, rep = prune_structured(model, data, keep, method=method, seq_len=SEQ, num_tokens=10_000)
    fl = encoder_flops(model, SEQ)
    assert rep["flops_keep_reached"] <= keep + 1e-9
    slack = (L * fl.per_neuron if method == "kcm" else fl.per_head) / fl.total
    assert keep - rep["flops_keep_reached"] < slack
    heads, neurons = structure_of(pruned)
    assert heads == rep["heads_per_layer"] and neurons == rep["neurons_per_layer"]
    assert encoder_flops(pruned, SEQ).total / fl.total == pytest.approx(rep["flops_keep_reached"])
    for k, v in model.state_dict().items():  # inplace=False leaves the input model alone
        assert torch.equal(v, before[k]), k
    assert set(rep["phase_seconds"]) and rep["prune_seconds"] > 0


def test_kprune_weight_tuning_preserves_knowledge():
    model, data = tiny(), sample()
    tuned, _ = prune_structured(model, data, 0.5, method="kprune", seq_len=SEQ)
    plain, _ = prune_structured(model, data, 0.5, method="kprune", seq_len=SEQ, weight_tuning=False)
    assert hidden_error(model, tuned, data) < hidden_error(model, plain, data)


def test_kprune_lower_budget_prunes_more():
    model, data = tiny(), sample()
    counts = []
    for keep in (0.8, 0.5, 0.3):
        _, rep = prune_structured(model, data, keep, method="kprune", seq_len=SEQ)
        counts.append(sum(rep["heads_per_layer"]) * 1000 + sum(rep["neurons_per_layer"]))
        assert rep["flops_keep_reached"] <= keep
    assert rep["config"]["mu"] == 64.0 and rep["config"]["lam_rep"] == 2.5e-4


def test_kwon_mask_tuning_reduces_error():
    # as published, the tuning fits the model masked at flops_keep ** 1/2 (not the dense one), with the
    # last FFN on [CLS] only and damping 1 (negligible pull on this tiny sample: weak damping here)
    from sparsebert.nn.structured import apply_masks
    model, data = tiny(), sample()
    tuned, rep = prune_structured(model, data, 0.5, method="kwon", seq_len=SEQ, damping=1e-3)
    plain, _ = prune_structured(model, data, 0.5, method="kwon", seq_len=SEQ, tune=False)
    err_t = err_p = 0.0
    with torch.no_grad():
        for bt in data:
            x = {k: bt[k] for k in ("input_ids", "attention_mask")}
            with apply_masks(model, torch.tensor(rep["teacher_head_mask"]).float(),
                             torch.tensor(rep["teacher_neuron_mask"]).float()):
                ref = model(**x).logits
            err_t += (tuned(**x).logits - ref).pow(2).sum().item()
            err_p += (plain(**x).logits - ref).pow(2).sum().item()
    assert err_t < err_p


def test_kwon_mask_search_is_optimal_by_brute_force():
    g = torch.Generator().manual_seed(3)
    fh, fn = torch.rand(2, 2, generator=g), torch.rand(2, 3, generator=g)
    ph, pn, budget = 5.0, 2.0, 13.0
    best = -1.0
    for kh in itertools.product([0, 1], repeat=4):
        for kn in itertools.product([0, 1], repeat=6):
            if sum(kh) * ph + sum(kn) * pn <= budget:
                best = max(best, float((fh.flatten() * torch.tensor(kh)).sum() + (fn.flatten() * torch.tensor(kn)).sum()))
    keep_h, keep_n = mask_search(fh, fn, ph, pn, budget)
    assert keep_h.sum() * ph + keep_n.sum() * pn <= budget
    assert float(fh[keep_h].sum() + fn[keep_n].sum()) == pytest.approx(best)


def test_kwon_rearrangement_never_worse():
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(20, 9, generator=g, dtype=torch.float64)
    grads[:, 3] = grads[:, 2]  # correlated units: pruning both is costly
    F_ = grads.T @ grads
    keep = torch.ones(9, dtype=torch.bool)
    keep[F_.diagonal().argsort()[:4]] = False
    new = rearrange_layer(F_, keep)
    assert int((~new).sum()) == 4
    z_new, z_old = (~new).double(), (~keep).double()
    assert z_new @ F_ @ z_new <= z_old @ F_ @ z_old + 1e-12


def test_kcm_ranking_and_merge():
    # neurons 0..3 distinct; neuron 4 duplicates neuron 1 (twice its activation)
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(50, 4, generator=g, dtype=torch.float64)
    acts = torch.cat([acts, 2 * acts[:, 1:2]], 1)
    K = torch.eye(5, dtype=torch.float64)
    K[1, 4] = K[4, 1] = 0.9
    order = representative_ranking(K, 4)
    assert 4 not in order.tolist() or 1 not in order.tolist()  # the pair is represented once
    kept = torch.tensor([0, 1, 2, 3])
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    merged = convex_merge(w, acts, K, kept)
    torch.testing.assert_close(acts @ merged.T, acts @ w.T)  # exact: the duplicate is reconstructed
    assert torch.all(merged[:, 4] == 0)


def test_kcm_infeasible_budget_and_api_errors():
    model, data = tiny(), sample()
    with pytest.raises(ValueError, match="KCM prunes FFN neurons only"):
        prune_structured(model, data, 0.1, method="kcm", seq_len=SEQ)
    with pytest.raises(ValueError, match="method"):
        prune_structured(model, data, 0.5, method="magnitude")
    for bad in (0.0, 1.0, -1.0, 1e-4):
        with pytest.raises(ValueError, match="flops_keep"):
            prune_structured(model, data, bad, method="kprune", seq_len=SEQ)
    with pytest.raises(TypeError, match="unknown Kprune option"):
        prune_structured(model, data, 0.5, method="kprune", seq_len=SEQ, lambda_pred=1.0)


def test_kprune_tuning_ridge_interpolates_to_untuned():
    model, data = tiny(), sample()
    plain, _ = prune_structured(model, data, 0.5, method="kprune", seq_len=SEQ, weight_tuning=False)
    stiff, _ = prune_structured(model, data, 0.5, method="kprune", seq_len=SEQ, tuning_ridge=1e9)
    assert structure_of(plain) == structure_of(stiff)
    for (k, a), (_, b) in zip(plain.state_dict().items(), stiff.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
