"""Sparse inference: turn pruned linears into compressed inference layers, and back.

    compress(model, format="bitmask" | "bsr" | "2:4" | "dense", block_size=32, tile=(32, 64), ...)
    decompress(model, to="linear" | "sparse")
    footprint_report(model)                     bytes per module and in total, against dense
    save_compressed(model, path); load_compressed(path_or_state, model_skeleton)

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
from ..ops.sparse_formats import bitmask_linear, bsr_linear
from .sparse_linear import SparseLinear

log = logging.getLogger("sparsebert.nn.compress")

FORMATS = ("bitmask", "bsr", "2:4", "dense")
SAVE_FORMAT_VERSION = 1


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

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def weight_nbytes(self) -> int:
        return _nbytes(self.values, self.bitmask, self.tile_offsets)

    def dense_weight(self) -> Tensor:
        return rf.bitmask_decode(self.values, self.bitmask, self.tile_offsets, self.in_features, self.tile_n,
                                 self.tile_k)

    def forward(self, x: Tensor) -> Tensor:
        return bitmask_linear(x, self.values, self.bitmask, self.tile_offsets, self.bias, self.in_features,
                              self.tile_n, self.tile_k, backend=self.backend)

    def manifest(self) -> Dict:
        return {**super().manifest(), "tile": [self.tile_n, self.tile_k], "nnz": self.values.numel()}

    @classmethod
    def _empty(cls, m: Dict) -> "BitmaskLinear":
        dtype = getattr(torch, m["dtype"])
        new = cls(torch.zeros(m["out_features"], m["in_features"], dtype=dtype),
                  torch.zeros(m["out_features"], dtype=dtype) if m["has_bias"] else None, tile=m["tile"])
        new.values = torch.zeros(m["nnz"], dtype=dtype)
        return new


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
        return bsr_linear(x, self.values, self.crow_indices, self.col_indices, self.bias, self.in_features,
                          backend=self.backend)

    def manifest(self) -> Dict:
        return {**super().manifest(), "block_size": self.block_size, "nnzb": self.values.shape[0]}

    @classmethod
    def _empty(cls, m: Dict) -> "BSRLinear":
        dtype, b = getattr(torch, m["dtype"]), m["block_size"]
        new = cls(torch.zeros(m["out_features"], m["in_features"], dtype=dtype),
                  torch.zeros(m["out_features"], dtype=dtype) if m["has_bias"] else None, block_size=b)
        new.values = torch.zeros(m["nnzb"], b, b, dtype=dtype)
        new.col_indices = torch.zeros(m["nnzb"], dtype=torch.int32)
        return new


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
    "sparse" always uses it, "dense" always the dense product, "auto" times both once per token-count
    bucket (powers of two) and caches the faster choice in `plan` (the dense fallback decodes and caches
    a dense weight once, only if some bucket chooses it). On CPU the forward is the dense fallback.
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

    def _probe(self, x2: Tensor) -> str:
        """Time the sparse and the dense product on this input once; the faster one wins."""
        dense = self._dense_weight_cached()
        times = {}
        for name, w in (("sparse", self._sparse), ("dense", dense)):
            for _ in range(3):
                F.linear(x2, w)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                F.linear(x2, w)
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end)
        choice = "sparse" if times["sparse"] < times["dense"] else "dense"
        log.debug("2:4 probe %s: sparse %.4f ms, dense %.4f ms -> %s", tuple(x2.shape), times["sparse"] / 10,
                  times["dense"] / 10, choice)
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

    @classmethod
    def _empty(cls, m: Dict) -> "SemiStructuredLinear":
        dtype = getattr(torch, m["dtype"])
        return cls(torch.zeros(m["out_features"], m["in_features"], dtype=dtype),
                   torch.zeros(m["out_features"], dtype=dtype) if m["has_bias"] else None,
                   policy=m.get("policy", "auto"))

    def manifest(self) -> Dict:
        return {**super().manifest(), "policy": self.policy}


COMPRESSED_TYPES = {"bitmask": BitmaskLinear, "bsr": BSRLinear, "2:4": SemiStructuredLinear}


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
             min_sparsity: float = 0.0, policy: str = "auto", backend: str = "auto") -> nn.Module:
    """Replace pruned linears of `model` (in place; returned) by inference modules of `format`.

    format: "bitmask" (tile=(TILE_N, TILE_K)), "bsr" (block_size 16/32/64), "2:4" (policy auto/sparse/
    dense), or "dense" (plain nn.Linear with the zeros written in: SparseLinear and compressed modules).
    modules: names, or a predicate (name, module) -> bool; default: every linear whose effective weight
    has more than `min_sparsity` zeros (every SparseLinear that prunes anything, compressed modules too).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "bsr":
        rf.check_block(block_size)
    if format == "bitmask":
        rf.check_tile(*tile)
    named = {n: m for n, m in model.named_modules() if n and _is_linear_like(m)}
    if modules is None:
        chosen = []
        for name, mod in named.items():
            if isinstance(mod, _CompressedLinear):
                chosen.append(name)
                continue
            w = _effective_weight(mod)
            if float((w == 0).float().mean()) > min_sparsity:
                chosen.append(name)
    elif callable(modules):
        chosen = [n for n, m in named.items() if modules(n, m)]
    else:
        chosen = list(modules)
        missing = [n for n in chosen if n not in named]
        if missing:
            raise ValueError(f"modules {missing} are not linear layers of the model")
    for name in chosen:
        mod = named[name]
        if isinstance(mod, _CompressedLinear) and mod.format == format:
            continue
        w, b = _effective_weight(mod), _bias_of(mod)
        try:
            if format == "dense":
                new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    new.weight.copy_(w)
                    if b is not None:
                        new.bias.copy_(b)
            elif format == "bitmask":
                new = BitmaskLinear(w, b, tile=tile, backend=backend)
            elif format == "bsr":
                new = BSRLinear(w, b, block_size=block_size, backend=backend)
            else:
                new = SemiStructuredLinear(w, b, policy=policy)
        except ValueError as exc:
            raise ValueError(f"cannot compress module {name!r} (weight {tuple(w.shape)}) to {format!r}: {exc}") from exc
        new.train(mod.training)
        _set_module(model, name, new)
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


