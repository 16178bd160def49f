"""Backend discovery and dispatch.

Backends implement the 2-D contract of docs/ARCHITECTURE.md:
  torch   plain torch (`_torch_backend`), always available;
  cpp     the C++ CPU kernels of the extension `sparsebert._C` (CPU tensors);
  cuda    the CUDA kernels of the same extension (CUDA tensors);
  triton  `sparsebert.kernels` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
"auto" picks triton > cuda on a CUDA device and cpp > torch on the CPU. Triton leads on the GPU
because its GEMMs are autotuned and pipelined (wgmma on Hopper), while the CUDA C++ GEMM is a plain
tiled kernel written to be verified by reading; `sparsebert bench` on a GPU is what should reorder
this. The environment variable SPARSEBERT_BACKEND replaces "auto" (to force a backend in a whole run).
"""
from __future__ import annotations

import functools
import importlib
import logging
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional

import torch

from . import _env, _ext

log = logging.getLogger("sparsebert.ops")

BACKENDS = ("torch", "cpp", "cuda", "triton")
_MASKED_OPS = ("masked_linear_fwd", "masked_linear_bwd_input", "masked_linear_bwd_weight",
               "masked_linear_bwd_weight_bias")
_SCORE_OPS = ("score_masked_linear_fwd", "score_masked_linear_bwd_input", "score_masked_linear_bwd_weight_scores",
              "score_masked_linear_bwd_weight_scores_bias")
_OPS = _MASKED_OPS + _SCORE_OPS + ("topk_threshold",)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except Exception as exc:  # pragma: no cover - depends on the install
        log.debug("triton not importable: %s", exc)
        return False


def _interpreting() -> bool:
    return _env.triton_interpret() == "1"


def _probe(device_type: str, interpreting: bool) -> tuple:
    found = []
    if device_type == "cuda":
        if _ext.has_cuda():
            found.append("cuda")
        if triton_available():
            found.append("triton")
    else:
        if _ext.has_cpu():
            found.append("cpp")
        if triton_available() and interpreting:
            found.append("triton")
    found.append("torch")
    return tuple(found)


