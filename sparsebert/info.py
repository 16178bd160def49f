"""What this install can do: versions, GPU, built backends and compiled architectures.

`python -m sparsebert.info` or `sparsebert info`.
"""
from __future__ import annotations

import json
import platform
from typing import Dict

import torch

from .ops import _ext
from .ops._backends import available_backends, resolve_backend, triton_available


def collect() -> Dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "transformers": None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": _ext.build_info() if _ext.load() else None,
        "backends": {"cpu": available_backends("cpu")},
        "auto": {"cpu": resolve_backend("auto", "cpu")},
    }
    if triton_available():
        import triton
        info["triton"] = triton.__version__
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["backends"]["cuda"] = available_backends("cuda")
        info["auto"]["cuda"] = resolve_backend("auto", "cuda")
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def format_info(info: Dict) -> str:
    ext = info["extension"]
    lines = [
        f"sparsebert    python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
        f"triton {info['triton']}, transformers {info['transformers']}",
        f"GPU           {info['gpu'] or 'none visible'}" + (f" (sm {info.get('gpu_capability')})" if info["gpu"] else ""),
        f"extension     {'not built (pure torch and Triton only)' if ext is None else json.dumps(ext)}",
    ]
    for dev, names in info["backends"].items():
        lines.append(f"backends {dev:4s} {', '.join(names)}   (auto -> {info['auto'][dev]})")
    return "\n".join(lines)


def main() -> int:
    print(format_info(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
