"""Inference ops on compressed sparse weights: `bitmask_linear` and `bsr_linear`.

Formats are described in `sparsebert.ops.reference_formats` (which also holds the plain-torch references
with the same signatures, the encoders and the decoders). Both ops are `torch.library.custom_op`s under
`sparsebert::` with fake impls (so they trace under torch.compile); they are inference-only (no autograd).

Backends, "auto" order:
    bitmask_linear  CUDA: triton > torch      CPU: cpp (sparsebert._C) > torch
    bsr_linear      CUDA: triton > torch      CPU: torch (block-wise gather + batched product)
"triton" on CPU tensors only under TRITON_INTERPRET=1. The ops check shapes and dtypes, not contents:
`validate_bitmask_format` / `validate_bsr_format` check those once (the layers in sparsebert.nn.compress
call them at construction and load). The "torch" bitmask backend decodes W and calls
F.linear; the "torch" BSR backend never densifies W. SPARSEBERT_BACKEND overrides "auto" when it names a
backend the op has on that device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import reference_formats as ref
from . import _ext
from ._backends import op_backend, resolve_backend
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


# ------------------------------------------------------------------------------------- format validators
# The ops check shapes and dtypes only (checking contents costs a host sync per forward); the kernels then
# trust the contents. These validators check the contents once, where a compressed weight comes from
# outside (the layers' construction and state-dict loading, `load_compressed`): every index in range, the
# offsets consistent with the bitmask, so that every backend computes the same product or none does.
def validate_bitmask_format(values: Tensor, bitmask: Tensor, tile_offsets: Tensor, in_features: int,
                            tile_n: int, tile_k: int) -> None:
    """Raise ValueError naming the tensor unless (values, bitmask, tile_offsets) is exactly what
    `bitmask_encode` writes for some (N, in_features) weight: padding bits past in_features are 0,
    tile_offsets[i, j] = nonzeros of the tiles before (i, j) in row-major tile order, and values holds
    exactly the set bits."""
    check_tensor("values", values, ndim=1)
    check_float("values", values)
    ref.check_tile(tile_n, tile_k)
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    for name, t, ndim in (("bitmask", bitmask, 2), ("tile_offsets", tile_offsets, 2)):
        check_tensor(name, t, ndim=ndim)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        check_same_device(name, t, "values", values)
    n, words = bitmask.shape[0], -(-in_features // 32)
    if bitmask.shape[1] != words:
        raise ValueError(f"bitmask must have shape ({n}, {words}) for in_features {in_features}, got "
                         f"{tuple(bitmask.shape)}")
    tiles = (-(-n // tile_n), -(-in_features // tile_k))
    if tuple(tile_offsets.shape) != tiles:
        raise ValueError(f"tile_offsets must have shape {tiles} for weight ({n}, {in_features}) and tiles "
                         f"({tile_n}, {tile_k}), got {tuple(tile_offsets.shape)}")
    if in_features % 32:
        last = bitmask[:, -1].to(torch.int64) & 0xFFFFFFFF
        if bool((last >> (in_features % 32)).any()):
            raise ValueError(f"bitmask has bits set past in_features = {in_features} (padding bits must be 0)")
    mask = ref.unpack_mask(bitmask, in_features)
    counts = ref._to_tiles(mask, tile_n, tile_k).sum(dim=(2, 3)).reshape(-1).to(torch.int64)
    expected = (torch.cumsum(counts, 0) - counts).view(tiles)
    wrong = (tile_offsets.to(torch.int64) != expected).nonzero()
    if wrong.numel():
        i, j = (int(v) for v in wrong[0])
        raise ValueError(f"tile_offsets[{i}, {j}] is {int(tile_offsets[i, j])} but the bitmask puts that tile's "
                         f"first nonzero at {int(expected[i, j])} in values ({wrong.shape[0]} tiles disagree)")
    total = int(counts.sum())
    if values.numel() != total:
        raise ValueError(f"values has {values.numel()} entries but the bitmask has {total} set bits")


def validate_tc_bitmask_format(data: Tensor, tile_offsets: Tensor, out_features: int, in_features: int) -> None:
    """Raise ValueError naming the tensor unless (data, tile_offsets) is exactly what `tc_bitmask_encode`
    writes for an (out_features, in_features) weight: offsets start at 0, each tile is its 512-byte bitmask
    plus its set bits' values padded to 16 bytes, the last offset is data.numel(), no bit lies past the
    weight's edges. (Bit changes that keep a tile's padded length cannot be seen; the kernels still read
    only inside the tile.)"""
    check_tensor("data", data, ndim=1)
    check_float("data", data)
    check_tensor("tile_offsets", tile_offsets, ndim=1)
    if tile_offsets.dtype != torch.int32:
        raise TypeError(f"tile_offsets must be int32, got {tile_offsets.dtype}")
    check_same_device("tile_offsets", tile_offsets, "data", data)
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    nt, kt = -(-out_features // ref.TC_TILE), -(-in_features // ref.TC_TILE)
    if tile_offsets.shape[0] != nt * kt + 1:
        raise ValueError(f"tile_offsets must have {nt * kt + 1} entries for weight ({out_features}, {in_features}) "
                         f"(64 x 64 tiles + 1), got {tile_offsets.shape[0]}")
    elem = data.element_size()
    header, align = ref.TC_HEADER_BYTES // elem, 16 // elem
    off = tile_offsets.to(torch.int64)
    if int(off[0]) != 0 or int(off[-1]) != data.numel():
        raise ValueError(f"tile_offsets must start at 0 and end at data.numel() = {data.numel()}, got "
                         f"{int(off[0])} and {int(off[-1])}")
    lengths = off[1:] - off[:-1]
    short = (lengths < header) | (lengths % align != 0)
    if bool(short.any()):
        t = int(short.nonzero()[0])
        raise ValueError(f"tile {t} spans {int(lengths[t])} elements of data; a tile is {header} bitmask elements "
                         f"plus its values padded to a multiple of {align} ({data.dtype})")
    shifts = torch.arange(64, device=data.device, dtype=torch.int64)
    words = data.view(torch.int64)[(off[:-1] * elem // 8)[:, None] + shifts]
    bits = ((words[:, :, None] >> shifts) & 1).bool()
    counts = bits.sum(dim=(1, 2))
    expected = header + (counts + align - 1) // align * align
    wrong = (expected != lengths).nonzero()
    if wrong.numel():
        t = int(wrong[0])
        raise ValueError(f"tile {t} spans {int(lengths[t])} elements of data but its bitmask has {int(counts[t])} "
                         f"set bits (needs {int(expected[t])}); tile_offsets and the bitmask words disagree")
    inside = ref._tc_subtiles(torch.ones(out_features, in_features, dtype=torch.bool, device=data.device))
    outside = bits & ~inside.view(bits.shape)
    if bool(outside.any()):
        t = int(outside.any(-1).any(-1).nonzero()[0])
        raise ValueError(f"tile {t} has bitmask bits set past the weight's edges ({out_features}, {in_features})")


def validate_bsr_format(values: Tensor, crow_indices: Tensor, col_indices: Tensor, in_features: int,
                        out_features: Optional[int] = None) -> None:
    """Raise ValueError naming the tensor unless the BSR triple is well formed: values (nnzb, B, B) with
    B in {16, 32, 64}; crow_indices starts at 0, never decreases and ends at nnzb; col_indices are block
    columns in [0, in_features / B), strictly ascending inside each block row."""
    check_tensor("values", values, ndim=3)
    check_float("values", values)
    block = values.shape[-1]
    if values.shape[1] != block:
        raise ValueError(f"values must hold square blocks (nnzb, B, B), got shape {tuple(values.shape)}")
    ref.check_block(block)
    if not isinstance(in_features, int) or in_features < 1 or in_features % block:
        raise ValueError(f"in_features must be a positive multiple of the block size {block}, got {in_features!r}")
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        check_tensor(name, t, ndim=1)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        check_same_device(name, t, "values", values)
    nnzb, block_rows, block_cols = values.shape[0], crow_indices.shape[0] - 1, in_features // block
    if block_rows < 0:
        raise ValueError("crow_indices must have at least one entry (block rows + 1)")
    if out_features is not None and block_rows * block != out_features:
        raise ValueError(f"crow_indices has {block_rows + 1} entries but out_features {out_features} needs "
                         f"{out_features // block + 1} (blocks of {block})")
    if col_indices.shape[0] != nnzb:
        raise ValueError(f"col_indices has {col_indices.shape[0]} entries but values has {nnzb} blocks")
    crow = crow_indices.to(torch.int64)
    if int(crow[0]) != 0 or int(crow[-1]) != nnzb:
        raise ValueError(f"crow_indices must start at 0 and end at nnzb = {nnzb}, got {int(crow[0])} and "
                         f"{int(crow[-1])}")
    if bool((crow[1:] < crow[:-1]).any()):
        row = int((crow[1:] < crow[:-1]).nonzero()[0])
        raise ValueError(f"crow_indices decreases at block row {row} ({int(crow[row])} -> {int(crow[row + 1])})")
    if nnzb == 0:
        return
    col = col_indices.to(torch.int64)
    bad = (col < 0) | (col >= block_cols)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"col_indices[{i}] = {int(col[i])} is out of range [0, {block_cols}) for in_features "
                         f"{in_features} and blocks of {block}")
    rows = torch.repeat_interleave(torch.arange(block_rows, device=col.device), crow[1:] - crow[:-1])
    unsorted = (rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])
    if bool(unsorted.any()):
        i = int(unsorted.nonzero()[0]) + 1
        raise ValueError(f"col_indices must be strictly ascending inside each block row; col_indices[{i}] = "
                         f"{int(col[i])} follows {int(col[i - 1])} in block row {int(rows[i])}")


# ------------------------------------------------------------------------------------------ bitmask_linear
@custom_op("sparsebert::bitmask_linear", mutates_args=())
def _bitmask_linear_op(x: Tensor, values: Tensor, bitmask: Tensor, tile_offsets: Tensor, bias: Optional[Tensor],
                       in_features: int, tile_n: int, tile_k: int, backend: str) -> Tensor:
    backend = resolve_format_backend("bitmask_linear", backend, x.device)
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
    chosen = op_backend(backend, x.device, supports=format_backends("bitmask_linear"))
    x2 = x.reshape(-1, in_features).contiguous()
    y = _bitmask_linear_op(x2, values.contiguous(), bitmask.contiguous(), tile_offsets.contiguous(), bias,
                           in_features, tile_n, tile_k, chosen)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------- bsr_linear
@custom_op("sparsebert::bsr_linear", mutates_args=())
def _bsr_linear_op(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor],
                   in_features: int, backend: str) -> Tensor:
    backend = resolve_format_backend("bsr_linear", backend, x.device)
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
    chosen = op_backend(backend, x.device, supports=format_backends("bsr_linear"))
    x2 = x.reshape(-1, in_features).contiguous()
    y = _bsr_linear_op(x2, values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), bias,
                       in_features, chosen)
    return y.reshape(*x.shape[:-1], n)


# Pure-torch references with the same signatures (ground truth for the tests).
bitmask_linear_reference = ref.bitmask_linear
bsr_linear_reference = ref.bsr_linear

__all__ = ["bitmask_linear", "bsr_linear", "bitmask_linear_reference", "bsr_linear_reference",
           "format_backends", "resolve_format_backend", "validate_bitmask_format", "validate_bsr_format",
           "validate_tc_bitmask_format"]
