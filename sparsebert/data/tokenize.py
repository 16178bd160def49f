"""Tokenization: the model's own HF tokenizer (or :class:`SimpleVocabTokenizer` for the self-contained
demo and tests), a :class:`TokenizedDataset`, a dynamic-padding collate, and an on-disk cache.

Any tokenizer works that is callable as ``tok(texts_a, texts_b_or_None, truncation=True,
max_length=L)`` returning a mapping with ``input_ids`` (and optionally ``token_type_ids``), and has a
``pad_token_id``: HF ``PreTrainedTokenizer``s and :class:`SimpleVocabTokenizer` both do.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from ..checkpoint import CheckpointError, atomic_save, atomic_write_bytes, load_checkpoint
from .tasks import Example

__all__ = ["SimpleVocabTokenizer", "tokenize_examples", "TokenizedDataset", "PaddingCollator", "label_tensor",
           "tokenizer_fingerprint", "cache_key"]

_WORD = re.compile(r"\w+|[^\w\s]")


class SimpleVocabTokenizer:
    """Whitespace/punctuation word tokenizer over a vocabulary built from training texts (lower-cased).
    Special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3. Pairs are encoded BERT-style:
    ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0 for the first part, 1 for the second; truncation is
    "longest first"."""

    special_tokens = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[:4]) != self.special_tokens:
            raise ValueError(f"vocab: expected to start with {self.special_tokens}, got {vocab[:4]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab: expected unique tokens")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id = 0, 1, 2, 3
        digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:12]
        self.name_or_path = f"simple-vocab-{len(vocab)}-{digest}"

    @classmethod
    def from_texts(cls, texts: Iterable[str | None], *, min_freq: int = 1, max_size: int | None = None):
        """Vocabulary of the words in ``texts`` seen at least ``min_freq`` times, most frequent first
        (ties alphabetical), capped at ``max_size`` tokens including the 4 special ones."""
        counts = Counter(w for t in texts if t for w in cls.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max(0, max_size - 4)]
        return cls(list(cls.special_tokens) + words)

    @classmethod
    def from_examples(cls, examples: Sequence[Example], **kw):
        return cls.from_texts([t for ex in examples for t in (ex.text_a, ex.text_b)], **kw)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.token_to_id)

    def encode_words(self, text: str) -> list[int]:
        return [self.token_to_id.get(w, self.unk_token_id) for w in self.split(text)]

    def _encode_one(self, a: str, b: str | None, truncation: bool, max_length: int | None, special: bool):
        ids_a, ids_b = self.encode_words(a), (self.encode_words(b) if b is not None else None)
        n_special = (3 if ids_b is not None else 2) if special else 0
        if truncation and max_length is not None:
            budget = max_length - n_special
            if budget < 0:
                raise ValueError(f"max_length: {max_length} leaves no room for the special tokens")
            if ids_b is None:
                ids_a = ids_a[:budget]
            else:
                while len(ids_a) + len(ids_b) > budget:  # longest first, like HF
                    if len(ids_a) >= len(ids_b):
                        ids_a.pop()
                    else:
                        ids_b.pop()
        if not special:
            ids = ids_a + (ids_b or [])
            return ids, [0] * len(ids_a) + [1] * len(ids_b or [])
        ids = [self.cls_token_id] + ids_a + [self.sep_token_id]
        types = [0] * len(ids)
        if ids_b is not None:
            ids += ids_b + [self.sep_token_id]
            types += [1] * (len(ids_b) + 1)
        return ids, types

    def __call__(self, text, text_pair=None, *, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True, **unused):
        """HF-like call: a string (or pair) gives lists of ints, a list of strings gives lists of lists.
        Returns a dict with input_ids, token_type_ids, attention_mask (no padding)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = [text_pair] if single else (list(text_pair) if text_pair is not None else [None] * len(texts))
        if len(pairs) != len(texts):
            raise ValueError(f"text_pair: expected {len(texts)} second texts, got {len(pairs)}")
        enc = [self._encode_one(a, b, truncation, max_length, add_special_tokens) for a, b in zip(texts, pairs)]
        out = {"input_ids": [e[0] for e in enc], "token_type_ids": [e[1] for e in enc],
               "attention_mask": [[1] * len(e[0]) for e in enc]}
        return {k: v[0] for k, v in out.items()} if single else out

    def save(self, path) -> None:
        atomic_write_bytes(json.dumps({"vocab": self.vocab}).encode(), path)

    @classmethod
    def load(cls, path):
        return cls(json.loads(Path(path).read_text())["vocab"])


