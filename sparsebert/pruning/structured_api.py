"""One entry point for retraining-free structured pruning: ``prune_structured(model, batches, flops_keep,
method=...)`` -> ``(pruned_model, report)``. The pruned model is physically smaller (``remove_pruned``);
``report`` holds the method's phase times, the FLOPs reached and the heads/neurons kept per layer.

``flops_keep`` is the fraction of FLOPs KEPT (see ``sparsebert.flops``).
"""
from __future__ import annotations

import copy
import time

from ..flops import check_flops_keep, encoder_flops, masked_flops
from ..nn.structured import remove_pruned
from .kcm import kcm_prune
from .kprune import kprune, prepare_batches, sample_seq_len
from .kwon import kwon_prune

__all__ = ["prune_structured", "STRUCTURED_METHODS"]

STRUCTURED_METHODS = ("kprune", "kwon", "kcm")


def prune_structured(model, batches, flops_keep: float, method: str = "kprune", *, seq_len: int | None = None,
                     num_tokens: int = 100_000, inplace: bool = False, progress=None, **cfg):
    """Prune ``model`` to ``flops_keep`` of its FLOPs with ``method`` in {"kprune", "kwon", "kcm"}.

    ``batches``: iterable of dicts (input_ids, attention_mask, optional token_type_ids / labels; labels
    are only used by "kwon"). ``seq_len``: sequence length of the FLOPs model (default: the sample's
    padded length). ``cfg``: method options (Kprune: lam_pred, lam_rep, mu, temperature, weight_tuning;
    Kwon: rearrange, tune, damping; KCM: kernel_tokens, seed). The input model is left untouched unless
    ``inplace=True``.
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"method must be one of {STRUCTURED_METHODS}, got {method!r}")
    dev = next(model.parameters()).device
    sample = prepare_batches(batches, num_tokens, dev)
    seq_len = seq_len or sample_seq_len(sample)
    fl = encoder_flops(model, seq_len)
    check_flops_keep(flops_keep, fl)
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    if method == "kprune":
        hm, nm, rep = kprune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens, progress=progress, **cfg)
    elif method == "kwon":
        hm, nm, rep = kwon_prune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens, progress=progress, **cfg)
    else:
        hm, nm, rep = kcm_prune(work, sample, flops_keep, seq_len=seq_len, num_tokens=num_tokens, progress=progress, **cfg)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    remove_pruned(work, hm, nm)
    rep["phase_seconds"]["remove"] = time.perf_counter() - t0
    kept_flops = masked_flops(fl, hm, nm)
    rep.update({
        "flops_keep_target": flops_keep, "flops_keep_reached": kept_flops / fl.total,
        "flops_dense": fl.total, "flops_pruned": kept_flops, "prune_seconds": t_prune,
        "heads_per_layer": [int((r != 0).sum()) for r in hm], "neurons_per_layer": [int((r != 0).sum()) for r in nm],
        "heads_total": int(hm.shape[1]), "neurons_total": int(nm.shape[1]),
        "head_mask": (hm != 0).int().tolist(),
    })
    return work, rep


def format_report(rep: dict) -> str:
    """Human-readable per-layer summary of a ``prune_structured`` report."""
    lines = [f"method {rep['method']}: FLOPs kept {rep['flops_keep_reached']:.3f} (target {rep['flops_keep_target']}) "
             f"at seq_len {rep['seq_len']}, sample {rep['sample_tokens']} tokens, {rep['prune_seconds']:.1f}s",
             "phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in rep["phase_seconds"].items()),
             f"{'layer':>5} {'heads':>9} {'neurons':>11}"]
    for l, (h, n) in enumerate(zip(rep["heads_per_layer"], rep["neurons_per_layer"])):
        lines.append(f"{l:>5} {h:>4}/{rep['heads_total']:<4} {n:>5}/{rep['neurons_total']:<5}")
    return "\n".join(lines)
