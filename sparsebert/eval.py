"""Prediction and metrics: accuracy (NLI, FEVER), F1 of the positive class (paraphrase), HANS-style
accuracy per heuristic and for entailed / non-entailed examples, and mean ± std over seeds.

A 3-way MNLI model is scored on a 2-way HANS(-style) set by taking the 3-way argmax first and then
mapping neutral and contradiction to non-entailment (as the SRNet authors' code does;
`sparsebert.data.mnli_to_hans_preds`). Summing P(neutral) + P(contradiction) before the argmax is the
option ``hans_rule="sum"``.

Every score comes with its trivial baselines (`classification_summary`: majority-class accuracy,
constant-predictor F1, a `one_class` flag), and `bootstrap_ci` gives 95% intervals over examples and seeds.
Rates of rare events over seeds (a mask search that collapses) are compared with `fisher_exact_2x2`, or with
`cluster_permutation_test` when the seeds come in clusters (several searches from one teacher).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .train import forward_logits


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device=None, progress: bool = False, desc: str = "eval"):
    """(probs (N, C) float32, labels (N,)) over `loader`, in loader order; the model's train/eval
    mode is restored afterwards. A 1-output (regression) head gives its raw scores (N, 1), not a softmax."""
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
            logits = forward_logits(model, batch, device).float()
            probs.append((logits if logits.shape[-1] == 1 else torch.softmax(logits, -1)).cpu())
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


CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def metric_value(metric: str, preds, labels) -> float:
    if metric == "accuracy":
        return accuracy(preds, labels)
    if metric == "f1":
        return f1_score(preds, labels)
    if metric == "matthews":
        return matthews_corr(preds, labels)
    if metric == "pearson":
        return pearson_corr(preds, labels)
    if metric == "spearman":
        return spearman_corr(preds, labels)
    raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS + REGRESSION_METRICS}, got {metric!r}")


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


def classification_summary(preds, labels, num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Accuracy beside its trivial baselines: {"accuracy", "f1" (binary only, else None: F1 of class 1),
    "majority_accuracy" (always predicting the most frequent true label), "constant_f1" (binary: F1 of
    always predicting class 1), "one_class" (True when every prediction is the same class),
    "pred_counts" (per class)}."""
    preds, labels = _check_pair(preds, labels)
    k = int(num_classes) if num_classes is not None else int(max(preds.max(), labels.max())) + 1
    if int(preds.min()) < 0 or int(labels.min()) < 0 or int(preds.max()) >= k or int(labels.max()) >= k:
        raise ValueError(f"preds, labels: expected class indices in [0, {k}), got preds in [{int(preds.min())}, "
                         f"{int(preds.max())}] and labels in [{int(labels.min())}, {int(labels.max())}]")
    binary = k == 2
    label_counts = torch.bincount(labels.long(), minlength=k)
    pred_counts = torch.bincount(preds.long(), minlength=k)
    return {"accuracy": accuracy(preds, labels), "f1": f1_score(preds, labels) if binary else None,
            "majority_accuracy": label_counts.max().item() / labels.numel(),
            "constant_f1": f1_score(torch.ones_like(labels), labels) if binary else None,
            "one_class": bool((pred_counts > 0).sum().item() == 1), "pred_counts": pred_counts.tolist()}


def seed_example_bootstrap(x: torch.Tensor, n_boot: int, level: float, seed: int) -> Dict[str, float]:
    """Percentile interval of x.mean() for x (seeds, examples): each replicate draws the seeds with
    replacement and, shared by those seeds (the examples are paired), the examples with replacement."""
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 1, got {level} and {n_boot}")
    g = torch.Generator().manual_seed(seed)
    s, n = x.shape
    seed_idx = torch.randint(0, s, (n_boot, s), generator=g)
    ex_idx = torch.randint(0, n, (n_boot, n), generator=g)
    # (n_boot, S): each seed's mean on each replicate's examples (in chunks to bound memory)
    per_seed = torch.cat([x[:, ex_idx[i:i + 256]].mean(-1).T for i in range(0, n_boot, 256)])
    means = per_seed.gather(1, seed_idx).mean(1)
    alpha = (1.0 - level) / 2
    return {"mean": x.mean().item(), "low": torch.quantile(means, alpha).item(),
            "high": torch.quantile(means, 1 - alpha).item(), "level": level, "n_seeds": s, "n_examples": n}


