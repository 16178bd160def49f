"""Prediction and metrics: accuracy (NLI, FEVER), F1 of the positive class (paraphrase), HANS-style
accuracy per heuristic and for entailed / non-entailed examples, and mean ± std over seeds.

A 3-way MNLI model is scored on a 2-way HANS(-style) set by collapsing its probabilities
(neutral + contradiction -> non-entailment, `sparsebert.data.mnli_to_hans_probs`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .train import forward_logits


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device=None, progress: bool = False, desc: str = "eval"):
    """(probs (N, C) float32, labels (N,) long) over `loader`, in loader order; the model's train/eval
    mode is restored afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, labels = [], []
    it = loader
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for batch in it:
            probs.append(torch.softmax(forward_logits(model, batch, device).float(), -1).cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("loader is empty")
    return torch.cat(probs), torch.cat(labels)


def _check_pair(preds, labels):
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    if preds.shape != labels.shape or preds.dim() != 1:
        raise ValueError(f"preds and labels must be 1-D of one length, got {tuple(preds.shape)} and {tuple(labels.shape)}")
    if preds.numel() == 0:
        raise ValueError("preds is empty")
    return preds, labels


def accuracy(preds, labels) -> float:
    preds, labels = _check_pair(preds, labels)
    return (preds == labels).float().mean().item()


def f1_score(preds, labels, positive: int = 1) -> float:
    """F1 of class `positive` (0.0 when there are neither predicted nor true positives)."""
    preds, labels = _check_pair(preds, labels)
    tp = ((preds == positive) & (labels == positive)).sum().item()
    fp = ((preds == positive) & (labels != positive)).sum().item()
    fn = ((preds != positive) & (labels == positive)).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def metric_value(metric: str, preds, labels) -> float:
    if metric == "accuracy":
        return accuracy(preds, labels)
    if metric == "f1":
        return f1_score(preds, labels)
    raise ValueError(f"metric must be 'accuracy' or 'f1', got {metric!r}")


def hans_breakdown(preds, examples: Sequence) -> Dict[str, Any]:
    """HANS-style accuracy: overall, entailed (label 0), non-entailed (label 1), and per heuristic
    (`meta["heuristic"]`) split the same way. `preds` are 2-way (0 entailment, 1 non-entailment)."""
    preds = torch.as_tensor(preds)
    if len(examples) != preds.numel():
        raise ValueError(f"{preds.numel()} predictions for {len(examples)} examples")
    labels = torch.tensor([ex.label for ex in examples])
    heur = [ex.meta.get("heuristic", "unknown") for ex in examples]

    def acc(sel: torch.Tensor) -> Optional[float]:
        return (preds[sel] == labels[sel]).float().mean().item() if sel.any() else None

    out: Dict[str, Any] = {"accuracy": acc(torch.ones_like(labels, dtype=torch.bool)),
                           "entailed": acc(labels == 0), "non_entailed": acc(labels == 1), "by_heuristic": {}}
    for h in sorted(set(heur)):
        in_h = torch.tensor([x == h for x in heur])
        out["by_heuristic"][h] = {"accuracy": acc(in_h), "entailed": acc(in_h & (labels == 0)),
                                  "non_entailed": acc(in_h & (labels == 1))}
    return out


def evaluate(model: nn.Module, loader: Iterable, *, metric: str, examples: Optional[Sequence] = None,
             collapse_mnli_to_2way: bool = False, hans: bool = False, device=None, progress: bool = False,
             desc: str = "eval") -> Dict[str, Any]:
    """Score `model` on `loader`: {"metric", "value", "accuracy", "n"} (+ "f1" for f1 tasks, + "hans" with
    the HANS-style breakdown when `hans` and `examples` are given). `collapse_mnli_to_2way` scores a
    3-way NLI model on a 2-way entailment set."""
    probs, labels = predict(model, loader, device=device, progress=progress, desc=desc)
    if collapse_mnli_to_2way:
        from .data import mnli_to_hans_probs
        probs = mnli_to_hans_probs(probs)
    preds = probs.argmax(-1)
    out: Dict[str, Any] = {"metric": metric, "value": metric_value(metric, preds, labels),
                           "accuracy": accuracy(preds, labels), "n": int(labels.numel())}
    if metric == "f1":
        out["f1"] = out["value"]
    if hans:
        if examples is None:
            raise ValueError("hans=True needs the examples (for their heuristic)")
        out["hans"] = hans_breakdown(preds, examples)
    return out


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """{"mean", "std", "n"}: sample std (n - 1), 0.0 for one value; None entries are skipped."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(vals)}


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Mean ± std, leaf by leaf, of the numeric entries shared by a list of (nested) metric dicts."""
    if not results:
        raise ValueError("results is empty")
    first = results[0]
    out: Dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, Mapping):
            subs = [r[key] for r in results if isinstance(r.get(key), Mapping)]
            out[key] = aggregate_seeds(subs)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = mean_std([r.get(key) for r in results])
    return out


def format_mean_std(stats: Mapping[str, float], scale: float = 100.0, digits: int = 1) -> str:
    if stats.get("n", 0) == 0:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"

