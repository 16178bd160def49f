"""Triton exact k-th smallest value over one or several score tensors (global movement-pruning threshold).

`topk_threshold(scores_list, k_prune)` returns a 0-dim fp32 tensor tau = the (k_prune + 1)-th smallest
value over all elements of all given tensors (so `scores >= tau` keeps n - k_prune of n when there are no
ties), -inf when k_prune == 0 and +inf when k_prune == n (the C++ and CUDA kernels' edges). No sort: a radix select over the order-preserving uint32 key of each
value (converted exactly to fp32 first, so tensors of different float dtypes mix):

    key(v) = bits(v) | 0x80000000   for v >= +0.0        key(v) = ~bits(v)   for v <= -0.0

Four passes, one per byte of the key, most significant first. Pass p histograms byte p of the keys whose
higher bytes equal the prefix found so far (tl.histogram per block, one atomic add of the block's
histogram per program); a one-program kernel then picks the byte whose cumulative count passes the
remaining rank, appends it to the prefix and lowers the rank. Prefix and rank live in a 2-int32 device
tensor written by fill kernels (no host-to-device copy), so the host never waits on the device. After 4 passes the prefix is the exact key of the answer.
Several tensors of one dtype are concatenated first (one launch per pass instead of one per tensor).
NaN orders above +inf (as in torch.kthvalue); -0.0 orders just below +0.0 (equal values either way).
"""
import math
from typing import Sequence, Union

import torch
import triton
import triton.language as tl

__all__ = ["topk_threshold"]

from ._interpreter import INTERPRET
_BLOCK = 256 if INTERPRET else 4096


