"""FLOPs model of a BERT-family encoder, per attention head and per FFN neuron, as a function of the
sequence length; used for the structured-pruning budget.

Counting convention: one multiply-add = 2 FLOPs; per sequence of ``seq_len`` tokens.

* one attention head (head size ``d_h``, hidden ``d``, ``L`` tokens):
  Q, K, V projections ``3 * 2*L*d*d_h`` + scores ``2*L*L*d_h`` + context ``2*L*L*d_h`` + its slice of the
  output projection ``2*L*d_h*d``  =  ``8*L*d*d_h + 4*L*L*d_h``.
* one FFN neuron: its row of FFN-in ``2*L*d`` + its column of FFN-out ``2*L*d`` = ``4*L*d``.
* fixed (not prunable): embedding sums and LayerNorm (~``7*L*d``), per layer the two residual adds,
  output-projection biases and LayerNorms (~``14*L*d``), pooler ``2*d*d`` and classifier ``2*d*C`` on the
  [CLS] token. Softmax, GELU and bias adds inside heads/neurons are ignored (they are < 1% of the total).
  DistilBERT has no token-type embedding and no pooler but a ``pre_classifier`` of the same size (``2*d*d``),
  so the same fixed count is used (the embedding term is an estimate either way).

Config names come from ``sparsebert.nn.families`` (BERT/RoBERTa ``hidden_size``, ``num_attention_heads``,
``intermediate_size``, ``num_hidden_layers``; DistilBERT ``dim``, ``n_heads``, ``hidden_dim``, ``n_layers``).

Budget direction: ``flops_keep`` is the fraction of the dense model's FLOPs that the pruned model KEEPS
(``flops_keep=0.4`` -> 40% of the FLOPs remain). Kwon et al. (2022) state their constraint the same way
(a FLOPs constraint of 60% = the pruned model has 60% of the FLOPs). The Kprune paper (Park et al., 2024)
speaks of a *compression rate*, the fraction REMOVED (compression rate 60% = ``flops_keep=0.4``); its
reference code computes ``max_flops = model_flops * (1 - constraint)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .nn.families import FAMILIES

__all__ = ["EncoderFlops", "encoder_flops", "masked_flops", "prunable_budget", "check_flops_keep"]


@dataclass(frozen=True)
class EncoderFlops:
    """FLOPs per sequence of ``seq_len`` tokens. ``heads_per_layer``/``neurons_per_layer`` are the dense
    sizes (a list, so that an already-pruned model with per-layer widths can be described)."""
    seq_len: int
    hidden_size: int
    head_size: int
    heads_per_layer: tuple
    neurons_per_layer: tuple
    per_head: int
    per_neuron: int
    fixed: int

    @property
    def num_layers(self) -> int:
        return len(self.heads_per_layer)

    @property
    def total(self) -> int:
        return (self.fixed + self.per_head * sum(self.heads_per_layer)
                + self.per_neuron * sum(self.neurons_per_layer))

    @property
    def prunable(self) -> int:
        return self.total - self.fixed


def _get(config, name, default=None):
    return getattr(config, name, default)


def encoder_flops(model_or_config, seq_len: int, *, heads_per_layer: Sequence[int] | None = None,
                  neurons_per_layer: Sequence[int] | None = None) -> EncoderFlops:
    """FLOPs model of an encoder (a HF model or its config) at ``seq_len`` tokens per sequence.

    Per-layer widths default to the config's (``sparsebert_heads_per_layer`` /
    ``sparsebert_neurons_per_layer`` when the model was physically pruned by ``remove_pruned``)."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    config = getattr(model_or_config, "config", model_or_config)
    fam = FAMILIES.get(_get(config, "model_type"), FAMILIES["bert"])  # other types: BERT's config names
    d = int(getattr(config, fam.hidden))
    n_layers = int(getattr(config, fam.num_layers))
    dense_heads = int(getattr(config, fam.heads))
    d_h = d // dense_heads
    if heads_per_layer is None:
        heads_per_layer = _get(config, "sparsebert_heads_per_layer") or [dense_heads] * n_layers
    if neurons_per_layer is None:
        neurons_per_layer = (_get(config, "sparsebert_neurons_per_layer")
                             or [int(getattr(config, fam.intermediate))] * n_layers)
    if len(heads_per_layer) != n_layers or len(neurons_per_layer) != n_layers:
        raise ValueError("heads_per_layer and neurons_per_layer must have num_hidden_layers entries")
    L = seq_len
    per_head = 8 * L * d * d_h + 4 * L * L * d_h
    per_neuron = 4 * L * d
    num_labels = int(_get(config, "num_labels", 2) or 2)
    fixed = 7 * L * d + n_layers * 14 * L * d + 2 * d * d + 2 * d * num_labels
    return EncoderFlops(L, d, d_h, tuple(int(h) for h in heads_per_layer),
                        tuple(int(n) for n in neurons_per_layer), per_head, per_neuron, fixed)


def _count(mask) -> int:
    if mask is None:
        return 0
    if isinstance(mask, torch.Tensor):
        return int((mask != 0).sum())
    return int(sum(int((m != 0).sum()) for m in mask))


def masked_flops(fl: EncoderFlops, head_mask, neuron_mask) -> int:
    """FLOPs of the model with these masks (nonzero entry = unit kept); masks are (L, H)/(L, N) tensors or
    per-layer lists."""
    return fl.fixed + fl.per_head * _count(head_mask) + fl.per_neuron * _count(neuron_mask)


def check_flops_keep(flops_keep, fl: EncoderFlops) -> None:
    """Raise ValueError for a budget outside (fixed/total, 1)."""
    if isinstance(flops_keep, bool) or not isinstance(flops_keep, (int, float)):
        raise TypeError(f"flops_keep must be a float in (0, 1), got {type(flops_keep).__name__}")
    if not 0.0 < flops_keep < 1.0:
        raise ValueError(f"flops_keep must be in (0, 1) (fraction of FLOPs KEPT), got {flops_keep}")
    floor = fl.fixed / fl.total
    if flops_keep <= floor:
        raise ValueError(
            f"flops_keep={flops_keep} is below what the embeddings, LayerNorms and classifier alone cost "
            f"({floor:.4f} of the FLOPs at seq_len={fl.seq_len}); choose flops_keep > {floor:.4f}")


def prunable_budget(flops_keep: float, fl: EncoderFlops) -> float:
    """FLOPs left for heads and neurons when the whole model may keep ``flops_keep`` of its FLOPs."""
    check_flops_keep(flops_keep, fl)
    return flops_keep * fl.total - fl.fixed