def _per_seed_correct(arrays: Sequence, name: str) -> torch.Tensor:
    if len(arrays) == 0:
        raise ValueError(f"{name}: expected at least one seed's array")
    rows = [torch.as_tensor(a).reshape(-1).double() for a in arrays]
    n = rows[0].numel()
    if n == 0 or any(r.numel() != n for r in rows):
        raise ValueError(f"{name}: expected non-empty arrays of one length, got lengths {[r.numel() for r in rows]}")
    x = torch.stack(rows)
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name}: expected 0/1 (correct or not) entries")
    return x


def bootstrap_ci(per_seed_correct: Sequence, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> Dict[str, float]:
    """Percentile bootstrap interval of the mean accuracy over seeds and examples.

    `per_seed_correct`: one 0/1 (or bool) array per seed, all over the same N examples. Each replicate
    draws the seeds with replacement and, shared by those seeds (the examples are paired), N examples
    with replacement. Returns {"mean", "low", "high", "level", "n_seeds", "n_examples"}."""
    return seed_example_bootstrap(_per_seed_correct(per_seed_correct, "per_seed_correct"), n_boot, level, seed)


def bootstrap_diff_ci(per_seed_correct_a: Sequence, per_seed_correct_b: Sequence, *, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Interval of accuracy(a) - accuracy(b), paired by seed and by example: a's and b's seed i share a
    seed (e.g. a pruned model and the dense model it came from) and both arrays cover the same examples.
    Resampled as `bootstrap_ci`, on the per-example differences. Same keys as `bootstrap_ci`, "mean"
    being the difference."""
    a = _per_seed_correct(per_seed_correct_a, "per_seed_correct_a")
    b = _per_seed_correct(per_seed_correct_b, "per_seed_correct_b")
    if a.shape != b.shape:
        raise ValueError(f"per_seed_correct_a and per_seed_correct_b: expected the same seeds x examples, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return seed_example_bootstrap(a - b, n_boot, level, seed)


def evaluate(model: nn.Module, loader: Iterable, *, metric: str, examples: Optional[Sequence] = None,
             collapse_mnli_to_2way: bool = False, hans_rule: str = "argmax", hans: bool = False, device=None,
             progress: bool = False, desc: str = "eval") -> Dict[str, Any]:
    """Score `model` on `loader`: {"metric", "value", "accuracy", "n", "summary"} (+ "f1" for f1 tasks,
    + "hans" with the HANS-style breakdown when `hans` and `examples` are given). `collapse_mnli_to_2way`
    scores a 3-way NLI model on a 2-way entailment set with `hans_rule` ("argmax" or "sum", see
    `sparsebert.data.mnli_to_hans_preds`). "summary" is `classification_summary` of the predictions."""
    probs, labels = predict(model, loader, device=device, progress=progress, desc=desc)
    if probs.shape[-1] == 1:  # regression head: correlations only, argmax would always be 0
        if metric not in REGRESSION_METRICS:
            raise ValueError(f"metric {metric!r} needs a classifier, but the model has 1 output (regression); "
                             f"use one of {REGRESSION_METRICS}")
        return {"metric": metric, "value": metric_value(metric, probs[:, 0], labels.float()),
                "n": int(labels.numel())}
    if metric in REGRESSION_METRICS:
        raise ValueError(f"metric {metric!r} is for a 1-output regression head; this model has "
                         f"{probs.shape[-1]} outputs: use one of {CLASSIFICATION_METRICS}")
    if collapse_mnli_to_2way:
        from .data import mnli_to_hans_preds
        preds, num_classes = mnli_to_hans_preds(probs, hans_rule), 2
    else:
        preds, num_classes = probs.argmax(-1), probs.shape[-1]
    out: Dict[str, Any] = {"metric": metric, "value": metric_value(metric, preds, labels),
                           "accuracy": accuracy(preds, labels), "n": int(labels.numel()),
                           "summary": classification_summary(preds, labels, num_classes)}
    if collapse_mnli_to_2way:
        out["hans_rule"] = hans_rule
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


# ------------------------------------------------------------------ correlations (GLUE STS-B, CoLA)
def _check_real_pair(preds, labels):
    preds, labels = _check_pair(preds, labels)
    if preds.numel() < 2:
        raise ValueError("preds: a correlation needs at least 2 values")
    return preds.double(), labels.double()


def pearson_corr(preds, labels) -> float:
    """Pearson correlation of two 1-D sequences (0.0 when either is constant)."""
    x, y = _check_real_pair(preds, labels)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return 0.0 if den == 0 else float((x * y).sum()) / den


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of their ranks (as scipy.stats.rankdata)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    _, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman_corr(preds, labels) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    x, y = _check_real_pair(preds, labels)
    return pearson_corr(_average_ranks(x), _average_ranks(y))


def matthews_corr(preds, labels) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K; 0.0 when undefined)."""
    preds, labels = _check_pair(preds, labels)
    if preds.is_floating_point() or labels.is_floating_point():
        raise ValueError("matthews: expected integer class predictions and labels (a classifier's argmax)")
    classes, inv = torch.unique(torch.cat([preds, labels]), return_inverse=True)
    k, n = classes.numel(), preds.numel()
    conf = torch.zeros(k, k, dtype=torch.float64)
    conf.index_put_((inv[n:], inv[:n]), torch.ones(n, dtype=torch.float64), accumulate=True)  # [true, pred]
    c, s = float(conf.trace()), float(n)
    t, p = conf.sum(1), conf.sum(0)
    den = math.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
    return 0.0 if den == 0 else (c * s - float(t @ p)) / den


# ------------------------------------------------- pruned vs dense, and two methods compared per example
def dense_agreement(pruned_probs, dense_probs) -> Dict[str, float]:
    """How closely a pruned model follows the dense one on the same inputs: ``agreement`` (fraction of equal
    argmax predictions) and ``mean_kl`` (mean over examples of KL(dense || pruned)), from (N, C) probabilities."""
    p, q = torch.as_tensor(pruned_probs, dtype=torch.float64), torch.as_tensor(dense_probs, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"pruned_probs and dense_probs must be (N, C) of one shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.shape[1] < 2:
        raise ValueError("pruned_probs: agreement and KL need class probabilities (C >= 2), not regression scores")
    kl = (q * (q.clamp_min(1e-300).log() - p.clamp_min(1e-300).log())).sum(1)
    return {"agreement": float((p.argmax(1) == q.argmax(1)).double().mean()), "mean_kl": float(kl.mean()),
            "n": int(p.shape[0])}


def _check_correct_pair(correct_a, correct_b):
    a, b = torch.as_tensor(correct_a).bool().flatten(), torch.as_tensor(correct_b).bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty and of one length, got {a.numel()} and {b.numel()}")
    return a, b


def paired_bootstrap(correct_a, correct_b, *, n_boot: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Paired bootstrap over examples of accuracy(a) - accuracy(b) from per-example correctness (bool).
    Returns the observed difference, a 95% percentile interval and ``p_value``: the two-sided fraction of
    resamples whose difference crosses 0 (2 * min(P(d <= 0), P(d >= 0)), capped at 1)."""
    a, b = _check_correct_pair(correct_a, correct_b)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = a.double() - b.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
    diffs = d[idx].mean(1)
    p = min(1.0, 2 * min(float((diffs <= 0).double().mean()), float((diffs >= 0).double().mean())))
    return {"diff": float(d.mean()), "low": float(diffs.quantile(0.025)), "high": float(diffs.quantile(0.975)),
            "p_value": p, "n": int(d.numel())}


def mcnemar_test(correct_a, correct_b) -> Dict[str, float]:
    """Exact (binomial) two-sided McNemar test on the discordant pairs: ``b01`` (a wrong, b right) and
    ``b10`` (a right, b wrong); p = 1 when there are none."""
    a, b = _check_correct_pair(correct_a, correct_b)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n = n10 + n01
    k = min(n10, n01)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"b10": n10, "b01": n01, "p_value": p}


def fisher_exact_2x2(hits_a: int, n_a: int, hits_b: int, n_b: int) -> Dict[str, float]:
    """Fisher's exact two-sided test of "event rate in group a = in group b" from counts (hits of n per group).

    Conditioned on the margins, the number of group a's hits is hypergeometric; p sums the probabilities of every
    table no more likely than the observed one (R's fisher.test and scipy's convention, with the same relative
    tolerance 1e-7 for ties). Exact for any size; meant for small ones (seeds, not examples)."""
    for name, v in (("hits_a", hits_a), ("n_a", n_a), ("hits_b", hits_b), ("n_b", n_b)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
    if hits_a > n_a or hits_b > n_b or n_a == 0 or n_b == 0:
        raise ValueError(f"expected 0 <= hits <= n and n >= 1 per group, got {hits_a}/{n_a} and {hits_b}/{n_b}")
    hits, n = hits_a + hits_b, n_a + n_b
    lo, hi = max(0, hits - n_b), min(hits, n_a)

    def prob(k: int) -> float:  # P(group a has k of the hits | margins)
        return math.comb(n_a, k) * math.comb(n_b, hits - k) / math.comb(n, hits)

    observed = prob(hits_a)
    p = sum(q for q in (prob(k) for k in range(lo, hi + 1)) if q <= observed * (1 + 1e-7))
    return {"rate_a": hits_a / n_a, "rate_b": hits_b / n_b, "p_value": min(1.0, p)}


def cluster_permutation_test(clusters_a, clusters_b) -> Dict[str, float]:
    """Exact two-sided permutation test of "event rate in group a = in group b" when the events come in clusters
    (runs that share one teacher): each cluster is a ``(hits, n)`` pair, and the cluster, not the run, is what is
    exchanged between the groups. Every split of the pooled clusters into groups of the observed sizes is
    enumerated; the statistic is the difference of the pooled rates, and p is the share of splits at least as far
    from zero as the observed one (relative tolerance 1e-9 for ties). ``min_p_value`` is the smallest p that any
    split of these same clusters could have given (at best 2 / C(k_a + k_b, k_a) for groups of equal size): with
    few clusters even the most lopsided outcome cannot be significant, and a reader should see that next to p."""
    groups = []
    for name, clusters in (("clusters_a", clusters_a), ("clusters_b", clusters_b)):
        clusters = list(clusters)
        if not clusters:
            raise ValueError(f"{name}: expected at least one (hits, n) cluster, got none")
        for c in clusters:
            ok = isinstance(c, (tuple, list)) and len(c) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in c)
            if not ok or not 0 <= c[0] <= c[1] or c[1] == 0:
                raise ValueError(f"{name}: expected (hits, n) pairs of integers with 0 <= hits <= n and n >= 1, "
                                 f"got {c!r}")
        groups.append(clusters)
    pooled = groups[0] + groups[1]
    k_a, total = len(groups[0]), len(pooled)
    if math.comb(total, k_a) > 1_000_000:
        raise ValueError(f"clusters_a, clusters_b: {math.comb(total, k_a)} splits to enumerate; this exact test is for "
                         "a handful of clusters per group (at most 10^6 splits)")
    hits_all, n_all = sum(h for h, _ in pooled), sum(n for _, n in pooled)

    def diff(idx) -> float:
        h = sum(pooled[i][0] for i in idx)
        n = sum(pooled[i][1] for i in idx)
        return h / n - (hits_all - h) / (n_all - n)

    observed = abs(diff(range(k_a)))
    stats = [abs(diff(idx)) for idx in itertools.combinations(range(total), k_a)]
    extreme = sum(s >= observed * (1 - 1e-9) for s in stats)
    top = max(stats)
    at_top = sum(s >= top * (1 - 1e-9) for s in stats)
    rate = lambda cs: sum(h for h, _ in cs) / sum(n for _, n in cs)  # noqa: E731
    return {"rate_a": rate(groups[0]), "rate_b": rate(groups[1]), "p_value": extreme / len(stats),
            "min_p_value": at_top / len(stats), "splits": len(stats)}
