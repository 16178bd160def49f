"""Tasks, the common example type, and loaders for the local evaluation files.

Every loader reads one local file in its published format and returns ``list[Example]``. A missing file
raises ``FileNotFoundError`` naming it; a malformed one raises :class:`DataFormatError` (a ``ValueError``)
naming the file, the 1-based line number and what was expected there.

Label conventions (index = position in ``TaskSpec.label_names``):

* mnli: 0 entailment, 1 neutral, 2 contradiction.
* hans, hans_style, synthetic: 0 entailment, 1 non-entailment.
* qqp, paws, paws_qqp, paws_qqp_biased, mrpc: 0 not paraphrase, 1 paraphrase.
* sst2: 0 negative, 1 positive (``text_b`` is None).
* fever, fever_symmetric: 0 SUPPORTS, 1 REFUTES, 2 NOT ENOUGH INFO.

For FEVER the pair is ordered like NLI: ``text_a`` = evidence (premise), ``text_b`` = claim (hypothesis).

What is real and what is generated in :func:`load_task` (the data folder holds only the files listed in
``../shared/data/README.md``; MNLI train, QQP, FEVER train and the official HANS set are NOT here):

* mnli: train = REAL MNLI dev_matched.tsv, seeded stratified split (1 - dev_fraction); id_dev = REAL,
  the held-out part; ood = GENERATED HANS-style set (``hans_style.py``; not the official HANS).
* mrpc: train = REAL MRPC train.tsv; id_dev = REAL MRPC dev.tsv; ood = REAL PAWS-QQP dev_and_test.tsv.
* paws_qqp: train = REAL PAWS-QQP train.tsv, seeded split; id_dev = REAL, held-out part of train.tsv;
  ood = REAL PAWS-QQP dev_and_test.tsv (its official evaluation set).
* paws_qqp_biased: REAL PAWS-QQP train.tsv, a controlled bias (:func:`paws_qqp_biased_splits`): train = a
  subset in which a word-bigram-overlap cue agrees with the label on 80%, less a held-out 10% = id_dev
  (same mix); ood = the anti-correlated remainder (cue accuracy 0); ``extra_ood["paws_dev_and_test"]`` =
  REAL PAWS-QQP dev_and_test.tsv. Every example carries ``meta["cue_agrees"]``.
* sst2: train = REAL SST-2 train.tsv; id_dev = REAL SST-2 dev.tsv; ood = None (none available).
* fever_symmetric: train = REAL Fever-Symmetric v0.2_dev.jsonl, seeded split grouped by claim (each
  claim occurs twice there, once per label); id_dev = REAL, held-out
  part; ood = REAL Fever-Symmetric v0.1_generated.jsonl (symmetric pairs: claim-only cues do not predict the label).
* synthetic: all three GENERATED (``synthetic.py``), the spurious feature decorrelated in ood.

``meta["source"]`` on every example says where it came from (file name, or the generator's name).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

__all__ = [
    "Example", "TaskSpec", "TASKS", "get_task", "DataFormatError", "TaskSplits",
    "default_data_dir", "read_text", "load_mnli", "load_hans", "load_qqp", "load_paws", "load_mrpc", "load_sst2",
    "load_fever", "load_fever_symmetric", "split_examples", "load_task", "mnli_to_hans_probs",
    "mnli_to_hans_preds", "HANS_RULES", "word_overlap", "bigram_overlap", "OVERLAP_CUES", "overlap_cue_scores",
    "overlap_biased_split", "paws_qqp_biased_splits", "PAWS_BIASED",
]


@dataclass(frozen=True)
class Example:
    """One classification example. ``text_b`` is None for single-sentence tasks; ``meta`` carries
    provenance and extras (``source``, ``heuristic``/``subcase``/``template`` for HANS, ``bias_probs``)."""

    text_a: str
    text_b: str | None
    label: int
    meta: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_labels: int
    label_names: tuple[str, ...]
    metric: str  # "accuracy" or "f1" (F1 of the positive class, label 1)
    pair: bool = True

    def label_id(self, name: str) -> int:
        return self.label_names.index(name)


_NLI2 = ("entailment", "non-entailment")
_PARA = ("not_paraphrase", "paraphrase")
_FEVER = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("mnli", 3, ("entailment", "neutral", "contradiction"), "accuracy"),
        TaskSpec("hans", 2, _NLI2, "accuracy"),
        TaskSpec("hans_style", 2, _NLI2, "accuracy"),
        TaskSpec("qqp", 2, _PARA, "f1"),
        TaskSpec("paws", 2, _PARA, "f1"),
        TaskSpec("paws_qqp", 2, _PARA, "f1"),
        TaskSpec("paws_qqp_biased", 2, _PARA, "f1"),
        TaskSpec("mrpc", 2, _PARA, "f1"),
        TaskSpec("sst2", 2, ("negative", "positive"), "accuracy", pair=False),
        TaskSpec("fever", 3, _FEVER, "accuracy"),
        TaskSpec("fever_symmetric", 3, _FEVER, "accuracy"),
        TaskSpec("synthetic", 2, _NLI2, "accuracy"),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def mnli_to_hans_probs(probs):
    """Collapse 3-way MNLI probabilities (..., 3) to 2 classes (..., 2) by summing: entailment stays,
    P(neutral) + P(contradiction) becomes non-entailment. This is the "sum" rule, an option only: it
    counts a flat output (e.g. 0.4/0.35/0.25) as non-entailment. The default HANS scoring is
    :func:`mnli_to_hans_preds` (argmax over the 3 classes first)."""
    if probs.shape[-1] != 3:
        raise ValueError(f"probs: expected last dim 3 (MNLI classes), got shape {tuple(probs.shape)}")
    import torch

    return torch.stack([probs[..., 0], probs[..., 1] + probs[..., 2]], dim=-1)


HANS_RULES = ("argmax", "sum")


def mnli_to_hans_preds(probs, rule: str = "argmax"):
    """2-way HANS predictions (0 entailment, 1 non-entailment) of 3-way MNLI outputs (..., 3).

    ``rule="argmax"`` (default, as the SRNet authors' code scores HANS): the 3-way argmax first, then
    neutral and contradiction both map to non-entailment. ``rule="sum"``: argmax of
    :func:`mnli_to_hans_probs` (P(neutral) + P(contradiction) against P(entailment))."""
    if rule not in HANS_RULES:
        raise ValueError(f"rule: expected one of {HANS_RULES}, got {rule!r}")
    if probs.shape[-1] != 3:
        raise ValueError(f"probs: expected last dim 3 (MNLI classes), got shape {tuple(probs.shape)}")
    if rule == "sum":
        return mnli_to_hans_probs(probs).argmax(-1)
    return (probs.argmax(-1) != 0).long()


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file and line."""

    def __init__(self, path, line: int | None, expected: str, got: str | None = None):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        msg = f"{where}: expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)
        self.path, self.line = str(path), line


# ----------------------------------------------------------------------------------------------- paths
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """``$SPARSEBERT_DATA`` if set, else ``<repo root>/../shared/data`` (not required to exist)."""
    env = os.environ.get("SPARSEBERT_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (_repo_root() / ".." / "shared" / "data").resolve()


def _check_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found (see ../shared/data/README.md for the "
                                "expected layout, or set SPARSEBERT_DATA)")
    return path


# ------------------------------------------------------------------------------------------ raw readers
def read_text(path, what: str, *, encoding: str = "utf-8-sig") -> str:
    """The text of a data file; FileNotFoundError or DataFormatError naming it (a file that is not text in
    `encoding`: where the first undecodable byte is). The default drops a leading UTF-8 BOM."""
    path = _check_file(path, what)
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataFormatError(path, raw.count(b"\n", 0, e.start) + 1, f"{what} as {encoding.upper().removesuffix('-SIG')} text",
                              f"byte 0x{raw[e.start]:02x} at offset {e.start} (a binary file?)") from None


def _read_tsv(path, what: str, *, encoding: str = "utf-8") -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Header + rows of a tab-separated file with no quoting (GLUE style). Rows are checked for the
    header's field count. Yields (1-based line number, {column: value})."""
    path = _check_file(path, what)
    lines = read_text(path, what, encoding=encoding).splitlines()
    if not lines or not lines[0].strip():
        raise DataFormatError(path, 1, "a tab-separated header row", "an empty file")
    header = [h.strip() for h in lines[0].split("\t")]
    if header and header[0].startswith("\ufeff"):
        header[0] = header[0][1:]  # a BOM read without utf-8-sig

    def rows():
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataFormatError(path, number, f"{len(header)} tab-separated fields ({', '.join(header)})",
                                      f"{len(fields)}")
            yield number, dict(zip(header, fields))

    return header, rows()


def _pick_column(header: list[str], candidates: Sequence[str], path, purpose: str) -> str:
    for c in candidates:
        if c in header:
            return c
    raise DataFormatError(path, 1, f"a header with a {purpose} column named one of {list(candidates)}",
                          f"columns {header}")


def _label(value: str, mapping: dict[str, int], path, line: int, column: str) -> int:
    key = value.strip()
    if key not in mapping:
        raise DataFormatError(path, line, f"column {column!r} to be one of {sorted(mapping)}", repr(value))
    return mapping[key]


def _pair_tsv(path, what, a_cols, b_cols, label_cols, mapping, task, *, encoding="utf-8",
              skip_labels=()) -> list[Example]:
    header, rows = _read_tsv(path, what, encoding=encoding)
    col_a = _pick_column(header, a_cols, path, "first text")
    col_b = _pick_column(header, b_cols, path, "second text") if b_cols else None
    col_y = _pick_column(header, label_cols, path, "label")
    source = Path(path).name
    out = []
    for line, row in rows:
        if row[col_y].strip() in skip_labels:
            continue
        label = _label(row[col_y], mapping, path, line, col_y)
        out.append(Example(row[col_a].strip(), row[col_b].strip() if col_b else None, label,
                           {"source": f"{task}:{source}", "line": line}))
    return out


# --------------------------------------------------------------------------------------------- loaders
def load_mnli(path) -> list[Example]:
    """MNLI: the GLUE tsv (sentence1/sentence2/gold_label, many columns) or the local dev_matched.tsv
    layout (index, premise, hypothesis, gold_label, number of correct responses). Rows with gold
    label ``-`` (no annotator consensus) are skipped."""
    mapping = {n: i for i, n in enumerate(TASKS["mnli"].label_names)}
    return _pair_tsv(path, "MNLI tsv", ("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label",),
                     mapping, "mnli", skip_labels=("-",))


def load_hans(path) -> list[Example]:
    """Official HANS ``heuristics_evaluation_set.txt`` (tsv: gold_label, sentence1_binary_parse,
    sentence2_binary_parse, sentence1_parse, sentence2_parse, sentence1, sentence2, pairID, heuristic,
    subcase, template). Columns are read by name; heuristic/subcase/template/pairID go to meta."""
    header, rows = _read_tsv(path, "HANS evaluation set")
    for col in ("gold_label", "sentence1", "sentence2", "heuristic", "subcase", "template"):
        _pick_column(header, (col,), path, col)
    mapping = {"entailment": 0, "non-entailment": 1}
    out = []
    for line, row in rows:
        meta = {k: row[k].strip() for k in ("heuristic", "subcase", "template")}
        if "pairID" in row:
            meta["pair_id"] = row["pairID"].strip()
        meta.update(source=f"hans:{Path(path).name}", line=line)
        out.append(Example(row["sentence1"].strip(), row["sentence2"].strip(),
                           _label(row["gold_label"], mapping, path, line, "gold_label"), meta))
    return out


def load_qqp(path) -> list[Example]:
    """QQP: GLUE layout (id, qid1, qid2, question1, question2, is_duplicate); also accepts the PAWS
    layout (sentence1, sentence2, label). Label 1 = duplicate/paraphrase."""
    return _pair_tsv(path, "QQP tsv", ("question1", "sentence1"), ("question2", "sentence2"),
                     ("is_duplicate", "label"), {"0": 0, "1": 1}, "qqp")


def load_paws(path) -> list[Example]:
    """PAWS-QQP or PAWS-Wiki tsv: id, sentence1, sentence2, label (1 = paraphrase). CRLF line ends
    (as in PAWS-QQP train.tsv) are accepted."""
    return _pair_tsv(path, "PAWS tsv", ("sentence1",), ("sentence2",), ("label",), {"0": 0, "1": 1}, "paws")


def load_mrpc(path) -> list[Example]:
    """GLUE MRPC tsv: Quality, #1 ID, #2 ID, #1 String, #2 String; the file starts with a UTF-8 BOM."""
    return _pair_tsv(path, "MRPC tsv", ("#1 String",), ("#2 String",), ("Quality",), {"0": 0, "1": 1}, "mrpc",
                     encoding="utf-8-sig")


def load_sst2(path) -> list[Example]:
    """GLUE SST-2 tsv: sentence, label (1 = positive). ``text_b`` is None."""
    return _pair_tsv(path, "SST-2 tsv", ("sentence",), None, ("label",), {"0": 0, "1": 1}, "sst2")


_FEVER_MAP = {"SUPPORTS": 0, "REFUTES": 1, "NOT ENOUGH INFO": 2}


def _fever_label(value, path, line) -> int:
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"a string label in {sorted(_FEVER_MAP)}", repr(value))
    key = value.strip().upper().replace("_", " ")
    if key not in _FEVER_MAP:
        raise DataFormatError(path, line, f"label in {sorted(_FEVER_MAP)}", repr(value))
    return _FEVER_MAP[key]


def load_fever(path, *, task: str = "fever") -> list[Example]:
    """FEVER-style jsonl: one object per line with ``claim``, an evidence text (``evidence``,
    ``evidence_sentence`` or ``sentence1``) and a label (``gold_label`` or ``label``: SUPPORTS, REFUTES,
    NOT ENOUGH INFO). ``text_a`` = evidence, ``text_b`` = claim."""
    path = _check_file(path, "FEVER jsonl")
    out = []
    text = read_text(path, "FEVER jsonl").replace("\r\n", "\n").replace("\r", "\n")  # universal newlines
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, line_no, "one JSON object per line", f"invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, line_no, "a JSON object", type(obj).__name__)
        evidence_key = next((k for k in ("evidence", "evidence_sentence", "sentence1") if k in obj), None)
        label_key = next((k for k in ("gold_label", "label") if k in obj), None)
        if "claim" not in obj or evidence_key is None or label_key is None:
            raise DataFormatError(path, line_no, "keys 'claim', 'evidence' (or 'evidence_sentence'/"
                                  "'sentence1') and 'gold_label' (or 'label')", f"keys {sorted(obj)}")
        evidence = obj[evidence_key]
        if isinstance(evidence, list):  # a list of sentences
            evidence = " ".join(str(e) for e in evidence)
        if not isinstance(evidence, str) or not isinstance(obj["claim"], str):
            raise DataFormatError(path, line_no, "string 'claim' and evidence fields")
        meta = {"source": f"{task}:{path.name}", "line": line_no}
        if "id" in obj:
            meta["id"] = str(obj["id"])
        out.append(Example(evidence.strip(), obj["claim"].strip(), _fever_label(obj[label_key], path, line_no),
                           meta))
    return out


def load_fever_symmetric(path) -> list[Example]:
    """Fever-Symmetric v0.1 (claim, evidence_sentence, label) or v0.2 (claim, evidence, gold_label, ...)."""
    return load_fever(path, task="fever_symmetric")


# ---------------------------------------------------------------------------------------------- splits
def split_examples(examples: Sequence[Example], sizes: Sequence[float | int], seed: int = 0, *,
                   stratify: bool = True, group_by: Callable[[Example], object] | None = None
                   ) -> list[list[Example]]:
    """Seeded disjoint split. ``sizes`` are either all fractions (floats in (0, 1], summing to <= 1; the
    last part may absorb rounding) or all counts (ints, summing to <= len). With ``stratify`` each
    part keeps the label proportions (classes are shuffled separately and interleaved by rank).
    ``group_by`` (e.g. ``lambda ex: ex.text_b``) keeps examples with the same key in the same part:
    groups are shuffled and each cut moves to the next group boundary, so part sizes are approximate
    and ``stratify`` is not applied. Deterministic given the seed and the input order."""
    n = len(examples)
    if not sizes:
        raise ValueError("sizes: expected at least one part size")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        counts = list(sizes)
        if any(c < 0 for c in counts) or sum(counts) > n:
            raise ValueError(f"sizes: counts must be >= 0 and sum to <= {n} examples, got {list(sizes)}")
    elif all(isinstance(s, float) for s in sizes):
        if any(not 0.0 < s <= 1.0 for s in sizes) or sum(sizes) > 1.0 + 1e-9:
            raise ValueError(f"sizes: fractions must be in (0, 1] and sum to <= 1, got {list(sizes)}")
        counts = [int(round(s * n)) for s in sizes]
        if abs(sum(sizes) - 1.0) < 1e-9:
            counts[-1] = n - sum(counts[:-1])
        while sum(counts) > n:
            counts[counts.index(max(counts))] -= 1
    else:
        raise TypeError(f"sizes: expected all floats (fractions) or all ints (counts), got {list(sizes)}")
    rng = random.Random(seed)
    if group_by is not None:
        groups: dict[object, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(group_by(ex), []).append(i)
        shuffled = list(groups.values())
        rng.shuffle(shuffled)
        order = [i for g in shuffled for i in g]
        ends = [0]
        for g in shuffled:
            ends.append(ends[-1] + len(g))
        parts, start, target = [], 0, 0
        for c in counts:
            target += c
            stop = next(e for e in ends if e >= min(target, n)) if c else start
            stop = max(stop, start)
            parts.append([examples[i] for i in order[start:stop]])
            start = stop
        return parts
    if stratify:
        by_label: dict[int, list[int]] = {}
        for i, ex in enumerate(examples):
            by_label.setdefault(ex.label, []).append(i)
        keyed = []
        for label in sorted(by_label):
            idx = by_label[label]
            rng.shuffle(idx)
            keyed += [((r + rng.random()) / len(idx), i) for r, i in enumerate(idx)]
        order = [i for _, i in sorted(keyed)]
    else:
        order = list(range(n))
        rng.shuffle(order)
    parts, start = [], 0
    for c in counts:
        parts.append([examples[i] for i in order[start:start + c]])
        start += c
    return parts


def word_overlap(text_a: str, text_b: str | None) -> float:
    """Jaccard overlap of the lower-cased word sets of two texts (0.0 when both are empty)."""
    import re

    a = set(re.findall(r"[a-z0-9]+", text_a.lower()))
    b = set(re.findall(r"[a-z0-9]+", (text_b or "").lower()))
    return len(a & b) / len(a | b) if (a or b) else 0.0


def bigram_overlap(text_a: str, text_b: str | None) -> float:
    """Jaccard overlap of the sets of adjacent lower-cased word pairs of two texts (word order matters;
    0.0 when neither text has two words)."""
    import re

    a = re.findall(r"[a-z0-9]+", text_a.lower())
    b = re.findall(r"[a-z0-9]+", (text_b or "").lower())
    pa, pb = set(zip(a, a[1:])), set(zip(b, b[1:]))
    return len(pa & pb) / len(pa | pb) if (pa or pb) else 0.0


# name -> score of a pair; the cue of overlap_biased_split is "score >= threshold"
OVERLAP_CUES: dict[str, Callable[[str, str | None], float]] = {"words": word_overlap, "bigrams": bigram_overlap}


def overlap_cue_scores(examples: Sequence[Example], cue: str = "words") -> list[float]:
    """The :data:`OVERLAP_CUES` score ``cue`` of every example's (text_a, text_b)."""
    if cue not in OVERLAP_CUES:
        raise ValueError(f"cue: expected one of {sorted(OVERLAP_CUES)}, got {cue!r}")
    return [OVERLAP_CUES[cue](ex.text_a, ex.text_b) for ex in examples]


def overlap_biased_split(examples: Sequence[Example], agree_fraction: float = 0.8, seed: int = 0, *,
                         threshold: float | None = None, cue: str = "words"
                         ) -> tuple[list[Example], list[Example], dict]:
    """A training subset in which a word-overlap cue agrees with the label ``agree_fraction`` of the
    time, and the anti-correlated remainder as an OOD set (for paraphrase pairs, label 1 = paraphrase).

    The cue predicts 1 when the ``cue`` score (:data:`OVERLAP_CUES`: "words" = :func:`word_overlap`,
    "bigrams" = :func:`bigram_overlap`) >= ``threshold`` (default: the median score). Train =
    every example the cue gets right plus just enough of the ones it gets wrong (seeded draw) to reach
    ``agree_fraction`` (the agreeing part is subsampled instead when the wrong ones are too few); OOD =
    the cue-wrong examples left over (the cue is 0% accurate there). Returns (train, ood, stats) with
    stats: cue, threshold, agree_fraction (measured on train), n_train, n_ood."""
    if not 0.5 <= agree_fraction < 1.0:
        raise ValueError(f"agree_fraction: expected a number in [0.5, 1), got {agree_fraction!r}")
    if len(examples) < 4:
        raise ValueError(f"examples: expected at least 4 examples, got {len(examples)}")
    bad = [i for i, ex in enumerate(examples) if ex.label not in (0, 1) or ex.text_b is None]
    if bad:
        raise ValueError(f"examples: expected sentence pairs with labels 0/1; example {bad[0]} is not")
    scores = overlap_cue_scores(examples, cue)
    if threshold is None:
        ordered = sorted(scores)
        threshold = ordered[len(ordered) // 2]
    agree = [i for i, (ex, sc) in enumerate(zip(examples, scores)) if int(sc >= threshold) == ex.label]
    disagree = [i for i, (ex, sc) in enumerate(zip(examples, scores)) if int(sc >= threshold) != ex.label]
    rng = random.Random(seed)
    rng.shuffle(agree)
    rng.shuffle(disagree)
    n_dis = round(len(agree) * (1.0 - agree_fraction) / agree_fraction)
    if n_dis >= len(disagree):  # too few cue-wrong examples: keep half of them for OOD, shrink the agreeing part
        n_dis = len(disagree) // 2
        agree = agree[:round(n_dis * agree_fraction / (1.0 - agree_fraction))]
    if n_dis < 1 or not agree:
        raise ValueError(f"examples: the overlap cue (threshold {threshold:.3f}) leaves too few examples on one "
                         f"side ({len(agree)} agree, {len(disagree)} disagree) for agree_fraction {agree_fraction}")
    train_idx = sorted(agree + disagree[:n_dis])
    ood_idx = sorted(disagree[n_dis:])
    train = [examples[i] for i in train_idx]
    ood = [examples[i] for i in ood_idx]
    stats = {"cue": cue, "threshold": threshold, "agree_fraction": len(agree) / len(train_idx), "n_train": len(train),
             "n_ood": len(ood)}
    return train, ood, stats


class TaskSplits(NamedTuple):
    train: list[Example]
    id_dev: list[Example]
    ood: list[Example] | None
    spec: TaskSpec          # label space of train / id_dev
    ood_spec: TaskSpec | None  # label space of ood (HANS: 2 classes for the 3-class MNLI)
    sources: dict           # split name -> human-readable provenance ("real: ..." / "GENERATED: ...")
    ood_train: list[Example] | None = None  # OOD *training* data disjoint from ood (mnli: HANS-style train part)
    extra_ood: dict | None = None  # further OOD evaluation sets, name -> list[Example] in ood_spec's label space


# What the task name paws_qqp_biased means (a change here is a different task: rename it)
PAWS_BIASED = {"cue": "bigrams", "agree_fraction": 0.8, "dev_fraction": 0.1}


def paws_qqp_biased_splits(pool: Sequence[Example], evaluation: Sequence[Example], seed: int = 0, *,
                           cue: str = "bigrams", agree_fraction: float = 0.8, dev_fraction: float = 0.1):
    """The controlled-bias sets from PAWS-QQP train.tsv (``pool``) and dev_and_test.tsv (``evaluation``).

    :func:`overlap_biased_split` of ``pool`` gives the biased subset and the anti-correlated remainder
    (ood); ``dev_fraction`` of every (label, cue agrees) cell of the subset is held out as id_dev, so
    id_dev has train's label and agreement mix. Every returned example carries ``meta["cue_agrees"]``
    (the cue at the subset's threshold predicts its label). Returns (train, id_dev, ood, evaluation,
    stats); stats adds to the split's: dev_fraction, n_id_dev, the agreement measured on train
    (``agree_fraction``), id_dev, ood and evaluation."""
    from dataclasses import replace

    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction: expected a fraction in (0, 1), got {dev_fraction!r}")
    biased, anti, stats = overlap_biased_split(pool, agree_fraction, seed, cue=cue)
    threshold = stats["threshold"]

    def tag(exs):
        return [replace(ex, meta={**ex.meta, "cue_agrees": int(sc >= threshold) == ex.label})
                for ex, sc in zip(exs, overlap_cue_scores(exs, cue))]

    biased, anti, evaluation = tag(biased), tag(anti), tag(evaluation)
    cells: dict[tuple, list[int]] = {}
    for i, ex in enumerate(biased):
        cells.setdefault((ex.label, ex.meta["cue_agrees"]), []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(cells):
        idx = cells[key]
        rng.shuffle(idx)
        held.update(idx[:round(dev_fraction * len(idx))])
    train = [ex for i, ex in enumerate(biased) if i not in held]
    id_dev = [ex for i, ex in enumerate(biased) if i in held]
    if not train or not id_dev:
        raise ValueError(f"dev_fraction: {dev_fraction} of {len(biased)} biased examples leaves an empty part")

    def agreement(exs):
        return sum(ex.meta["cue_agrees"] for ex in exs) / len(exs) if exs else None

    stats.update(dev_fraction=dev_fraction, n_train=len(train), n_id_dev=len(id_dev), n_evaluation=len(evaluation),
                 agree_fraction=agreement(train), id_dev_agree_fraction=agreement(id_dev),
                 ood_agree_fraction=agreement(anti), evaluation_agree_fraction=agreement(evaluation))
    return train, id_dev, anti, evaluation, stats


_SPLITS = ("train", "dev", "id_dev", "ood", "all")


def load_task(name: str, split: str = "all", data_dir=None, *, seed: int = 0, dev_fraction: float | None = None,
              hans_per_subcase: int = 100, synthetic_sizes: tuple[int, int, int] = (2000, 500, 500),
              hans_holdout: str = "template"):
    """The standard sets for ``name`` (see the module docstring for what is real and what is generated).
    ``split``: "train", "dev"/"id_dev", "ood" (a list, or None when there is no OOD set) or "all" (a
    :class:`TaskSplits`). ``seed`` drives the train/dev split and the generators. ``dev_fraction``: the
    held-out ID part (None: 0.2; paws_qqp_biased: ``PAWS_BIASED["dev_fraction"]`` of the biased subset). For mnli the OOD set
    is the "eval" part of the HANS-style generator and ``TaskSplits.ood_train`` its disjoint "train"
    part (``hans_holdout``: "template" or "subcase", see ``hans_style.part_patterns``), 2-way labels."""
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {_SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if dev_fraction is None:
        dev_fraction = PAWS_BIASED["dev_fraction"] if name == "paws_qqp_biased" else 0.2
    if name == "mnli":
        from .hans_style import HANS_STYLE_NAME, generate_hans_style

        train, dev = split_examples(load_mnli(root / "mnli" / "dev_matched.tsv"),
                                    [1.0 - dev_fraction, dev_fraction], seed)
        want_ood = split in ("ood", "all")
        ood = generate_hans_style(hans_per_subcase, seed, part="eval", holdout=hans_holdout) if want_ood else None
        ood_train = (generate_hans_style(hans_per_subcase, seed, part="train", holdout=hans_holdout)
                     if split == "all" else None)
        splits = TaskSplits(train, dev, ood, TASKS["mnli"], TASKS["hans_style"], {
            "train": f"real: MNLI dev_matched.tsv, {1 - dev_fraction:.0%} seeded stratified split (seed {seed})",
            "id_dev": f"real: MNLI dev_matched.tsv, the held-out {dev_fraction:.0%}",
            "ood": f"GENERATED: {HANS_STYLE_NAME}, eval part (held-out {hans_holdout}s), {hans_per_subcase} per "
                   f"subcase (seed {seed}); not the official HANS set",
            "ood_train": f"GENERATED: {HANS_STYLE_NAME}, train part ({hans_holdout}s disjoint from the eval part), "
                         f"{hans_per_subcase} per subcase (seed {seed})"}, ood_train)
    elif name == "mrpc":
        splits = TaskSplits(load_mrpc(root / "mrpc" / "train.tsv"), load_mrpc(root / "mrpc" / "dev.tsv"),
                            load_paws(root / "paws_qqp" / "dev_and_test.tsv"), TASKS["mrpc"], TASKS["paws_qqp"],
                            {"train": "real: MRPC train.tsv", "id_dev": "real: MRPC dev.tsv",
                             "ood": "real: PAWS-QQP dev_and_test.tsv"})
    elif name in ("paws_qqp", "paws"):
        train, dev = split_examples(load_paws(root / "paws_qqp" / "train.tsv"), [1.0 - dev_fraction, dev_fraction],
                                    seed)
        splits = TaskSplits(train, dev, load_paws(root / "paws_qqp" / "dev_and_test.tsv"), TASKS["paws_qqp"],
                            TASKS["paws_qqp"], {
                                "train": f"real: PAWS-QQP train.tsv, seeded split (seed {seed})",
                                "id_dev": "real: PAWS-QQP train.tsv, held-out part",
                                "ood": "real: PAWS-QQP dev_and_test.tsv (its official evaluation set)"})
    elif name == "paws_qqp_biased":
        cue, agree = PAWS_BIASED["cue"], PAWS_BIASED["agree_fraction"]
        train, dev, ood, evaluation, st = paws_qqp_biased_splits(
            load_paws(root / "paws_qqp" / "train.tsv"), load_paws(root / "paws_qqp" / "dev_and_test.tsv"), seed,
            cue=cue, agree_fraction=agree, dev_fraction=dev_fraction)
        cue_text = f"{cue} overlap >= {st['threshold']:.3f} -> paraphrase"
        splits = TaskSplits(train, dev, ood, TASKS["paws_qqp_biased"], TASKS["paws_qqp"], {
            "train": f"real: PAWS-QQP train.tsv, overlap-biased subset (seed {seed}): the cue ({cue_text}) agrees "
                     f"with the label on {st['agree_fraction']:.1%} (measured), less the held-out {dev_fraction:.0%}",
            "id_dev": f"real: the held-out {dev_fraction:.0%} of that subset, same label and cue-agreement mix "
                      f"(cue agrees on {st['id_dev_agree_fraction']:.1%})",
            "ood": "real: PAWS-QQP train.tsv, the anti-correlated remainder (the cue is wrong on every pair)",
            "paws_dev_and_test": f"real: PAWS-QQP dev_and_test.tsv, its official evaluation set (the cue agrees on "
                                 f"{st['evaluation_agree_fraction']:.1%})",
            "bias_split": st}, extra_ood={"paws_dev_and_test": evaluation})
    elif name == "sst2":
        splits = TaskSplits(load_sst2(root / "sst2" / "train.tsv"), load_sst2(root / "sst2" / "dev.tsv"), None,
                            TASKS["sst2"], None, {"train": "real: SST-2 train.tsv", "id_dev": "real: SST-2 dev.tsv",
                                                  "ood": "none available"})
    elif name == "fever_symmetric":
        # every v0.2 claim occurs twice, once per label: keep both copies in one part, or a claim-only
        # model would see the claim with the opposite label in train
        train, dev = split_examples(load_fever_symmetric(root / "fever_symmetric" / "v0.2_dev.jsonl"),
                                    [1.0 - dev_fraction, dev_fraction], seed, group_by=lambda ex: ex.text_b)
        splits = TaskSplits(train, dev, load_fever_symmetric(root / "fever_symmetric" / "v0.1_generated.jsonl"),
                            TASKS["fever_symmetric"], TASKS["fever_symmetric"], {
                                "train": "real: Fever-Symmetric v0.2_dev.jsonl, seeded split grouped by claim "
                                         f"(seed {seed})",
                                "id_dev": "real: Fever-Symmetric v0.2_dev.jsonl, held-out part",
                                "ood": "real: Fever-Symmetric v0.1_generated.jsonl"})
    elif name == "synthetic":
        from .synthetic import SYNTHETIC_NAME, make_synthetic_task

        train, dev, ood = make_synthetic_task(*synthetic_sizes, seed=seed)
        splits = TaskSplits(train, dev, ood, TASKS["synthetic"], TASKS["synthetic"], {
            k: f"GENERATED: {SYNTHETIC_NAME} (seed {seed})" for k in ("train", "id_dev", "ood")})
    else:
        raise ValueError(f"name: load_task knows mnli, mrpc, paws_qqp, paws_qqp_biased, sst2, fever_symmetric, "
                         f"synthetic; got {name!r}")
    if split == "all":
        return splits
    return {"train": splits.train, "dev": splits.id_dev, "id_dev": splits.id_dev, "ood": splits.ood}[split]
