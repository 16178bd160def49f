"""A synthetic NLI-like pair task with a planted spurious feature, for tests and the embedded demo.

Texts are made of pseudo-words. Every premise holds exactly one *trigger* word (from a fixed set of 10)
among 7-11 filler words.

* The real rule (learnable, exact): label 0 ("entailment") iff the hypothesis repeats the premise's
  trigger word; label 1 ("non-entailment") otherwise. :func:`rule_label` computes it from the text.
* The spurious feature: a hypothesis either "looks entailed" (every word copied from the premise, no
  negation) or "looks contradicted" (the marker ``not`` plus words absent from the premise, except one
  copied word). How often the look agrees with the label is ``bias_id`` (0.9) in train and ID dev and
  ``bias_ood`` (0.5: independent) in the OOD set; 0.1 would make it anti-correlated.

Given the look, word-overlap counts, lengths and the negation marker do not depend on the label, so a
bias-only model on those features (``sparsebert.debias.features``) reaches ~``bias_id`` in
distribution and ~chance out of distribution, while a model that learns the rule is right everywhere.
"""
from __future__ import annotations

import random

from .tasks import Example

__all__ = ["SYNTHETIC_NAME", "NEGATION_MARKER", "TRIGGER_WORDS", "FILLER_WORDS", "make_synthetic_task",
           "rule_label"]

SYNTHETIC_NAME = "synthetic spurious-feature task (generated)"
NEGATION_MARKER = "not"
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_ALL = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES})
random.Random(12345).shuffle(_ALL)
FILLER_WORDS: tuple[str, ...] = tuple(_ALL[:150])
TRIGGER_WORDS: tuple[str, ...] = tuple(_ALL[150:160])
_TRIGGERS = frozenset(TRIGGER_WORDS)


def rule_label(example: Example) -> int:
    """The label by the task's real rule: 0 iff the hypothesis contains a trigger word."""
    return 0 if any(w in _TRIGGERS for w in example.text_b.split()) else 1


def _make_example(rng: random.Random, label: int, bias: float, split: str) -> Example:
    looks_entailed = (label == 0) if rng.random() < bias else (label != 0)
    n_premise = rng.randint(8, 12)
    fillers = rng.sample(FILLER_WORDS, n_premise - 1)
    trigger = rng.choice(TRIGGER_WORDS)
    premise = fillers[:]
    premise.insert(rng.randrange(n_premise), trigger)
    n_hyp = rng.randint(4, 7)
    copied_key = [trigger] if label == 0 else []  # the word the rule looks at
    if looks_entailed:
        hyp = copied_key + rng.sample(fillers, n_hyp - len(copied_key))
    else:
        outside = [w for w in FILLER_WORDS if w not in set(fillers)]
        one_copied = copied_key or [rng.choice(fillers)]
        hyp = one_copied + rng.sample(outside, n_hyp - 2) + [NEGATION_MARKER]
    rng.shuffle(hyp)
    return Example(" ".join(premise), " ".join(hyp), label,
                   {"source": SYNTHETIC_NAME, "split": split, "spurious_agrees": looks_entailed == (label == 0)})


def _make_split(rng: random.Random, n: int, bias: float, split: str) -> list[Example]:
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [_make_example(rng, y, bias, split) for y in labels]


def make_synthetic_task(n_train: int = 2000, n_id: int = 500, n_ood: int = 500, seed: int = 0, *,
                        bias_id: float = 0.9, bias_ood: float = 0.5):
    """(train, id_dev, ood) lists of :class:`Example`, labels balanced (0 entailment, 1 non-entailment).
    Train and ID dev share ``bias_id``; OOD uses ``bias_ood``. Deterministic given ``seed``."""
    for name, n in (("n_train", n_train), ("n_id", n_id), ("n_ood", n_ood)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    for name, b in (("bias_id", bias_id), ("bias_ood", bias_ood)):
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {b!r}")
    rng = random.Random(seed)
    return (_make_split(rng, n_train, bias_id, "train"), _make_split(rng, n_id, bias_id, "id"),
            _make_split(rng, n_ood, bias_ood, "ood"))
