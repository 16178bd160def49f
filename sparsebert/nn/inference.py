"""The inference path for a structurally pruned encoder: physically smaller layers (``remove_pruned``), the
stock dense GEMMs (cuBLAS / MKL) and PyTorch's SDPA attention.

``for_inference(model, head_mask=None, neuron_mask=None, *, round_to=None)`` removes the masked heads and
neurons (when masks are given), optionally zero-pads every layer's widths up to a multiple of ``round_to``
(``pad_widths``), switches the attention to ``"sdpa"`` and puts the model in eval mode.

Zero padding keeps the function exactly: a padded neuron has a zero FFN-in row and bias (GELU(0) = 0) and a
zero FFN-out column; a padded head has zero Q/K/V rows and biases (its context is a mean of zero values)
and zero attention-output columns. The output changes only by floating-point reordering inside the GEMMs.
Heads pad in whole heads (the attention width is heads x head size); a width is never padded past the
dense model's (``load_pruned`` rebuilds at most the dense widths), and a removed sublayer (0 units) stays
removed. Whether padding pays depends on the device: ``bench/test_bench_structured_inference.py`` measures
it on the CPU, ``bench/bench_structured_speed.py --round-to`` on the GPU.

The gathered-index Triton kernels (``sparsebert.ops.pruned_ffn`` / ``pruned_attention``) are for the masked,
not-removed model while pruning; a pruned model is served through this module.
"""
from __future__ import annotations

import torch
from torch import nn

from .structured import _head_size, _linear_like, dense_widths, encoder_family, encoder_layers, remove_pruned, structure_of

__all__ = ["for_inference", "pad_widths", "padded_width"]


def _check_round_to(round_to):
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to <= 0:
        raise ValueError(f"round_to must be None or a positive int (e.g. 8 or 64), got {round_to!r}")
    return round_to


def padded_width(units: int, unit_size: int, round_to: int, max_units: int) -> int:
    """The fewest units ``>= units`` whose width ``units * unit_size`` is a multiple of ``round_to``; ``units``
    itself when that would pass ``max_units`` (then ``max_units`` is used if it is larger, i.e. the dense
    width) or when ``units`` is 0."""
    if units == 0:
        return 0
    u = units
    while (u * unit_size) % round_to:
        u += 1
    if u > max_units:
        return max(units, max_units)
    return u


def _pad_rows(lin: nn.Linear, extra: int) -> nn.Linear:
    w = torch.cat([lin.weight, lin.weight.new_zeros(extra, lin.weight.shape[1])], 0)
    b = None if lin.bias is None else torch.cat([lin.bias, lin.bias.new_zeros(extra)])
    return _linear_like(lin, w, b)


def _pad_cols(lin: nn.Linear, extra: int) -> nn.Linear:
    return _linear_like(lin, torch.cat([lin.weight, lin.weight.new_zeros(lin.weight.shape[0], extra)], 1), lin.bias)


@torch.no_grad()
def pad_widths(model, round_to: int):
    """Zero-pad every layer's attention width (in whole heads) and FFN width up to a multiple of ``round_to``
    (in place; returns the model). Exact: the padded units contribute zeros (module docstring)."""
    round_to = _check_round_to(round_to)
    if round_to is None:
        return model
    fam = encoder_family(model)
    d_h = _head_size(model)
    dense_heads, dense_neurons = dense_widths(model)
    heads_now, neurons_now = structure_of(model)
    for l, layer in enumerate(encoder_layers(model)):
        h = padded_width(heads_now[l], d_h, round_to, dense_heads)
        if h > heads_now[l]:
            extra = (h - heads_now[l]) * d_h
            for path in (fam.query, fam.key, fam.value):
                fam.set(layer, path, _pad_rows(layer.get_submodule(path), extra))
            fam.set(layer, fam.attn_out, _pad_cols(layer.get_submodule(fam.attn_out), extra))
            core = layer.get_submodule(fam.attn_core)
            setattr(core, fam.heads_attr, h)
            if hasattr(core, "all_head_size"):
                core.all_head_size = h * d_h
            heads_now[l] = h
        n = padded_width(neurons_now[l], 1, round_to, dense_neurons)
        if n > neurons_now[l]:
            extra = n - neurons_now[l]
            fam.set(layer, fam.ffn_in, _pad_rows(layer.get_submodule(fam.ffn_in), extra))
            fam.set(layer, fam.ffn_out, _pad_cols(layer.get_submodule(fam.ffn_out), extra))
            neurons_now[l] = n
    model.config.sparsebert_heads_per_layer = list(heads_now)
    model.config.sparsebert_neurons_per_layer = list(neurons_now)
    return model


def for_inference(model, head_mask=None, neuron_mask=None, *, round_to: int | None = None,
                  attn_implementation: str = "sdpa"):
    """Serve a structurally pruned model (in place; returns it in eval mode): remove the heads/neurons that
    ``head_mask`` / ``neuron_mask`` zero (``remove_pruned``; omit them for an already removed model), zero-pad
    the widths to multiples of ``round_to`` when given (``pad_widths``), and select ``attn_implementation``
    (``"sdpa"`` by default; any per-layer head count works with it). Its output equals the masked model's."""
    _check_round_to(round_to)
    if not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a string such as 'sdpa', got {attn_implementation!r}")
    encoder_layers(model)  # TypeError for an unsupported model, before any change
    if head_mask is not None or neuron_mask is not None:
        remove_pruned(model, head_mask, neuron_mask)
    if round_to is not None:
        pad_widths(model, round_to)
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval()