_AVAILABLE: Dict[tuple, tuple] = {}


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Backends that can run on `device`, fastest first (probed once per device type)."""
    key = (torch.device(device).type, _interpreting())
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _probe(*key)
    return list(_AVAILABLE[key])


# resolve_backend's answers by (name, device, supports, SPARSEBERT_BACKEND, TRITON_INTERPRET): it runs on
# every op call (twice: in the wrapper and where the op runs), where re-deriving the answer cost ~15 us.
_RESOLVED: Dict[tuple, str] = {}


def resolve_backend(name: str, device: torch.device | str, supports: Optional[Iterable[str]] = None) -> str:
    """Turn "auto" (or an explicit name) into a backend that runs on `device`, or raise ValueError.

    supports: the backends the op has (default: all); an op without a C++ kernel passes ("triton", "torch").
    """
    if isinstance(name, str):
        # the device as given (a torch.device hashes without building its string, which cost ~3 us a call)
        key = (name, device, None if supports is None else tuple(supports), _env.backend_override(),
               _interpreting())
        hit = _RESOLVED.get(key)
        if hit is None:
            hit = _RESOLVED[key] = _resolve_backend(name, device, supports)
        return hit
    return _resolve_backend(name, device, supports)


def _resolve_backend(name: str, device: torch.device | str, supports: Optional[Iterable[str]] = None) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}, got {type(name).__name__}")
    usable = [b for b in available_backends(device) if supports is None or b in supports]
    if name == "auto":
        forced = _env.backend_override()
        # A run-wide choice applies where the op has it; otherwise the op's own best.
        order = ("triton", "cuda", "torch") if torch.device(device).type == "cuda" else ("cpp", "torch")
        choice = forced if forced in usable else next(b for b in order if b in usable)
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    elif name not in usable:
        raise ValueError(f"backend {name!r} is not available for this op on {torch.device(device)}; available: {usable}")
    else:
        choice = name
    if not torch.compiler.is_compiling():
        _log_choice(choice, str(torch.device(device)))
    return choice


def op_backend(name: str, device: torch.device | str, supports: Optional[Iterable[str]] = None) -> str:
    """The backend argument an op wrapper passes to its torch.library op: `name` is checked now (ValueError
    for one that cannot run on `device`), but "auto" stays "auto" and the op resolves it where it runs, so a
    torch.export / torch.compile graph does not bake in the backend found at trace time."""
    if name == "auto" and supports is None:  # the torch backend runs everywhere: nothing to check here, and
        return "auto"                        # the op resolves it where it runs (one resolve per call, not two)
    chosen = resolve_backend(name, device, supports)
    return "auto" if name == "auto" else chosen


@functools.lru_cache(maxsize=None)
def _log_choice(backend: str, device: str) -> None:
    log.debug("sparsebert ops on %s use the %s backend", device, backend)


def _ext_namespace() -> SimpleNamespace:
    ns = torch.ops.sparsebert_ext

    # A tensor (0-dim k_prune, 0-dim threshold) goes to the `.tensor` overloads, which read it where it lives
    # (free on the CPU; on the device in the CUDA kernels): no host sync.
    def topk(scores, k_prune):
        if isinstance(k_prune, torch.Tensor):
            return ns.topk_threshold.tensor(list(scores), k_prune)
        return ns.topk_threshold(list(scores), int(k_prune))

    def _thr(op, threshold):
        return getattr(op, "tensor") if isinstance(threshold, torch.Tensor) else op.default

    def bws(dy, x, weight, scores, threshold, need_dweight):
        op = _thr(ns.score_masked_linear_bwd_weight_scores, threshold)
        ds, dw = op(dy, x, weight, scores, threshold, bool(need_dweight))
        return ds, (dw if need_dweight else None)

    # The weight-gradient entry points in csrc/ do not reduce db: it is a separate torch pass over dy here.
    def _dbias(dy, need_dbias):
        return dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else None

    def bw_bias(dy, x, mask, packed, need_dbias):
        return ns.masked_linear_bwd_weight(dy, x, mask, packed), _dbias(dy, need_dbias)

    def bws_bias(dy, x, weight, scores, threshold, need_dweight, need_dbias):
        return (*bws(dy, x, weight, scores, threshold, need_dweight), _dbias(dy, need_dbias))

    def fwd_s(x, weight, bias, scores, threshold):
        return _thr(ns.score_masked_linear_fwd, threshold)(x, weight, bias, scores, threshold)

    def bwi_s(dy, weight, scores, threshold):
        return _thr(ns.score_masked_linear_bwd_input, threshold)(dy, weight, scores, threshold)

    return SimpleNamespace(
        masked_linear_fwd=ns.masked_linear_fwd,
        masked_linear_bwd_input=ns.masked_linear_bwd_input,
        masked_linear_bwd_weight=ns.masked_linear_bwd_weight,
        masked_linear_bwd_weight_bias=bw_bias,
        score_masked_linear_fwd=fwd_s,
        score_masked_linear_bwd_input=bwi_s,
        score_masked_linear_bwd_weight_scores=bws,
        score_masked_linear_bwd_weight_scores_bias=bws_bias,
        topk_threshold=topk,
    )


def _triton_namespace() -> SimpleNamespace:
    ml = importlib.import_module("sparsebert.kernels.masked_linear")
    sml = importlib.import_module("sparsebert.kernels.score_masked_linear")
    topk = importlib.import_module("sparsebert.kernels.topk_threshold")
    return SimpleNamespace(**{n: getattr(ml, n) for n in _MASKED_OPS}, **{n: getattr(sml, n) for n in _SCORE_OPS},
                           topk_threshold=topk.topk_threshold)


_IMPLS: Dict[str, SimpleNamespace] = {}


def impl(backend: str) -> SimpleNamespace:
    """The namespace of 2-D functions of one backend."""
    if backend not in _IMPLS:
        if backend == "torch":
            from . import _torch_backend as mod
            _IMPLS[backend] = SimpleNamespace(**{n: getattr(mod, n) for n in _OPS})
        elif backend in ("cpp", "cuda"):
            if not _ext.load():
                raise RuntimeError("the sparsebert._C extension is not built; reinstall with a compiler present")
            _IMPLS[backend] = _ext_namespace()
        elif backend == "triton":
            _IMPLS[backend] = _triton_namespace()
        else:
            raise ValueError(f"unknown backend {backend!r}")
    return _IMPLS[backend]


# Probe the CPU backends at import, so that a torch.compile trace only reads the cached answer.
available_backends("cpu")
