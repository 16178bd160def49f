"""`sparse_rows_linear`: y = x @ W.T + bias with an unstructured float32 W in the sparse-rows format
(nonzeros row by row + int16/int32 column indices + int32 row offsets; layout in
`sparsebert.ops.reference_formats`). The CPU inference op behind `sparsebert.nn.SparseRowsLinear`.

Backends, "auto" order: cpp (sparsebert._C, AVX2+FMA with a scalar fallback) > torch (decode + F.linear,
any device). Inference only (no autograd); a `torch.library.custom_op` with a fake impl.
float32 only: x, values and bias of another dtype are refused with a TypeError (the format stores fp32 and
the kernel computes in fp32; cast the model with `.float()` first).
The op checks shapes and dtypes, not contents; `validate_sparse_rows_format` checks the contents once (the
layer calls it at construction and load). The C++ kernel also range-checks row_offsets and each row's
col_indices before use, so bad contents raise instead of reading out of bounds.

One token: with `slots=` (the row-group slots of the same weight, `sparse_rows_slots`, built once per
weight), an input holding a single token goes to the one-token kernel (`sparse_rows_slots_matvec` in
csrc/cpu/sparse_rows_slots_cpu.cpp: an in-register permute of x instead of a gather per nonzero; through
SparseRowsLinear 1.26-2.98x MKL's dense GEMV at 80-90% sparsity on the BERT-base shapes, one or two threads,
bench/results/cpu-20261130-sparse-rows.csv, where the gather kernel was 0.6-1.5x). Eager CPU calls only;
under torch.compile the registered op (without slots) runs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import _env, _ext
from . import reference_formats as ref
from ._backends import op_backend, resolve_backend
from ._validate import check_same_device, check_tensor


def _ext_has(op_name: str) -> bool:
    """True when the loaded C++ extension registered `op_name` (a loaded extension does not change: cached
    once found, so the per-call check costs a dict lookup, not a torch.ops attribute lookup)."""
    if op_name in _EXT_OPS:
        return True
    if _ext.load() and hasattr(torch.ops.sparsebert_ext, op_name):
        _EXT_OPS.add(op_name)
        return True
    return False


_EXT_OPS: set = set()


def cpp_available() -> bool:
    """True when the C++ extension has the sparse-rows kernel."""
    return _ext_has("sparse_rows_linear_fwd")


def _supports() -> tuple:
    return ("torch",) + (("cpp",) if cpp_available() else ())


def _check_fp32(name: str, t: Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 for the sparse-rows format, got {t.dtype} (cast with .float())")


def validate_sparse_rows_format(values: Tensor, col_indices: Tensor, row_offsets: Tensor, in_features: int,
                                out_features: Optional[int] = None) -> None:
    """Raise ValueError/TypeError naming the tensor unless the triple is what `sparse_rows_encode` writes:
    values (nnz,) float32; col_indices (nnz,) int16 (in_features <= 32768) or int32, each in
    [0, in_features) and strictly ascending inside a row; row_offsets (out_features + 1,) int32 from 0 to
    nnz, never decreasing."""
    check_tensor("values", values, ndim=1)
    _check_fp32("values", values)
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    check_tensor("col_indices", col_indices, ndim=1)
    if col_indices.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"col_indices must be int16 or int32, got {col_indices.dtype}")
    if col_indices.dtype == torch.int16 and in_features > 32768:
        raise TypeError(f"col_indices is int16 but in_features = {in_features} needs int32 indices")
    check_tensor("row_offsets", row_offsets, ndim=1)
    if row_offsets.dtype != torch.int32:
        raise TypeError(f"row_offsets must be int32, got {row_offsets.dtype}")
    for name, t in (("col_indices", col_indices), ("row_offsets", row_offsets)):
        check_same_device(name, t, "values", values)
    nnz, n = values.numel(), row_offsets.numel() - 1
    if n < 0:
        raise ValueError("row_offsets must have out_features + 1 entries, got none")
    if out_features is not None and n != out_features:
        raise ValueError(f"row_offsets has {n + 1} entries but out_features {out_features} needs {out_features + 1}")
    if col_indices.numel() != nnz:
        raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {nnz}")
    offs = row_offsets.to(torch.int64)
    if int(offs[0]) != 0 or int(offs[-1]) != nnz:
        raise ValueError(f"row_offsets must start at 0 and end at nnz = {nnz}, got {int(offs[0])} and {int(offs[-1])}")
    if bool((offs[1:] < offs[:-1]).any()):
        row = int((offs[1:] < offs[:-1]).nonzero()[0])
        raise ValueError(f"row_offsets decreases at row {row} ({int(offs[row])} -> {int(offs[row + 1])})")
    if nnz == 0:
        return
    col = col_indices.to(torch.int64)
    bad = (col < 0) | (col >= in_features)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"col_indices[{i}] = {int(col[i])} is out of range [0, {in_features})")
    rows = torch.repeat_interleave(torch.arange(n, device=col.device), offs[1:] - offs[:-1])
    unsorted = (rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])
    if bool(unsorted.any()):
        i = int(unsorted.nonzero()[0]) + 1
        raise ValueError(f"col_indices must be strictly ascending inside each row; col_indices[{i}] = "
                         f"{int(col[i])} follows {int(col[i - 1])} in row {int(rows[i])}")


@custom_op("sparsebert::sparse_rows_linear", mutates_args=())
def _sparse_rows_linear_op(x: Tensor, values: Tensor, col_indices: Tensor, row_offsets: Tensor,
                           bias: Optional[Tensor], in_features: int, backend: str) -> Tensor:
    backend = resolve_backend(backend, x.device, supports=_supports())
    if backend == "cpp":
        return torch.ops.sparsebert_ext.sparse_rows_linear_fwd(x, values, col_indices, row_offsets, in_features,
                                                               bias)
    return ref.sparse_rows_linear(x, values, col_indices, row_offsets, bias, in_features)


@_sparse_rows_linear_op.register_fake
def _(x, values, col_indices, row_offsets, bias, in_features, backend):
    return x.new_empty((x.shape[0], row_offsets.shape[0] - 1))


def _check_inputs(x, values, col_indices, row_offsets, bias, in_features: int) -> None:
    """TypeError/ValueError naming the argument for any x, format tensor or bias the op cannot take."""
    check_tensor("x", x)
    _check_fp32("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} in its last dimension, got shape {tuple(x.shape)}")
    check_tensor("values", values, ndim=1)
    _check_fp32("values", values)
    check_tensor("col_indices", col_indices, ndim=1)
    if col_indices.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"col_indices must be int16 or int32, got {col_indices.dtype}")
    if col_indices.numel() != values.numel():
        raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {values.numel()}")
    check_tensor("row_offsets", row_offsets, ndim=1)
    if row_offsets.dtype != torch.int32 or row_offsets.numel() < 1:
        raise TypeError(f"row_offsets must be a non-empty int32 tensor, got {row_offsets.dtype} "
                        f"{tuple(row_offsets.shape)}")
    for name, t in (("values", values), ("col_indices", col_indices), ("row_offsets", row_offsets)):
        check_same_device(name, t, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        _check_fp32("bias", bias)
        if bias.shape[0] != row_offsets.numel() - 1:
            raise ValueError(f"bias must have out_features = {row_offsets.numel() - 1} elements, got {bias.shape[0]}")
        check_same_device("bias", bias, "x", x)


_OVERLOADS: dict = {}


def _overload(name: str):
    """torch.ops.sparsebert_ext.<name>.default, looked up once (the lookup costs microseconds per call)."""
    op = _OVERLOADS.get(name)
    if op is None:
        op = _OVERLOADS[name] = getattr(torch.ops.sparsebert_ext, name).default
    return op


def _cpp_fwd():
    return _overload("sparse_rows_linear_fwd")


def _cpp_slots():
    return _overload("sparse_rows_slots_matvec")


def slots_available() -> bool:
    """True when the C++ extension has the one-token row-group slots kernel."""
    return _ext_has("sparse_rows_slots_matvec")


def sparse_rows_slots(values: Tensor, col_indices: Tensor, row_offsets: Tensor,
                      in_features: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The row-group slots (slot_values, slot_lanes, slot_chunks, group_offsets) of a sparse-rows weight, for
    `sparse_rows_linear(..., slots=)`; contents checked first (ValueError naming the tensor)."""
    validate_sparse_rows_format(values, col_indices, row_offsets, in_features, row_offsets.numel() - 1)
    return ref.sparse_rows_slots_encode(values, col_indices, row_offsets, in_features)


