"""Issue 12, remaining parts: DistilBERT through the family table (masks, remove_pruned, save/load, FLOPs, the
three pruners) and Kwon et al.'s latency-constrained search with a latency lookup table."""
import argparse
import copy
import json

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification)

import sparsebert.latency as lat
from sparsebert.flops import encoder_flops, masked_flops
from sparsebert.latency import LatencyTable, fit_piecewise_linear, sublayer_latency_table
from sparsebert.nn.structured import apply_masks, load_pruned, remove_pruned, save_pruned, structure_of
from sparsebert.pruning.kwon import latency_search, mask_search
from sparsebert.pruning.structured_api import format_report, prune_structured

L, H, N, D, SEQ, V = 2, 4, 37, 32, 12, 97


def distil(num_labels=3, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=V, dim=D, n_layers=L, n_heads=H, hidden_dim=N, max_position_embeddings=64,
                           num_labels=num_labels, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    m = DistilBertForSequenceClassification(cfg).to(dtype).eval()
    with torch.no_grad():
        m.classifier.weight.mul_(40)
    return m


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)).eval()


def sample(n=24, seed=1, b=8):
    """Batches with varied real lengths, token_type_ids (DistilBERT takes none: they must be dropped) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, SEQ), generator=g)
    lengths = torch.randint(5, SEQ + 1, (n,), generator=g)
    am = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    data = {"input_ids": ids * am, "attention_mask": am, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 3, (n,), generator=g)}
    return [{k: v[i:i + b] for k, v in data.items()} for i in range(0, n, b)]


def inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": am}


def random_masks(seed=0):
    """Real-valued masks with zeros; layer 0 loses every head, layer 1 every neuron."""
    g = torch.Generator().manual_seed(seed)
    hm = torch.rand(L, H, generator=g) + 0.5
    nm = torch.rand(L, N, generator=g) + 0.5
    hm[0] = 0
    hm[1, 1] = 0
    nm[1] = 0
    nm[0, torch.randperm(N, generator=g)[:15]] = 0
    return hm, nm


# ------------------------------------------------------------------------------ DistilBERT
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_distilbert_masked_output_equals_the_physically_pruned_model(dtype, tol):
    model = distil(dtype=dtype)
    hm, nm = random_masks()
    x = inputs()
    with torch.no_grad(), apply_masks(model, hm.to(dtype), nm.to(dtype)):
        want = model(**x).logits
    pruned = remove_pruned(copy.deepcopy(model), hm, nm)
    assert structure_of(pruned) == ([0, 3], [22, 0])
    with torch.no_grad():
        got = pruned(**x).logits
        dense = model(**x).logits
    assert not torch.allclose(want, dense, atol=1e-3)  # the masks do act
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_distilbert_mask_gradients_flow_to_the_masks():
    model = distil()
    hm = torch.ones(L, H, requires_grad=True)
    nm = torch.ones(L, N, requires_grad=True)
    with apply_masks(model, hm, nm):
        model(**inputs()).logits.pow(2).sum().backward()
    assert hm.grad.abs().sum() > 0 and nm.grad.abs().sum() > 0


def test_distilbert_pruned_model_saves_and_loads(tmp_path):
    model = distil()
    hm, nm = random_masks(1)
    pruned = remove_pruned(copy.deepcopy(model), hm, nm)
    save_pruned(pruned, str(tmp_path / "p"))
    back = load_pruned(str(tmp_path / "p"))
    assert structure_of(back) == structure_of(pruned)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs()).logits, pruned(**inputs()).logits)


def test_distilbert_flops_match_a_hand_count():
    fl = encoder_flops(distil(), SEQ)
    d_h = D // H
    per_head = 3 * 2 * SEQ * D * d_h + 2 * SEQ * SEQ * d_h + 2 * SEQ * SEQ * d_h + 2 * SEQ * d_h * D
    per_neuron = 2 * SEQ * D + 2 * SEQ * D
    fixed = 7 * SEQ * D + L * 14 * SEQ * D + 2 * D * D + 2 * D * 3
    assert (fl.per_head, fl.per_neuron, fl.fixed) == (per_head, per_neuron, fixed) == (29184, 1536, 15680)
    assert fl.total == fixed + L * H * per_head + L * N * per_neuron
    hm, nm = random_masks()
    pruned = remove_pruned(distil(), hm, nm)
    assert encoder_flops(pruned, SEQ).total == masked_flops(fl, hm, nm) == fixed + 3 * per_head + 22 * per_neuron


@pytest.mark.parametrize("method", ["kprune", "kwon", "kcm"])
def test_every_method_prunes_distilbert_under_the_budget(method):
    model = distil()
    keep = 0.75 if method == "kcm" else 0.6
    pruned, rep = prune_structured(model, sample(), keep, method=method, seq_len=SEQ)
    assert rep["flops_keep_reached"] <= keep + 1e-9
    assert rep["flops_keep_reached"] > keep - 0.1
    assert list(structure_of(pruned)) == [rep["heads_per_layer"], rep["neurons_per_layer"]]
    with torch.no_grad():
        assert torch.isfinite(pruned(**inputs()).logits).all()


def test_unsupported_families_are_refused_naming_the_supported_ones():
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=64))
    with pytest.raises(ValueError, match="supported families: bert, roberta, distilbert"):
        prune_structured(gpt2, sample(), 0.6)
    with pytest.raises(TypeError, match="distilbert"):
        structure_of(gpt2)


# ------------------------------------------------------------------------------ latency table
def piecewise_lut(units, c, t, slope, empty):
    """lut[n] for n = 0..units: ``empty`` at 0, ``c`` up to t units, then + slope per unit."""
    return torch.tensor([empty] + [c + slope * max(0, n - t) for n in range(1, units + 1)], dtype=torch.float64)


def test_fit_recovers_an_exact_piecewise_linear_table():
    lut = piecewise_lut(12, 2.0, 4, 0.5, 0.3)
    f = fit_piecewise_linear(lut[1:])
    assert f.threshold == 4 and abs(f.c - 2.0) < 1e-12 and abs(f.slope - 0.5) < 1e-12
    flat = fit_piecewise_linear(torch.full((5,), 1.5, dtype=torch.float64))
    assert flat.slope == 0 and abs(flat.c - 1.5) < 1e-12
    with pytest.raises(ValueError, match="lut"):
        fit_piecewise_linear([1.0, float("nan")])


def _fake_timer(calls):
    def fake(fn, device, warmup, iters):
        calls.append(1)
        return 1.0 + 0.01 * len(calls)
    return fake


def test_table_cache_is_reused_and_invalidated_by_a_changed_key(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lat, "_time_ms", _fake_timer(calls))
    model = bert()
    t1 = sublayer_latency_table(model, 4, 8, cache_dir=tmp_path, grid_points=5)
    n_entries = (H + 1) + 5
    assert len(calls) == n_entries and not t1.from_cache
    assert t1.mha_lut().shape == (H + 1,) and t1.ffn_lut().shape == (N + 1,)
    t2 = sublayer_latency_table(model, 4, 8, cache_dir=tmp_path, grid_points=5)
    assert len(calls) == n_entries and t2.from_cache and t2.mha_ms == t1.mha_ms and t2.ffn_grid_ms == t1.ffn_grid_ms
    # another sequence length, batch or thread count is another key: measured again
    sublayer_latency_table(model, 4, 9, cache_dir=tmp_path, grid_points=5)
    assert len(calls) == 2 * n_entries
    old = torch.get_num_threads()
    torch.set_num_threads(old + 1)
    try:
        assert not sublayer_latency_table(model, 4, 8, cache_dir=tmp_path, grid_points=5).from_cache
    finally:
        torch.set_num_threads(old)
    # a file whose stored key differs (another torch) is never reused
    data = json.loads(open(t1.path).read())
    data["key"]["torch"] = "0.0.0"
    open(t1.path, "w").write(json.dumps(data))
    t3 = sublayer_latency_table(model, 4, 8, cache_dir=tmp_path, grid_points=5)
    assert not t3.from_cache and json.loads(open(t1.path).read())["key"]["torch"] == torch.__version__
    with pytest.raises(ValueError, match="batch_size"):
        sublayer_latency_table(model, 0, 8, cache_dir=tmp_path)


def test_ffn_table_interpolates_between_grid_points():
    t = LatencyTable({}, [0.0] * (H + 1), [0, 10, 37], [1.0, 2.0, 4.7])
    lut = t.ffn_lut()
    assert lut.shape == (38,)
    torch.testing.assert_close(lut[[0, 5, 10, 37]], torch.tensor([1.0, 1.5, 2.0, 4.7], dtype=torch.float64))
    assert t.estimate([H, 0], [10, 37]) == pytest.approx(0 + 0 + 2.0 + 4.7)


def test_measured_table_is_monotonic_ish(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=512)
    t = sublayer_latency_table(cfg, 8, 64, cache_dir=tmp_path, grid_points=3, warmup=2, iters=7)
    mha, ffn = t.mha_lut(), t.ffn_lut()
    assert mha.shape == (5,) and ffn.shape == (513,)
    assert bool((mha > 0).all()) and bool((ffn > 0).all())
    assert mha[4] > mha[0] and ffn[512] > ffn[0]
    assert t.key["device_type"] == "cpu" and t.key["threads"] == torch.get_num_threads()


# ------------------------------------------------------------------------------ latency search
def _kept_importance(fh, fn, kh, kn):
    return float(fh[kh].sum() + fn[kn].sum())


@pytest.mark.parametrize("variant", ["corrected", "authors"])
def test_latency_search_meets_the_budget_on_a_stubbed_table(variant):
    g = torch.Generator().manual_seed(0)
    Lx, Hx, Nx = 4, 6, 20
    mha = piecewise_lut(Hx, 1.0, 2, 0.25, 0.05)
    ffn = piecewise_lut(Nx, 0.8, 5, 0.06, 0.05)
    dense = Lx * float(mha[Hx] + ffn[Nx])
    prev = -1.0
    if variant == "authors":  # its cumulative budget leaves nothing feasible when (0, 0) drops do not fit
        with pytest.raises(ValueError, match="no mask fits"):
            latency_search(torch.rand(Lx, Hx, generator=g), torch.rand(Lx, Nx, generator=g), mha, ffn, 0.3, variant)
    for keep in ((0.3, 0.45, 0.6, 0.8, 0.95) if variant == "corrected" else (0.6, 0.8, 0.95)):
        fh, fn = torch.rand(Lx, Hx, generator=g), torch.rand(Lx, Nx, generator=g)
        kh, kn = latency_search(fh, fn, mha, ffn, keep, variant)
        used = sum(float(mha[int(k)]) for k in kh.sum(1)) + sum(float(ffn[int(k)]) for k in kn.sum(1))
        if variant == "authors":  # the authors count 0 for a removed sublayer
            used -= float(mha[0]) * int((kh.sum(1) == 0).sum()) + float(ffn[0]) * int((kn.sum(1) == 0).sum())
        assert used <= keep * dense + 1e-9, (keep, used)
        assert used > 0
    # same importance: more budget never keeps less
    fh, fn = torch.rand(Lx, Hx, generator=g), torch.rand(Lx, Nx, generator=g)
    for keep in (0.3, 0.5, 0.7, 0.9):
        kh, kn = latency_search(fh, fn, mha, ffn, keep, "corrected")
        imp = _kept_importance(fh, fn, kh, kn)
        assert imp >= prev - 1e-12
        prev = imp


def test_latency_search_with_a_linear_table_is_at_least_the_flops_search():
    """lut[n] = a * n is a per-unit cost: the latency search must reach the FLOPs search's importance."""
    g = torch.Generator().manual_seed(1)
    Lx, Hx, Nx = 3, 4, 16
    a_h, a_n = 3.0, 0.5
    mha = torch.arange(Hx + 1, dtype=torch.float64) * a_h
    ffn = torch.arange(Nx + 1, dtype=torch.float64) * a_n
    for keep in (0.25, 0.5, 0.75):
        fh, fn = torch.rand(Lx, Hx, generator=g) ** 3, torch.rand(Lx, Nx, generator=g) ** 3
        kh, kn = latency_search(fh, fn, mha, ffn, keep)
        budget = keep * Lx * (Hx * a_h + Nx * a_n)
        assert float(kh.sum()) * a_h + float(kn.sum()) * a_n <= budget + 1e-9
        fkh, fkn = mask_search(fh, fn, a_h, a_n, budget)
        assert _kept_importance(fh, fn, kh, kn) >= _kept_importance(fh, fn, fkh, fkn) - 1e-9


