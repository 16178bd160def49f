"""Hand-crafted bias features (the inputs of the bias-only model).

* :class:`PairOverlapFeaturizer` for NLI/paraphrase pairs (premise = ``text_a``, hypothesis = ``text_b``):
  word-overlap statistics, negation words, lengths and the HANS heuristics' flags (subsequence,
  approximate constituent). These are the features of McCoy et al. (2019) / Clark et al. (2019) style
  bias-only models.
* :class:`ClaimOnlyFeaturizer` for FEVER (claim = ``text_b``): max-pooled word embeddings of the claim
  (any embedding matrix + its tokenizer, e.g. the backbone's input embeddings), plus negation and length.
* :class:`ClaimWordsFeaturizer` for FEVER without an embedding: a bag of words of the claim plus
  negation and length (the default of the SRNet driver).

A featurizer is callable on a sequence of :class:`~sparsebert.data.Example` and returns a float32 tensor
(N, F); ``feature_names`` lists the F columns.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from ..data.tasks import OVERLAP_CUES, Example

__all__ = ["NEGATION_WORDS", "PAIR_FEATURE_NAMES", "feature_words", "pair_features", "PairOverlapFeaturizer",
           "OverlapCueFeaturizer",
           "ClaimOnlyFeaturizer", "ClaimWordsFeaturizer", "make_featurizer"]

NEGATION_WORDS = frozenset({"not", "no", "never", "nothing", "nobody", "none", "nowhere", "neither", "nor",
                            "n't", "cannot", "without"})
_STOPWORDS = frozenset("a an the of to in on at by for with and or but is are was were be been being it its "
                       "this that these those as from there their they he she his her i you we".split())
_WORD = re.compile(r"n't|[a-z0-9]+(?:'[a-z]+)?")
# words after which a clause (a constituent of the premise) may start
_CLAUSE_OPENERS = frozenset({"that", "if", "unless", "since", "because", "although", "after", "before", "once",
                             "while", "when", "and", "or", "but", "whether", "though"})

PAIR_FEATURE_NAMES = ("overlap_rate", "all_in_premise", "content_overlap_rate", "jaccard", "bigram_overlap",
                      "hyp_negation", "prem_negation", "len_diff", "len_ratio", "log_hyp_len", "is_subsequence",
                      "is_constituent")


def feature_words(text: str | None) -> list[str]:
    """Lower-cased words, punctuation dropped; contractions kept whole (``don't``) or split GLUE-style
    (``do n't``) as in the input."""
    return _WORD.findall(text.lower()) if text else []


def _is_negation(w: str) -> bool:
    return w in NEGATION_WORDS or w.endswith("n't")


def _contiguous_at(hyp: list[str], prem: list[str]) -> list[int]:
    n = len(hyp)
    return [i for i in range(len(prem) - n + 1) if prem[i:i + n] == hyp] if n else []


def _clause_bounded(premise_text: str, hyp: list[str]) -> bool:
    """Approximate constituent test without a parser: the hypothesis is a contiguous span of one
    comma-separated chunk of the premise that starts at the chunk start or right after a clause opener
    (that, if, since, and, ...) and ends at the chunk end."""
    for chunk in re.split(r"[,;:]", premise_text):
        words = feature_words(chunk)
        for start in _contiguous_at(hyp, words):
            if start + len(hyp) == len(words) and (start == 0 or words[start - 1] in _CLAUSE_OPENERS):
                return True
    return False


def pair_features(premise: str, hypothesis: str | None) -> list[float]:
    """The :data:`PAIR_FEATURE_NAMES` features of one pair."""
    p, h = feature_words(premise), feature_words(hypothesis)
    p_set, h_set = set(p), set(h)
    n_h, n_p = len(h), len(p)
    overlap = sum(w in p_set for w in h) / n_h if n_h else 0.0
    content = [w for w in h if w not in _STOPWORDS]
    content_overlap = sum(w in p_set for w in content) / len(content) if content else overlap
    jaccard = len(p_set & h_set) / len(p_set | h_set) if (p_set or h_set) else 0.0
    h_bi = list(zip(h, h[1:]))
    p_bi = set(zip(p, p[1:]))
    bigram = sum(b in p_bi for b in h_bi) / len(h_bi) if h_bi else overlap
    subsequence = bool(_contiguous_at(h, p))
    constituent = subsequence and _clause_bounded(premise, h)
    return [overlap, float(n_h > 0 and overlap == 1.0), content_overlap, jaccard, bigram,
            float(any(map(_is_negation, h))), float(any(map(_is_negation, p))), float(n_p - n_h),
            n_h / max(n_p, 1), math.log1p(n_h), float(subsequence), float(constituent)]


class PairOverlapFeaturizer:
    """Word-overlap / negation / length / heuristic-flag features of (text_a, text_b) pairs."""

    feature_names = PAIR_FEATURE_NAMES

    def __call__(self, examples: Sequence[Example]) -> torch.Tensor:
        for i, ex in enumerate(examples):
            if ex.text_b is None:
                raise ValueError(f"examples[{i}]: pair features need text_b (a hypothesis), got None")
        return torch.tensor([pair_features(ex.text_a, ex.text_b) for ex in examples],
                            dtype=torch.float32).reshape(len(examples), len(PAIR_FEATURE_NAMES))


class OverlapCueFeaturizer:
    """Only the scores of the named overlap cues (:data:`sparsebert.data.OVERLAP_CUES`, columns
    ``cue_<name>``): the bias-only model of a task whose bias is one known cue (paws_qqp_biased)."""

    def __init__(self, cues: Sequence[str]):
        bad = [c for c in cues if c not in OVERLAP_CUES]
        if not cues or bad:
            raise ValueError(f"cues: expected one or more names in {sorted(OVERLAP_CUES)}, got {list(cues)}")
        self.cues = tuple(cues)
        self.feature_names = tuple(f"cue_{c}" for c in self.cues)

    def __call__(self, examples: Sequence[Example]) -> torch.Tensor:
        for i, ex in enumerate(examples):
            if ex.text_b is None:
                raise ValueError(f"examples[{i}]: overlap cues need text_b (the second text), got None")
        return torch.tensor([[OVERLAP_CUES[c](ex.text_a, ex.text_b) for c in self.cues] for ex in examples],
                            dtype=torch.float32).reshape(len(examples), len(self.cues))


class ClaimOnlyFeaturizer:
    """Claim-only features for FEVER: max over the claim's tokens of ``embedding[token_id]`` (D values),
    then ``claim_negation`` and ``log_claim_len``. ``embedding``: (vocab, D) tensor, e.g.
    ``model.get_input_embeddings().weight``; ``tokenizer``: its tokenizer (called with
    ``add_special_tokens=False``). ``field``: which text holds the claim (``text_b`` for our FEVER loaders)."""

    def __init__(self, embedding: torch.Tensor, tokenizer, *, field: str = "text_b"):
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
            raise ValueError(f"embedding: expected a 2-D (vocab, dim) tensor, got "
                             f"{getattr(embedding, 'shape', type(embedding))}")
        if field not in ("text_a", "text_b"):
            raise ValueError(f"field: expected 'text_a' or 'text_b', got {field!r}")
        self.embedding = embedding.detach().float().cpu()
        self.tokenizer, self.field = tokenizer, field
        d = self.embedding.shape[1]
        self.feature_names = tuple(f"emb_max_{k}" for k in range(d)) + ("claim_negation", "log_claim_len")

    def __call__(self, examples: Sequence[Example]) -> torch.Tensor:
        rows = []
        for i, ex in enumerate(examples):
            claim = getattr(ex, self.field)
            if claim is None:
                raise ValueError(f"examples[{i}]: {self.field} (the claim) is None")
            ids = list(self.tokenizer(claim, add_special_tokens=False)["input_ids"])
            if ids and max(ids) >= self.embedding.shape[0]:
                raise ValueError(f"embedding: token id {max(ids)} out of range for {self.embedding.shape[0]} rows")
            pooled = (self.embedding[ids].max(0).values if ids else torch.zeros(self.embedding.shape[1]))
            words = feature_words(claim)
            extra = torch.tensor([float(any(map(_is_negation, words))), math.log1p(len(words))])
            rows.append(torch.cat([pooled, extra]))
        if not rows:
            return torch.zeros(0, len(self.feature_names))
        return torch.stack(rows)


class ClaimWordsFeaturizer:
    """Claim-only features for FEVER without an embedding: a bag of words of the claim (binary presence
    of each vocabulary word) plus ``claim_negation``, ``claim_negation_count`` and ``log_claim_len``.
    With :class:`BiasModel` on top this is a bag-of-words logistic regression on the claim. The
    vocabulary is fixed at construction (:meth:`from_examples`: the claim words seen at least
    ``min_count`` times, most frequent first, at most ``max_words``); labels are never read."""

    def __init__(self, vocabulary: Sequence[str], *, field: str = "text_b"):
        if field not in ("text_a", "text_b"):
            raise ValueError(f"field: expected 'text_a' or 'text_b', got {field!r}")
        vocabulary = list(vocabulary)
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary: expected distinct words")
        self.vocabulary, self.field = vocabulary, field
        self._index = {w: i for i, w in enumerate(vocabulary)}
        self.feature_names = tuple(f"claim_has_{w}" for w in vocabulary) + (
            "claim_negation", "claim_negation_count", "log_claim_len")

    @classmethod
    def from_examples(cls, examples: Sequence[Example], *, min_count: int = 2, max_words: int = 2000,
                      field: str = "text_b") -> "ClaimWordsFeaturizer":
        if min_count < 1 or max_words < 0:
            raise ValueError(f"min_count must be >= 1 and max_words >= 0, got {min_count} and {max_words}")
        counts: dict[str, int] = {}
        for i, ex in enumerate(examples):
            claim = getattr(ex, field)
            if claim is None:
                raise ValueError(f"examples[{i}]: {field} (the claim) is None")
            for w in set(feature_words(claim)):
                counts[w] = counts.get(w, 0) + 1
        vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))[:max_words]
        return cls(vocab, field=field)

    def __call__(self, examples: Sequence[Example]) -> torch.Tensor:
        out = torch.zeros(len(examples), len(self.feature_names))
        v = len(self.vocabulary)
        for i, ex in enumerate(examples):
            claim = getattr(ex, self.field)
            if claim is None:
                raise ValueError(f"examples[{i}]: {self.field} (the claim) is None")
            words = feature_words(claim)
            for w in words:
                j = self._index.get(w)
                if j is not None:
                    out[i, j] = 1.0
            n_neg = sum(map(_is_negation, words))
            out[i, v:] = torch.tensor([float(n_neg > 0), float(n_neg), math.log1p(len(words))])
        return out