@triton.jit
def _order_key(values):
    """fp32 -> uint32 key with key(a) < key(b) iff a < b (and -0 < +0, NaN above +inf)."""
    bits = values.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _radix_histogram_kernel(scores_ptr, numel, state_ptr, hist_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += #{i : byte (SHIFT / 8) of key_i == d and key_i's bytes above it == prefix}."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    prefix = tl.load(state_ptr).to(tl.uint32, bitcast=True)
    hist = tl.zeros((512,), dtype=tl.int32)
    for start in range(pid * BLOCK, numel, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < numel
        key = _order_key(tl.load(scores_ptr + offs, mask=valid, other=0.0).to(tl.float32))
        if SHIFT < 24:
            valid = valid & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
        # elements outside the prefix (or past the end) go to bin 256, which nobody reads
        hist += tl.histogram(tl.where(valid, digit, 256), 512)
    tl.atomic_add(hist_ptr + tl.arange(0, 512), hist)


@triton.jit
def _radix_select_kernel(state_ptr, hist_ptr, out_ptr, SHIFT: tl.constexpr):
    """Finds the byte holding rank `state[1]`, appends it to the prefix `state[0]`; last pass writes tau."""
    hist = tl.load(hist_ptr + tl.arange(0, 256))
    rank = tl.load(state_ptr + 1)
    below = tl.cumsum(hist, 0) <= rank  # bins entirely below the wanted rank (a prefix of the bins)
    digit = tl.sum(below.to(tl.int32), 0)
    rank = rank - tl.sum(tl.where(below, hist, 0), 0)
    prefix = tl.load(state_ptr).to(tl.uint32, bitcast=True) | (digit.to(tl.uint32) << SHIFT)
    tl.store(state_ptr, prefix.to(tl.int32, bitcast=True))
    tl.store(state_ptr + 1, rank)
    if SHIFT == 0:
        bits = tl.where((prefix >> 31) != 0, prefix & 0x7FFFFFFF, ~prefix)
        tl.store(out_ptr, bits.to(tl.float32, bitcast=True))


def _num_programs(numel: int, device: torch.device) -> int:
    blocks = triton.cdiv(numel, _BLOCK)
    if INTERPRET or device.type != "cuda":
        return min(blocks, 4)
    return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def check_count(total: int, device: torch.device) -> None:
    """The kernels count and index in int32, and the last grid-stride step of a program may pass `numel` by
    up to programs * BLOCK: refuse totals where that step would wrap past 2**31 - 1."""
    limit = 2**31 - 1 - _num_programs(2**31 - 1, device) * _BLOCK
    if total > limit:
        raise ValueError(f"topk_threshold counts and indexes in int32; got {total} scores (limit {limit})")


def _flat_buffers(tensors):
    """One flat contiguous buffer per dtype (a single tensor is only viewed, not copied)."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in by_dtype.values()]


def topk_threshold(scores_list: Union[torch.Tensor, Sequence[torch.Tensor]], k_prune: int) -> torch.Tensor:
    """0-dim fp32 tensor: the (k_prune + 1)-th smallest of all values in `scores_list` (-inf if k_prune == 0,
    +inf if k_prune == total).

    scores_list: a tensor or a non-empty sequence of float tensors (fp32/fp16/bf16, any shape) on one
    device; k_prune: int with 0 <= k_prune <= total number of elements."""
    tensors = [scores_list] if isinstance(scores_list, torch.Tensor) else list(scores_list)
    if not tensors:
        raise ValueError("scores_list must hold at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scores_list[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"scores_list[{i}] must be fp32/fp16/bf16, got {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"scores_list tensors must share one device; got {tensors[0].device} and {t.device}")
    device = tensors[0].device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}")
    total = sum(t.numel() for t in tensors)
    if isinstance(k_prune, torch.Tensor):  # a 0-dim integer tensor on the device: read by the kernels, no sync
        return _select_device_rank(tensors, k_prune, total, device)
    if isinstance(k_prune, bool) or not isinstance(k_prune, int):
        raise TypeError(f"k_prune must be an int or a 0-dim integer tensor, got {type(k_prune).__name__}")
    if not 0 <= k_prune <= total:
        raise ValueError(f"k_prune must satisfy 0 <= k_prune <= {total} (the number of scores), got {k_prune}")
    check_count(total, device)
    if k_prune == 0:
        return torch.full((), -math.inf, dtype=torch.float32, device=device)
    if k_prune == total:
        return torch.full((), math.inf, dtype=torch.float32, device=device)

    state = torch.zeros(2, dtype=torch.int32, device=device)  # [key prefix, rank within prefix]
    state[1:].fill_(k_prune)  # a fill kernel, not a host-to-device copy: no sync
    return _radix_select(tensors, state, device)


def _select_device_rank(tensors, k_prune: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """The radix select with the rank read from a 0-dim integer tensor; -inf for k <= 0, +inf for k >= total."""
    if k_prune.dim() != 0 or k_prune.device != device or k_prune.is_floating_point():
        raise ValueError(f"k_prune must be a 0-dim integer tensor on {device}, got {k_prune.dtype} {tuple(k_prune.shape)} "
                         f"on {k_prune.device}")
    check_count(total, device)
    k = k_prune.long()
    state = torch.zeros(2, dtype=torch.int32, device=device)
    state[1:].copy_(k.clamp(0, total - 1))  # a device-to-device copy: no sync
    out = _radix_select(tensors, state, device)
    inf = torch.full((), math.inf, dtype=torch.float32, device=device)
    return torch.where(k <= 0, -inf, torch.where(k >= total, inf, out))


def _radix_select(tensors, state, device):
    buffers = _flat_buffers(tensors)
    hist = torch.zeros((4, 512), dtype=torch.int32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    for p, shift in enumerate((24, 16, 8, 0)):
        for buf in buffers:
            _radix_histogram_kernel[(_num_programs(buf.numel(), device),)](
                buf, buf.numel(), state, hist[p], SHIFT=shift, BLOCK=_BLOCK)
        _radix_select_kernel[(1,)](state, hist[p], out, SHIFT=shift)
    return out
