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

# BERT / RoBERTa / ELECTRA-style names, and DistilBERT's.
_ENCODER_LINEAR = re.compile(
    r"(?:^|\.)(?:encoder|transformer)\.layer\.(?P<layer>\d+)\."
    r"(?P<role>attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense"
    r"|attention\.(?:q_lin|k_lin|v_lin|out_lin)|ffn\.lin1|ffn\.lin2)$"
)
_ROLE_NAMES = {
    "attention.self.query": "query", "attention.q_lin": "query",
    "attention.self.key": "key", "attention.k_lin": "key",
    "attention.self.value": "value", "attention.v_lin": "value",
    "attention.output.dense": "attn_out", "attention.out_lin": "attn_out",
    "intermediate.dense": "ffn_in", "ffn.lin1": "ffn_in",
    "output.dense": "ffn_out", "ffn.lin2": "ffn_out",
}
_HEAD = re.compile(r"(?:^|\.)(?:pooler\.dense|classifier(?:\.dense|\.out_proj)?|pre_classifier)$")


def linear_role(name: str) -> Optional[str]:
    """'query' | 'key' | 'value' | 'attn_out' | 'ffn_in' | 'ffn_out' for an encoder linear's module name."""
    m = _ENCODER_LINEAR.search(name)
    return _ROLE_NAMES[m.group("role")] if m else None


def encoder_linears(model: nn.Module) -> "OrderedDict[str, nn.Linear]":
    """Module name -> linear for Q, K, V, attention-out, FFN-in, FFN-out of every encoder layer, in order."""
    found = OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and linear_role(n))
    if not found:
        raise ValueError(f"{type(model).__name__} has no BERT-family encoder linears (encoder.layer.N...)")
    return found


def head_linears(model: nn.Module) -> "OrderedDict[str, nn.Linear]":
    """Pooler and classifier linears (the task head)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _HEAD.search(n))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparsify(model: nn.Module, mode: str = "mask", *, include_classifier: bool = False, **kwargs) -> nn.Module:
    """Replace the encoder linears (and optionally the head) by SparseLinear layers, in place.

    mode: "dense", "mask" (initial mask: the weight's nonzeros) or "scores" (kwargs: score_init,
    target_sparsity, threshold, scores_dtype, backend). Weights are shared, not copied. Returns `model`.
    """
    targets = OrderedDict(encoder_linears(model))
    if include_classifier:
        targets.update(head_linears(model))
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


@torch.no_grad()
def _kept(lin: nn.Linear) -> torch.Tensor:
    m = lin.effective_mask() if isinstance(lin, SparseLinear) else torch.ones_like(lin.weight, dtype=torch.bool)
    return m & (lin.weight != 0)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> Dict:
    """Per-layer and overall sparsity of the encoder linears; the head is reported apart.

    Returns {"overall": float, "total": int, "zeros": int, "layers": {name: {...}}, "head": {name: {...}},
    "by_role": {role: float}}. A weight counts as pruned when masked or exactly zero.
    """
    def entry(lin):
        kept = int(_kept(lin).sum().item())
        n = lin.weight.numel()
        return {"numel": n, "zeros": n - kept, "sparsity": 1.0 - kept / n, "shape": list(lin.weight.shape)}

    layers = OrderedDict((n, entry(m)) for n, m in encoder_linears(model).items())
    total = sum(e["numel"] for e in layers.values())
    zeros = sum(e["zeros"] for e in layers.values())
    by_role: Dict[str, list] = {}
    for n, e in layers.items():
        r = by_role.setdefault(linear_role(n), [0, 0])
        r[0] += e["zeros"]
        r[1] += e["numel"]
    return {
        "overall": zeros / total, "total": total, "zeros": zeros, "layers": layers,
        "by_role": {r: z / t for r, (z, t) in by_role.items()},
        "head": OrderedDict((n, entry(m)) for n, m in head_linears(model).items()),
    }
