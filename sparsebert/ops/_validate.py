"""Input checks shared by the ops: clear errors that name the argument, raised before any kernel runs."""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32)


def check_tensor(name: str, t, *, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move both to one device")


def check_linear(x, weight, bias) -> None:
    """x (..., K), weight (N, K), bias (N,) or None; one float dtype, one device."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)} = (out_features, in_features))"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    check_same_device("weight", weight, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} output rows")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; they must match")
        check_same_device("bias", bias, "x", x)


def check_mask(mask, weight: Tensor) -> bool:
    """Returns True for a bit-packed (int32) mask. Shapes: (N, K), or (N, ceil(K/32)) when packed."""
    check_tensor("mask", mask, ndim=2)
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"mask must be bool or uint8 (dense) or int32 (bit-packed), got {mask.dtype}")
    n, k = weight.shape
    packed = mask.dtype == torch.int32
    expected = (n, (k + 31) // 32) if packed else (n, k)
    if tuple(mask.shape) != expected:
        kind = "bit-packed int32 mask" if packed else "mask"
        raise ValueError(f"{kind} must have shape {expected} for weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    check_same_device("mask", mask, "weight", weight)
    return packed


def check_mask_to_pack(mask) -> None:
    """`pack_mask`'s input: a 2-D bool or uint8 (N, K) mask."""
    check_tensor("mask", mask, ndim=2)
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"mask must be a bool or uint8 (N, K) tensor to pack, got {mask.dtype}")


def check_packed_mask(packed, in_features) -> None:
    """`unpack_mask`'s input: a 2-D int32 (N, ceil(in_features / 32)) tensor and an int in_features >= 0."""
    check_tensor("packed", packed, ndim=2)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be an int32 (bit-packed) tensor, got {packed.dtype}")
    if isinstance(in_features, bool) or not isinstance(in_features, (int, torch.SymInt)) or in_features < 0:
        raise ValueError(f"in_features must be an int >= 0, got {in_features!r}")
    words = (in_features + 31) // 32
    if packed.shape[1] != words:
        raise ValueError(f"in_features = {in_features} needs packed of shape (N, {words}) (32 bits a word), "
                         f"got {tuple(packed.shape)}")


def check_scores(scores, weight: Tensor) -> None:
    check_tensor("scores", scores, ndim=2)
    check_float("scores", scores)
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    check_same_device("scores", scores, "weight", weight)
    assert_no_nan("scores", scores)


# Value checks (NaN) cost kernels: on a GPU an isnan, a reduction and an assert per checked tensor per call,
# which the first GPU run measured as most of an op's GPU time at <= 64 tokens. A tensor whose values were
# checked is remembered by identity and version counter (bumped by every in-place write, as autograd's
# saved-tensor checks rely on): the check runs again only after the values changed. Writes through `.data`
# bypass the version counter, for these checks as for autograd's. Never while tracing (torch.compile keeps
# the checks in its graph).
_CHECKED: "OrderedDict[int, tuple]" = OrderedDict()
_CHECKED_MAX = 4096
_FLOAT_THRESHOLDS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_CACHE_LOCK = threading.Lock()  # both caches are shared by every thread that calls an op


def _checked_before(t: Tensor) -> bool:
    if torch.compiler.is_compiling() or type(t) not in (Tensor, torch.nn.Parameter):
        return False
    entry = _CHECKED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version


def _remember_checked(t: Tensor) -> None:
    if torch.compiler.is_compiling() or type(t) not in (Tensor, torch.nn.Parameter):
        return
    try:
        ref = weakref.ref(t)
    except TypeError:
        return
    with _CACHE_LOCK:
        _CHECKED[id(t)] = (ref, t._version)
        _CHECKED.move_to_end(id(t))
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)


