"""Sparse inference: turn pruned linears into compressed inference layers, and back.

    compress(model, format="bitmask" | "bsr" | "2:4" | "dense", block_size=32, tile=(32, 64), ...)
    decompress(model, to="linear" | "sparse")
    footprint_report(model)                     bytes per module and in total, against dense
    save_compressed(model, path); load_compressed(path)   one safetensors file, JSON manifest + config inside

Inference modules (no training; forward only; each has `.nbytes()`, `.bytes_per_weight`, `.dense_weight()`):
    BitmaskLinear         unstructured: nonzeros + 1-bit mask + per-tile offsets (Triton on GPU, C++ on CPU)
    BSRLinear             block-sparse rows, blocks of 16/32/64 (Triton on GPU, block-wise torch on CPU)
    SemiStructuredLinear  2:4: torch's semi-structured sparse tensors (cuSPARSELt/CUTLASS) on CUDA sm80+,
                          compressed weight and a per-token-count plan (sparse or dense, by a timed probe)
                          cached; on CPU a dense fallback (with a one-time warning)
Structured pruning (heads / FFN neurons) already yields physically smaller dense nn.Linear layers; they
are left as they are and reported as "dense".

A linear is compressed when it is a SparseLinear or an nn.Linear whose effective weight has zeros
(more than `min_sparsity` of them); `modules=` picks names explicitly. Inputs a format cannot serve
(2:4 on a weight that is not 2:4, BSR block sizes that do not divide the shape) raise ValueError naming
the module.
"""
from __future__ import annotations

import abc

import logging
import math
import warnings
from typing import Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import reference_formats as rf
from ..ops.sparse_formats import bitmask_linear, bsr_linear, validate_bitmask_format, validate_bsr_format
from ..ops.sparse_rows_linear import validate_sparse_rows_format
from .sparse_linear import SparseLinear

log = logging.getLogger("sparsebert.nn.compress")

FORMATS = ("bitmask", "bsr", "2:4", "dense", "sparse-rows", "auto")
SAVE_FORMAT_VERSION = 2  # 2: safetensors + JSON metadata (1 was a torch pickle)


def _nbytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _CompressedLinear(nn.Module, abc.ABC):
    """Shared parts: shape attributes, bias buffer, byte accounting, conversion back to nn.Linear.
    Each format implements weight_nbytes, dtype and dense_weight."""

    format: str = ""

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor]):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())

    @abc.abstractmethod
    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight alone."""

    def nbytes(self) -> int:
        """Bytes of everything stored: compressed weight + bias."""
        return self.weight_nbytes() + _nbytes(self.bias)

    @property
    def bytes_per_weight(self) -> float:
        """Compressed weight bytes / (out_features * in_features); dense bf16 is 2.0, fp32 4.0."""
        return self.weight_nbytes() / max(1, self.in_features * self.out_features)

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the stored values (and of the outputs)."""

    @abc.abstractmethod
    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight with zeros where pruned."""

    def to_linear(self) -> nn.Linear:
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def manifest(self) -> Dict:
        return {"format": self.format, "in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None, "dtype": str(self.dtype).replace("torch.", "")}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bytes_per_weight={self.bytes_per_weight:.3f}")

    def validate(self) -> None:
        """Check the stored format's contents (indices in range, offsets consistent); ValueError naming the
        tensor. Runs at construction and after every state-dict load, never in forward."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors, n_missing = len(error_msgs), len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == n_errors and len(missing_keys) == n_missing:  # loaded whole: check it
            try:
                self.validate()
            except ValueError as exc:
                raise ValueError(f"{type(self).__name__} {prefix.rstrip('.') or '(root)'}: {exc}") from None


