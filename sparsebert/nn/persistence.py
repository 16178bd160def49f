"""Save and load sparse, compressed and pruned Hugging Face models: safetensors for tensors, JSON for settings.

    save_pretrained(model, dir)     from_pretrained(dir)     export_onnx(model, args, path)

A directory written by `save_pretrained` holds:

* ``config.json`` (the model's config; per-layer widths ``sparsebert_heads_per_layer`` /
  ``sparsebert_neurons_per_layer`` for a structurally pruned model);
* ``model.safetensors``: stock Hugging Face weights with the *masked* weights (zeros where pruned), so
  ``transformers.AutoModel*.from_pretrained(dir)`` gives the sparse model as plain dense layers. Written for
  every model except a compressed one with ``stock_weights=False`` (the default there, to keep the file
  small); that model's non-compressed tensors go to ``sparsebert_base.safetensors`` instead, so stock
  loaders fail with "no model.safetensors" rather than load something else. A pruned model's stock weights
  have the smaller shapes: stock ``from_pretrained`` refuses them (size mismatch); load it with sparsebert.
* ``sparsebert_state.safetensors``: what only sparsebert reads: per SparseLinear the bit-packed mask
  (mode "mask") or the scores and threshold (mode "scores"), plus the unmasked weight where the layer may
  still revive pruned weights (scores mode by default, see `keep_pruned_weights`); per compressed module
  its stored form (bitmask / BSR / 2:4 / sparse-rows tensors and bias).
* ``sparsebert.json``: format version, model class, dtype, the files, and per module its type and
  settings (mode, target_sparsity, granularity, backend, scores dtype; a compressed module's manifest).
  It is written last: a directory without it is an ordinary Hugging Face (or pruned) checkpoint.

`from_pretrained` builds the model from ``config.json`` and the recorded class (a name looked up in
``transformers``, checked to be a ``PreTrainedModel``), shrinks it to the recorded widths, swaps in the
SparseLinear / compressed modules and loads every tensor strictly. Nothing is unpickled. Files are
written to a temporary folder inside ``dir`` and renamed into place (readers see whole files); they get
the user's umask.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..ops.reference import pack_mask, unpack_mask
from .compress import _CompressedLinear, _set_module, compressed_from_tensors, compressed_state
from .sparse_linear import MODES, SparseLinear
from .sparsify import sparse_linears

FORMAT_NAME = "sparsebert"
FORMAT_VERSION = 1
META_FILE = "sparsebert.json"
STATE_FILE = "sparsebert_state.safetensors"
BASE_FILE = "sparsebert_base.safetensors"
STOCK_FILE = "model.safetensors"
_STOCK_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------ file helpers
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _chmod_umask(path: PathLike) -> None:
    """Give a file written through a private temporary the mode a plain open() would have given it."""
    os.chmod(path, 0o666 & ~_umask())


def _fsync_path(path: PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name beside `path`; after the block writes it, fsync and rename it over
    `path`. The file is created by the writer (so it gets the user's umask); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        yield str(tmp)
        _chmod_umask(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(path.parent)


def _granularity_json(g) -> str:
    return f"block:{g[1]}" if isinstance(g, tuple) else str(g)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from(name, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what} must name a torch dtype, got {name!r}")
    return dtype


def _dedupe_shared(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Drop tensors that share storage with an earlier key (tied weights): safetensors refuses aliases;
    the loader accepts a missing key whose parameter is tied to a loaded one."""
    out, seen = {}, set()
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------ model building
def model_class_by_name(name) -> type:
    """A transformers PreTrainedModel class by name (or the class itself); anything else is a ValueError."""
    import transformers

    cls = name if isinstance(name, type) else getattr(transformers, str(name), None)
    auto = isinstance(cls, type) and cls.__name__.startswith("AutoModel") and cls.__module__.startswith("transformers.")
    if not (auto or isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"model class must be a transformers PreTrainedModel (or AutoModel*) class or its name, "
                         f"got {name!r}")
    return cls


def build_model(config, model_class) -> nn.Module:
    """A freshly initialized model of `model_class` (class or name) from a config object or dict, shrunk to
    the per-layer widths the config records (a structurally pruned model)."""
    import transformers

    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("the stored config has no model_type")
        config = transformers.AutoConfig.for_model(model_type, **config)
    cls = model_class_by_name(model_class)
    model = (cls.from_config(config) if cls.__name__.startswith("AutoModel") else cls(config)).eval()
    heads = getattr(config, "sparsebert_heads_per_layer", None)
    neurons = getattr(config, "sparsebert_neurons_per_layer", None)
    if heads is not None and neurons is not None:
        from .structured import shrink_to_structure
        shrink_to_structure(model, heads, neurons)
    return model