def test_latency_search_rejects_bad_arguments():
    fh, fn = torch.rand(2, H), torch.rand(2, N)
    mha, ffn = piecewise_lut(H, 1.0, 1, 0.1, 0.0), piecewise_lut(N, 1.0, 1, 0.1, 0.0)
    with pytest.raises(ValueError, match="latency_keep"):
        latency_search(fh, fn, mha, ffn, 1.0)
    with pytest.raises(ValueError, match="mha_lut"):
        latency_search(fh, fn, mha[:-1], ffn, 0.5)
    with pytest.raises(ValueError, match="variant"):
        latency_search(fh, fn, mha, ffn, 0.5, "fast")
    with pytest.raises(ValueError, match="no mask fits"):
        latency_search(fh, fn, piecewise_lut(H, 1.0, 1, 0.1, 5.0), piecewise_lut(N, 1.0, 1, 0.1, 5.0), 0.05)


def test_prune_structured_latency_budget_validation():
    with pytest.raises(ValueError, match="only available with method='kwon'"):
        prune_structured(distil(), sample(), method="kprune", latency_keep=0.5)
    with pytest.raises(ValueError, match="exactly one budget"):
        prune_structured(distil(), sample(), 0.5, method="kwon", latency_keep=0.5)
    with pytest.raises(ValueError, match="latency_keep"):
        prune_structured(distil(), sample(), method="kwon", latency_keep=1.5, seq_len=SEQ)