class BitmaskLinear(_CompressedLinear):
    """y = x W^T + b with W as nonzero values + bitmask + per-tile offsets (see reference_formats)."""

    format = "bitmask"

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, tile=(32, 64), backend: str = "auto"):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.tile_n, self.tile_k = int(tile[0]), int(tile[1])
        values, bitmask, offsets = rf.bitmask_encode(weight.detach(), self.tile_n, self.tile_k)
        self.register_buffer("values", values)
        self.register_buffer("bitmask", bitmask)
        self.register_buffer("tile_offsets", offsets)
        self.backend = backend
        self.validate()

    def validate(self) -> None:
        validate_bitmask_format(self.values, self.bitmask, self.tile_offsets, self.in_features, self.tile_n,
                                self.tile_k)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def weight_nbytes(self) -> int:
        return _nbytes(self.values, self.bitmask, self.tile_offsets)

    def dense_weight(self) -> Tensor:
        return rf.bitmask_decode(self.values, self.bitmask, self.tile_offsets, self.in_features, self.tile_n,
                                 self.tile_k)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # plain dict lookups: nn.Module attribute lookups cost ~2 us each per call
        return bitmask_linear(x, b["values"], b["bitmask"], b["tile_offsets"], b["bias"], self.in_features,
                              self.tile_n, self.tile_k, backend=self.backend)

    def manifest(self) -> Dict:
        return {**super().manifest(), "tile": [self.tile_n, self.tile_k], "nnz": self.values.numel()}


