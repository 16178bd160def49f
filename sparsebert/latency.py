"""Latency lookup table of one encoder sublayer as a function of its width, measured on the current device
(Kwon et al. 2022, ``generate_lut.py`` and ``efficiency/latency.py`` of WoosukKwon/retraining-free-pruning).

* MHA: a stand-alone attention sublayer (Q/K/V/out projections, SDPA attention, residual, LayerNorm) with
  ``h`` heads, timed for every ``h = 0..H`` (``h = 0``: what a layer without heads still runs, the output
  bias + residual + LayerNorm; the authors count 0 there).
* FFN: FFN-in, GELU, FFN-out, residual, LayerNorm with ``n`` neurons, timed on a grid of ``grid_points``
  widths from 0 to N and linearly interpolated (the authors time every width 1..N).
* Each entry is the median over ``iters`` timed runs after ``warmup`` runs, in milliseconds, at input
  shape ``(batch_size, seq_len, hidden)`` with the given dtype (the authors: the mean).

Tables are cached as JSON in ``cache_dir`` (default ``$SPARSEBERT_CACHE/latency`` or
``~/.cache/sparsebert/latency``), one file per key: device name, torch version, sizes, batch, sequence
length, dtype, torch threads and measurement settings. A file whose stored key differs from the wanted one
is never reused (it is measured again and overwritten); files are written atomically.

``fit_piecewise_linear`` is the authors' ``fit_latency_fn``: latency ``c`` up to ``threshold`` units, then
``c + slope * (n - threshold)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .nn.families import FAMILIES

__all__ = ["LatencyTable", "PiecewiseLatency", "sublayer_latency_table", "fit_piecewise_linear",
           "measure_model_ms", "default_cache_dir", "device_name", "LUT_FORMAT_VERSION"]

LUT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PiecewiseLatency:
    """``latency(n) = c`` for ``1 <= n <= threshold``, ``c + slope * (n - threshold)`` above."""
    threshold: int
    c: float
    slope: float

    def __call__(self, n: int) -> float:
        return self.c + self.slope * max(0, n - self.threshold)


def fit_piecewise_linear(lut) -> PiecewiseLatency:
    """The authors' ``fit_latency_fn`` on ``lut[i] = latency with i + 1 units`` (entry 0 = one unit): the
    threshold with the least squared error; ``c`` = mean of the first ``threshold`` entries; the slope by
    least squares through ``c`` (0 when negative)."""
    y_all = torch.as_tensor(lut, dtype=torch.float64).flatten()
    if y_all.numel() == 0 or not bool(torch.isfinite(y_all).all()):
        raise ValueError(f"lut must be a non-empty sequence of finite latencies, got {lut!r}")
    n = y_all.numel()
    best, best_err = None, float("inf")
    for t in range(1, n + 1):
        c = float(y_all[:t].mean())
        y = y_all[t:] - c
        x = torch.arange(1, y.numel() + 1, dtype=torch.float64)
        slope = 0.0 if t == n else max(0.0, float((x * y).sum() / (x * x).sum()))
        approx = torch.cat([torch.full((t,), c, dtype=torch.float64), c + slope * x])
        err = float(((y_all - approx) ** 2).sum())
        if err < best_err:
            best, best_err = PiecewiseLatency(t, c, slope), err
    return best


def default_cache_dir() -> Path:
    root = os.environ.get("SPARSEBERT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sparsebert") / "latency"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


class _MHA(nn.Module):
    def __init__(self, d, heads, d_h):
        super().__init__()
        self.h, self.d_h = heads, d_h
        self.q, self.k, self.v = (nn.Linear(d, heads * d_h) for _ in range(3))
        self.out = nn.Linear(heads * d_h, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        if self.h == 0:
            return self.ln(x + self.out.bias)
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.h, self.d_h).transpose(1, 2) for p in (self.q, self.k, self.v))
        ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, self.h * self.d_h)
        return self.ln(self.out(ctx) + x)


class _FFN(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.n = n
        self.lin1, self.lin2 = nn.Linear(d, n), nn.Linear(n, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        if self.n == 0:
            return self.ln(x + self.lin2.bias)
        return self.ln(self.lin2(F.gelu(self.lin1(x))) + x)


def _time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in ms (host synchronised around each run on CUDA: a measurement)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


@dataclass
class LatencyTable:
    """``mha_ms[h]``: one MHA sublayer with h heads; ``ffn_grid``/``ffn_grid_ms``: one FFN sublayer at the
    measured widths (interpolated in between). Milliseconds per batch of ``key['batch_size']`` sequences."""
    key: dict
    mha_ms: list
    ffn_grid: list
    ffn_grid_ms: list
    path: str | None = None
    from_cache: bool = False

    def mha_lut(self) -> torch.Tensor:
        """(H + 1,) float64: latency with 0..H heads."""
        return torch.tensor(self.mha_ms, dtype=torch.float64)

    def ffn_lut(self) -> torch.Tensor:
        """(N + 1,) float64: latency with 0..N neurons (linear interpolation between grid points)."""
        grid = torch.tensor(self.ffn_grid, dtype=torch.float64)
        ms = torch.tensor(self.ffn_grid_ms, dtype=torch.float64)
        n = torch.arange(int(self.ffn_grid[-1]) + 1, dtype=torch.float64)
        i = torch.clamp(torch.searchsorted(grid, n, right=True) - 1, 0, grid.numel() - 2)
        w = (n - grid[i]) / (grid[i + 1] - grid[i])
        return ms[i] + w * (ms[i + 1] - ms[i])

    def estimate(self, heads_per_layer, neurons_per_layer) -> float:
        """Predicted encoder latency (ms): the sum over layers of the table at each layer's widths."""
        mha, ffn = self.mha_lut(), self.ffn_lut()
        return float(sum(mha[int(h)] for h in heads_per_layer) + sum(ffn[int(n)] for n in neurons_per_layer))

    def to_json(self) -> dict:
        return {"key": self.key, "mha_ms": self.mha_ms, "ffn_grid": self.ffn_grid, "ffn_grid_ms": self.ffn_grid_ms}


