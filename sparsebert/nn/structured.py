"""Structured (head / FFN-neuron) masks for Hugging Face BERT-family encoders, and physical removal.

Masks are applied with forward pre-hooks, never by copying weights:

* head mask of layer l: a pre-hook on ``layer.attention.output.dense`` multiplies the attention context
  (..., H*d_h) by the mask, broadcast over each head's ``d_h`` slice (a per-dimension mask of length
  H*d_h is accepted too). It acts after the attention, so it works with every attention implementation
  (eager, sdpa, flash) of transformers 5.x.
* neuron mask of layer l: a pre-hook on ``layer.output.dense`` (FFN-out) multiplies the intermediate
  activations (..., N) by the mask.

The mask tensors take part in autograd, so ``loss.backward()`` fills ``mask.grad`` (used by the
importance scores). Masks may be real-valued (Kwon et al.'s tuned masks); ``remove_pruned`` folds their
values into the output projections.

Works on any model whose base model has ``encoder.layer[i].{attention.self.{query,key,value},
attention.output.dense, intermediate.dense, output.dense}`` (BERT, RoBERTa, ...).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["encoder_layers", "structure_of", "StructuredMasks", "apply_masks", "remove_pruned",
           "shrink_to_structure", "save_pruned", "load_pruned", "full_masks"]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT-family model (task head or bare)."""
    base = getattr(model, "base_model", model)
    enc = getattr(base, "encoder", None)
    if enc is None or not hasattr(enc, "layer"):
        raise TypeError(f"model must be a BERT-family encoder (base_model.encoder.layer), got {type(model).__name__}")
    return enc.layer


def _head_size(model) -> int:
    c = model.config
    return c.hidden_size // c.num_attention_heads