def test_kwon_with_a_stubbed_table_meets_the_latency_budget():
    mha = piecewise_lut(H, 1.0, 1, 0.3, 0.1)
    ffn = piecewise_lut(N, 0.5, 4, 0.05, 0.1)
    table = LatencyTable({"batch_size": 2, "seq_len": SEQ, "device": "stub", "dtype": "float32", "threads": 1},
                         mha.tolist(), list(range(N + 1)), ffn.tolist())
    pruned, rep = prune_structured(distil(), sample(), method="kwon", latency_keep=0.5, seq_len=SEQ,
                                   latency_table=table)
    dense = L * float(mha[H] + ffn[N])
    assert rep["latency"]["dense_ms_table"] == pytest.approx(dense)
    assert rep["latency"]["pruned_ms_table"] <= 0.5 * dense + 1e-9
    assert table.estimate(*structure_of(pruned)) == pytest.approx(rep["latency"]["pruned_ms_table"])
    assert rep["latency"]["measured_ms_pruned"] > 0 and rep["latency"]["measured_ms_dense"] > 0
    assert rep["flops_keep_target"] is None and "latency budget 0.5" in format_report(rep)


def test_kwon_latency_tiny_real_run_measures_and_then_reuses_the_table(tmp_path):
    _, rep = prune_structured(distil(), sample(), method="kwon", latency_keep=0.5, seq_len=SEQ,
                              latency_cache_dir=str(tmp_path), latency_batch_size=4)
    info = rep["latency"]
    assert not info["table_from_cache"] and info["table_key"]["batch_size"] == 4
    assert info["table_key"]["seq_len"] == SEQ and info["pruned_ms_table"] < info["dense_ms_table"]
    assert info["pruned_ms_fit"] > 0 and info["measured_ms_pruned"] > 0
    _, rep2 = prune_structured(distil(), sample(), method="kwon", latency_keep=0.5, seq_len=SEQ,
                               latency_cache_dir=str(tmp_path), latency_batch_size=4)
    assert rep2["latency"]["table_from_cache"] and rep2["heads_per_layer"] == rep["heads_per_layer"]


# ------------------------------------------------------------------------------ CLI
def _cli_args(*argv):
    from sparsebert.cli import kprune as sub
    parser = argparse.ArgumentParser(prog="sparsebert")
    sub.add_parser(parser.add_subparsers(dest="command"))
    return sub, parser.parse_args(["kprune", *argv])


@pytest.mark.parametrize("argv,msg", [
    (["--flops-keep", "0.5", "--latency-keep", "0.5", "--method", "kwon"], "exactly one budget"),
    ([], "exactly one budget"),
    (["--latency-keep", "0.5"], "only with --method kwon"),
    (["--latency-keep", "1.5", "--method", "kwon"], "--latency-keep"),
    (["--latency-keep", "0.5", "--method", "kwon", "--latency-batch-size", "0"], "--latency-batch-size"),
])
def test_cli_latency_flag_checks(tmp_path, argv, msg):
    sub, args = _cli_args("--model", str(tmp_path), "--data", "x.tsv", "--out", str(tmp_path / "o"), *argv)
    with pytest.raises(sub.UsageError, match=msg):
        sub.check_args(args)
