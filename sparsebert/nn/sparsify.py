"""Model surgery for Hugging Face BERT-family encoders: sparsify, densify, sparsity_report.

The prunable matrices are those of the "Win-win Deal" paper: per encoder layer the query, key, value,
attention-output, FFN-in and FFN-out linears; optionally the classification head (pooler + classifier).
Sparsity is counted over the encoder linears' weights (the papers' convention); the head is reported
apart.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn

from .sparse_linear import SparseLinear

# BERT / RoBERTa / ELECTRA-style names, DeBERTa-v2/v3's (query_proj, ...) and DistilBERT's.
_ENCODER_LINEAR = re.compile(
    r"(?:^|\.)(?:encoder|transformer)\.layer\.(?P<layer>\d+)\."
    r"(?P<role>attention\.self\.(?:query|key|value)(?:_proj)?|attention\.output\.dense|intermediate\.dense"
    r"|output\.dense|attention\.(?:q_lin|k_lin|v_lin|out_lin)|ffn\.lin1|ffn\.lin2)$"
)
_ROLE_NAMES = {
    "attention.self.query": "query", "attention.q_lin": "query", "attention.self.query_proj": "query",
    "attention.self.key": "key", "attention.k_lin": "key", "attention.self.key_proj": "key",
    "attention.self.value": "value", "attention.v_lin": "value", "attention.self.value_proj": "value",
    "attention.output.dense": "attn_out", "attention.out_lin": "attn_out",
    "intermediate.dense": "ffn_in", "ffn.lin1": "ffn_in",
    "output.dense": "ffn_out", "ffn.lin2": "ffn_out",
}
_HEAD = re.compile(r"(?:^|\.)(?:pooler\.dense|classifier(?:\.dense|\.out_proj)?|pre_classifier)$")


def linear_role(name: str) -> Optional[str]:
    """'query' | 'key' | 'value' | 'attn_out' | 'ffn_in' | 'ffn_out' for an encoder linear's module name."""
    m = _ENCODER_LINEAR.search(name)
    return _ROLE_NAMES[m.group("role")] if m else None


# Linears inside an encoder layer that are not one of the six roles but are known and left dense:
# DeBERTa-v2's relative-position projections (only with share_att_key=False; not in the papers' set).
_LEFT_DENSE = re.compile(r"\.attention\.self\.pos_(?:key|query)_proj$")
_LAYER_PREFIX = re.compile(r"^(?P<prefix>(?:.*\.)?(?:encoder|transformer)\.layer\.\d+)\.")


def _refuse_unknown_layer_linears(model: nn.Module) -> None:
    """Raise ValueError when an encoder layer holds linears that are none of the six roles (DeBERTa-v1's
    fused in_proj, MPNet's attn.q/k/v/o): sparsifying the rest would leave them dense while the report
    counted only the others."""
    unknown = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and _LAYER_PREFIX.match(n) and not linear_role(n) and not _LEFT_DENSE.search(n)]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise ValueError(f"model: {type(model).__name__} has encoder-layer linears that sparsebert does not know "
                         f"(query/key/value/attention-output/FFN names expected): {shown}; pruning the known ones "
                         "would leave these dense, so the model is refused")


def encoder_linears(model: nn.Module) -> "OrderedDict[str, nn.Linear]":
    """Module name -> linear for Q, K, V, attention-out, FFN-in, FFN-out of every encoder layer, in order.

    Raises ValueError for a model without them, or whose layers hold other, unknown linears."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a Hugging Face BERT-family model), got {type(model).__name__}")
    found = OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and linear_role(n))
    if not found:
        raise ValueError(f"{type(model).__name__} has no BERT-family encoder linears (encoder.layer.N...)")
    _refuse_unknown_layer_linears(model)
    return found


def head_linears(model: nn.Module) -> "OrderedDict[str, nn.Linear]":
    """Pooler and classifier linears (the task head)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _HEAD.search(n))


HEAD_CHOICES = (False, True, "pooler")


