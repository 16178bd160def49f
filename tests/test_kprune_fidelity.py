"""Method fidelity of the structured pruners (issue 12): batch-size independence, FLOPs sequence length,
task heads and model families, Kwon et al. as published, Kprune ablations; regression end to end; the
`sparsebert kprune` CLI checks and atomic save; pruned-vs-dense and paired-comparison metrics."""
import json
import math
import types

import pytest
import torch
from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from sparsebert import eval as E
from sparsebert.data.tasks import Example
from sparsebert.data.tokenize import PaddingCollator, SimpleVocabTokenizer, TokenizedDataset
from sparsebert.flops import encoder_flops
from sparsebert.pruning import kwon as kwon_mod
from sparsebert.pruning.kprune import rebatch
from sparsebert.pruning.kwon import damped_scale_solve, swap_greedy_rearrange
from sparsebert.pruning.structured_api import format_report, prune_structured
from sparsebert.train import default_loss_fn, mse_loss

L, H, N, SEQ, V = 2, 4, 37, 12, 97
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=L, num_attention_heads=H, intermediate_size=N,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(num_labels=3, cls=BertForSequenceClassification, config=BertConfig, **kw):
    torch.manual_seed(0)
    m = cls(config(**COMMON, num_labels=num_labels, **kw)).eval()
    head = getattr(m, "classifier", None) or getattr(m, "qa_outputs")
    with torch.no_grad():
        for mod in head.modules():
            if isinstance(mod, torch.nn.Linear) and mod.out_features == num_labels:
                mod.weight.mul_(40)
    return m


def rows(n=24, seed=1, labels="class", pair=True):
    """Sequences with varied real lengths (right padding) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, SEQ), generator=g)
    lengths = torch.randint(5, SEQ + 1, (n,), generator=g)
    am = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = ids * am
    out = {"input_ids": ids, "attention_mask": am}
    if pair:
        out["token_type_ids"] = (torch.arange(SEQ)[None] >= (lengths[:, None] // 2)).long() * am
    if labels == "class":
        out["labels"] = torch.randint(0, 3, (n,), generator=g)
    elif labels == "regression":
        out["labels"] = torch.rand(n, generator=g) * 5
    elif labels == "qa":
        out["start_positions"] = torch.randint(0, 5, (n,), generator=g)
        out["end_positions"] = out["start_positions"] + 1
    return out


def batched(data, b):
    n = data["input_ids"].shape[0]
    return [{k: v[i:i + b] for k, v in data.items()} for i in range(0, n, b)]


# ------------------------------------------------------------------------------ 1. batch-size independence
def test_rebatch_is_independent_of_the_callers_batching():
    data = rows()
    a = rebatch(batched(data, 4), 32, 10**9)
    b = rebatch(batched(data, 7), 32, 10**9)
    assert len(a) == len(b) == 1
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k])
    # cut at the sequence that reaches num_tokens, whatever the batching
    tok = int(data["attention_mask"][:5].sum())
    c, d = rebatch(batched(data, 3), 2, tok), rebatch(batched(data, 8), 2, tok)
    assert sum(x["input_ids"].shape[0] for x in c) == sum(x["input_ids"].shape[0] for x in d) == 5


@pytest.mark.parametrize("method", ["kprune", "kwon"])
def test_masks_do_not_change_with_the_batch_size(method):
    model, data = tiny(), rows(n=40)
    reps = [prune_structured(model, batched(data, b), 0.6, method=method, num_tokens=10**9)[1] for b in (4, 8, 40)]
    for r in reps[1:]:
        assert r["head_mask"] == reps[0]["head_mask"]
        assert r["neurons_per_layer"] == reps[0]["neurons_per_layer"]


def test_callers_batching_changes_the_masks_without_the_fixed_knowledge_batch():
    """The defect being fixed: with the caller's batches (knowledge_batch_size / batch_size None) the
    predictive term's weight moves with B, and so do the masks; with the fixed batch of 32 they do not."""
    from sparsebert.pruning.kprune import kprune
    data = rows(n=40)

    def kp(b, kb):  # lam_rep where the two terms balance on this tiny model
        return kprune(tiny(), batched(data, b), 0.5, seq_len=SEQ, knowledge_batch_size=kb, lam_rep=1e-8,
                      num_tokens=10**9)[1]

    assert not torch.equal(kp(4, None), kp(40, None))
    assert torch.equal(kp(4, 32), kp(40, 32))
    kw = [kwon_mod.kwon_prune(tiny(), batched(data, b), 0.6, seq_len=SEQ, batch_size=None)[1] for b in (4, 40)]
    assert not torch.equal(kw[0] != 0, kw[1] != 0)


