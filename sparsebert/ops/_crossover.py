"""The measured crossover table of size-based dispatch (`crossover.json` next to this file).

On CUDA, `backend="auto"` runs masked_linear / score_masked_linear as "weight pass + cuBLAS" (one fused
elementwise pass writes W * m, then dense GEMMs) when the token count M is at least the crossover of the
GPU, op and dtype, and as the fused Triton kernels below it. The table is JSON (never code), measured by
bench/bench_crossover.py (which writes a whole table to copy here; its "measured" entry records where
each GPU's values came from and is not read by the dispatch). A GPU, op or dtype not in the table gets `default_tokens` (0: always the weight
pass, which is the unfused reference's own work, so it is never slower than that reference; the fused path
is taken only where a measurement says it wins).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crossover.json")
OPS = ("masked_linear", "score_masked_linear")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_table(data: dict) -> dict:
    """Validates a loaded table; ValueError naming the bad entry."""
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict):
        raise ValueError("crossover table must be an object with a 'gpus' object")
    default = data.get("default_tokens", 0)
    if isinstance(default, bool) or not isinstance(default, int) or default < 0:
        raise ValueError(f"crossover table: default_tokens must be an int >= 0, got {default!r}")
    for gpu, ops in data["gpus"].items():
        if not isinstance(ops, dict):
            raise ValueError(f"crossover table: gpus[{gpu!r}] must be an object")
        for op, by_dtype in ops.items():
            if op not in OPS:
                raise ValueError(f"crossover table: gpus[{gpu!r}] has unknown op {op!r}; expected one of {OPS}")
            if not isinstance(by_dtype, dict):
                raise ValueError(f"crossover table: gpus[{gpu!r}][{op!r}] must be an object")
            for dt, tokens in by_dtype.items():
                if dt not in _DTYPES:
                    raise ValueError(f"crossover table: gpus[{gpu!r}][{op!r}] has unknown dtype {dt!r}")
                if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                    raise ValueError(f"crossover table: gpus[{gpu!r}][{op!r}][{dt!r}] must be an int >= 0, "
                                     f"got {tokens!r}")
    return data


@functools.lru_cache(maxsize=None)
def load_table(path: str = TABLE_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return parse_table(json.load(f))


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)  # host query, no device sync


def crossover_tokens(op: str, gpu_name: str, dtype: torch.dtype, table: Optional[dict] = None) -> int:
    """The token count at and above which `op` on `gpu_name` in `dtype` takes the weight-pass path."""
    table = load_table() if table is None else table
    name = str(dtype).replace("torch.", "")
    return table["gpus"].get(gpu_name, {}).get(op, {}).get(name, table.get("default_tokens", 0))


def use_weight_pass(op: str, device: torch.device, dtype: torch.dtype, tokens: int,
                    table: Optional[dict] = None) -> bool:
    """True when `backend="auto"` runs `op` as weight pass + dense GEMMs: CUDA tensors only, M >= crossover."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tokens >= crossover_tokens(op, _device_name(index), dtype, table)
