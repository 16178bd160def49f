"""One entry point for retraining-free structured pruning: ``prune_structured(model, batches, flops_keep,
method=...)`` -> ``(pruned_model, report)``. The pruned model is physically smaller (``remove_pruned``);
``report`` holds the method's phase times, the FLOPs reached and the heads/neurons kept per layer.

``flops_keep`` is the fraction of FLOPs KEPT (see ``sparsebert.flops``).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import time

from ..flops import check_flops_keep, encoder_flops, masked_flops
from ..latency import measure_model_ms
from ..nn.structured import remove_pruned
from .kcm import kcm_prune
from .kprune import KpruneConfig, check_finite_weights, check_model_family, kprune, prepare_batches, rebatch, resolve_seq_len
from .kwon import kwon_prune

__all__ = ["prune_structured", "method_options", "STRUCTURED_METHODS"]

STRUCTURED_METHODS = ("kprune", "kwon", "kcm")


# arguments of the method functions that are not method options (prune_structured sets them itself)
_NOT_OPTIONS = ("model", "batches", "flops_keep", "seq_len", "num_tokens", "latency_keep", "progress", "config")


def method_options(method: str, **cfg) -> dict:
    """Every option of ``method`` with the value a ``prune_structured(..., method=method, **cfg)`` call uses:
    the method's defaults updated by ``cfg``. A record keyed by this dict (an experiment's cache) changes
    when a default changes, so an old result is never taken for a new one. Unknown names raise ``TypeError``.
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"method must be one of {STRUCTURED_METHODS}, got {method!r}")
    if method == "kprune":
        known = {f.name: f.default for f in dataclasses.fields(KpruneConfig) if f.name not in _NOT_OPTIONS}
    else:
        fn = kwon_prune if method == "kwon" else kcm_prune
        known = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in _NOT_OPTIONS}
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise TypeError(f"unknown {method} option(s) {unknown}; known: {sorted(known)}")
    return {**known, **cfg}


def prune_structured(model, batches, flops_keep: float | None = None, method: str = "kprune", *,
                     seq_len: int | str | None = None, num_tokens: int = 100_000, inplace: bool = False,
                     latency_keep: float | None = None, progress=None, **cfg):
    """Prune ``model`` to ``flops_keep`` of its FLOPs with ``method`` in {"kprune", "kwon", "kcm"}.

    ``batches``: iterable of dicts (input_ids, attention_mask, optional token_type_ids / labels; labels
    are only used by "kwon"). ``seq_len``: sequence length of the FLOPs model: an int, ``"average"`` (the
    default: the sample's mean number of real tokens per sequence) or ``"max"`` (its padded length); the
    report's ``seq_len_source`` says which. ``cfg``: method options (Kprune: lam_pred, lam_rep, mu,
    temperature, weight_tuning, knowledge_batch_size, predictive, representational, sublayerwise,
    empty_sublayer_bias, tune_unpruned_ffn; Kwon:
    rearrange, tune, damping, pseudo_labels, batch_size, latency_table, latency_batch_size,
    latency_cache_dir, latency_search_variant; KCM: kernel_tokens, seed). The input model is left
    untouched unless ``inplace=True``.

    ``latency_keep`` (method "kwon" only, instead of ``flops_keep``): the fraction of the encoder's
    latency kept, by a latency table of this device (``sparsebert.latency``); the report's ``latency``
    entry holds the table's prediction and the measured forward time of the dense and pruned models.
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"method must be one of {STRUCTURED_METHODS}, got {method!r}")
    if latency_keep is not None and method != "kwon":
        raise ValueError(f"latency_keep is only available with method='kwon' (Kwon et al.'s latency search), "
                         f"got method={method!r}")
    if (flops_keep is None) == (latency_keep is None):
        raise ValueError("prune_structured needs exactly one budget: flops_keep or latency_keep")
    check_model_family(model, f"prune_structured(method={method!r})")
    check_finite_weights(model)
    dev = next(model.parameters()).device
    sample = prepare_batches(batches, num_tokens, dev)
    # on the sequences the methods use (cut at num_tokens), so the length does not depend on the batching
    seq_len, seq_src = resolve_seq_len(seq_len, rebatch(sample, 1 << 30, num_tokens))
    fl = encoder_flops(model, seq_len)
    if flops_keep is not None:
        check_flops_keep(flops_keep, fl)
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    if method == "kprune":
        hm, nm, rep = kprune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens, progress=progress, **cfg)
    elif method == "kwon":
        hm, nm, rep = kwon_prune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens,
                                 latency_keep=latency_keep, progress=progress, **cfg)
    else:
        hm, nm, rep = kcm_prune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens, progress=progress, **cfg)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    remove_pruned(work, hm, nm)
    rep["phase_seconds"]["remove"] = time.perf_counter() - t0
    if latency_keep is not None:  # measured: whole-model forward at the table's batch x seq_len
        b, t = rep["latency"]["table_key"]["batch_size"], rep["latency"]["table_key"]["seq_len"]
        rep["latency"]["measured_ms_dense"] = None if inplace else measure_model_ms(model, b, t)
        rep["latency"]["measured_ms_pruned"] = measure_model_ms(work, b, t)
    kept_flops = masked_flops(fl, hm, nm)
    rep.update({
        "seq_len_source": seq_src, "flops_keep_target": flops_keep, "flops_keep_reached": kept_flops / fl.total,
        "flops_dense": fl.total, "flops_pruned": kept_flops, "prune_seconds": t_prune,
        "heads_per_layer": [int((r != 0).sum()) for r in hm], "neurons_per_layer": [int((r != 0).sum()) for r in nm],
        "heads_total": int(hm.shape[1]), "neurons_total": int(nm.shape[1]),
        "head_mask": (hm != 0).int().tolist(),
    })
    return work, rep


def format_report(rep: dict) -> str:
    """Human-readable per-layer summary of a ``prune_structured`` report."""
    budget = (f"budget {rep['flops_keep_target']}: {rep['flops_keep_target'] * rep['flops_dense']:.3g} of "
              f"{rep['flops_dense']:.3g} FLOPs per sequence" if rep.get("flops_keep_target") is not None
              else f"latency budget {rep['latency']['keep_target']}")
    lines = [f"method {rep['method']}: FLOPs kept {rep['flops_keep_reached']:.3f} ({budget}) at seq_len {rep['seq_len']} ({rep.get('seq_len_source', 'given')}), sample {rep['sample_tokens']} "
             f"tokens in {rep['sample_sequences']} sequences, {rep['prune_seconds']:.1f}s",
             "phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in rep["phase_seconds"].items()),
             f"{'layer':>5} {'heads':>9} {'neurons':>11}"]
    for l, (h, n) in enumerate(zip(rep["heads_per_layer"], rep["neurons_per_layer"])):
        lines.append(f"{l:>5} {h:>4}/{rep['heads_total']:<4} {n:>5}/{rep['neurons_total']:<5}")
    lat = rep.get("latency")
    if lat is not None:
        k = lat["table_key"]
        measured = (f"{lat['measured_ms_pruned']:.3g} ms of {lat['measured_ms_dense']:.3g} ms dense"
                    if lat.get("measured_ms_dense") else "not measured")
        lines.append(f"latency ({k['device']}, batch {k['batch_size']} x seq {k['seq_len']}, {k['dtype']}, "
                     f"{k['threads']} threads): encoder predicted by the table {lat['pruned_ms_table']:.3g} ms of "
                     f"{lat['dense_ms_table']:.3g} ms ({lat['keep_table']:.3f} kept, target {lat['keep_target']}); "
                     f"whole model measured {measured}")
    return "\n".join(lines)
