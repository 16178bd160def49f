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

Module names come from the family table ``sparsebert.nn.families`` (BERT, RoBERTa, DistilBERT; a model of
another type with BERT's layout, ``encoder.layer[i].attention.self.query`` ..., is treated as BERT). The
hooks above are on the family's attention-output and FFN-out projections (DistilBERT: ``attention.out_lin``
and ``ffn.lin2``).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .families import FAMILIES, SUPPORTED_FAMILIES, EncoderFamily

__all__ = ["encoder_layers", "encoder_family", "dense_widths", "structure_of", "StructuredMasks", "apply_masks", "remove_pruned",
           "shrink_to_structure", "save_pruned", "load_pruned", "full_masks"]


def encoder_family(model: nn.Module) -> EncoderFamily:
    """The layout of ``model`` (by ``config.model_type``; an unknown type with BERT's layout counts as BERT).
    TypeError when it is none of them."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in FAMILIES:
        return FAMILIES[mt]
    base = getattr(model, "base_model", model)
    if hasattr(getattr(base, "encoder", None), "layer"):
        return FAMILIES["bert"]
    raise TypeError(f"model must be a {', '.join(SUPPORTED_FAMILIES)} encoder (base_model.encoder.layer or "
                    f"base_model.transformer.layer), got {type(model).__name__} (model_type {mt!r})")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT, RoBERTa or DistilBERT model (task head or bare)."""
    fam = encoder_family(model)
    base = getattr(model, "base_model", model)
    try:
        return base.get_submodule(fam.layers)
    except AttributeError:
        raise TypeError(f"model must be a {fam.model_type} encoder with base_model.{fam.layers}, got "
                        f"{type(model).__name__}") from None


def _head_size(model) -> int:
    c = model.config
    return c.hidden_size // c.num_attention_heads


def dense_widths(model) -> tuple[int, int]:
    """``(heads, FFN neurons)`` per layer of the unpruned model, from its config."""
    fam = encoder_family(model)
    return int(getattr(model.config, fam.heads)), int(getattr(model.config, fam.intermediate))


def structure_of(model) -> tuple[list[int], list[int]]:
    """Current (heads, neurons) per layer, read from the modules (so valid after physical removal)."""
    d_h = _head_size(model)
    fam = encoder_family(model)
    heads, neurons = [], []
    for layer in encoder_layers(model):
        heads.append(layer.get_submodule(fam.attn_out).in_features // d_h)
        neurons.append(layer.get_submodule(fam.ffn_out).in_features)
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
        fam = encoder_family(model)
        for l, layer in enumerate(layers):
            self._handles.append(layer.get_submodule(fam.attn_out).register_forward_pre_hook(self._head_hook(l)))
            self._handles.append(layer.get_submodule(fam.ffn_out).register_forward_pre_hook(self._neuron_hook(l)))

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


class NoHeadsAttention(nn.Module):
    """Stand-in for an attention module that holds its own output projection (DistilBERT's) once every
    head was removed: returns ``(out_proj(empty context), None)``, i.e. the projection's bias. The
    projection keeps its name, so the state dict keys stay those of the family."""

    def __init__(self, out_name: str, out_proj: nn.Linear):
        super().__init__()
        self._out_name = out_name
        setattr(self, out_name, out_proj)

    def forward(self, hidden_states, *args, **kwargs):
        out = getattr(self, self._out_name)
        return out(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


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
    fam = encoder_family(model)
    d_h = _head_size(model)
    heads_now, neurons_now = structure_of(model)
    hm = _as_list(head_mask, len(layers), "head_mask")
    nm = _as_list(neuron_mask, len(layers), "neuron_mask")
    out_in_core = fam.attn_out.startswith(fam.attn_core + ".")  # DistilBERT: out_lin inside `attention`
    ffn_out_in_entry = fam.ffn_out.startswith(fam.ffn_entry + ".")  # DistilBERT: lin1 and lin2 inside `ffn`
    for l, layer in enumerate(layers):
        if hm[l] is not None:
            m = hm[l].detach().float().flatten()
            if m.numel() != heads_now[l]:
                raise ValueError(f"head_mask[{l}] must have {heads_now[l]} entries, got {m.numel()}")
            keep = (m != 0).nonzero().flatten()
            cols = (keep[:, None] * d_h + torch.arange(d_h, device=keep.device)).flatten()
            out = layer.get_submodule(fam.attn_out)
            scale = m[keep].repeat_interleave(d_h).to(out.weight)
            new_out = _linear_like(out, out.weight[:, cols] * scale, out.bias)
            fam.set(layer, fam.attn_out, new_out)
            if keep.numel() == 0:
                fam.set(layer, fam.attn_core, NoHeadsAttention(fam.attn_out[len(fam.attn_core) + 1:], new_out)
                        if out_in_core else NoAttention())
            else:
                for path in (fam.query, fam.key, fam.value):
                    lin = layer.get_submodule(path)
                    fam.set(layer, path, _linear_like(lin, lin.weight[cols], None if lin.bias is None else lin.bias[cols]))
                core = layer.get_submodule(fam.attn_core)
                setattr(core, fam.heads_attr, int(keep.numel()))
                if hasattr(core, "all_head_size"):
                    core.all_head_size = int(keep.numel()) * d_h
            heads_now[l] = int(keep.numel())
        if nm[l] is not None:
            m = nm[l].detach().float().flatten()
            if m.numel() != neurons_now[l]:
                raise ValueError(f"neuron_mask[{l}] must have {neurons_now[l]} entries, got {m.numel()}")
            keep = (m != 0).nonzero().flatten()
            fin, fout = layer.get_submodule(fam.ffn_in), layer.get_submodule(fam.ffn_out)
            fam.set(layer, fam.ffn_out, _linear_like(fout, fout.weight[:, keep] * m[keep].to(fout.weight), fout.bias))
            if keep.numel() == 0 and not ffn_out_in_entry:
                fam.set(layer, fam.ffn_entry, NoIntermediate())
            else:  # (a zero-width FFN-in inside DistilBERT's `ffn` gives empty activations by itself)
                fam.set(layer, fam.ffn_in, _linear_like(fin, fin.weight[keep], None if fin.bias is None else fin.bias[keep]))
            neurons_now[l] = int(keep.numel())
    model.config.sparsebert_heads_per_layer = list(heads_now)
    model.config.sparsebert_neurons_per_layer = list(neurons_now)
    return model


def shrink_to_structure(model, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]):
    """Resize a freshly built model to per-layer widths (keeping the first units) so a pruned state dict
    can be loaded into it."""
    layers = encoder_layers(model)
    dense_heads, dense_neurons = dense_widths(model)
    hm = [(torch.arange(dense_heads) < h).float() for h in heads_per_layer]
    nm = [(torch.arange(dense_neurons) < n).float() for n in neurons_per_layer]
    if len(hm) != len(layers) or len(nm) != len(layers):
        raise ValueError("heads_per_layer/neurons_per_layer must have one entry per layer")
    return remove_pruned(model, hm, nm)


def save_pruned(model, path: str) -> None:
    """Save a structurally pruned model (config with per-layer widths + safetensors); same as
    ``sparsebert.save_pretrained``, which also handles sparse layers inside it."""
    from .persistence import save_pretrained
    save_pretrained(model, path)


def load_pruned(path: str, model_class=None, dtype=None):
    """Load a model saved by ``save_pruned`` (or by ``save_pretrained``): built from its config, every
    layer shrunk to the saved widths, the weights loaded strictly (``sparsebert.from_pretrained``)."""
    from .persistence import from_pretrained
    model = from_pretrained(path, model_class=model_class)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
