"""SRNet fidelity (issue 11): HANS scoring rule, source model vs mask-training loss, paradigm (b) with
mask-training masks, the OOD-informed setting with disjoint HANS-style parts, the FEVER claim-only bias
model, teacher records, accuracy baselines, bootstrap CIs, and the overlap-biased PAWS-QQP subset."""
import collections
import json

import pytest
import torch

from sparsebert.data import (
    Example, generate_hans_style, load_fever_symmetric, load_task, mnli_to_hans_preds, overlap_biased_split, word_overlap,
)
from sparsebert.data.hans_style import SUBCASES, part_patterns
from sparsebert.data.tasks import default_data_dir
from sparsebert.debias import ClaimWordsFeaturizer, cross_fit_bias_probs, fit_bias_model, make_featurizer
from sparsebert.eval import bootstrap_ci, bootstrap_diff_ci, classification_summary
from sparsebert.pruning.paradigms import masks_from_state
from sparsebert.pruning.srnet import Runner, SRNetConfig, expand_grid, load_data, ood_training_examples
from sparsebert.report import markdown_table, summarize

from pathlib import Path

FIX = Path(__file__).parent / "fixtures"
BASE = dict(task="synthetic", model="tiny", max_train=64, max_eval=32, max_ood=32, batch_size=16, max_length=32,
            epochs=1.0, lr=1e-3, lr_scores=5e-2, eval_points=1)


def _need(rel):
    if not (default_data_dir() / rel).is_file():
        pytest.skip(f"data file {rel} not available")


# ------------------------------------------------------------------------------------------ 1. HANS rule
def test_hans_rules_disagree_on_a_flat_output():
    probs = torch.tensor([[0.40, 0.35, 0.25],   # flat: argmax entailment; summed .60 -> non-entailment
                          [0.30, 0.45, 0.25],   # neutral wins: non-entailment under both rules
                          [0.20, 0.10, 0.70],   # contradiction wins: non-entailment under both
                          [0.60, 0.30, 0.10]])  # entailment under both
    assert mnli_to_hans_preds(probs).tolist() == [0, 1, 1, 0]
    assert mnli_to_hans_preds(probs, "sum").tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="rule"):
        mnli_to_hans_preds(probs, "max")
    with pytest.raises(ValueError, match="last dim 3"):
        mnli_to_hans_preds(torch.ones(2, 2) / 2)