# ------------------------------------------------------------------------------ 2. FLOPs sequence length
def test_flops_use_the_average_length_by_default_and_max_on_request():
    model, data = tiny(), rows()
    avg = round(int(data["attention_mask"].sum()) / data["input_ids"].shape[0])
    _, rep = prune_structured(model, batched(data, 8), 0.7, method="kprune", num_tokens=10**9)
    assert rep["seq_len"] == avg and rep["seq_len_source"] == "sample average"
    assert rep["flops_dense"] == encoder_flops(model, avg).total
    _, rep = prune_structured(model, batched(data, 8), 0.7, method="kprune", seq_len="max", num_tokens=10**9)
    assert rep["seq_len"] == SEQ and rep["seq_len_source"] == "sample max"
    _, rep = prune_structured(model, batched(data, 8), 0.8, method="kcm", seq_len=20)
    assert rep["seq_len"] == 20 and rep["seq_len_source"] == "given"
    text = format_report(rep)
    assert "seq_len 20 (given)" in text and "budget 0.8" in text and "sequences" in text
    with pytest.raises(ValueError, match="seq_len"):
        prune_structured(model, batched(data, 8), 0.7, seq_len="mean")


# ------------------------------------------------------------------------------ 3. task heads, families
@pytest.mark.parametrize("method", ["kprune", "kwon"])
@pytest.mark.parametrize("head", ["single", "pair", "regression", "qa"])
def test_every_task_head_prunes_to_budget(method, head):
    if head == "qa":
        model, data = tiny(2, BertForQuestionAnswering), rows(labels="qa")
    elif head == "regression":
        model, data = tiny(1), rows(labels="regression")
    else:
        model, data = tiny(), rows(pair=head == "pair")
    pruned, rep = prune_structured(model, batched(data, 8), 0.6, method=method, seq_len=SEQ)
    assert rep["head_kind"] == {"qa": "qa", "regression": "regression"}.get(head, "classification")
    assert rep["flops_keep_reached"] <= 0.6 + 1e-9
    with torch.no_grad():
        out = pruned(**{k: data[k][:3] for k in ("input_ids", "attention_mask")})
    logits = out.start_logits if head == "qa" else out.logits
    assert torch.isfinite(logits).all()


def test_regression_predictive_knowledge_is_the_mse_to_the_teacher():
    from sparsebert.pruning.kprune import predictive_loss, teacher_targets
    z_t, z_s = torch.randn(5, 1), torch.randn(5, 1)
    t = teacher_targets("regression", types.SimpleNamespace(logits=z_t), 2.0)
    assert torch.allclose(predictive_loss("regression", types.SimpleNamespace(logits=z_s), t, 2.0),
                          ((z_s - z_t) ** 2).mean())
    s0, e0, s1, e1 = (torch.randn(3, 9) for _ in range(4))
    t = teacher_targets("qa", types.SimpleNamespace(start_logits=s0, end_logits=e0), 2.0)
    got = predictive_loss("qa", types.SimpleNamespace(start_logits=s1, end_logits=e1), t, 2.0)

    def kl(a, b):
        p, q = torch.softmax(a / 2, -1), torch.softmax(b / 2, -1)
        return (p * (p.log() - q.log())).sum(-1).mean() * 4

    assert torch.allclose(got, (kl(s0, s1) + kl(e0, e1)) / 2, atol=1e-6)