def _record_widths(model) -> None:
    """Write the per-layer widths into the config when the model was pruned structurally."""
    from .structured import dense_widths, encoder_layers, structure_of
    try:
        encoder_layers(model)
    except TypeError:
        return
    config = model.config
    heads, neurons = structure_of(model)
    dense_heads, dense_neurons = dense_widths(model)
    full = heads == [dense_heads] * len(heads) and neurons == [dense_neurons] * len(neurons)
    if not full or hasattr(config, "sparsebert_heads_per_layer"):
        config.sparsebert_heads_per_layer, config.sparsebert_neurons_per_layer = heads, neurons


# ------------------------------------------------------------------------------------------ save
def _sparse_linear_entry(lin: SparseLinear) -> Dict:
    return {"type": "SparseLinear", "mode": lin.mode, "in_features": lin.in_features,
            "out_features": lin.out_features, "has_bias": lin.bias is not None,
            "target_sparsity": lin.target_sparsity, "granularity": _granularity_json(lin.granularity),
            "backend": lin.backend,
            "scores_dtype": _dtype_name(lin.scores.dtype) if lin.mode == "scores" else None}


@torch.no_grad()
def save_pretrained(model: nn.Module, path: PathLike, *, stock_weights: Optional[bool] = None,
                    keep_pruned_weights: Optional[bool] = None) -> Path:
    """Save a Hugging Face model holding SparseLinear, compressed or structurally pruned layers (see the
    module docstring for the layout). Returns the directory.

    stock_weights: also write ``model.safetensors`` for a compressed model (dense weights with zeros; the
        default False keeps only the compressed form). Always written for other models.
    keep_pruned_weights: store each SparseLinear's unmasked weight besides the masked one in
        ``model.safetensors``, so that further training can revive pruned weights. Default (None): for
        layers in mode "scores" (whose mask still moves), not for mode "mask" (reloaded with zeros there;
        the forward and the masked gradient never read them).
    """
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    from safetensors.torch import save_file

    sparse = sparse_linears(model)
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, _CompressedLinear)}
    stock = (not compressed) if stock_weights is None else bool(stock_weights)
    _record_widths(model)

    base = {k: v.detach() for k, v in model.state_dict().items()}
    extra: Dict[str, Tensor] = {}
    modules: Dict[str, Dict] = {}
    for name, lin in sparse.items():
        entry = _sparse_linear_entry(lin)
        keep = (lin.mode == "scores") if keep_pruned_weights is None else bool(keep_pruned_weights)
        for key in ("mask", "scores", "threshold"):
            base.pop(f"{name}.{key}", None)
        if lin.mode != "dense":
            base[f"{name}.weight"] = lin.weight.detach() * lin.effective_mask().to(lin.weight.dtype)
            if keep:
                extra[f"{name}.weight"] = lin.weight.detach()
        if lin.mode == "mask":
            extra[f"{name}.mask"] = pack_mask(lin.mask)
        elif lin.mode == "scores":
            extra[f"{name}.scores"] = lin.scores.detach()
            extra[f"{name}.threshold"] = lin.threshold.detach()
        entry["keeps_pruned_weights"] = keep and lin.mode != "dense"
        modules[name] = entry
    comp_state = compressed_state(model) if compressed else {}
    for name, mod in compressed.items():
        for key in list(base):
            if key.startswith(name + ".") and "." not in key[len(name) + 1:]:
                extra[key] = comp_state[key]
                del base[key]
        if stock:
            base[f"{name}.weight"] = mod.dense_weight()
            if mod.bias is not None:
                base[f"{name}.bias"] = mod.bias
        modules[name] = {"type": type(mod).__name__, **mod.manifest()}

    path = Path(path)
    if path.is_file():
        raise ValueError(f"path must be a directory, {path} is a file")
    path.mkdir(parents=True, exist_ok=True)
    files = []
    tmpdir = Path(tempfile.mkdtemp(prefix=".sparsebert-save-", dir=path))
    try:
        if stock:
            model.save_pretrained(tmpdir, state_dict=base)
            files += sorted(f.name for f in tmpdir.iterdir() if _STOCK_SHARD.match(f.name) and f.suffix == ".safetensors")
        else:
            model.config.save_pretrained(tmpdir)
            base = {k: v.cpu().contiguous() for k, v in _dedupe_shared(base).items()}
            save_file(base, str(tmpdir / BASE_FILE), metadata={"format": "pt"})
            files.append(BASE_FILE)
        if extra:
            save_file({k: v.cpu().contiguous() for k, v in extra.items()}, str(tmpdir / STATE_FILE),
                      metadata={"format": "pt"})
            files.append(STATE_FILE)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_class": type(model).__name__,
                "dtype": _dtype_name(model.dtype) if hasattr(model, "dtype") else None,
                "files": files, "stock_weights": stock, "modules": modules}
        with open(tmpdir / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for f in tmpdir.iterdir():
            _chmod_umask(f)
            _fsync_path(f)
        # Drop what a previous save left that this one does not replace, so no stale weights are read.
        old_meta = path / META_FILE
        if old_meta.exists():
            old_meta.unlink()
        written = {f.name for f in tmpdir.iterdir()}
        for f in path.iterdir():
            if f.is_file() and f.name not in written and (_STOCK_SHARD.match(f.name) or f.name in (BASE_FILE, STATE_FILE)):
                f.unlink()
        for f in sorted(tmpdir.iterdir(), key=lambda p: p.name == META_FILE):  # sparsebert.json last
            os.replace(f, path / f.name)
        _fsync_path(path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------ load
def _read_meta(path: Path) -> Optional[Dict]:
    f = path / META_FILE
    if not f.exists():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{f} is not a sparsebert manifest (expected format {FORMAT_NAME!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{f}: format version {meta.get('version')!r} is not one this sparsebert reads "
                         f"(<= {FORMAT_VERSION})")
    for key in ("files", "modules"):
        if not isinstance(meta.get(key), (list if key == "files" else dict)):
            raise ValueError(f"{f}: {key!r} is missing or malformed")
    for name in meta["files"]:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{f}: files must be .safetensors names inside the directory, got {name!r}")
    return meta


def _stock_files(path: Path) -> list:
    index = path / (STOCK_FILE + ".index.json")
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted(set(weight_map.values()))
    if (path / STOCK_FILE).exists():
        return [STOCK_FILE]
    raise FileNotFoundError(f"{path} has neither {META_FILE} nor {STOCK_FILE}")


def _load_tensors(path: Path, files) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    state: Dict[str, Tensor] = {}
    for name in files:
        if name == STATE_FILE:
            continue
        state.update(load_file(str(path / name)))
    return state


def _sparse_linear_from(name: str, e: Dict, lin: nn.Module, extra: Dict[str, Tensor], state: Dict[str, Tensor],
                        backend: Optional[str]) -> SparseLinear:
    mode = e.get("mode")
    if mode not in MODES:
        raise ValueError(f"module {name!r}: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (e.get("out_features"), e.get("in_features")):
        raise ValueError(f"module {name!r}: the model built from config.json has {lin!r} there, the manifest "
                         f"records a ({e.get('out_features')}, {e.get('in_features')}) linear")
    kwargs = {"backend": backend or e.get("backend", "auto"), "granularity": e.get("granularity", "element")}
    if mode == "scores":
        kwargs.update(score_init="constant", target_sparsity=e.get("target_sparsity"),
                      scores_dtype=_dtype_from(e.get("scores_dtype"), f"module {name!r}: scores_dtype"))
    new = SparseLinear.from_linear(lin, mode=mode, **kwargs)
    new.set_target_sparsity(e.get("target_sparsity"))  # kept in every mode (it outlives a freeze_mask)
    if mode == "mask":
        packed = extra.pop(f"{name}.mask", None)
        words = -(-lin.in_features // 32)
        if packed is None or packed.dtype != torch.int32 or tuple(packed.shape) != (lin.out_features, words):
            raise ValueError(f"module {name!r}: {STATE_FILE} must hold '{name}.mask' as a ({lin.out_features}, "
                             f"{words}) int32 packed mask, got "
                             f"{None if packed is None else (tuple(packed.shape), packed.dtype)}")
        state[f"{name}.mask"] = unpack_mask(packed, lin.in_features).to(torch.uint8)
    elif mode == "scores":
        for key in ("scores", "threshold"):
            if f"{name}.{key}" not in extra:
                raise ValueError(f"module {name!r}: {STATE_FILE} lacks '{name}.{key}'")
            state[f"{name}.{key}"] = extra.pop(f"{name}.{key}")
    if f"{name}.weight" in extra:  # the unmasked weight, when it was kept
        state[f"{name}.weight"] = extra.pop(f"{name}.weight")
    return new


def _check_all_loaded(model: nn.Module, missing, unexpected, path: Path) -> None:
    if missing:  # a key tied to a loaded tensor (e.g. an MLM decoder and the word embeddings) is fine
        tensors = dict(model.state_dict(keep_vars=True))
        loaded = {tensors[k].data_ptr() for k in tensors if k not in missing and tensors[k].numel()}
        missing = [k for k in missing if tensors[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model built from its config: missing "
                         f"{list(missing)[:8]}, unexpected {list(unexpected)[:8]}")


def from_pretrained(path: PathLike, *, model_class=None, backend: Optional[str] = None,
                    device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a directory written by `save_pretrained` (or a plain / pruned Hugging Face checkpoint) with its
    SparseLinear, compressed and pruned layers restored; the model is returned in eval mode.

    model_class: override the recorded class (a transformers class or its name). backend: override the
    recorded kernel backend of every sparse layer. device: where to put the model.
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    meta = _read_meta(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = model_class or (meta or {}).get("model_class") or (getattr(config, "architectures", None) or [None])[0]
    if cls is None:
        raise ValueError(f"{path}: no model class recorded; pass model_class")
    model = build_model(config, cls)
    if meta and meta.get("dtype"):
        model.to(_dtype_from(meta["dtype"], f"{path / META_FILE}: dtype"))
    files = meta["files"] if meta else _stock_files(path)
    state = _load_tensors(path, files)
    extra = load_file(str(path / STATE_FILE)) if meta and STATE_FILE in files else {}
    for name, e in (meta["modules"] if meta else {}).items():
        if not isinstance(e, dict):
            raise ValueError(f"{path / META_FILE}: module {name!r} entry must be an object")
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the model built from {path}/config.json has no module {name!r}") from exc
        if e.get("type") == "SparseLinear":
            new = _sparse_linear_from(name, e, current, extra, state, backend)
        elif e.get("type") in ("BitmaskLinear", "BSRLinear", "SemiStructuredLinear", "SparseRowsLinear"):
            prefix = name + "."
            own = {k[len(prefix):]: extra.pop(k) for k in list(extra) if k.startswith(prefix) and "." not in k[len(prefix):]}
            for k in list(state):  # stock copies of a compressed module's weight are not loaded into it
                if k.startswith(prefix) and "." not in k[len(prefix):]:
                    del state[k]
            device0 = next((p.device for p in model.parameters()), None)
            new = compressed_from_tensors(name, e, own, backend=backend or "auto", device=device0)
            state.update({prefix + k: v for k, v in new.state_dict().items()})
        else:
            raise ValueError(f"{path / META_FILE}: module {name!r} has unknown type {e.get('type')!r}")
        _set_module(model, name, new)
    if extra:
        raise ValueError(f"{path / STATE_FILE} holds tensors no module claims: {sorted(extra)[:8]}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not match the model built from its config: {exc}") from exc
    _check_all_loaded(model, missing, unexpected, path)
    if device is not None:
        model.to(device)
    return model.eval()


# ------------------------------------------------------------------------------------------ export
def export_onnx(model: nn.Module, args, path: PathLike, **kwargs):
    """torch.onnx.export of a model with sparsebert layers. ONNX has no bitmask / BSR / 2:4 or fused
    masked-linear operators, so a copy of the model is densified first (SparseLinear and compressed
    modules become nn.Linear holding W * m, with a warning saying so); `model` itself is untouched."""
    import copy

    from .compress import decompress
    from .sparsify import densify

    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as exc:
        raise ImportError("export_onnx needs the 'onnx' package (and 'onnxscript' for the dynamo exporter); "
                          "pip install onnx onnxscript") from exc
    n_sparse = len(sparse_linears(model)) + sum(isinstance(m, _CompressedLinear) for m in model.modules())
    dense = copy.deepcopy(model)
    if n_sparse:
        warnings.warn(f"export_onnx: ONNX has no sparse-matrix operators for sparsebert's formats; {n_sparse} "
                      "sparse layers are exported as dense nn.Linear with zeros where pruned (same outputs, "
                      "dense size and speed)", UserWarning, stacklevel=2)
        densify(decompress(dense, to="linear"))
    return torch.onnx.export(dense.eval(), args, str(path), **kwargs)


__all__ = ["save_pretrained", "from_pretrained", "export_onnx", "build_model", "model_class_by_name", "atomic_file",
           "FORMAT_VERSION"]