def as_threshold(threshold, device: torch.device) -> Tensor:
    """A float or 0-dim tensor -> 0-dim fp32 tensor on `device`; NaN is refused.

    No host sync: a Python float is checked on the host and written once per (value, device) by a fill
    kernel (no host-to-device copy; the 0-dim tensor is then reused, never written); a tensor is checked on
    the device (`torch._assert_async`: an error on the CPU, a device-side assert on a GPU), once per version
    of its values (see _CHECKED)."""
    if isinstance(threshold, Tensor):
        if (threshold.dim() == 0 and threshold.dtype == torch.float32 and not threshold.requires_grad
                and threshold.device == device and _checked_before(threshold)):
            return threshold  # what the detach/reshape/to below would return (an alias), without their cost
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a scalar or a 1-element tensor, got shape {tuple(threshold.shape)}")
        t = threshold.detach().reshape(()).to(device=device, dtype=torch.float32)
        if not _checked_before(threshold):
            device_check(~torch.isnan(t), "threshold is NaN; a mask cannot be taken from it")
            _remember_checked(threshold)
        return t
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"threshold must be a float or a 0-dim tensor, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ValueError("threshold is NaN; a mask cannot be taken from it")
    if torch.compiler.is_compiling() or not isinstance(threshold, (int, float)):
        return torch.full((), threshold, dtype=torch.float32, device=device)
    key = (float(threshold), str(device))
    t = _FLOAT_THRESHOLDS.get(key)
    if t is None:
        t = torch.full((), threshold, dtype=torch.float32, device=device)
        with _CACHE_LOCK:
            t = _FLOAT_THRESHOLDS.setdefault(key, t)
            while len(_FLOAT_THRESHOLDS) > 256:
                _FLOAT_THRESHOLDS.popitem(last=False)
    return t


def device_check(ok: Tensor, message: str) -> None:
    """Refuses bad values without a host sync: `torch._assert_async(ok)`, which on a GPU is a device-side
    assert (the error surfaces at the next synchronization). On the CPU the check is immediate and raises
    ValueError(message), like the other input checks (RuntimeError while tracing under torch.compile)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        try:
            torch._assert_async(ok, message)
        except RuntimeError:
            raise ValueError(message) from None
    else:
        torch._assert_async(ok, message)


def assert_no_nan(name: str, t: Tensor) -> None:
    """Refuses NaN in `t` (see `device_check`), once per version of its values (see _CHECKED); the message
    names `name`."""
    if _checked_before(t):
        return
    device_check(~torch.isnan(t.detach()).any(), f"{name} contains NaN; a NaN score has no rank (refused)")
    _remember_checked(t)


def assert_no_nan_all(named: Sequence[Tuple[str, Tensor]], what: str) -> None:
    """Refuses NaN in any of the (name, tensor) pairs, and remembers each as checked (see _CHECKED), so that
    an op given one of them later skips its own check until the values change.

    One reduction for all of them instead of a check per tensor: `torch._foreach_norm` (the 2-norm, a
    multi-tensor launch per device and dtype on a GPU) is NaN exactly when its tensor holds a NaN (a square
    is never NaN, a sum of non-negative terms and +inf never is), so the stacked norms summed are NaN
    exactly when one of the tensors holds one: about 6 launches per device for all the tensors, where
    `assert_no_nan` costs 4 per tensor (mask training: every score matrix changes at every optimizer step).
    On the CPU the error names the first tensor with a NaN; on a GPU it is a device-side assert (no host
    sync) that names `what`."""
    todo = [(n, t) for n, t in named if not _checked_before(t)]
    if len(todo) <= 1 or torch.compiler.is_compiling():
        for n, t in todo:
            assert_no_nan(n, t)
        return
    by_device: "OrderedDict[torch.device, list]" = OrderedDict()
    for n, t in todo:
        by_device.setdefault(t.device, []).append((n, t))
    for device, group in by_device.items():
        norms = torch._foreach_norm([t.detach() for _, t in group], 2, dtype=torch.float32)
        total = torch.stack(norms).sum()
        try:
            device_check(total == total, f"{what} contain NaN; a NaN score has no rank (refused)")
        except ValueError:  # raised at once on the CPU only: name the first tensor that holds a NaN
            for n, t in group:
                assert_no_nan(n, t)
            raise
        for _, t in group:
            _remember_checked(t)


def remember_checked(t: Tensor) -> None:
    """Record that `t`'s current values are NaN-free (a caller that knows it: e.g. a top-k threshold of
    checked scores); `assert_no_nan` and `as_threshold` then skip `t` until its values change."""
    _remember_checked(t)


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A float in [0, 1) (NaN fails the range test); errors name `name`. Also takes the symbolic float
    torch.compile passes for a sparsity that changes between calls: no math.isnan or float() on it, so the
    graph stays whole."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return sparsity * 1.0
