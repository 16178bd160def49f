"""Per-family layout of the encoders that structured pruning supports: where the transformer layers live,
the names of the projections inside a layer, and the config names of the sizes.

BERT and RoBERTa share one layout (``encoder.layer[i].attention.self.query`` ...). DistilBERT (transformers
5.x ``DistilBertModel``) keeps Q/K/V and the attention output projection in one module,
``transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}``, the FFN in ``ffn.{lin1,lin2}``, and has
post-sublayer LayerNorms ``sa_layer_norm`` / ``output_layer_norm``; its config says ``dim``, ``n_heads``,
``hidden_dim``, ``n_layers``. In all three a sublayer computes ``LayerNorm(out_proj(...) + input)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["EncoderFamily", "FAMILIES", "SUPPORTED_FAMILIES", "family_of", "config_dims"]


@dataclass(frozen=True)
class EncoderFamily:
    """Module paths (dotted, relative to the base model or to one layer) and config attribute names."""
    model_type: str
    layers: str          # base model -> ModuleList of layers
    query: str           # layer -> Q / K / V projections
    key: str
    value: str
    attn_out: str        # layer -> attention output projection (its input is the per-head context)
    attn_entry: str      # layer -> module whose first input is the attention sublayer's input (residual)
    attn_core: str       # layer -> module replaced by a stand-in when every head is removed
    attn_norm: str       # layer -> LayerNorm after the attention sublayer
    ffn_in: str          # layer -> FFN-in projection
    ffn_out: str         # layer -> FFN-out projection (its input is the neuron activations)
    ffn_entry: str       # layer -> module whose first input is the FFN sublayer's input (residual)
    ffn_norm: str
    hidden: str          # config attribute names
    heads: str
    intermediate: str
    num_layers: str
    heads_attr: str      # attribute of the attention module holding its head count ("" = none)

    def get(self, root: nn.Module, path: str) -> nn.Module:
        return root.get_submodule(path)

    def set(self, root: nn.Module, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, module)


_BERT = dict(layers="encoder.layer", query="attention.self.query", key="attention.self.key",
             value="attention.self.value", attn_out="attention.output.dense", attn_entry="attention.self",
             attn_core="attention.self", attn_norm="attention.output.LayerNorm", ffn_in="intermediate.dense",
             ffn_out="output.dense", ffn_entry="intermediate", ffn_norm="output.LayerNorm", hidden="hidden_size",
             heads="num_attention_heads", intermediate="intermediate_size", num_layers="num_hidden_layers",
             heads_attr="num_attention_heads")

FAMILIES = {
    "bert": EncoderFamily("bert", **_BERT),
    "roberta": EncoderFamily("roberta", **_BERT),
    "distilbert": EncoderFamily(
        "distilbert", layers="transformer.layer", query="attention.q_lin", key="attention.k_lin",
        value="attention.v_lin", attn_out="attention.out_lin", attn_entry="attention", attn_core="attention",
        attn_norm="sa_layer_norm", ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_entry="ffn",
        ffn_norm="output_layer_norm", hidden="dim", heads="n_heads", intermediate="hidden_dim",
        num_layers="n_layers", heads_attr="n_heads"),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_of(model_or_config, what: str = "structured pruning") -> EncoderFamily:
    """The family of a model or config by ``config.model_type``; ValueError naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    fam = FAMILIES.get(mt)
    if fam is None:
        name = type(model_or_config).__name__
        raise ValueError(f"{what}: model type {mt!r} ({name}) is not supported; supported families: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    return fam


def config_dims(config) -> tuple[int, int, int, int]:
    """``(hidden size, heads, FFN width, layers)`` of the dense model described by ``config``."""
    fam = family_of(config, "config_dims")
    return (int(getattr(config, fam.hidden)), int(getattr(config, fam.heads)),
            int(getattr(config, fam.intermediate)), int(getattr(config, fam.num_layers)))