class BSRLinear(_CompressedLinear):
    """y = x W^T + b with W as B x B blocks (values, crow_indices, col_indices), B in {16, 32, 64}."""

    format = "bsr"

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, block_size: int = 32,
                 backend: str = "auto"):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        values, crow, col = rf.bsr_encode(weight.detach(), block_size)
        self.block_size = int(block_size)
        self.register_buffer("values", values)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.backend = backend
        self.validate()

    def validate(self) -> None:
        validate_bsr_format(self.values, self.crow_indices, self.col_indices, self.in_features, self.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def weight_nbytes(self) -> int:
        return _nbytes(self.values, self.crow_indices, self.col_indices)

    def block_density(self) -> float:
        total = (self.out_features // self.block_size) * (self.in_features // self.block_size)
        return self.values.shape[0] / max(1, total)

    def dense_weight(self) -> Tensor:
        return rf.bsr_decode(self.values, self.crow_indices, self.col_indices, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # plain dict lookups (see BitmaskLinear.forward)
        return bsr_linear(x, b["values"], b["crow_indices"], b["col_indices"], b["bias"], self.in_features,
                          backend=self.backend)

    def manifest(self) -> Dict:
        return {**super().manifest(), "block_size": self.block_size, "nnzb": self.values.shape[0]}


def _semi_structured_supported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when torch's semi-structured sparse tensors can serve this weight; else the reason."""
    if device.type != "cuda":
        return f"2:4 sparse kernels need a CUDA GPU (sm80+); weights are on {device}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"2:4 sparse kernels need compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse kernels are used for float16/bfloat16 weights here, got {dtype}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


class SemiStructuredLinear(_CompressedLinear):
    """y = x W^T + b with a 2:4 sparse W.

    Stored (and saved) as values (N, K/2) + 4-bit-per-group metadata (1.125 bytes per weight in bf16).
    On CUDA sm80+ (fp16/bf16) the first forward builds torch's semi-structured sparse weight from it, and
    the stored copy is released (it is rebuilt from the sparse tensor for `state_dict`). `policy`:
    "sparse" always uses it, "dense" always the dense product, "auto" probes both once per token-count
    bucket (powers of two): 25 alternating runs each, every run from a flushed L2 and timed with CUDA
    events; sparse is chosen only when its median is more than 5% faster than dense, and the choice is
    cached in `plan` (the dense fallback decodes and caches a dense weight once, only if some bucket
    chooses it). On CPU the forward is the dense fallback.
    """

    format = "2:4"

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, policy: str = "auto"):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        if policy not in ("auto", "sparse", "dense"):
            raise ValueError(f"policy must be 'auto', 'sparse' or 'dense', got {policy!r}")
        values, meta = rf.nm24_encode(weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.policy = policy
        self.plan: Dict[int, str] = {}
        self.fallback_reason: Optional[str] = None
        self._sparse = None  # torch SparseSemiStructuredTensor, built lazily on CUDA
        self._dense = None  # dense fallback weight, built lazily
        self._dtype = values.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def released(self) -> bool:
        return self._sparse is not None and self.values.numel() == 0

    def weight_nbytes(self) -> int:
        if self.released:
            names = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
            return _nbytes(*[getattr(self._sparse, n, None) for n in names])
        return _nbytes(self.values, self.meta)

    def dense_weight(self) -> Tensor:
        if self.released:
            return self._sparse.to_dense()
        return rf.nm24_decode(self.values, self.meta, self.in_features)

    def _apply(self, fn, *args, **kwargs):
        if self.released:  # restore the stored form before moving / casting
            values, meta = rf.nm24_encode(self._sparse.to_dense())
            self.values, self.meta = values, meta
        self._sparse, self._dense, self.plan = None, None, {}
        out = super()._apply(fn, *args, **kwargs)
        self._dtype = self.values.dtype
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.released:
            values, meta = rf.nm24_encode(self._sparse.to_dense())
            destination[prefix + "values"], destination[prefix + "meta"] = values, meta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.released:
            self.values = torch.empty(self.out_features, self.in_features // 2, dtype=self._dtype,
                                      device=self._sparse.device)
            self.meta = torch.empty(self.out_features, -(-self.in_features // 8), dtype=torch.uint8,
                                    device=self._sparse.device)
        self._sparse, self._dense, self.plan = None, None, {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dense_weight_cached(self) -> Tensor:
        if self._dense is None:
            self._dense = self.dense_weight()
        return self._dense

    def _build_sparse(self) -> bool:
        if self._sparse is not None:
            return True
        reason = _semi_structured_supported(self.values.device, self.values.dtype)
        if reason is None:
            try:
                self._sparse = torch.sparse.to_sparse_semi_structured(self.dense_weight())
            except (RuntimeError, ValueError) as exc:
                reason = f"torch refused the weight ({tuple(self.values.shape)}): {exc}"
        if reason is not None:
            if self.fallback_reason is None:
                warnings.warn(f"SemiStructuredLinear: {reason}; using the dense fallback", RuntimeWarning,
                              stacklevel=3)
            self.fallback_reason = reason
            return False
        self.values = self.values.new_empty(0)  # release the stored copy: the sparse tensor holds the weight
        self.meta = self.meta.new_empty(0)
        return True

    def _probe(self, x2: Tensor, reps: int = 25, margin: float = 0.05) -> str:
        """Time the sparse and the dense product on this input; sparse wins only when its median is more
        than `margin` faster than dense. Each of the `reps` runs per candidate (alternating, after
        warm-up) starts from a flushed L2 and is timed alone with CUDA events, so that "never slower than
        dense" holds beyond timing noise."""
        dense = self._dense_weight_cached()
        candidates = (("sparse", self._sparse), ("dense", dense))
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=x2.device)  # > any GPU's L2
        events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(reps)] for name, _ in candidates}
        for _, w in candidates:
            for _ in range(3):
                F.linear(x2, w)
        for i in range(reps):
            for name, w in candidates:
                flush.zero_()
                start, end = events[name][i]
                start.record()
                F.linear(x2, w)
                end.record()
        torch.cuda.synchronize()
        times = {name: sorted(s.elapsed_time(e) for s, e in events[name])[reps // 2] for name, _ in candidates}
        choice = "sparse" if times["sparse"] * (1.0 + margin) < times["dense"] else "dense"
        log.debug("2:4 probe %s: sparse %.4f ms, dense %.4f ms (medians of %d, margin %.0f%%) -> %s",
                  tuple(x2.shape), times["sparse"], times["dense"], reps, 100 * margin, choice)
        return choice

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features = {self.in_features} in its last dimension, got "
                             f"shape {tuple(x.shape)}")
        if self.policy == "dense" or not self._build_sparse():
            return F.linear(x, self._dense_weight_cached(), self.bias)
        x2 = x.reshape(-1, self.in_features)
        bucket = 1 << max(0, math.ceil(math.log2(max(1, x2.shape[0]))))
        choice = "sparse" if self.policy == "sparse" else self.plan.get(bucket)
        if choice is None:
            capturing = torch.cuda.is_current_stream_capturing()
            compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
            if capturing or compiling:
                choice = "sparse"
            else:
                choice = self.plan[bucket] = self._probe(x2.contiguous())
                if "dense" not in self.plan.values():
                    self._dense = None  # the probe's dense weight is not needed by any bucket
        w = self._sparse if choice == "sparse" else self._dense_weight_cached()
        y = F.linear(x2.contiguous(), w, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def manifest(self) -> Dict:
        return {**super().manifest(), "policy": self.policy}


COMPRESSED_TYPES = {"bitmask": BitmaskLinear, "bsr": BSRLinear, "2:4": SemiStructuredLinear}
# what each format saves (besides the bias); "sparse-rows" is SparseRowsLinear (sparsebert.nn.cpu_sparse)
_STORED_TENSORS = {"bitmask": ("values", "bitmask", "tile_offsets"), "bsr": ("values", "crow_indices", "col_indices"),
                   "2:4": ("values", "meta"), "sparse-rows": ("values", "col_indices", "row_offsets")}


# ------------------------------------------------------------------------------------------ model surgery
def _effective_weight(module: nn.Module) -> Tensor:
    if isinstance(module, _CompressedLinear):
        return module.dense_weight()
    w = module.weight.detach()
    if isinstance(module, SparseLinear) or hasattr(module, "effective_mask"):
        w = w * module.effective_mask().to(w.dtype)
    return w


def _bias_of(module: nn.Module) -> Optional[Tensor]:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _CompressedLinear))


def compress(model: nn.Module, format: str = "bitmask", *, block_size: int = 32, tile=(32, 64),
             modules: Union[None, Iterable[str], Callable[[str, nn.Module], bool]] = None,
             min_sparsity: float = 0.0, policy: str = "auto", backend: str = "auto",
             speed_check: bool = True, tokens: Iterable[int] = (1, 16, 128), margin: float = 0.10,
             timer=None) -> nn.Module:
    """Replace pruned linears of `model` (in place; returned) by inference modules of `format`.

    format: "bitmask" (tile=(TILE_N, TILE_K)), "bsr" (block_size 16/32/64), "2:4" (policy auto/sparse/
    dense), "sparse-rows" (float32 CPU kernel, sparsebert.nn.cpu_sparse), "dense" (plain nn.Linear with the
    zeros written in: SparseLinear and compressed modules), or "auto": per layer, "sparse-rows" when it
    measures at least `margin` faster than dense at every token count in `tokens` on this machine, else
    "dense" (see cpu_sparse.choose_cpu_format; `timer` replaces the clock).
    modules: names, or a predicate (name, module) -> bool; default: every linear whose effective weight
    has more than `min_sparsity` zeros (every SparseLinear that prunes anything, compressed modules too).
    speed_check: with an explicit sparse format on CPU or CUDA weights, time each new layer against dense (3
    quick interleaved reps per token count; on a GPU each call synchronized, so eager launch paths count, as
    the first H200 run showed they must) and warn (SlowerThanDenseWarning) naming the layer and the ratio
    when it is slower at some token count.
    The choice and the measured speedups (dense time / layer time per token count) of every layer handled
    are recorded in `model.compress_choices` {name: {"format", "speedups", "reason"}}.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "bsr":
        rf.check_block(block_size)
    if format == "bitmask":
        rf.check_tile(*tile)
    named = {n: m for n, m in model.named_modules() if n and _is_linear_like(m)}
    if modules is None:
        chosen, zeros, total = [], 0, 0
        for name, mod in named.items():
            if isinstance(mod, _CompressedLinear):
                chosen.append(name)
                continue
            w = _effective_weight(mod)
            z = int((w == 0).sum())
            zeros, total = zeros + z, total + w.numel()
            if z / max(1, w.numel()) > min_sparsity:
                chosen.append(name)
        if not chosen:
            warnings.warn(f"compress(format={format!r}) changed nothing: no linear layer has more than "
                          f"min_sparsity={min_sparsity} zeros (measured density {1 - zeros / max(1, total):.4f} "
                          f"over {len(named)} linears); prune the model first (sparsify + mask training or IMP)",
                          UserWarning, stacklevel=2)
    elif callable(modules):
        chosen = [n for n, m in named.items() if modules(n, m)]
    else:
        chosen = list(modules)
        missing = [n for n in chosen if n not in named]
        if missing:
            raise ValueError(f"modules {missing} are not linear layers of the model")
    from .cpu_sparse import SlowerThanDenseWarning, SparseRowsLinear, choose_cpu_format, interleaved_median_timer
    from .cpu_sparse import measure_speedup

    tokens = tuple(tokens)
    choices = getattr(model, "compress_choices", None)
    choices = dict(choices) if isinstance(choices, dict) else {}
    for name in chosen:
        mod = named[name]
        fmt, new = format, None
        if format == "auto":
            w, b = _effective_weight(mod), _bias_of(mod)
            choice = choose_cpu_format(w, b, tokens=tokens, margin=margin, timer=timer)
            fmt, new = choice.format, choice.module
            choices[name] = choice.as_dict()
            log.info("compress(auto) %s %s: %s (%s)", name, tuple(w.shape), fmt, choice.reason)
        if isinstance(mod, _CompressedLinear) and mod.format == fmt:
            continue
        if format != "auto":
            w, b = _effective_weight(mod), _bias_of(mod)
        try:
            if new is not None:
                pass
            elif fmt == "dense":
                new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    new.weight.copy_(w)
                    if b is not None:
                        new.bias.copy_(b)
            elif fmt == "bitmask":
                new = BitmaskLinear(w, b, tile=tile, backend=backend)
            elif fmt == "bsr":
                new = BSRLinear(w, b, block_size=block_size, backend=backend)
            elif fmt == "sparse-rows":
                new = SparseRowsLinear(w, b, backend=backend)
            else:
                new = SemiStructuredLinear(w, b, policy=policy)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot compress module {name!r} (weight {tuple(w.shape)}) to {fmt!r}: {exc}") from exc
        if format in ("bitmask", "bsr", "sparse-rows") and speed_check and w.device.type in ("cpu", "cuda"):
            speedups = measure_speedup(new, w, b, tokens=tokens, timer=timer or interleaved_median_timer(3, 1))
            choices[name] = {"format": fmt, "speedups": speedups, "reason": "explicit format"}
            slow = {t: r for t, r in speedups.items() if r < 1.0}
            if slow:
                worst = min(slow, key=slow.get)
                where = ("this CPU" if w.device.type == "cpu"
                         else f"this GPU ({torch.cuda.get_device_name(w.device)}, eager calls)")
                warnings.warn(f"compress(format={fmt!r}): module {name!r} {tuple(w.shape)} measured slower than "
                              f"dense on {where}: {slow[worst]:.2f}x dense speed at {worst} tokens (speedups by "
                              f"token count: { {t: round(r, 2) for t, r in speedups.items()} }); format='auto' "
                              f"keeps such layers dense", SlowerThanDenseWarning, stacklevel=2)
        elif format == "dense":
            choices[name] = {"format": "dense", "speedups": {}, "reason": "explicit format"}
        new.train(mod.training)
        _set_module(model, name, new)
    model.compress_choices = choices
    return model


def decompress(model: nn.Module, to: str = "linear") -> nn.Module:
    """Replace every compressed module by an nn.Linear (to="linear") or a SparseLinear in mode "mask"
    whose mask is the stored nonzero pattern (to="sparse"). In place; returns the model."""
    if to not in ("linear", "sparse"):
        raise ValueError(f"to must be 'linear' or 'sparse', got {to!r}")
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, _CompressedLinear)]:
        lin = mod.to_linear()
        if to == "sparse":
            lin = SparseLinear.from_linear(lin, mode="mask", mask=lin.weight.detach() != 0)
        _set_module(model, name, lin)
    return model


def footprint_report(model: nn.Module) -> Dict:
    """Bytes of each linear-like module's weight (compressed or dense) against dense storage in its dtype.

    Returns {"modules": {name: {format, shape, dtype, bytes, dense_bytes, bytes_per_weight, ratio}},
    "total_bytes", "dense_bytes", "ratio"}. SparseLinear counts its weight plus its mask (what it stores).
    """
    rows, total, dense_total = {}, 0, 0
    for name, mod in model.named_modules():
        if not name or not _is_linear_like(mod):
            continue
        if isinstance(mod, _CompressedLinear):
            fmt, nbytes, dtype = mod.format, mod.weight_nbytes(), mod.dtype
        else:
            dtype = mod.weight.dtype
            mask = getattr(mod, "mask", None) if isinstance(mod, SparseLinear) else None
            fmt = "masked" if isinstance(mod, SparseLinear) and mod.mode != "dense" else "dense"
            nbytes = _nbytes(mod.weight) + (_nbytes(mask) if isinstance(mask, Tensor) else 0)
        dense = rf.dense_nbytes(mod.out_features, mod.in_features, dtype)
        rows[name] = {"format": fmt, "shape": [mod.out_features, mod.in_features],
                      "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "dense_bytes": dense,
                      "bytes_per_weight": nbytes / max(1, mod.out_features * mod.in_features),
                      "ratio": nbytes / max(1, dense)}
        total += nbytes
        dense_total += dense
    return {"modules": rows, "total_bytes": total, "dense_bytes": dense_total,
            "ratio": total / dense_total if dense_total else float("nan")}


def _manifest_dtype(name: str, m: Dict) -> torch.dtype:
    dtype = getattr(torch, str(m.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"module {name!r}: manifest dtype must be a floating torch dtype, got {m.get('dtype')!r}")
    return dtype


def compressed_from_tensors(name: str, m: Dict, tensors: Dict[str, Tensor], *, backend: str = "auto",
                            device=None) -> _CompressedLinear:
    """Build the compressed module described by manifest `m` from its stored tensors (keys without the
    module prefix), through the layer's constructor: the stored form is decoded with the reference decoder,
    re-encoded, and must match what was stored exactly; anything else is a ValueError naming the module."""
    fmt = m.get("format")
    if fmt not in _STORED_TENSORS:
        raise ValueError(f"module {name!r}: format must be one of {sorted(_STORED_TENSORS)}, got {fmt!r}")
    try:
        n, k, has_bias = int(m["out_features"]), int(m["in_features"]), bool(m["has_bias"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"module {name!r}: manifest needs integer in_features/out_features and has_bias") from exc
    dtype = _manifest_dtype(name, m)
    stored = _STORED_TENSORS[fmt]
    wanted = set(stored) | ({"bias"} if has_bias else set())
    if set(tensors) != wanted:
        raise ValueError(f"module {name!r} ({fmt}): stored tensors must be {sorted(wanted)}, got {sorted(tensors)}")
    if tensors["values"].dtype != dtype:
        raise ValueError(f"module {name!r}: values have dtype {tensors['values'].dtype}, manifest says {dtype}")
    bias = tensors.get("bias")
    if bias is not None and (bias.dtype != dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"module {name!r}: bias must be ({n},) {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    t = {s: tensors[s] for s in stored}
    try:
        if fmt == "bitmask":
            tile = [int(v) for v in m["tile"]]
            if tuple(t["bitmask"].shape) != (n, -(-k // 32)):
                raise ValueError(f"bitmask must have shape ({n}, {-(-k // 32)}), got {tuple(t['bitmask'].shape)}")
            dense = rf.bitmask_decode(t["values"], t["bitmask"], t["tile_offsets"], k, *tile)
            new = BitmaskLinear(dense, bias, tile=tile, backend=backend)
        elif fmt == "bsr":
            b = int(m["block_size"])
            rf.check_block(b)
            if t["values"].dim() != 3 or tuple(t["values"].shape[1:]) != (b, b) or n % b or k % b:
                raise ValueError(f"values must be (nnzb, {b}, {b}) blocks of a ({n}, {k}) weight, got "
                                 f"{tuple(t['values'].shape)}")
            if tuple(t["crow_indices"].shape) != (n // b + 1,):
                raise ValueError(f"crow_indices must have {n // b + 1} entries, got {tuple(t['crow_indices'].shape)}")
            dense = rf.bsr_decode(t["values"], t["crow_indices"], t["col_indices"], k)
            new = BSRLinear(dense, bias, block_size=b, backend=backend)
        elif fmt == "sparse-rows":
            from .cpu_sparse import SparseRowsLinear  # cpu_sparse imports this module
            validate_sparse_rows_format(t["values"], t["col_indices"], t["row_offsets"], k, n)
            dense = rf.sparse_rows_decode(t["values"], t["col_indices"], t["row_offsets"], k)
            slots = m.get("matvec_slots", True)  # files written before the option: the default
            if not isinstance(slots, bool):
                raise TypeError(f"manifest matvec_slots must be true or false, got {slots!r}")
            new = SparseRowsLinear(dense, bias, backend=backend, matvec_slots=slots)
        else:
            if tuple(t["values"].shape) != (n, k // 2) or tuple(t["meta"].shape) != (n, -(-k // 8)):
                raise ValueError(f"values must be ({n}, {k // 2}) and meta ({n}, {-(-k // 8)}), got "
                                 f"{tuple(t['values'].shape)} and {tuple(t['meta'].shape)}")
            dense = rf.nm24_decode(t["values"], t["meta"].to(torch.uint8), k)
            new = SemiStructuredLinear(dense, bias, policy=m.get("policy", "auto"))
    except (RuntimeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"module {name!r}: stored {fmt} tensors are invalid: {exc}") from exc
    if tuple(dense.shape) != (n, k):
        raise ValueError(f"module {name!r}: stored {fmt} tensors decode to {tuple(dense.shape)}, manifest says {(n, k)}")
    for s in stored:
        if getattr(new, s).dtype != t[s].dtype or not torch.equal(getattr(new, s), t[s]):
            raise ValueError(f"module {name!r}: stored {fmt} tensor {s!r} is inconsistent with the others "
                             "(re-encoding the decoded weight gives a different value)")
    return new if device is None else new.to(device)


# ------------------------------------------------------------------------------------------ save / load
_PICKLE_HINT = ("files written by sparsebert 0.1 (torch pickles) are not read, since loading a pickle can run "
                "code; load that file with torch.load(weights_only=True) in a trusted session and save it again")


def compressed_state(model: nn.Module) -> Dict[str, Tensor]:
    """The model's state dict on the CPU, contiguous, with tied (shared-storage) tensors cloned apart so that
    safetensors accepts them; compressed modules appear in their stored form."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        seen.add(key)
        state[k] = v
    return state


def compressed_manifest(model: nn.Module) -> Dict[str, Dict]:
    """Module name -> manifest (format, shape, dtype, format settings) of every compressed module."""
    return {n: m.manifest() for n, m in model.named_modules() if isinstance(m, _CompressedLinear)}


def save_compressed(model: nn.Module, path) -> None:
    """Save a compressed model as one safetensors file (no pickle): every tensor of the state dict, and in
    the file's metadata a JSON manifest of the compressed modules plus, for a Hugging Face model, its config
    and class, so that `load_compressed(path)` needs no skeleton. Written atomically, with the umask."""
    import json

    from safetensors.torch import save_file

    from .persistence import atomic_file

    meta = {"sparsebert_compressed": str(SAVE_FORMAT_VERSION), "manifest": json.dumps(compressed_manifest(model))}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        meta["config"] = config.to_json_string(use_diff=False)
        meta["model_class"] = type(model).__name__
    state = compressed_state(model)
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=meta)


def _read_compressed_file(path, map_location):
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a safetensors file written by save_compressed ({exc}); " + _PICKLE_HINT) from exc
    if "sparsebert_compressed" not in meta:
        raise ValueError(f"{path} is not a sparsebert compressed checkpoint (no 'sparsebert_compressed' metadata)")
    try:
        version = int(meta["sparsebert_compressed"])
        manifest = json.loads(meta["manifest"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: the sparsebert metadata is damaged ({exc})") from exc
    return {"sparsebert_compressed": version, "manifest": manifest, "state_dict": state,
            "config": meta.get("config"), "model_class": meta.get("model_class")}


def load_compressed(path_or_state, model_skeleton: Optional[nn.Module] = None, *, map_location="cpu",
                    backend: str = "auto") -> nn.Module:
    """Rebuild a model saved by `save_compressed` (a safetensors file, or the same content as a dict with
    keys sparsebert_compressed / manifest / state_dict). Without `model_skeleton` the model is built from
    the config and class stored in the file; the compressed modules are built from their stored tensors
    (validated: see `compressed_from_tensors`), then the whole state is loaded strictly."""
    blob = path_or_state
    if not isinstance(blob, dict):
        blob = _read_compressed_file(path_or_state, map_location)
    if not isinstance(blob, dict) or "sparsebert_compressed" not in blob:
        raise ValueError("not a sparsebert compressed checkpoint (expected the file or dict written by save_compressed)")
    if int(blob["sparsebert_compressed"]) > SAVE_FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {blob['sparsebert_compressed']} is newer than this "
                         f"sparsebert understands ({SAVE_FORMAT_VERSION})")
    if model_skeleton is None:
        if not blob.get("config") or not blob.get("model_class"):
            raise ValueError("this compressed checkpoint records no model config/class; pass model_skeleton "
                             "(a freshly built model of the same architecture)")
        import json

        from .persistence import build_model
        model_skeleton = build_model(json.loads(blob["config"]), blob["model_class"])
    state = blob["state_dict"]
    device = next((p.device for p in model_skeleton.parameters()), torch.device("cpu"))
    for name, m in blob["manifest"].items():
        try:
            model_skeleton.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the model has no module {name!r} named in the checkpoint") from exc
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        _set_module(model_skeleton, name, compressed_from_tensors(name, m, own, backend=backend, device=device))
    model_skeleton.load_state_dict(state, strict=True)
    for module in model_skeleton.modules():  # compressed formats: contents checked whatever the loader
        if isinstance(module, _CompressedLinear):
            module.validate()
    return model_skeleton


__all__ = ["compress", "decompress", "footprint_report", "save_compressed", "load_compressed",
           "compressed_from_tensors", "compressed_manifest", "compressed_state", "BitmaskLinear",
           "BSRLinear", "SemiStructuredLinear", "FORMATS"]
