"""Fused elementwise passes of the "weight pass + dense GEMM" path (issue 10 item 1).

Above a crossover token count a masked linear is cheapest as one elementwise pass that writes the effective
weight W * m once per step, followed by cuBLAS GEMMs (the forward and the input gradient both read that
one W * m; the weight gradient is a plain dY^T X). These kernels are the elementwise passes:

    masked_weight(weight, mask_src, kind, ...)              W * m (weight dtype); masked-dense semantics:
                                                            a pruned entry is 0 even if W holds NaN/inf
    weight_grad_epilogue(grad, weight, scores, threshold)   dweight = G * m (weight dtype) and
                                                            dscores = G * W (scores dtype), one pass over G

`kind` is `_gemm.MASK_UINT8`, `MASK_PACKED` or `MASK_SCORES` (threshold: a float or a 0-dim tensor read on
the device, rounded to the scores' dtype as torch's `scores >= tau`). Inputs are validated with the
`_gemm` checks; 1-D programs over BLOCK elements of the flattened (N, K) matrix (int32 offsets: `check_matrix`
refuses 2**31 elements or more).
"""
import torch
import triton
import triton.language as tl

from . import _gemm
from ._gemm import MASK_PACKED, MASK_SCORES, MASK_UINT8, load_keep, load_threshold

_BLOCK = 1024


@triton.jit
def _keep_at(mask_ptr, offs, valid, N, K, words_per_row, threshold, threshold_ptr,
             MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr):
    n = offs // K
    k = offs % K
    if MASK_KIND == 3:
        tau = load_threshold(threshold, threshold_ptr, mask_ptr, THRESHOLD_FROM_PTR)
    else:
        tau = 0.0
    return load_keep(mask_ptr, n, k, N, K, words_per_row, tau, MASK_KIND) & valid


@triton.jit
def _masked_weight_kernel(w_ptr, mask_ptr, out_ptr, N, K, words_per_row, threshold, threshold_ptr,
                          MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N * K
    keep = _keep_at(mask_ptr, offs, valid, N, K, words_per_row, threshold, threshold_ptr, MASK_KIND,
                    THRESHOLD_FROM_PTR)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, tl.where(keep, w, tl.zeros_like(w)), mask=valid)


@triton.jit
def _weight_grad_epilogue_kernel(g_ptr, w_ptr, mask_ptr, dscores_ptr, dweight_ptr, N, K, words_per_row,
                                 threshold, threshold_ptr, MASK_KIND: tl.constexpr, THRESHOLD_FROM_PTR: tl.constexpr,
                                 WRITE_DSCORES: tl.constexpr, WRITE_DWEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N * K
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if WRITE_DSCORES:
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(dscores_ptr + offs, (g * w).to(dscores_ptr.dtype.element_ty), mask=valid)
    if WRITE_DWEIGHT:
        keep = _keep_at(mask_ptr, offs, valid, N, K, words_per_row, threshold, threshold_ptr, MASK_KIND,
                        THRESHOLD_FROM_PTR)
        tl.store(dweight_ptr + offs, tl.where(keep, g, 0.0).to(dweight_ptr.dtype.element_ty), mask=valid)


def _mask_source(weight, mask_src, kind, threshold):
    n, k = weight.shape
    if kind == MASK_SCORES:
        _gemm.check_matrix("scores", mask_src, (n, k))
        value, ptr = _gemm.threshold_args(threshold, mask_src)
        return mask_src, 0, value, ptr
    if kind not in (MASK_UINT8, MASK_PACKED):
        raise ValueError(f"kind must be MASK_UINT8, MASK_PACKED or MASK_SCORES, got {kind!r}")
    mask, _, words = _gemm.check_mask(mask_src, kind == MASK_PACKED, n, k)
    return mask, words, 0.0, None


def _grid(numel):
    return (triton.cdiv(numel, _BLOCK),)


def masked_weight(weight: torch.Tensor, mask_src: torch.Tensor, kind: int, threshold=None) -> torch.Tensor:
    """W * m as a new (N, K) tensor in weight's dtype. mask_src: uint8/bool (N, K), packed int32
    (N, ceil(K/32)) or scores (N, K) (kind MASK_SCORES, with `threshold`)."""
    _gemm.check_matrix("weight", weight)
    _gemm.check_device(weight, mask_src)
    mask, words, value, ptr = _mask_source(weight, mask_src, kind, threshold)
    out = torch.empty_like(weight)
    if weight.numel():
        _masked_weight_kernel[_grid(weight.numel())](
            weight, mask, out, weight.shape[0], weight.shape[1], words, value, ptr,
            MASK_KIND=kind, THRESHOLD_FROM_PTR=ptr is not None, BLOCK=_BLOCK)
    return out


def weight_grad_epilogue(grad: torch.Tensor, weight, mask_src, kind: int, threshold=None, *,
                         need_dscores: bool, need_dweight: bool, dscores_dtype=None, dweight_dtype=None):
    """From G = dY^T X (N, K), any float dtype: (dscores = G * W or None, dweight = G * m or None).

    dscores needs kind MASK_SCORES (mask_src = the scores; dscores in their dtype unless dscores_dtype is
    given); dweight is in weight's dtype unless dweight_dtype is given."""
    _gemm.check_matrix("grad", grad)
    n, k = grad.shape
    _gemm.check_matrix("weight", weight, (n, k))
    _gemm.check_device(grad, weight, mask_src)
    if need_dscores and kind != MASK_SCORES:
        raise ValueError("need_dscores=True needs kind MASK_SCORES (the scores as mask_src)")
    mask, words, value, ptr = _mask_source(weight, mask_src, kind, threshold)
    dscores = torch.empty((n, k), dtype=dscores_dtype or mask_src.dtype, device=grad.device) if need_dscores else None
    dweight = torch.empty((n, k), dtype=dweight_dtype or weight.dtype, device=grad.device) if need_dweight else None
    if grad.numel() and (need_dscores or need_dweight):
        _weight_grad_epilogue_kernel[_grid(grad.numel())](
            grad, weight, mask, grad if dscores is None else dscores, grad if dweight is None else dweight,
            n, k, words, value, ptr, MASK_KIND=kind, THRESHOLD_FROM_PTR=ptr is not None,
            WRITE_DSCORES=need_dscores, WRITE_DWEIGHT=need_dweight, BLOCK=_BLOCK)
    return dscores, dweight