# ------------------------------------------------------------------------------------------ save / load
def save_compressed(model: nn.Module, path) -> None:
    """Save the whole model state (compressed modules in their stored form) with a manifest that says
    which modules are compressed and how; load with `load_compressed(path, skeleton)`."""
    manifest = {n: m.manifest() for n, m in model.named_modules() if isinstance(m, _CompressedLinear)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"sparsebert_compressed": SAVE_FORMAT_VERSION, "manifest": manifest, "state_dict": state}, path)


def load_compressed(path_or_state, model_skeleton: nn.Module, *, map_location="cpu") -> nn.Module:
    """Rebuild a compressed model: `model_skeleton` has the architecture (e.g. a freshly built dense model
    of the same config); its modules named in the manifest are replaced by empty compressed modules, then
    the saved state is loaded strictly. Returns the skeleton, modified in place."""
    blob = path_or_state
    if not isinstance(blob, dict):
        blob = torch.load(path_or_state, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or "sparsebert_compressed" not in blob:
        raise ValueError("not a sparsebert compressed checkpoint (expected the dict written by save_compressed)")
    if blob["sparsebert_compressed"] > SAVE_FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {blob['sparsebert_compressed']} is newer than this "
                         f"sparsebert understands ({SAVE_FORMAT_VERSION})")
    device = next((p.device for p in model_skeleton.parameters()), torch.device("cpu"))
    for name, m in blob["manifest"].items():
        if m["format"] not in COMPRESSED_TYPES:
            raise ValueError(f"module {name!r} has unknown format {m['format']!r}")
        try:
            model_skeleton.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the skeleton has no module {name!r} named in the checkpoint") from exc
        _set_module(model_skeleton, name, COMPRESSED_TYPES[m["format"]]._empty(m).to(device))
    model_skeleton.load_state_dict(blob["state_dict"], strict=True)
    return model_skeleton


__all__ = ["compress", "decompress", "footprint_report", "save_compressed", "load_compressed", "BitmaskLinear",
           "BSRLinear", "SemiStructuredLinear", "FORMATS"]