def make_featurizer(task: str, *, embedding: torch.Tensor | None = None, tokenizer=None,
                    examples: Sequence[Example] | None = None):
    """The default featurizer for a task. fever/fever_symmetric: claim-only, from ``embedding`` and
    ``tokenizer`` (:class:`ClaimOnlyFeaturizer`) or, without them, a claim bag of words whose vocabulary
    comes from ``examples`` (:class:`ClaimWordsFeaturizer`). Pair tasks: pair overlap; paws_qqp_biased:
    the score of the one cue its training subset is biased on (:class:`OverlapCueFeaturizer`)."""
    if task in ("fever", "fever_symmetric"):
        if embedding is not None and tokenizer is not None:
            return ClaimOnlyFeaturizer(embedding, tokenizer)
        if examples is not None:
            return ClaimWordsFeaturizer.from_examples(examples)
        raise ValueError("embedding, tokenizer, examples: claim-only FEVER features need an embedding and its "
                         "tokenizer, or the training examples (for a claim bag-of-words vocabulary)")
    if task == "paws_qqp_biased":
        from ..data.tasks import PAWS_BIASED
        return OverlapCueFeaturizer((PAWS_BIASED["cue"],))
    if task in ("mnli", "hans", "hans_style", "qqp", "paws", "paws_qqp", "mrpc", "synthetic"):
        return PairOverlapFeaturizer()
    raise ValueError(f"task: no bias features defined for {task!r}")