def structure_of(model) -> tuple[list[int], list[int]]:
    """Current (heads, neurons) per layer, read from the modules (so valid after physical removal)."""
    d_h = _head_size(model)
    heads, neurons = [], []
    for layer in encoder_layers(model):
        heads.append(layer.attention.output.dense.in_features // d_h)
        neurons.append(layer.output.dense.in_features)
    return heads, neurons


def full_masks(model, dtype=torch.float32, device=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All-ones masks, one tensor per layer (per-layer widths allowed)."""
    heads, neurons = structure_of(model)
    device = device or next(model.parameters()).device
    return ([torch.ones(h, dtype=dtype, device=device) for h in heads],
            [torch.ones(n, dtype=dtype, device=device) for n in neurons])


def _as_list(mask, n_layers, name):
    if mask is None:
        return [None] * n_layers
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            raise ValueError(f"{name} must be a (num_layers, units) tensor or a list of 1-D tensors, got shape {tuple(mask.shape)}")
        mask = list(mask.unbind(0))
    mask = list(mask)
    if len(mask) != n_layers:
        raise ValueError(f"{name} must have one entry per layer ({n_layers}), got {len(mask)}")
    return mask


class StructuredMasks:
    """Live head/neuron masks on a model (see module docstring). ``head_mask[l]``/``neuron_mask[l]`` can be
    reassigned at any time (``None`` = no mask); ``remove()`` takes the hooks off."""

    def __init__(self, model, head_mask=None, neuron_mask=None):
        self.model = model
        layers = encoder_layers(model)
        self.head_size = _head_size(model)
        self.head_mask = _as_list(head_mask, len(layers), "head_mask")
        self.neuron_mask = _as_list(neuron_mask, len(layers), "neuron_mask")
        heads, neurons = structure_of(model)
        for l, (h, n) in enumerate(zip(heads, neurons)):
            hm, nm = self.head_mask[l], self.neuron_mask[l]
            if hm is not None and hm.numel() not in (h, h * self.head_size):
                raise ValueError(f"head_mask[{l}] must have {h} (heads) or {h * self.head_size} entries, got {hm.numel()}")
            if nm is not None and nm.numel() != n:
                raise ValueError(f"neuron_mask[{l}] must have {n} entries, got {nm.numel()}")
        self._handles = []
        for l, layer in enumerate(layers):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._head_hook(l)))
            self._handles.append(layer.output.dense.register_forward_pre_hook(self._neuron_hook(l)))

    def _head_hook(self, l):
        def hook(module, args):
            m = self.head_mask[l]
            if m is None:
                return None
            x = args[0]
            if m.numel() * self.head_size == x.shape[-1]:
                m = m.repeat_interleave(self.head_size)
            return (x * m.to(x.dtype),) + tuple(args[1:])
        return hook

    def _neuron_hook(self, l):
        def hook(module, args):
            m = self.neuron_mask[l]
            if m is None:
                return None
            x = args[0]
            return (x * m.to(x.dtype),) + tuple(args[1:])
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_masks(model, head_mask=None, neuron_mask=None) -> StructuredMasks:
    """Attach head/neuron masks to ``model`` (returns the handle; use as a context manager or ``.remove()``)."""
    return StructuredMasks(model, head_mask, neuron_mask)


class NoAttention(nn.Module):
    """Stand-in for a self-attention whose heads were all removed: returns an empty context (..., 0)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class NoIntermediate(nn.Module):
    """Stand-in for an FFN-in whose neurons were all removed: returns empty activations (..., 0)."""

    def forward(self, hidden_states):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0)


def _linear_like(src: nn.Linear, weight, bias) -> nn.Linear:
    with warnings.catch_warnings():  # zero-width layers: "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


@torch.no_grad()
def remove_pruned(model, head_mask=None, neuron_mask=None):
    """Physically remove the masked heads and neurons (in place; returns the model).

    Kept heads keep their Q/K/V rows and attention-output columns; kept neurons their FFN-in rows and
    FFN-out columns. Real-valued mask entries are folded into those output columns, so the result equals
    the masked model. Every layer may keep a different number of heads/neurons; a layer that keeps none
    of a sublayer loses it (only the output bias, residual and LayerNorm remain). The per-layer widths are
    written to ``config.sparsebert_heads_per_layer`` / ``sparsebert_neurons_per_layer``.
    """
    layers = encoder_layers(model)
    d_h = _head_size(model)
    heads_now, neurons_now = structure_of(model)
    hm = _as_list(head_mask, len(layers), "head_mask")
    nm = _as_list(neuron_mask, len(layers), "neuron_mask")
    for l, layer in enumerate(layers):
        if hm[l] is not None:
            m = hm[l].detach().float().flatten()
            if m.numel() != heads_now[l]:
                raise ValueError(f"head_mask[{l}] must have {heads_now[l]} entries, got {m.numel()}")
            keep = (m != 0).nonzero().flatten()
            cols = (keep[:, None] * d_h + torch.arange(d_h, device=keep.device)).flatten()
            att, out = layer.attention.self, layer.attention.output.dense
            scale = m[keep].repeat_interleave(d_h).to(out.weight)
            out_w = out.weight[:, cols] * scale
            layer.attention.output.dense = _linear_like(out, out_w, out.bias)
            if keep.numel() == 0:
                layer.attention.self = NoAttention()
            else:
                for name in ("query", "key", "value"):
                    lin = getattr(att, name)
                    setattr(att, name, _linear_like(lin, lin.weight[cols], None if lin.bias is None else lin.bias[cols]))
                att.num_attention_heads = int(keep.numel())
                att.all_head_size = int(keep.numel()) * d_h
            heads_now[l] = int(keep.numel())
        if nm[l] is not None:
            m = nm[l].detach().float().flatten()
            if m.numel() != neurons_now[l]:
                raise ValueError(f"neuron_mask[{l}] must have {neurons_now[l]} entries, got {m.numel()}")
            keep = (m != 0).nonzero().flatten()
            fin, fout = layer.intermediate.dense, layer.output.dense
            layer.output.dense = _linear_like(fout, fout.weight[:, keep] * m[keep].to(fout.weight), fout.bias)
            if keep.numel() == 0:
                layer.intermediate = NoIntermediate()
            else:
                layer.intermediate.dense = _linear_like(fin, fin.weight[keep], None if fin.bias is None else fin.bias[keep])
            neurons_now[l] = int(keep.numel())
    model.config.sparsebert_heads_per_layer = list(heads_now)
    model.config.sparsebert_neurons_per_layer = list(neurons_now)
    return model


def shrink_to_structure(model, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]):
    """Resize a freshly built model to per-layer widths (keeping the first units) so a pruned state dict
    can be loaded into it."""
    layers = encoder_layers(model)
    hm = [(torch.arange(model.config.num_attention_heads) < h).float() for h in heads_per_layer]
    nm = [(torch.arange(model.config.intermediate_size) < n).float() for n in neurons_per_layer]
    if len(hm) != len(layers) or len(nm) != len(layers):
        raise ValueError("heads_per_layer/neurons_per_layer must have one entry per layer")
    return remove_pruned(model, hm, nm)


def save_pruned(model, path: str) -> None:
    """``model.save_pretrained(path)``; the config carries the per-layer widths."""
    if not hasattr(model.config, "sparsebert_heads_per_layer"):
        h, n = structure_of(model)
        model.config.sparsebert_heads_per_layer, model.config.sparsebert_neurons_per_layer = h, n
    model.save_pretrained(path)


def load_pruned(path: str, model_class=None, dtype=None):
    """Load a model saved by ``save_pruned``: build it from its config, shrink every layer to the saved
    widths, then load the weights strictly."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        archs = getattr(config, "architectures", None) or ["AutoModel"]
        model_class = getattr(transformers, archs[0])
    # Auto* classes are built with from_config; concrete model classes with their constructor
    model = model_class.from_config(config) if model_class.__name__.startswith("Auto") else model_class(config)
    heads = getattr(config, "sparsebert_heads_per_layer", None)
    neurons = getattr(config, "sparsebert_neurons_per_layer", None)
    if heads is not None and neurons is not None:
        shrink_to_structure(model, heads, neurons)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"pruned checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
