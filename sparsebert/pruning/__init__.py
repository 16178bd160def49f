"""Pruning algorithms.

Structured, retraining-free (heads and FFN neurons under a FLOPs budget): ``prune_structured`` with
``method="kprune"`` (Park et al., ICLR 2024), ``"kwon"`` (Kwon et al., NeurIPS 2022) or ``"kcm"``
(Nova et al., ICML 2023). Unstructured: ``MaskScheduler`` (mask training inside any loop; stepped by
``MaskTrainingCallback`` in a Hugging Face Trainer), ``train_masks``, ``iterative_magnitude_pruning``.
Names are exported lazily so that importing this package stays cheap.
"""
import importlib

_LAZY = {
    "prune_structured": "structured_api", "STRUCTURED_METHODS": "structured_api", "format_report": "structured_api",
    "kprune": "kprune", "KpruneConfig": "kprune",
    "kwon_prune": "kwon", "kcm_prune": "kcm",
    "MaskScheduler": "scheduler", "MaskTrainingCallback": "hf_callback", "train_masks": "mask_training",
    "iterative_magnitude_pruning": "imp",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
