"""sparsebert.ops: torch.library custom ops with fake impls, autograd and backend dispatch.

Public ops: masked_linear, score_masked_linear, topk_threshold, pack_mask, unpack_mask (training);
bitmask_linear, bsr_linear, sparse_rows_linear (inference on compressed weights, see sparsebert.nn.compress).
Every op has a plain-torch reference with the same signature in `sparsebert.ops.reference`.
"""
from ._backends import BACKENDS, available_backends, resolve_backend
from .bitmask_spmm import bitmask_spmm
from .masked_linear import masked_linear
from .reference import pack_mask, unpack_mask
from .score_masked_linear import score_masked_linear
from .sparse_formats import bitmask_linear, bsr_linear
from .sparse_rows_linear import sparse_rows_linear
from .topk_threshold import topk_threshold

__all__ = [
    "BACKENDS", "available_backends", "resolve_backend", "masked_linear", "score_masked_linear",
    "topk_threshold", "pack_mask", "unpack_mask", "bitmask_linear", "bsr_linear", "sparse_rows_linear",
    "bitmask_spmm",
]