def test_roberta_prunes_and_unsupported_families_get_a_clear_error():
    model = tiny(cls=RobertaForSequenceClassification, config=RobertaConfig, pad_token_id=1)
    data = rows(pair=False)
    _, rep = prune_structured(model, batched(data, 8), 0.6, method="kprune", seq_len=SEQ)
    assert rep["flops_keep_reached"] <= 0.6 + 1e-9
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="supported families: bert, roberta, distilbert"):
        prune_structured(gpt2, batched(data, 8), 0.6)


# ------------------------------------------------------------------------------ 4. Kwon et al. as published
def test_kwon_requires_labels_unless_pseudo_labels_is_asked():
    model, data = tiny(), rows()
    del data["labels"]
    with pytest.raises(ValueError, match="needs labels"):
        prune_structured(model, batched(data, 8), 0.6, method="kwon", seq_len=SEQ)
    _, rep = prune_structured(model, batched(data, 8), 0.6, method="kwon", seq_len=SEQ, pseudo_labels=True)
    assert rep["config"]["pseudo_labels"] is True
    reg = rows(labels=None)
    with pytest.raises(ValueError, match="regression"):
        prune_structured(tiny(1), batched(reg, 8), 0.6, method="kwon", seq_len=SEQ, pseudo_labels=True)


def test_swap_greedy_keeps_the_count_and_never_beats_less_than_the_diagonal_choice():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = torch.randn(6, 9, generator=g) + torch.randn(1, 9, generator=g)
        fdiag = grads.pow(2).sum(0)
        keep = torch.ones(9, dtype=torch.bool)
        keep[torch.argsort(fdiag)[:4]] = False
        new = swap_greedy_rearrange(grads, keep)
        assert int((~new).sum()) == 4

        def cost(k):
            return (grads[:, ~k].sum(1) ** 2).sum()

        assert cost(new) <= cost(keep) + 1e-9


def test_damped_solve_is_lsmr_damp_toward_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, dtype=torch.float64, generator=g)
    y = torch.randn(50, dtype=torch.float64, generator=g)
    a, b = x.T @ x, x.T @ y
    got = damped_scale_solve(a, b, 1.0)
    d = got - 1  # minimiser of ||a d - (b - a 1)||^2 + ||d||^2: gradient zero
    grad = a.T @ (a @ d - (b - a.sum(1))) + d
    assert grad.abs().max() < 1e-9
    # damping -> 0: the plain least-squares solution
    assert torch.allclose(damped_scale_solve(a, b, 1e-9), torch.linalg.solve(a, b), atol=1e-6)
    assert torch.allclose(damped_scale_solve(a[:1, :1], b[:1], 1.0), b[:1] / a[0, 0])


def test_kwon_tuning_skips_layer0_attention_and_moves_toward_the_sqrt_teacher():
    from sparsebert.nn.structured import apply_masks
    model, data = tiny(), rows(n=32)
    bt = batched(data, 8)
    tuned, rep = prune_structured(model, bt, 0.5, method="kwon", seq_len=SEQ, damping=1e-3)
    plain, _ = prune_structured(model, bt, 0.5, method="kwon", seq_len=SEQ, tune=False)
    assert rep["tuning_stopped_at"] is None and rep["teacher_flops_keep"] == pytest.approx(0.5 ** 0.5)
    x = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad(), apply_masks(model, torch.tensor(rep["teacher_head_mask"]).float(),
                                      torch.tensor(rep["teacher_neuron_mask"]).float()):
        ref = model(**x).logits
    with torch.no_grad():
        assert (tuned(**x).logits - ref).pow(2).sum() < (plain(**x).logits - ref).pow(2).sum()
    # layer 0's attention keeps 0/1 values: its output projection equals the dense one's kept columns
    hm, _, _ = kwon_mod.kwon_prune(tiny(), bt, 0.5, seq_len=SEQ, damping=1e-3)
    assert set(hm[0].unique().tolist()) <= {0.0, 1.0}
    assert not set(hm[1].unique().tolist()) <= {0.0, 1.0}


