"""Inference ops on compressed sparse weights: `bitmask_linear` and `bsr_linear`.

Formats are described in `sparsebert.ops.reference_formats` (which also holds the plain-torch references
with the same signatures, the encoders and the decoders). Both ops are `torch.library.custom_op`s under
`sparsebert::` with fake impls (so they trace under torch.compile); they are inference-only (no autograd).

Backends, "auto" order:
    bitmask_linear  CUDA: triton > torch      CPU: cpp (sparsebert._C) > torch
    bsr_linear      CUDA: triton > torch      CPU: torch (block-wise gather + batched product)
"triton" on CPU tensors only under TRITON_INTERPRET=1. The "torch" bitmask backend decodes W and calls
F.linear; the "torch" BSR backend never densifies W. SPARSEBERT_BACKEND overrides "auto" when it names a
backend the op has on that device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference_formats as ref
from . import _ext
from ._backends import resolve_backend
from ._validate import check_float, check_same_device, check_tensor

def _cpp_has(op_name: str) -> bool:
    """True when the C++ extension registered `torch.ops.sparsebert_ext.<op_name>`."""
    return _ext.load() and hasattr(torch.ops.sparsebert_ext, op_name)


def format_backends(op: str) -> tuple:
    """The backends that implement `op` ("bitmask_linear" has a C++ kernel; "bsr_linear" does not)."""
    return ("triton", "torch") + (("cpp",) if op == "bitmask_linear" and _cpp_has("bitmask_linear_fwd") else ())


def resolve_format_backend(op: str, backend: str, device) -> str:
    return resolve_backend(backend, device, supports=format_backends(op))


def _check_x(x, dtype: torch.dtype, in_features: int, ref_name: str, ref_t: Tensor) -> None:
    check_tensor("x", x)
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} in its last dimension, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"x has dtype {x.dtype} but the compressed weight has {dtype}; they must match")
    check_same_device(ref_name, ref_t, "x", x)


def _check_bias(bias, n: int, dtype: torch.dtype, x: Tensor) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, ndim=1)
    if bias.shape[0] != n:
        raise ValueError(f"bias must have out_features = {n} elements, got {bias.shape[0]}")
    if bias.dtype != dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but the weight values have {dtype}; they must match")
    check_same_device("bias", bias, "x", x)


def _check_index(name: str, t, ndim: int, x: Tensor) -> None:
    check_tensor(name, t, ndim=ndim)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    check_same_device(name, t, "x", x)


# ------------------------------------------------------------------------------------------ bitmask_linear
@torch.library.custom_op("sparsebert::bitmask_linear", mutates_args=())
def _bitmask_linear_op(x: Tensor, values: Tensor, bitmask: Tensor, tile_offsets: Tensor, bias: Optional[Tensor],
                       in_features: int, tile_n: int, tile_k: int, backend: str) -> Tensor:
    if backend == "cpp":
        return torch.ops.sparsebert_ext.bitmask_linear_fwd(x, values, bitmask, tile_offsets, in_features,
                                                            tile_n, tile_k, bias)
    if backend == "triton":
        from sparsebert.kernels.bitmask_linear import bitmask_linear_fwd
        return bitmask_linear_fwd(x, values, bitmask, tile_offsets, bias, in_features, tile_n, tile_k)
    return ref.bitmask_linear(x, values, bitmask, tile_offsets, bias, in_features, tile_n, tile_k)


@_bitmask_linear_op.register_fake
def _(x, values, bitmask, tile_offsets, bias, in_features, tile_n, tile_k, backend):
    return x.new_empty((x.shape[0], bitmask.shape[0]))


def bitmask_linear(x: Tensor, values: Tensor, bitmask: Tensor, tile_offsets: Tensor, bias: Optional[Tensor],
                   in_features: int, tile_n: int, tile_k: int, *, backend: str = "auto") -> Tensor:
    """y = x @ W.T + bias, W (N, in_features) in the tiled bitmask format. x (..., in_features)."""
    check_tensor("values", values, ndim=1)
    check_float("values", values)
    _check_x(x, values.dtype, in_features, "values", values)
    ref.check_tile(tile_n, tile_k)
    _check_index("bitmask", bitmask, 2, x)
    n, words = bitmask.shape[0], -(-in_features // 32)
    if bitmask.shape[1] != words:
        raise ValueError(f"bitmask must have shape ({n}, {words}) for in_features {in_features}, got "
                         f"{tuple(bitmask.shape)}")
    _check_index("tile_offsets", tile_offsets, 2, x)
    tiles = (-(-n // tile_n), -(-in_features // tile_k))
    if tuple(tile_offsets.shape) != tiles:
        raise ValueError(f"tile_offsets must have shape {tiles} for weight ({n}, {in_features}) and tiles "
                         f"({tile_n}, {tile_k}), got {tuple(tile_offsets.shape)}")
    _check_bias(bias, n, values.dtype, x)
    chosen = resolve_format_backend("bitmask_linear", backend, x.device)
    x2 = x.reshape(-1, in_features).contiguous()
    y = _bitmask_linear_op(x2, values.contiguous(), bitmask.contiguous(), tile_offsets.contiguous(), bias,
                           in_features, tile_n, tile_k, chosen)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------- bsr_linear
@torch.library.custom_op("sparsebert::bsr_linear", mutates_args=())
def _bsr_linear_op(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor],
                   in_features: int, backend: str) -> Tensor:
    if backend == "triton":
        from sparsebert.kernels.bsr_linear import bsr_linear_fwd
        return bsr_linear_fwd(x, values, crow_indices, col_indices, bias, in_features)
    return ref.bsr_linear_blockwise(x, values, crow_indices, col_indices, bias, in_features)


@_bsr_linear_op.register_fake
def _(x, values, crow_indices, col_indices, bias, in_features, backend):
    return x.new_empty((x.shape[0], (crow_indices.shape[0] - 1) * values.shape[-1]))


def bsr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor],
               in_features: int, *, backend: str = "auto") -> Tensor:
    """y = x @ W.T + bias, W (N, in_features) in BSR with square blocks. x (..., in_features)."""
    check_tensor("values", values, ndim=3)
    check_float("values", values)
    block = values.shape[-1]
    if values.shape[1] != block:
        raise ValueError(f"values must hold square blocks (nnzb, B, B), got shape {tuple(values.shape)}")
    ref.check_block(block)
    _check_x(x, values.dtype, in_features, "values", values)
    if in_features % block:
        raise ValueError(f"in_features {in_features} is not a multiple of the block size {block}")
    _check_index("crow_indices", crow_indices, 1, x)
    _check_index("col_indices", col_indices, 1, x)
    if col_indices.shape[0] != values.shape[0]:
        raise ValueError(f"col_indices has {col_indices.shape[0]} entries but values has {values.shape[0]} blocks")
    n = (crow_indices.shape[0] - 1) * block
    _check_bias(bias, n, values.dtype, x)
    chosen = resolve_format_backend("bsr_linear", backend, x.device)
    x2 = x.reshape(-1, in_features).contiguous()
    y = _bsr_linear_op(x2, values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), bias,
                       in_features, chosen)
    return y.reshape(*x.shape[:-1], n)


# Pure-torch references with the same signatures (ground truth for the tests).
bitmask_linear_reference = ref.bitmask_linear
bsr_linear_reference = ref.bsr_linear

__all__ = ["bitmask_linear", "bsr_linear", "bitmask_linear_reference", "bsr_linear_reference",
           "format_backends", "resolve_format_backend"]
