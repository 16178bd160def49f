"""The bias-only model: multinomial logistic regression on standardized hand-crafted features.

Trained in torch (full-batch L-BFGS with strong-Wolfe line search, or Adam), in float64 for a stable
optimum on small data. Its class probabilities on the training set are the ``bias_probs`` consumed by
the debiasing losses; :func:`attach_bias_probs` stores them with the examples (``meta["bias_probs"]``)
so that tokenized datasets pick them up.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_save, load_checkpoint
from ..data.tasks import Example, split_examples

__all__ = ["BiasModel", "fit_bias_model", "attach_bias_probs", "bias_probs_of", "cross_fit_bias_probs"]


class BiasModel:
    """``fit(features (N, F), labels (N,))``, ``predict_proba(features) -> (N, C)`` float32.

    Loss: mean cross-entropy + ``l2 * ||W||^2`` (the intercept is not penalized). Features are
    standardized with the training mean and std (constant columns get std 1)."""

    def __init__(self, num_labels: int, *, l2: float = 1e-3, optimizer: str = "lbfgs", max_iter: int = 200,
                 lr: float = 0.05, feature_names: Sequence[str] | None = None):
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels: expected an int >= 2, got {num_labels!r}")
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer: expected 'lbfgs' or 'adam', got {optimizer!r}")
        if l2 < 0:
            raise ValueError(f"l2: expected >= 0, got {l2}")
        self.num_labels, self.l2, self.optimizer = num_labels, float(l2), optimizer
        self.max_iter, self.lr = max_iter, lr
        self.feature_names = tuple(feature_names) if feature_names is not None else None
        self.mean = self.std = self.weight = self.bias = None

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    def _check_features(self, features, n_expected=None) -> torch.Tensor:
        x = torch.as_tensor(features)
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"features: expected a 2-D float tensor (N, F), got {x.dtype} {tuple(x.shape)}")
        if n_expected is not None and x.shape[1] != n_expected:
            raise ValueError(f"features: expected {n_expected} columns (as in training), got {x.shape[1]}")
        if not torch.isfinite(x).all():
            raise ValueError("features: expected finite values")
        return x.detach().to(torch.float64).cpu()

    def fit(self, features, labels) -> "BiasModel":
        x = self._check_features(features)
        y = torch.as_tensor(labels)
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(f"labels: expected an int tensor of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("features: expected at least one training example")
        y = y.long().cpu()
        if y.min() < 0 or y.max() >= self.num_labels:
            raise ValueError(f"labels: expected values in [0, {self.num_labels}), got [{int(y.min())}, {int(y.max())}]")
        if self.feature_names is not None and len(self.feature_names) != x.shape[1]:
            raise ValueError(f"features: {x.shape[1]} columns but {len(self.feature_names)} feature_names")
        self.mean = x.mean(0)
        std = x.std(0, unbiased=False)
        self.std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z = (x - self.mean) / self.std
        w = torch.zeros(self.num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
        counts = torch.bincount(y, minlength=self.num_labels).double()
        b = torch.log((counts + 1) / (counts.sum() + self.num_labels)).requires_grad_(True)  # class prior start

        def objective():
            return F.cross_entropy(z @ w.T + b, y) + self.l2 * (w * w).sum()

        threads = torch.get_num_threads()
        if z.numel() <= 1 << 20:  # small (N, F) x (F, C) problem: intra-op threads only add contention
            torch.set_num_threads(1)
        try:
            self._optimize(objective, [w, b])
        finally:
            torch.set_num_threads(threads)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def _optimize(self, objective, params) -> None:
        w, b = params
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure():
                opt.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam([w, b], lr=self.lr)
            for _ in range(self.max_iter):
                opt.zero_grad()
                objective().backward()
                opt.step()

    def predict_logits(self, features) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("BiasModel: call fit() (or load()) before predicting")
        z = (self._check_features(features, self.weight.shape[1]) - self.mean) / self.std
        return (z @ self.weight.T + self.bias).float()

    def predict_proba(self, features) -> torch.Tensor:
        return torch.softmax(self.predict_logits(features), dim=-1)

    def predict(self, features) -> torch.Tensor:
        return self.predict_logits(features).argmax(-1)

    def state_dict(self) -> dict:
        if not self.fitted:
            raise RuntimeError("BiasModel: nothing to save before fit()")
        return {"num_labels": self.num_labels, "l2": self.l2, "feature_names": list(self.feature_names or []),
                "mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    def save(self, path) -> None:
        """Atomic save (temporary file + fsync + rename)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path) -> "BiasModel":
        state = load_checkpoint(path)  # safetensors + JSON, never unpickled
        model = cls(state["num_labels"], l2=state["l2"], feature_names=state["feature_names"] or None)
        model.mean, model.std, model.weight, model.bias = state["mean"], state["std"], state["weight"], state["bias"]
        return model


def fit_bias_model(examples: Sequence[Example], featurizer, num_labels: int, **kw) -> BiasModel:
    """Featurize ``examples`` and fit a :class:`BiasModel` on their labels."""
    model = BiasModel(num_labels, feature_names=getattr(featurizer, "feature_names", None), **kw)
    return model.fit(featurizer(examples), torch.tensor([ex.label for ex in examples]))


def cross_fit_bias_probs(examples: Sequence[Example], featurizer, num_labels: int, *, folds: int = 5,
                         seed: int = 0, **kw) -> torch.Tensor:
    """Out-of-fold bias probabilities (N, C): each example is scored by a bias model fit on the other
    folds, so the probabilities are not inflated by fitting the example itself."""
    if folds < 2:
        raise ValueError(f"folds: expected >= 2, got {folds}")
    tagged = [dataclasses.replace(ex, meta={**ex.meta, "_row": i}) for i, ex in enumerate(examples)]
    parts = split_examples(tagged, [len(tagged) // folds + (k < len(tagged) % folds) for k in range(folds)], seed)
    feats = featurizer(examples)
    labels = torch.tensor([ex.label for ex in examples])
    out = torch.empty(len(examples), num_labels)
    for k, part in enumerate(parts):
        held = torch.tensor([ex.meta["_row"] for ex in part], dtype=torch.long)
        keep = torch.ones(len(examples), dtype=torch.bool)
        keep[held] = False
        model = BiasModel(num_labels, **kw).fit(feats[keep], labels[keep])
        out[held] = model.predict_proba(feats[held])
    return out


def attach_bias_probs(examples: Sequence[Example], probs) -> list[Example]:
    """New examples with ``meta["bias_probs"]`` = the row of ``probs`` (N, C) as a tuple of floats
    (examples are frozen; the input list is not modified)."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    if p.dim() != 2 or p.shape[0] != len(examples):
        raise ValueError(f"probs: expected shape ({len(examples)}, num_labels), got {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones(p.shape[0]), atol=1e-3):
        raise ValueError("probs: expected non-negative rows summing to 1")
    return [dataclasses.replace(ex, meta={**ex.meta, "bias_probs": tuple(row)})
            for ex, row in zip(examples, p.tolist())]


def bias_probs_of(examples: Sequence[Example]) -> torch.Tensor:
    """Stack ``meta["bias_probs"]`` of every example into an (N, C) float32 tensor."""
    missing = [i for i, ex in enumerate(examples) if "bias_probs" not in ex.meta]
    if missing:
        raise ValueError(f"examples: no meta['bias_probs'] on {len(missing)} examples (first: index {missing[0]}); "
                         "call attach_bias_probs first")
    return torch.tensor([ex.meta["bias_probs"] for ex in examples], dtype=torch.float32)