def test_kwon_tuning_stops_when_scales_leave_the_range(monkeypatch):
    monkeypatch.setattr(kwon_mod, "damped_scale_solve", lambda a, b, damping=1.0: torch.full_like(b, 11.0))
    hm, nm, rep = kwon_mod.kwon_prune(tiny(), batched(rows(), 8), 0.6, seq_len=SEQ)
    assert rep["tuning_stopped_at"] == {"layer": 0, "sublayer": "ffn"}
    assert set(hm.unique().tolist()) <= {0.0, 1.0} and set(nm.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------ Kprune ablations
def test_kprune_ablations():
    model, bt = tiny(), batched(rows(), 8)
    base = prune_structured(model, bt, 0.6, seq_len=SEQ)[1]
    no_pred = prune_structured(model, bt, 0.6, seq_len=SEQ, predictive=False)[1]
    assert no_pred["head_mask"] == prune_structured(model, bt, 0.6, seq_len=SEQ, lam_pred=0.0)[1]["head_mask"]
    no_rep = prune_structured(model, bt, 0.6, seq_len=SEQ, representational=False)[1]
    assert no_rep["neurons_per_layer"] == prune_structured(model, bt, 0.6, seq_len=SEQ, lam_rep=0.0)[1]["neurons_per_layer"]
    oneshot = prune_structured(model, bt, 0.6, seq_len=SEQ, sublayerwise=False)[1]
    assert oneshot["flops_keep_reached"] <= 0.6 + 1e-9
    # one-shot = the representational ranking decided once: equal to rep-only one-shot
    assert oneshot["head_mask"] == prune_structured(model, bt, 0.6, seq_len=SEQ, sublayerwise=False,
                                                    predictive=False)[1]["head_mask"]
    for r in (base, no_pred, no_rep, oneshot):
        assert r["flops_keep_reached"] <= 0.6 + 1e-9
    w0 = model.bert.encoder.layer[0].output.dense.weight.clone()
    pruned, _ = prune_structured(model, bt, 0.6, seq_len=SEQ, weight_tuning=False)
    kept = pruned.bert.encoder.layer[0].output.dense.weight
    assert any(torch.equal(kept[:, j], w0[:, i]) for j in range(kept.shape[1]) for i in range(N))
    with pytest.raises(ValueError, match="at least one knowledge term"):
        prune_structured(model, bt, 0.6, seq_len=SEQ, predictive=False, representational=False)


def test_an_emptied_sublayer_drops_its_output_bias_as_the_authors_code():
    """The authors' code removes a sublayer left with no head/neuron and computes LayerNorm(h)
    (`utils/arch.py`: prune_sublayer); "keep" leaves LayerNorm(h + b), what the masked model computes."""
    model, bt = tiny(), batched(rows(), 8)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.5)
    logits = {}
    for mode in ("drop", "keep"):
        pruned, rep = prune_structured(model, bt, 0.08, seq_len=SEQ, empty_sublayer_bias=mode)
        empty = [(r["layer"], r["sublayer"]) for r in rep["sublayers"] if r["kept"] == 0]
        assert empty, "the budget should empty at least one sublayer"
        for i, kind in empty:
            layer = pruned.bert.encoder.layer[i]
            out = layer.attention.output.dense if kind == "mha" else layer.output.dense
            dense = model.bert.encoder.layer[i]
            dense_out = dense.attention.output.dense if kind == "mha" else dense.output.dense
            if mode == "drop":
                assert torch.count_nonzero(out.bias) == 0
            else:
                assert torch.equal(out.bias, dense_out.bias)
        logits[mode] = pruned(**{k: v for k, v in bt[0].items() if k != "labels"}).logits
    assert not torch.allclose(logits["drop"], logits["keep"])  # the choice reaches the pruned model's outputs
    with pytest.raises(ValueError, match="empty_sublayer_bias"):
        prune_structured(model, bt, 0.5, seq_len=SEQ, empty_sublayer_bias="zero")