# --------------------------------------------------------------------------------------------- helpers
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's identity: class, name, vocabulary, lower-casing flag."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(getattr(tokenizer, "do_lower_case", "")).encode())
    vocab = tokenizer.get_vocab()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()


def cache_key(tokenizer, max_length: int, examples: Sequence[Example]) -> str:
    """Hash of (tokenizer fingerprint, max_length, all texts): the cache file name."""
    h = hashlib.sha256()
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(f"max_length={max_length}\n".encode())
    for ex in examples:
        h.update(ex.text_a.encode())
        h.update(b"\x00" + (ex.text_b.encode() if ex.text_b is not None else b"\x01") + b"\x02")
    return h.hexdigest()[:32]


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 128) -> dict[str, list]:
    """Encode all examples (pairs when ``text_b`` is set) with truncation to ``max_length``, no padding.
    Returns ``{"input_ids": [[...]], "token_type_ids": [[...]]}``; token_type_ids are zeros when the
    tokenizer gives none."""
    if not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length: expected an int >= 4, got {max_length!r}")
    input_ids: list = [None] * len(examples)
    type_ids: list = [None] * len(examples)
    for is_pair in (True, False):
        idx = [i for i, ex in enumerate(examples) if (ex.text_b is not None) == is_pair]
        if not idx:
            continue
        a = [examples[i].text_a for i in idx]
        b = [examples[i].text_b for i in idx] if is_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
        for j, i in enumerate(idx):
            input_ids[i], type_ids[i] = list(enc["input_ids"][j]), list(types[j])
    return {"input_ids": input_ids, "token_type_ids": type_ids}


def _probs_tensor(probs, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(probs, dtype=torch.float32)
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n}, num_labels), got {tuple(t.shape)}")
    if (t < 0).any() or not torch.allclose(t.sum(-1), torch.ones(n), atol=1e-3):
        raise ValueError(f"{name}: expected non-negative rows summing to 1")
    return t