# -------------------------------------------------------------------------- baselines and bootstrap CIs
def test_classification_summary_hand_computed():
    labels = torch.tensor([1, 1, 1, 0, 0])
    s = classification_summary(torch.tensor([1, 0, 1, 0, 1]), labels, 2)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert s["majority_accuracy"] == pytest.approx(3 / 5)
    assert s["constant_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))  # always 1: tp 3, fp 2, fn 0
    assert not s["one_class"] and s["pred_counts"] == [2, 3]
    flat = classification_summary(torch.ones(5, dtype=torch.long), labels, 2)
    assert flat["one_class"] and flat["accuracy"] == pytest.approx(flat["majority_accuracy"])
    three = classification_summary(torch.tensor([0, 2, 2]), torch.tensor([0, 1, 2]), 3)
    assert three["f1"] is None and three["constant_f1"] is None and three["majority_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_summary(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)


def test_bootstrap_ci():
    ones = bootstrap_ci([torch.ones(20), torch.ones(20)], n_boot=200)
    assert ones["mean"] == ones["low"] == ones["high"] == 1.0
    g = torch.Generator().manual_seed(0)
    seeds = [(torch.rand(400, generator=g) < 0.7).float() for _ in range(3)]
    ci = bootstrap_ci(seeds, n_boot=500, seed=1)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["n_seeds"] == 3 and ci["n_examples"] == 400
    assert ci == bootstrap_ci(seeds, n_boot=500, seed=1)
    assert 0.6 < ci["low"] and ci["high"] < 0.8
    small = bootstrap_ci([s[:40] for s in seeds], n_boot=500, seed=1)
    assert small["high"] - small["low"] > ci["high"] - ci["low"]  # fewer examples, wider interval
    # seeds that disagree widen the interval beyond the examples' own spread
    spread = bootstrap_ci([torch.ones(400), torch.zeros(400)], n_boot=500)
    assert spread["low"] < 0.1 and spread["high"] > 0.9
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ci([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="0/1"):
        bootstrap_ci([torch.tensor([0.5, 1.0])])



def test_bootstrap_diff_ci_is_paired_by_seed_and_example():
    g = torch.Generator().manual_seed(2)
    base = [(torch.rand(500, generator=g) < 0.6).float() for _ in range(3)]
    # b = a with 10% of the examples flipped to wrong: the paired difference is known exactly per seed
    flip = torch.rand(500, generator=g) < 0.1
    worse = [torch.where(flip, torch.zeros_like(a), a) for a in base]
    d = bootstrap_diff_ci(base, worse, n_boot=500, seed=3)
    exact = sum(float(a.mean() - w.mean()) for a, w in zip(base, worse)) / 3
    assert d["mean"] == pytest.approx(exact) and 0 < d["low"] <= d["mean"] <= d["high"]
    # pairing: the same difference between unpaired models (independent draws) has a far wider interval
    other = [(torch.rand(500, generator=g) < 0.6 - exact).float() for _ in range(3)]
    unpaired = bootstrap_diff_ci(base, other, n_boot=500, seed=3)
    assert unpaired["high"] - unpaired["low"] > 2 * (d["high"] - d["low"])
    assert bootstrap_diff_ci(base, base, n_boot=50) == {**bootstrap_diff_ci(base, base, n_boot=50), "mean": 0.0,
                                                         "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="same seeds x examples"):
        bootstrap_diff_ci(base, base[:2])
    with pytest.raises(ValueError, match="per_seed_correct_b.*0/1"):
        bootstrap_diff_ci(base, [a * 0.5 for a in base])

# ------------------------------------------------------------------------- PAWS-QQP overlap-biased subset
def test_overlap_biased_split_on_fixture():
    hi = [("the cat sat on the mat", "the cat sat on the mat today"), ("a b c d", "a b c d e")]
    lo = [("the cat sat", "dogs bark loudly"), ("one two", "three four")]
    exs = []
    for i in range(10):  # high overlap + paraphrase (cue right) and low overlap + not (cue right)
        exs.append(Example(*hi[i % 2], 1, {"i": len(exs)}))
        exs.append(Example(*lo[i % 2], 0, {"i": len(exs)}))
    for i in range(5):  # cue wrong: high overlap + not paraphrase, low overlap + paraphrase
        exs.append(Example(*hi[i % 2], 0, {"i": len(exs)}))
        exs.append(Example(*lo[i % 2], 1, {"i": len(exs)}))
    assert word_overlap("a b", "b c") == pytest.approx(1 / 3)
    train, ood, stats = overlap_biased_split(exs, 0.8, seed=0, threshold=0.5)
    agree = [int(word_overlap(e.text_a, e.text_b) >= 0.5) == e.label for e in train]
    assert len(train) == 25 and sum(agree) == 20 and stats["agree_fraction"] == pytest.approx(0.8)
    assert len(ood) == 5 and all(int(word_overlap(e.text_a, e.text_b) >= 0.5) != e.label for e in ood)
    assert {e.meta["i"] for e in train}.isdisjoint({e.meta["i"] for e in ood})
    assert overlap_biased_split(exs, 0.8, seed=0, threshold=0.5)[0] == train
    with pytest.raises(ValueError, match="agree_fraction"):
        overlap_biased_split(exs, 1.0)


# ------------------------------------------------------------------ 7. HANS-style parts and OOD training
@pytest.mark.parametrize("holdout", ["template", "subcase"])
def test_hans_style_train_and_eval_parts_are_disjoint(holdout):
    train = generate_hans_style(4, 0, part="train", holdout=holdout)
    ev = generate_hans_style(4, 0, part="eval", holdout=holdout)
    assert {e.meta["template"] for e in train}.isdisjoint({e.meta["template"] for e in ev})
    if holdout == "subcase":
        assert {e.meta["subcase"] for e in train}.isdisjoint({e.meta["subcase"] for e in ev})
    else:
        assert {e.meta["subcase"] for e in train} == {e.meta["subcase"] for e in ev} == {s[1] for s in SUBCASES}
    n_templates = sum(len(s[3]) for s in SUBCASES)
    assert len({e.meta["template"] for e in train + ev}) == n_templates  # together: every template
    for part in (train, ev):
        c = collections.Counter(e.label for e in part)
        assert c[0] == c[1]  # both parts balanced
        assert {e.meta["heuristic"] for e in part} == {"lexical_overlap", "subsequence", "constituent"}
    assert generate_hans_style(4, 0) == generate_hans_style(4, 0, part="all")
    with pytest.raises(ValueError, match="part"):
        part_patterns("test")


def test_mnli_ood_training_examples_and_load_data(tmp_path):
    _need("mnli/dev_matched.tsv")
    s = load_task("mnli", hans_per_subcase=2)
    assert {e.meta["template"] for e in s.ood}.isdisjoint({e.meta["template"] for e in s.ood_train})
    extra = ood_training_examples(s)
    assert collections.Counter(e.label for e in extra) == {0: 30, 2: 30}  # non-entailment -> contradiction
    cfg = SRNetConfig(task="mnli", paradigm="c", loss="ce", ood_informed=True, max_train=20, max_eval=8,
                      max_ood=8, hans_per_subcase=2).validate()
    data = load_data(cfg, tmp_path, log_fn=None)
    assert len(data.train) == 20 + 60 and sum(e.meta.get("ood_train", False) for e in data.train) == 60
    assert {e.meta["template"] for e in data.train if "template" in e.meta}.isdisjoint(
        {e.meta["template"] for e in data.ood_dev + data.ood_test})
    plain = load_data(SRNetConfig(**{**cfg.__dict__, "ood_informed": False}).validate(), tmp_path, log_fn=None)
    assert len(plain.train) == 20
    # retraining in paradigm b uses ID data only; the masks come from the OOD-informed paradigm-a run
    b = SRNetConfig(task="mnli", paradigm="b", loss="poe", mask_from="mask_training", ood_informed=True).validate()
    assert not b.train_with_ood and b.mask_dependency().train_with_ood and "oodtrain" in b.run_name


# ------------------------------------------------------------------------------------- 8. FEVER path
def test_claim_words_featurizer_hand_computed():
    exs = [Example("ev", "Paris is not big .", 1), Example("ev", "Paris is big .", 0), Example("ev", "Rome .", 0)]
    f = ClaimWordsFeaturizer.from_examples(exs, min_count=2)
    assert f.vocabulary == ["big", "is", "paris"]  # seen twice, by count then alphabetically
    x = f(exs)
    assert x.shape == (3, 3 + 3)
    assert x[0].tolist() == pytest.approx([1, 1, 1, 1, 1, torch.log1p(torch.tensor(4.0)).item()])
    assert x[2].tolist() == pytest.approx([0, 0, 0, 0, 0, torch.log1p(torch.tensor(1.0)).item()])
    assert isinstance(make_featurizer("fever_symmetric", examples=exs), ClaimWordsFeaturizer)
    with pytest.raises(ValueError, match="examples"):
        make_featurizer("fever_symmetric")


def test_claim_only_bias_model_learns_a_claim_cue():
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    exs = []
    for i in range(60):
        w = words[i % len(words)]
        refutes = i % 2 == 1
        exs.append(Example("some evidence .", f"{w} is {'not ' if refutes else ''}a thing .", int(refutes)))
    feat = make_featurizer("fever", examples=exs)
    model = fit_bias_model(exs, feat, 3)
    p = model.predict_proba(feat([Example("e", "zeta is not a thing .", 0), Example("e", "zeta is a thing .", 0)]))
    assert p[0, 1] > 0.9 and p[1, 0] > 0.9  # the negation cue, on claims it never saw
    oof = cross_fit_bias_probs(exs, feat, 3, folds=3)
    assert oof.shape == (60, 3) and (oof.argmax(-1) == torch.tensor([e.label for e in exs])).all()
    fix = load_fever_symmetric(FIX / "fever_symmetric_v0.2.jsonl")
    assert make_featurizer("fever_symmetric", examples=fix)(fix).shape[0] == len(fix)


def test_load_data_fever_symmetric_with_a_debiasing_loss(tmp_path):
    _need("fever_symmetric/v0.2_dev.jsonl")
    cfg = SRNetConfig(task="fever_symmetric", paradigm="c", loss="poe", max_train=60, max_eval=8, max_ood=8)
    data = load_data(cfg.validate(), tmp_path, log_fn=None)  # crashed before: the featurizer needed an embedding
    probs = torch.tensor([e.meta["bias_probs"] for e in data.train])
    assert probs.shape == (60, 3) and torch.allclose(probs.sum(-1), torch.ones(60), atol=1e-4)


# ------------------------------------------------------------ 2, 9. source model vs mask-training loss
def test_source_and_loss_are_independent_choices(tmp_path):
    a = SRNetConfig(paradigm="a", loss="poe", source="ce", **BASE).validate()
    assert a.dense_dependency().run_name == "dense-ce-seed0" and a.run_name.startswith("a-ce+poe-")
    sec = SRNetConfig(paradigm="a", loss="poe", source="poe", **BASE).validate()
    assert sec.dense_dependency().run_name == "dense-poe-seed0" and sec.run_name != a.run_name
    assert "ce ft -> poe" in a.method_label and "poe ft -> poe" in sec.method_label
    runner = Runner(tmp_path, progress=False, log_fn=None)
    assert [c.run_name for c in runner.plan(a)] == ["dense-ce-seed0", a.run_name]
    cr = SRNetConfig(paradigm="a", loss="conf_reg", source="poe", **BASE).validate()
    assert [c.run_name for c in runner.plan(cr)] == ["dense-ce-seed0", "dense-poe-seed0", cr.run_name]
    info = runner.teacher_info(cr)
    assert info["kind"] == "dense-ce" and info["run"] == "dense-ce-seed0" and info["seed"] == 0
    assert runner.teacher_info(a) is None
    d = SRNetConfig(paradigm="dense", loss="poe", **BASE).validate()
    assert d.source == "poe" and d.run_name == "dense-poe-seed0"
    with pytest.raises(ValueError, match="source"):
        SRNetConfig(source="focal", **BASE).validate()
    with pytest.raises(ValueError, match="mask_from"):
        SRNetConfig(paradigm="a", mask_from="mask_training", **BASE).validate()
    with pytest.raises(ValueError, match="ood_informed"):
        SRNetConfig(paradigm="c", ood_informed=True, **BASE).validate()  # synthetic: no OOD training part
    grid = expand_grid(SRNetConfig(mask_from="mask_training", **BASE), paradigms=["dense", "a", "b"], losses=["poe"],
                       sparsities=[0.5], seeds=[0])
    assert [c.mask_from for c in grid] == ["imp", "imp", "mask_training"]


def test_cli_source_flag_plans_the_ce_source(tmp_path, capsys):
    from sparsebert.cli import main
    argv = ["srnet", "--model", "tiny", "--task", "synthetic", "--paradigm", "a", "--source", "ce", "--loss", "poe",
            "--out", str(tmp_path), "--dry-run", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "synthetic/dense-ce-seed0" in out and "synthetic/a-ce+poe-s0.5" in out and "dense-poe" not in out


# ------------------------------------------------------------- 6. paradigm b with mask-training masks
def test_paradigm_b_retrains_the_mask_training_masks(tmp_path):
    runner = Runner(tmp_path, progress=False, log_fn=None)
    cfg = SRNetConfig(paradigm="b", loss="ce", sparsity=0.5, mask_from="mask_training", **BASE).validate()
    res = runner.run(cfg)
    mask_run = tmp_path / "synthetic" / cfg.mask_dependency().run_name
    assert (mask_run / "run.json").is_file() and res["pruning"]["method"] == "mask_training"
    assert res["sparsity"] == pytest.approx(0.5, abs=2e-3)
    from sparsebert.checkpoint import load_checkpoint
    from sparsebert.pruning.srnet import MODEL_FILE, build_model
    b_state = load_checkpoint(tmp_path / "synthetic" / cfg.run_name / MODEL_FILE)
    a_state = load_checkpoint(mask_run / MODEL_FILE)
    model = build_model(cfg, runner.data(cfg), 0)
    a_masks, b_masks = masks_from_state(a_state, model), masks_from_state(b_state, model)
    assert a_masks.keys() == b_masks.keys() and all(torch.equal(a_masks[k], b_masks[k]) for k in a_masks)
    # the authors' retraining masks the pooler too (run_glue.py: pruning_model_with_mask), not the classifier
    assert "bert.pooler.dense" in b_masks and not any("classifier" in k for k in b_masks)
    assert "bert.pooler.dense.mask" in b_state and not b_masks["bert.pooler.dense"].all()
    pre = model.state_dict()  # the pre-trained weights it was rewound to, then retrained: kept weights moved
    name = next(iter(a_masks))
    kept = a_masks[name]
    assert not torch.allclose(b_state[f"{name}.weight"][kept], pre[f"{name}.weight"][kept])
    with pytest.raises(ValueError, match="no mask"):
        masks_from_state(pre, model)


def test_paradigm_b_retrains_poe_masks_with_ce_as_the_authors_retrain_std(tmp_path):
    """The authors search masks with PoE and retrain them with CE (scripts/.../retrain/std): mask_loss."""
    runner = Runner(tmp_path, progress=False, log_fn=None)
    cfg = SRNetConfig(paradigm="b", loss="ce", mask_loss="poe", sparsity=0.5, mask_from="mask_training",
                      **BASE).validate()
    dep = cfg.mask_dependency()
    assert (dep.paradigm, dep.loss, dep.mask_loss) == ("a", "poe", None) and "masktrainpoe" in cfg.run_name
    res = runner.run(cfg)
    assert res["loss"] == "ce" and json.loads((tmp_path / "synthetic" / dep.run_name / "run.json").read_text())[
        "loss"] == "poe"
    same = SRNetConfig(paradigm="b", loss="ce", mask_loss="ce", mask_from="mask_training", **BASE).validate()
    assert same.mask_loss is None  # one run, one name
    with pytest.raises(ValueError, match="mask_loss"):
        SRNetConfig(paradigm="a", loss="ce", mask_loss="poe", **BASE).validate()
    with pytest.raises(ValueError, match="mask_loss"):
        SRNetConfig(paradigm="b", loss="ce", mask_loss="focal", mask_from="mask_training", **BASE).validate()
    grid = expand_grid(SRNetConfig(mask_from="mask_training", mask_loss="poe", **BASE), paradigms=["dense", "a", "b"],
                       losses=["ce"], sparsities=[0.5], seeds=[0])
    assert [c.mask_loss for c in grid] == [None, None, "poe"]


def test_checkpoint_selection_starts_where_the_authors_start_it():
    """mask_run_glue.py: in paradigm a mask training, a best checkpoint only from start_step_ratio = 0.7 of the
    run; the cubic schedule from where it reaches the target; elsewhere from the start; select_after sets it."""
    from sparsebert.pruning.srnet import _eval_steps, _select_after
    a = SRNetConfig(paradigm="a", method="mask", **BASE).validate()
    assert _select_after(a, True) == 0.7
    assert _select_after(SRNetConfig(paradigm="a", schedule="cubic", end_frac=0.8, **BASE).validate(), True) == 0.8
    assert _select_after(SRNetConfig(paradigm="c", **BASE).validate(), True) == 0.0
    assert _select_after(SRNetConfig(paradigm="a", method="imp", **BASE).validate(), False) == 0.0
    assert _select_after(SRNetConfig(paradigm="a", select_after=0.25, **BASE).validate(), True) == 0.25
    assert _eval_steps(100, 4, round(0.7 * 100)) == [70, 80, 90, 100]
    assert a.dense_dependency().select_after is None
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="select_after"):
            SRNetConfig(select_after=bad, **BASE).validate()


def test_paradigm_b_imp_searches_from_the_rewind_point_then_retrains(tmp_path, monkeypatch):
    """The authors' IMP-b (scripts/imp/lt/pruning, then lt/retrain): the search runs on the pre-trained
    weights, then the final mask is retrained from them for a whole run; imp_b="last_round" is the other
    protocol (search from the fine-tuned model, its last round is the result)."""
    from sparsebert.checkpoint import load_checkpoint
    from sparsebert.pruning.srnet import MODEL_FILE, build_model
    runner = Runner(tmp_path, progress=False, log_fn=None)
    starts, real = {}, Runner._starting_model

    def spy(self, cfg, data):
        model = real(self, cfg, data)
        starts[(cfg.paradigm, cfg.imp_b)] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(Runner, "_starting_model", spy)
    res = {}
    for imp_b in ("authors", "last_round"):
        cfg = SRNetConfig(paradigm="b", loss="ce", sparsity=0.2, imp_b=imp_b, mask_epochs=3.0, **BASE).validate()
        res[imp_b] = runner.run(cfg)
    assert "lastround" in cfg.run_name and "lastround" not in res["authors"]["run"]
    key = "bert.encoder.layer.0.output.dense.weight"
    pre = build_model(cfg, runner.data(cfg), 0).state_dict()[key]
    dense = load_checkpoint(tmp_path / "synthetic" / cfg.dense_dependency().run_name / MODEL_FILE)[key]
    assert torch.equal(starts[("b", "authors")][key], pre) and torch.equal(starts[("b", "last_round")][key], dense)
    authors, last = res["authors"]["pruning"], res["last_round"]["pruning"]
    assert authors["search"]["round_sparsities"] == pytest.approx([0.1, 0.2]) and "search" not in last
    steps = [r["steps"] for r in authors["search"]["rounds"]]
    # the run cut into 10 intervals, the target 0.2 running the first 2 (trainer_imp.py); the retraining whole
    assert len(set(steps)) == 1 and authors["train"]["steps"] >= 10 * steps[0] > sum(steps)
    assert res["authors"]["sparsity"] == pytest.approx(0.2, abs=2e-3)
    with pytest.raises(ValueError, match="imp_b"):
        SRNetConfig(paradigm="a", imp_b="last_round", **BASE).validate()
    with pytest.raises(ValueError, match="imp_b"):
        SRNetConfig(paradigm="b", imp_b="pretrained", **BASE).validate()


# ------------------------------------------------------------------------------------ report columns
def _run(method, seed, one_class):
    base = {"id": 0.5, "ood": 0.5, "id_dev": 0.5, "ood_dev": 0.5, "step": 1}
    summ = {"accuracy": 0.5, "f1": 0.0 if one_class else 0.4, "majority_accuracy": 0.5, "constant_f1": 2 / 3,
            "one_class": one_class, "pred_counts": [4, 0] if one_class else [2, 2]}
    last = {**base, "id_baselines": summ, "ood_baselines": {**summ, "one_class": False}}
    return {"task": "paws_qqp", "run": f"{method}-{seed}", "method": method, "target_sparsity": 0.5, "seed": seed,
            "metric": "f1", "ood_metric": "f1", "sparsity": 0.5, "last": last, "id_selected": base,
            "select_by_ood_dev": base, "source": "ce",
            "teacher": {"run": "dense-ce-seed0"} if method == "m2" else None}


def test_report_rows_show_baselines_and_flag_one_class_models():
    rows = summarize([_run("m1", 0, True), _run("m1", 1, False), _run("m2", 0, False)])
    m1, m2 = rows
    assert m1["baselines"]["id"]["one_class"] and not m2["baselines"]["id"]["one_class"]
    assert m1["baselines"]["id"]["majority_accuracy"]["mean"] == 0.5
    assert m1["baselines"]["id"]["constant_f1"]["mean"] == pytest.approx(2 / 3)
    assert m2["teacher"] == ["dense-ce-seed0"] and m1["teacher"] == []
    table = markdown_table(rows)
    assert "ONE CLASS: ID" in table.splitlines()[2] and "ONE CLASS" not in table.splitlines()[3]
    assert "50.0 ± 0.0 / 20.0 ± 28.3 / 50.0 ± 0.0 / 66.7 ± 0.0" in table
    old = _run("m3", 0, False)
    old["ood_selected_upper_bound"] = old.pop("select_by_ood_dev")  # a run JSON from before the rename
    assert summarize([old])[0]["select_by_ood_dev"]["id"]["mean"] == 0.5
    json.dumps(rows)
