"""`bitmask_spmm`: y = x @ W.T + bias with W in the tile-contiguous bitmask format ("tc-bitmask").

The format is specified in `sparsebert.ops.reference_formats` (`tc_bitmask_encode`); the plain-torch
reference with the same signature is `reference_formats.bitmask_spmm` (`bitmask_spmm_reference` here).
Inference only (no autograd); a `torch.library.custom_op` with a fake impl.

Backends, "auto" order:
    CUDA tensors, fp16/bf16: cuda (csrc/cuda/bitmask_spmm.cu, mma.sync tensor cores) > triton > torch
    CUDA tensors, fp32:      triton > torch (the CUDA kernel is tensor-core only: backend="cuda" raises)
    CPU tensors:             torch ("triton" only under TRITON_INTERPRET=1)
Both kernels reduce split-K in a fixed order, so results are bitwise reproducible. The op checks shapes and
dtypes, not contents: `validate_tc_bitmask_format` checks those once where a compressed weight comes in.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._fastpath import custom_op
from . import _env, _ext
from . import reference_formats as ref
from ._backends import op_backend, resolve_backend
from ._validate import check_float, check_same_device, check_tensor

_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _cuda_kernel_built() -> bool:
    return _ext.load() and hasattr(torch.ops.sparsebert_ext, "bitmask_spmm")


def spmm_backends(dtype: torch.dtype) -> tuple:
    """The backends that implement bitmask_spmm for `dtype`."""
    return ("triton", "torch") + (("cuda",) if dtype in _CUDA_DTYPES and _cuda_kernel_built() else ())


def _resolve(backend: str, x: Tensor) -> str:
    """"auto" on CUDA prefers the CUDA kernel (unlike the other ops) unless SPARSEBERT_BACKEND names one."""
    supports = spmm_backends(x.dtype)
    if (backend == "auto" and x.device.type == "cuda" and "cuda" in supports
            and _env.backend_override() == "auto"):
        return "cuda"
    return resolve_backend(backend, x.device, supports)


@custom_op("sparsebert::bitmask_spmm", mutates_args=())
def _bitmask_spmm_op(x: Tensor, data: Tensor, tile_offsets: Tensor, bias: Optional[Tensor], out_features: int,
                     in_features: int, split_k: int, backend: str) -> Tensor:
    backend = _resolve(backend, x)
    if x.shape[0] == 0:
        return x.new_empty((0, out_features))
    if backend == "cuda":
        return torch.ops.sparsebert_ext.bitmask_spmm(x, data, tile_offsets, bias, out_features, in_features, split_k)
    if backend == "triton":
        from sparsebert.kernels.bitmask_spmm import bitmask_spmm_fwd
        return bitmask_spmm_fwd(x, data, tile_offsets, bias, out_features, in_features, split_k)
    return ref.bitmask_spmm(x, data, tile_offsets, bias, out_features, in_features)


@_bitmask_spmm_op.register_fake
def _(x, data, tile_offsets, bias, out_features, in_features, split_k, backend):
    return x.new_empty((x.shape[0], out_features))


def bitmask_spmm(x: Tensor, data: Tensor, tile_offsets: Tensor, bias: Optional[Tensor], out_features: int,
                 in_features: int, *, backend: str = "auto", split_k: int = 0) -> Tensor:
    """y = x @ W.T + bias, W (out_features, in_features) in the tc-bitmask format. x (..., in_features).
    split_k: K splits reduced inside the kernel (0 = chosen from the shape and the device)."""
    check_tensor("data", data, ndim=1)
    check_float("data", data)
    check_tensor("x", x)
    check_float("x", x)
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 0:
        raise ValueError(f"split_k must be an int >= 0 (0 = automatic), got {split_k!r}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} in its last dimension, got shape {tuple(x.shape)}")
    if x.dtype != data.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the compressed weight (data) has {data.dtype}; they must match")
    check_same_device("data", data, "x", x)
    check_tensor("tile_offsets", tile_offsets, ndim=1)
    if tile_offsets.dtype != torch.int32:
        raise TypeError(f"tile_offsets must be int32, got {tile_offsets.dtype}")
    check_same_device("tile_offsets", tile_offsets, "x", x)
    tiles = -(-out_features // ref.TC_TILE) * -(-in_features // ref.TC_TILE)
    if tile_offsets.shape[0] != tiles + 1:
        raise ValueError(f"tile_offsets must have {tiles + 1} entries for weight ({out_features}, {in_features}) "
                         f"(64 x 64 tiles + 1), got {tile_offsets.shape[0]}")
    if (data.numel() * data.element_size()) % 16:
        raise ValueError(f"data must hold a multiple of 16 bytes (whole tc-bitmask tiles), got {data.numel()} "
                         f"{data.dtype} elements")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have out_features = {out_features} elements, got {bias.shape[0]}")
        if bias.dtype != data.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but the weight values have {data.dtype}; they must match")
        check_same_device("bias", bias, "x", x)
        bias = bias.contiguous()
    if backend == "cuda" and x.dtype not in _CUDA_DTYPES:
        raise TypeError(f"backend 'cuda' of bitmask_spmm runs on tensor cores and takes float16 or bfloat16, got "
                        f"x dtype {x.dtype}; use backend 'triton' or 'torch' for float32")
    chosen = op_backend(backend, x.device, supports=spmm_backends(x.dtype))
    data = data.contiguous()
    if data.data_ptr() % 16:  # a view at an odd offset: the kernels copy tiles in 16-byte chunks
        data = data.clone()
    x2 = x.reshape(-1, in_features).contiguous()
    y = _bitmask_spmm_op(x2, data, tile_offsets.contiguous(), bias, out_features, in_features, split_k, chosen)
    return y.reshape(*x.shape[:-1], out_features)


bitmask_spmm_reference = ref.bitmask_spmm

__all__ = ["bitmask_spmm", "bitmask_spmm_reference", "spmm_backends"]