def test_an_ffn_keeping_every_neuron_is_not_tuned_as_the_authors_code(monkeypatch):
    """`prune_neurons` returns before the tuning when no neuron is pruned (an MHA keeping every head is still
    tuned); tune_unpruned_ffn=True tunes it. Every unit is kept here (the selection forced), so only the rule
    decides what moves."""
    from sparsebert.pruning import kprune as kprune_mod
    monkeypatch.setattr(kprune_mod, "_threshold_keep", lambda scores, flops, budget: torch.ones_like(scores, dtype=torch.bool))
    model, bt = tiny(), batched(rows(), 8)
    dense = model.bert.encoder.layer
    for tune in (False, True):
        pruned, rep = prune_structured(model, bt, 0.5, seq_len=SEQ, tune_unpruned_ffn=tune)
        assert all(r["kept"] == r["total"] for r in rep["sublayers"])
        layers = pruned.bert.encoder.layer
        moved_ffn = [not torch.equal(layers[i].output.dense.weight, dense[i].output.dense.weight) for i in range(L)]
        moved_mha = [not torch.equal(layers[i].attention.output.dense.weight, dense[i].attention.output.dense.weight)
                     for i in range(1, L)]  # layer 0's MHA sees the teacher's own input: nothing to correct
        assert any(moved_mha)
        assert any(moved_ffn) if tune else not any(moved_ffn)


# ------------------------------------------------------------------------------ regression end to end
def test_float_labels_survive_tokenization_and_collation():
    exs = [Example("a b", "c", 3.8), Example("d", "e f", 1.25)]
    tok = SimpleVocabTokenizer.from_examples(exs)
    ds = TokenizedDataset.from_examples(exs, tok, 16)
    assert ds[0]["label"] == pytest.approx(3.8) and ds.labels.dtype == torch.float32
    batch = PaddingCollator(0)([ds[0], ds[1]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"][0].item() == pytest.approx(3.8)
    cls = TokenizedDataset.from_examples([Example("a", None, 2)], tok, 16)
    assert cls.labels.dtype == torch.long


def test_finetune_picks_mse_for_a_one_output_head():
    assert default_loss_fn(tiny(1)) is mse_loss
    assert default_loss_fn(tiny(3)) is not mse_loss
    assert mse_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)


def test_correlation_metrics():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 7.0])
    # by hand: dx = [-2,-1,0,1,2], dy = [-1.4,-2.4,0.6,-0.4,3.6]: cov 12, sxx 10, syy 21.2; ranks of y [2,1,4,3,5]
    assert E.pearson_corr(x, y) == pytest.approx(12 / math.sqrt(10 * 21.2))
    assert E.spearman_corr(x, y) == pytest.approx(0.8, abs=1e-9)
    assert E.spearman_corr(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660, abs=1e-4)
    p, t = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    # TP=2 TN=2 FP=1 FN=1: (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert E.matthews_corr(p, t) == pytest.approx(1 / 3)
    assert E.matthews_corr(t, t) == pytest.approx(1.0)


def test_scoring_a_regression_model_with_accuracy_is_an_error():
    model = tiny(1)
    data = rows(labels="regression")
    loader = batched(data, 8)
    with pytest.raises(ValueError, match="1 output"):
        E.evaluate(model, loader, metric="accuracy")
    out = E.evaluate(model, loader, metric="pearson")
    assert -1 <= out["value"] <= 1
    with pytest.raises(ValueError, match="regression"):
        E.evaluate(tiny(3), batched(rows(), 8), metric="spearman")