def prunable_linears(model: nn.Module, include_head=False) -> "OrderedDict[str, nn.Linear]":
    """The encoder linears, then the head's: all of them (pooler and classifier) for `include_head=True`
    (what the "Win-win Deal" mask training masks), the pooler only for "pooler" (what its IMP prunes),
    none for False. Zero-size linears (a layer whose heads or neurons `remove_pruned` removed entirely)
    have nothing to prune and are left out."""
    if include_head not in HEAD_CHOICES:
        raise ValueError(f"include_head must be one of {HEAD_CHOICES}, got {include_head!r}")
    targets = OrderedDict(encoder_linears(model))
    if include_head:
        for name, lin in head_linears(model).items():
            if include_head is True or re.search(r"(?:^|\.)(?:pooler\.dense|pre_classifier)$", name):
                targets[name] = lin
    return OrderedDict((n, m) for n, m in targets.items() if m.weight.numel() > 0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


EXISTING_CHOICES = ("error", "keep")


def sparsify(model: nn.Module, mode: str = "mask", *, include_head=False, include_classifier: Optional[bool] = None,
             existing: str = "error", **kwargs) -> nn.Module:
    """Replace the encoder linears (and, by `include_head`, the head: see `prunable_linears`) by
    SparseLinear layers, in place. `include_classifier` is the older name of `include_head`.

    mode: "dense", "mask" (initial mask: the weight's nonzeros) or "scores" (kwargs: score_init,
    target_sparsity, threshold, scores_dtype, backend). Weights are shared, not copied. Returns `model`.
    A target that is already a SparseLinear is refused with ValueError (`existing="error"`: a second
    call would otherwise ignore its mode and arguments), or left as it is (`existing="keep"`).
    """
    if existing not in EXISTING_CHOICES:
        raise ValueError(f"existing must be one of {EXISTING_CHOICES}, got {existing!r}")
    if include_classifier is not None:
        include_head = bool(include_classifier)
    targets = prunable_linears(model, include_head)
    already = [(n, m) for n, m in targets.items() if isinstance(m, SparseLinear)]
    if already and existing == "error":
        name, lin = already[0]
        raise ValueError(f"model: already sparsified ({len(already)} of {len(targets)} target linears are "
                         f"SparseLinear, e.g. {name} in mode {lin.mode!r}); densify(model) first to start over, "
                         "change a layer with set_mask/init_scores, or pass existing='keep' to leave them as they are")
    for name, lin in targets.items():
        if isinstance(lin, SparseLinear):
            continue
        _replace(model, name, SparseLinear.from_linear(lin, mode=mode, **dict(kwargs)))
    return model


def sparse_linears(model: nn.Module) -> "OrderedDict[str, SparseLinear]":
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear))


def densify(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear layers back, holding W * m (zeros where pruned). In place; returns `model`."""
    for name, lin in list(sparse_linears(model).items()):
        _replace(model, name, lin.to_linear())
    return model


def _is_compressed(m: nn.Module) -> bool:
    # compressed inference modules (sparsebert.nn.compress): linear-like, weight stored in a sparse format
    return not isinstance(m, nn.Linear) and callable(getattr(m, "dense_weight", None)) and hasattr(m, "in_features")


def _report_linears(model: nn.Module, pattern) -> "OrderedDict[str, nn.Module]":
    return OrderedDict((n, m) for n, m in model.named_modules()
                       if (isinstance(m, nn.Linear) or _is_compressed(m)) and pattern.search(n))


@torch.no_grad()
def _kept(lin: nn.Module) -> torch.Tensor:
    if _is_compressed(lin):
        return lin.dense_weight() != 0
    m = lin.effective_mask() if isinstance(lin, SparseLinear) else torch.ones_like(lin.weight, dtype=torch.bool)
    return m & (lin.weight != 0)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> Dict:
    """Per-layer and overall sparsity of the encoder linears (plain, SparseLinear or compressed); the head
    is reported apart. A zero-size linear (removed by `remove_pruned`) counts with numel 0, sparsity 0.

    Returns {"overall": float, "total": int, "zeros": int, "layers": {name: {...}}, "head": {name: {...}},
    "by_role": {role: float}}. A weight counts as pruned when masked or exactly zero.
    """
    def entry(lin):
        kept = int(_kept(lin).sum().item())
        n = lin.out_features * lin.in_features
        return {"numel": n, "zeros": n - kept, "sparsity": 1.0 - kept / n if n else 0.0,
                "shape": [lin.out_features, lin.in_features]}

    found = _report_linears(model, _ENCODER_LINEAR)
    if not found:
        raise ValueError(f"{type(model).__name__} has no BERT-family encoder linears (encoder.layer.N...)")
    _refuse_unknown_layer_linears(model)
    layers = OrderedDict((n, entry(m)) for n, m in found.items())
    total = sum(e["numel"] for e in layers.values())
    zeros = sum(e["zeros"] for e in layers.values())
    by_role: Dict[str, list] = {}
    for n, e in layers.items():
        r = by_role.setdefault(linear_role(n), [0, 0])
        r[0] += e["zeros"]
        r[1] += e["numel"]
    return {
        "overall": zeros / total if total else 0.0, "total": total, "zeros": zeros, "layers": layers,
        "by_role": {r: z / t if t else 0.0 for r, (z, t) in by_role.items()},
        "head": OrderedDict((n, entry(m)) for n, m in _report_linears(model, _HEAD).items()),
    }