def label_tensor(labels) -> torch.Tensor:
    """Labels as a tensor: float32 when any label is a non-integral number or a Python float (regression,
    e.g. STS-B scores), long otherwise (class indices)."""
    labels = list(labels)
    if any(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.is_floating_point()) for v in labels):
        t = torch.as_tensor([float(v) for v in labels], dtype=torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError("labels: expected finite numbers, got NaN or inf")
        return t
    return torch.as_tensor(labels, dtype=torch.long)


def _write_token_cache(enc: dict, path: Path) -> None:
    """The token lists as flat int32 tensors plus per-example lengths (a safetensors checkpoint)."""
    ids, types = enc["input_ids"], enc["token_type_ids"]
    atomic_save({"lengths": torch.tensor([len(x) for x in ids], dtype=torch.int64),
                 "input_ids": torch.tensor([t for x in ids for t in x], dtype=torch.int32),
                 "token_type_ids": torch.tensor([t for x in types for t in x], dtype=torch.int32)}, path)


def _read_token_cache(path: Path, n: int):
    """The cached encoding, or None (with a warning naming the file) when the file is unreadable or does
    not match: the caller then rebuilds it."""
    try:
        state = load_checkpoint(path)
        lengths = state["lengths"].tolist()
        total = sum(lengths)
        if len(lengths) != n or state["input_ids"].numel() != total or state["token_type_ids"].numel() != total:
            raise CheckpointError(f"{path} holds {len(lengths)} examples / {state['input_ids'].numel()} tokens, "
                                  f"expected {n} examples")
    except (CheckpointError, KeyError, AttributeError, OSError) as exc:
        warnings.warn(f"tokenization cache {path} is unreadable ({exc}); rebuilding it", stacklevel=3)
        return None
    bounds = [0]
    for k in lengths:
        bounds.append(bounds[-1] + k)
    flat_ids, flat_types = state["input_ids"].tolist(), state["token_type_ids"].tolist()
    return {"input_ids": [flat_ids[a:b] for a, b in zip(bounds, bounds[1:])],
            "token_type_ids": [flat_types[a:b] for a, b in zip(bounds, bounds[1:])]}


class TokenizedDataset(Dataset):
    """Tokenized examples plus labels and optional per-example ``bias_probs`` / ``teacher_probs``
    (N, num_labels). Items are dicts: input_ids, token_type_ids (lists), label, index (int), and the
    probability rows when present. Use with :class:`PaddingCollator`."""

    def __init__(self, input_ids, token_type_ids, labels, *, bias_probs=None, teacher_probs=None):
        n = len(input_ids)
        if len(token_type_ids) != n or len(labels) != n:
            raise ValueError(f"token_type_ids/labels: expected {n} entries each, got "
                             f"{len(token_type_ids)} and {len(labels)}")
        self.input_ids, self.token_type_ids = input_ids, token_type_ids
        self.labels = label_tensor(labels)
        self.bias_probs = _probs_tensor(bias_probs, n, "bias_probs") if bias_probs is not None else None
        self.teacher_probs = _probs_tensor(teacher_probs, n, "teacher_probs") if teacher_probs is not None else None

    @classmethod
    def from_examples(cls, examples: Sequence[Example], tokenizer, max_length: int = 128, *, cache_dir=None,
                      bias_probs=None, teacher_probs=None):
        """Tokenize (through the on-disk cache when ``cache_dir`` is given). ``bias_probs`` default to
        ``meta["bias_probs"]`` when every example carries them (see ``sparsebert.debias.attach_bias_probs``)."""
        enc = None
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"tok-{cache_key(tokenizer, max_length, examples)}.safetensors"
            if path.is_file():
                enc = _read_token_cache(path, len(examples))
        if enc is None:
            enc = tokenize_examples(examples, tokenizer, max_length)
            if path is not None:
                _write_token_cache(enc, path)
        if bias_probs is None and examples and all("bias_probs" in ex.meta for ex in examples):
            bias_probs = [ex.meta["bias_probs"] for ex in examples]
        return cls(enc["input_ids"], enc["token_type_ids"], [ex.label for ex in examples],
                   bias_probs=bias_probs, teacher_probs=teacher_probs)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        label = float(self.labels[i]) if self.labels.is_floating_point() else int(self.labels[i])
        item = {"input_ids": self.input_ids[i], "token_type_ids": self.token_type_ids[i],
                "label": label, "index": int(i)}
        if self.bias_probs is not None:
            item["bias_probs"] = self.bias_probs[i]
        if self.teacher_probs is not None:
            item["teacher_probs"] = self.teacher_probs[i]
        return item


class PaddingCollator:
    """Dynamic padding to the longest sequence in the batch. Returns input_ids, attention_mask,
    token_type_ids (B, L) long tensors, labels (B,), indices (B,) and, when the items carry them,
    bias_probs / teacher_probs (B, C)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def for_tokenizer(cls, tokenizer):
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError("tokenizer: expected a pad_token_id")
        return cls(pad)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("items: expected a non-empty batch")
        length = max(len(it["input_ids"]) for it in items)
        b = len(items)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        types = torch.zeros((b, length), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[r, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            types[r, :n] = torch.as_tensor(it["token_type_ids"], dtype=torch.long)
            attention[r, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": types,
                 "labels": label_tensor([it["label"] for it in items]),
                 "indices": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        for key in ("bias_probs", "teacher_probs"):
            present = [key in it for it in items]
            if any(present):
                if not all(present):
                    raise ValueError(f"items: {key} present on some items of the batch but not all")
                batch[key] = torch.stack([torch.as_tensor(it[key], dtype=torch.float32) for it in items])
        return batch