# ------------------------------------------------------------------------------ comparison metrics
def test_dense_agreement_and_paired_tests():
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    r = E.dense_agreement(p, q)
    assert r["agreement"] == pytest.approx(2 / 3)
    kl = (q * (q / p).log()).sum(1).mean().item()
    assert r["mean_kl"] == pytest.approx(kl)
    assert E.dense_agreement(q, q)["mean_kl"] == pytest.approx(0.0)
    a = torch.tensor([1] * 10 + [0] * 0 + [1] * 5, dtype=torch.bool)
    b = torch.tensor([0] * 10 + [1] * 5, dtype=torch.bool)
    m = E.mcnemar_test(a, b)
    assert (m["b10"], m["b01"]) == (10, 0) and m["p_value"] == pytest.approx(2 / 2 ** 10)
    assert E.mcnemar_test(a, a)["p_value"] == 1.0
    bs = E.paired_bootstrap(a, b, n_boot=500)
    assert bs["diff"] == pytest.approx(10 / 15) and bs["low"] > 0 and bs["p_value"] < 0.01
    same = E.paired_bootstrap(a, a, n_boot=100)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        E.mcnemar_test(a, b[:3])


# ------------------------------------------------------------------------------ the CLI
WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture
def model_dir(tmp_path):
    from transformers import BertTokenizer
    d = tmp_path / "model"
    model = tiny(3)
    model.save_pretrained(d)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(d)
    return d


def data_file(tmp_path, n=40, suffix=".tsv", labels=True):
    g = torch.Generator().manual_seed(0)

    def sent():
        k = int(torch.randint(3, 9, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, 40, (k,), generator=g))

    rows_ = [{"sentence1": sent(), "sentence2": sent(), **({"label": str(i % 3)} if labels else {})} for i in range(n)]
    p = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows_) + "\n")
    else:
        sep = "\t" if suffix == ".tsv" else ","
        cols = list(rows_[0])
        p.write_text("\n".join([sep.join(cols)] + [sep.join(r[c] for c in cols) for r in rows_]) + "\n")
    return p


def cli(*argv):
    """`sparsebert kprune ARGV` through this subcommand's own parser and run()."""
    import argparse

    from sparsebert.cli import kprune as sub
    parser = argparse.ArgumentParser(prog="sparsebert")
    sub.add_parser(parser.add_subparsers(dest="command"))
    return sub.run(parser.parse_args(["kprune", *argv]))