def _slots_matvec(x, slots, values, col_indices, row_offsets, bias, in_features: int) -> Tensor:
    """The one-token kernel; the C++ op checks every input (a bad slot tensor: ValueError naming slots).
    No Python checks before the call: at one token they would cost a good part of the kernel's time."""
    n = row_offsets.numel() - 1
    try:
        if x.dim() == 2:
            return _cpp_slots()(x, *slots, bias, n)
        return _cpp_slots()(x.reshape(1, in_features), *slots, bias, n).reshape(*x.shape[:-1], n)
    except (RuntimeError, TypeError) as exc:
        if not isinstance(slots, (tuple, list)) or len(slots) != 4 or not all(isinstance(t, Tensor) for t in slots):
            raise TypeError("slots must be the 4 tensors sparse_rows_slots returns (slot_values, slot_lanes, "
                            f"slot_chunks, group_offsets), got {type(slots).__name__}") from None
        _check_inputs(x, values, col_indices, row_offsets, bias, in_features)
        raise ValueError(f"slots: {str(exc).splitlines()[0]}") from None


def sparse_rows_linear(x: Tensor, values: Tensor, col_indices: Tensor, row_offsets: Tensor,
                       bias: Optional[Tensor], in_features: int, *, backend: str = "auto",
                       slots: Optional[Sequence[Tensor]] = None) -> Tensor:
    """y = x @ W.T + bias, W (N, in_features) in the sparse-rows format, x (..., in_features) float32 in any
    layout. N = row_offsets.numel() - 1. slots: the weight's row-group slots (`sparse_rows_slots`), used for
    an x of one token on the CPU (the C++ one-token kernel); None: every token count takes the gather kernel."""
    if (isinstance(x, Tensor) and x.is_cpu and not torch.compiler.is_compiling() and cpp_available()
            and (backend == "cpp" or (backend == "auto" and _env.backend_override() != "torch"))):
        if slots is not None and x.numel() == in_features and x.shape[-1] == in_features and slots_available():
            return _slots_matvec(x, slots, values, col_indices, row_offsets, bias, in_features)
        # Eager CPU fast path (what resolve_backend answers for CPU tensors: "auto" is cpp unless
        # SPARSEBERT_BACKEND=torch): the C++ op directly, which checks every input itself. The Python checks
        # and the custom_op's dispatch would cost several times the kernel at one token on a 768x768 layer;
        # so would the reshapes of a 2-D x (2-4 us each way) and the overload lookup of the op.
        # On a refusal the Python checks run to raise a TypeError/ValueError naming the argument.
        flat = x.dim() == 2
        try:
            y = _cpp_fwd()(x if flat else x.reshape(-1, in_features), values, col_indices, row_offsets,
                           in_features, bias)
        except RuntimeError:
            _check_inputs(x, values, col_indices, row_offsets, bias, in_features)
            raise
        return y if flat else y.reshape(*x.shape[:-1], y.shape[1])
    _check_inputs(x, values, col_indices, row_offsets, bias, in_features)
    chosen = op_backend(backend, x.device, supports=_supports())
    x2 = x.reshape(-1, in_features)  # any strides: the C++ kernel packs x itself, F.linear takes any
    y = _sparse_rows_linear_op(x2, values.contiguous(), col_indices.contiguous(), row_offsets.contiguous(), bias,
                               in_features, chosen)
    return y.reshape(*x.shape[:-1], row_offsets.numel() - 1)


sparse_rows_linear_reference = ref.sparse_rows_linear

__all__ = ["sparse_rows_linear", "sparse_rows_linear_reference", "validate_sparse_rows_format", "cpp_available",
           "sparse_rows_slots", "slots_available"]