def _dims(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    fam = FAMILIES.get(getattr(config, "model_type", None), FAMILIES["bert"])
    d, H = int(getattr(config, fam.hidden)), int(getattr(config, fam.heads))
    return d, H, d // H, int(getattr(config, fam.intermediate))


def _valid(data, key) -> bool:
    try:
        H, N = key["heads"], key["ffn"]
        return (data["key"] == key and len(data["mha_ms"]) == H + 1 and data["ffn_grid"][0] == 0
                and data["ffn_grid"][-1] == N and len(data["ffn_grid"]) == len(data["ffn_grid_ms"]))
    except (KeyError, TypeError, IndexError):
        return False


def sublayer_latency_table(model_or_config, batch_size: int, seq_len: int, *, device=None, dtype=None,
                           grid_points: int = 17, warmup: int = 3, iters: int = 10, cache_dir=None,
                           refresh: bool = False) -> LatencyTable:
    """The latency table of ``model_or_config``'s sublayers on ``device`` (default: the model's, else CPU)
    at ``(batch_size, seq_len)``, from the cache when its key matches, else measured (and cached)."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grid_points", grid_points),
                    ("iters", iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if grid_points < 2:
        raise ValueError(f"grid_points must be >= 2 (the FFN table needs both ends), got {grid_points}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    param = next(model_or_config.parameters(), None) if isinstance(model_or_config, nn.Module) else None
    device = torch.device(device if device is not None else (param.device if param is not None else "cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    d, H, d_h, N = _dims(model_or_config)
    grid = sorted({round(i * N / (grid_points - 1)) for i in range(grid_points)})
    key = {"version": LUT_FORMAT_VERSION, "device": device_name(device), "device_type": device.type,
           "torch": torch.__version__, "hidden": d, "heads": H, "head_size": d_h, "ffn": N,
           "batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "grid": grid, "warmup": warmup, "iters": iters}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"lut-{digest}.json"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if data is not None and _valid(data, key):
            return LatencyTable(data["key"], data["mha_ms"], data["ffn_grid"], data["ffn_grid_ms"], str(path), True)
    x = torch.randn(batch_size, seq_len, d, device=device, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zero-width layers: "Initializing zero-element tensors"
        mha = [_time_ms(lambda m=_MHA(d, h, d_h).to(device, dtype).eval(): m(x), device, warmup, iters)
               for h in range(H + 1)]
        ffn = [_time_ms(lambda m=_FFN(d, n).to(device, dtype).eval(): m(x), device, warmup, iters) for n in grid]
    table = LatencyTable(key, mha, grid, ffn, str(path), False)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table.to_json(), f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return table


@torch.no_grad()
def measure_model_ms(model, batch_size: int, seq_len: int, *, warmup: int = 2, iters: int = 5, seed: int = 0) -> float:
    """Median forward time (ms) of ``model`` on random token ids of shape (batch_size, seq_len) with a full
    attention mask (the whole model: embeddings and task head included)."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(param.device)
    am = torch.ones_like(ids)
    was = model.training
    model.eval()
    try:
        return _time_ms(lambda: model(input_ids=ids, attention_mask=am), param.device, warmup, iters)
    finally:
        model.train(was)