def test_cli_bad_arguments_are_one_line_errors_before_any_work(model_dir, tmp_path, capsys):
    data = data_file(tmp_path)
    base = ["--model", str(model_dir), "--flops-keep", "0.6"]
    cases = [
        (["--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o")], "file not found"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--max-length", "0"], "--max-length"),
        (["--data", str(data), "--out", str(data)], "--out"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--seq-len", "-3"], "--seq-len"),
        (["--data", "no_such_task", "--out", str(tmp_path / "o")], "load_task knows"),
    ]
    for argv, msg in cases:
        assert cli(*base, *argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_nan_weights(model_dir, tmp_path, capsys):
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        m.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    m.save_pretrained(model_dir)
    assert cli("--model", str(model_dir), "--data", str(data_file(tmp_path)), "--flops-keep", "0.6",
               "--out", str(tmp_path / "o")) == 2
    assert "NaN or inf" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_cli_prunes_the_users_labelled_file_and_reports(model_dir, tmp_path, capsys, suffix):
    out = tmp_path / "pruned"
    assert cli("--model", str(model_dir), "--data", str(data_file(tmp_path, suffix=suffix)), "--flops-keep", "0.6",
               "--out", str(out), "--method", "kwon", "--batch-size", "8") == 0
    text = capsys.readouterr().out
    assert "(sample average)" in text and "speedup: predicted" in text and "budget 0.6" in text
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["seq_len_source"] == "sample average" and rep["max_length"] == 128
    assert rep["predicted_speedup"] > 1 and rep["measured_speedup"] > 0
    from sparsebert.nn.structured import load_pruned
    assert load_pruned(str(out)).config.sparsebert_heads_per_layer == rep["heads_per_layer"]


def test_cli_kwon_on_unlabelled_data_needs_pseudo_labels(model_dir, tmp_path, capsys):
    data = data_file(tmp_path, labels=False)
    base = ["--model", str(model_dir), "--data", str(data), "--flops-keep", "0.6", "--method", "kwon"]
    assert cli(*base, "--out", str(tmp_path / "o")) == 2
    assert "--pseudo-labels" in capsys.readouterr().err
    assert cli(*base, "--out", str(tmp_path / "o"), "--pseudo-labels") == 0


def test_cli_passes_the_labels_to_kwon(model_dir, tmp_path, monkeypatch):
    seen = {}
    import sparsebert.pruning.structured_api as api
    real = api.prune_structured

    def spy(model, batches, *a, **kw):
        seen["labels"] = [b.get("labels") for b in batches]
        return real(model, batches, *a, **kw)

    monkeypatch.setattr(api, "prune_structured", spy)
    assert cli("--model", str(model_dir), "--data", str(data_file(tmp_path)), "--flops-keep", "0.6",
               "--method", "kwon", "--out", str(tmp_path / "o")) == 0
    labels = torch.cat(seen["labels"])
    assert labels.dtype == torch.long and sorted(labels.tolist()) == sorted([i % 3 for i in range(40)])


def test_atomic_save_keeps_the_old_model_when_the_write_fails(tmp_path):
    from sparsebert.cli.kprune import save_atomically
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")

    def bad(tmp):
        (tmp / "config.json").write_text("new")
        raise KeyboardInterrupt  # a kill in the middle of the save

    with pytest.raises(KeyboardInterrupt):
        save_atomically(bad, out)
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    save_atomically(lambda tmp: (tmp / "config.json").write_text("new"), out)
    assert (out / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


# ------------------------------------------------------------------------------ resolved method options
def test_method_options_name_every_default_and_reproduce_the_default_call():
    """`method_options(m)` is what a cache keys a result by: every option with the value the call uses.
    Passing it back must give the same pruned model as passing nothing, and a changed default must change it."""
    from sparsebert.pruning.kprune import KpruneConfig
    from sparsebert.pruning.structured_api import method_options
    kp = method_options("kprune")
    assert kp["empty_sublayer_bias"] == KpruneConfig.empty_sublayer_bias == "drop"
    assert kp["tune_unpruned_ffn"] is False and "num_tokens" not in kp and "progress" not in kp
    assert method_options("kprune", mu=8.0)["mu"] == 8.0 and method_options("kprune")["mu"] == 64.0
    assert set(method_options("kcm")) == {"kernel_tokens", "seed"}
    assert method_options("kwon")["latency_search_variant"] == "corrected"
    json.dumps([method_options(m) for m in ("kprune", "kwon", "kcm")])  # a cache key must serialize
    model, data = tiny(), rows(n=40)
    for method, keep in (("kprune", 0.6), ("kwon", 0.6), ("kcm", 0.8)):  # KCM: FFN only, attention is 0.68 here
        plain = prune_structured(model, batched(data, 8), keep, method=method, num_tokens=10**9)[1]
        explicit = prune_structured(model, batched(data, 8), keep, method=method, num_tokens=10**9,
                                    **method_options(method))[1]
        assert explicit["head_mask"] == plain["head_mask"]
        assert explicit["neurons_per_layer"] == plain["neurons_per_layer"]
    with pytest.raises(TypeError, match="unknown kprune option.*'damping'"):
        method_options("kprune", damping=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        method_options("magnitude")
