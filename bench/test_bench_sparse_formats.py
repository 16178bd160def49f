"""CPU pytest-benchmark entries for the sparse inference formats (run anywhere):

    pytest bench/test_bench_sparse_formats.py --benchmark-enable --benchmark-group-by=param:tokens

Dense F.linear (MKL/oneDNN) against the bitmask format (C++ kernel when sparsebert._C is built, else the
torch decode path; the backend is in extra_info), BSR (block-wise torch path) and 2:4 (CPU dense
fallback), at a BERT-base FFN shape, fp32. Each entry also checks its output against the dense product.
With the default --benchmark-disable (pytest.ini) every entry runs once, as a test.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsebert.nn.compress import BitmaskLinear, BSRLinear, SemiStructuredLinear
from sparsebert.ops.sparse_formats import resolve_format_backend
from sparsebert.nn.granularity import granular_topk_mask

K, N = 768, 3072


def _weight(density, granularity):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    if density < 1.0:
        w = w * granular_topk_mask(torch.rand(N, K), 1 - density, granularity)
    return w


@pytest.mark.parametrize("tokens", [1, 16, 128])
@pytest.mark.parametrize("fmt,density", [("dense", 1.0), ("bitmask", 0.1), ("bitmask", 0.3), ("bsr32", 0.1),
                                         ("2:4", 0.5)])
def test_cpu_sparse_format(benchmark, fmt, density, tokens):
    granularity = {"dense": "element", "bitmask": "element", "bsr32": ("block", 32), "2:4": "2:4"}[fmt]
    w, b = _weight(density, granularity), torch.randn(N)
    x = torch.randn(tokens, K)
    if fmt == "dense":
        fn = lambda: F.linear(x, w, b)  # noqa: E731
        nbytes = w.numel() * w.element_size()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 2:4 falls back to dense on CPU
            module = {"bitmask": lambda: BitmaskLinear(w, b, tile=(32, 64)),
                      "bsr32": lambda: BSRLinear(w, b, block_size=32),
                      "2:4": lambda: SemiStructuredLinear(w, b)}[fmt]()
            module(x)
        fn = lambda: module(x)  # noqa: E731
        nbytes = module.weight_nbytes()
    benchmark.extra_info.update(format=fmt, density=density, tokens=tokens, weight_bytes=nbytes,
                                bytes_ratio=nbytes / (w.numel() * w.element_size()))
    if fmt == "bitmask":
        benchmark.extra_info["backend"] = resolve_format_backend("bitmask_linear", "auto", "cpu")
    y = benchmark(fn)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
