"""CPU benchmark: the C++ elementwise passes of mask training and masked inference (sparsebert._C), and its
top-k threshold, against the same result computed by torch, in the same run.

    OMP_NUM_THREADS=2 pytest bench/test_bench_cpp_elementwise.py --benchmark-enable -q

Each pass runs once per layer per step: W * m (the weight pass's `masked_weight` / `score_masked_weight`,
and the fused C++ ops' first step), and the weight-gradient epilogue (`score_masked_weight_grad`: dScores
= G * W, dW = G * [s >= tau]). Each entry times the C++ pass and torch's way to the same bits
(`torch.where(keep, v, 0)`, what the torch backend runs; for packed masks the unpack first) by interleaved
rounds (`REPS`, medians), and writes both with their ratio and the bytes moved per second to
bench/results/cpu-<date>-cpp-elementwise.csv. With the default --benchmark-disable every entry runs once as
a correctness test (bit-for-bit against torch) and writes nothing.

Prediction from bytes, written before the branch-free rewrite (csrc/cpu/sparsebert_cpu.h): each pass reads
and writes every element once (W * m, fp32, uint8 mask: 9 bytes an element; packed: 8.1; scores: 12;
dScores+dW: 16), so it is bandwidth-bound: 1536 x 384 (590k elements, 5.3 MB) ~0.1 ms on this 2-core
machine, as torch's `w * m` (0.10 ms). The branchy loop took 1.3 ms: ~2.2 ns an element, a mispredicted
branch at about half of them. Predicted after: 10-15x faster, near `w * m`.

The top-k threshold (`topk_threshold`: every `threshold_refresh_steps` in mask training, each IMP round)
against torch's `kthvalue` over the same keys: one matrix (per-layer scope) and the 36 matrices of a
MiniLM encoder (global scope). Before: std::nth_element over all n keys, ~9.5 ns a key (5.6 ms for
590k). Prediction for the radix pass (a histogram of the top 12 bits, a gather of one bin, nth_element on
it): two streaming passes at ~1-2 ns a key, ~0.5-1 ms for 590k; without the n-sized key array, the
global case (10.6M keys, 42 MB of keys before) gains more.
"""

import pytest
import torch

from _cpu_ab import interleaved_medians, write_rows_csv
from sparsebert.ops import _ext
from sparsebert.ops.reference import unpack_mask

SHAPES = [(1536, 384), (768, 768), (3072, 768)]  # (out_features, in_features): MiniLM FFN, BERT-base
REPS = 30
_rows = []

pytestmark = pytest.mark.skipif(not (_ext.load() and _ext.has_cpu()),
                                reason=f"sparsebert._C CPU kernels not built ({_ext.load_error()})")


@pytest.fixture(scope="module", autouse=True)
def _write_csv():
    yield
    write_rows_csv(_rows, "cpp-elementwise")


def _cases(n, k, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(dtype)
    s = torch.randn(n, k, generator=g)
    grad = torch.randn(n, k, generator=g)
    keep = s >= 0.0
    u8, packed = keep.to(torch.uint8), torch.ops.sparsebert_ext.pack_mask(keep)
    tau = torch.tensor(0.0)
    zero = torch.zeros((), dtype=dtype)
    ext = torch.ops.sparsebert_ext
    size = dtype.itemsize
    # name: (C++ pass, torch's way to the same values, bytes read + written per element)
    return {
        "masked_weight uint8": (lambda: ext.masked_weight(w, u8, False), lambda: torch.where(u8.bool(), w, zero),
                                2 * size + 1),
        "masked_weight packed": (lambda: ext.masked_weight(w, packed, True),
                                 lambda: torch.where(unpack_mask(packed, k), w, zero), 2 * size + 1 / 8),
        "score_masked_weight": (lambda: ext.score_masked_weight(w, s, tau), lambda: torch.where(s >= tau, w, zero),
                                2 * size + 4),
        "weight grad: dscores": (lambda: ext.score_masked_weight_grad(grad, w, s, tau, True, False)[0],
                                 lambda: grad * w.float(), 4 + size + 4),
        "weight grad: dscores + dweight": (
            lambda: ext.score_masked_weight_grad(grad, w, s, tau, True, True),
            lambda: (grad * w.float(), torch.where(s >= tau, grad, 0.0).to(dtype)), 4 + size + 4 + 4 + size),
    }


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("name", ["masked_weight uint8", "masked_weight packed", "score_masked_weight",
                                  "weight grad: dscores", "weight grad: dscores + dweight"])
def test_cpp_pass_vs_torch(benchmark, name, shape, dtype, threads):
    n, k = shape
    cpp, ref, bytes_per_element = _cases(n, k, dtype)[name]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = benchmark(cpp)
        assert _same(got, ref()), f"{name}: the C++ pass and torch disagree"
        if benchmark.disabled:
            return
        (t_cpp, iqr_cpp), (t_ref, iqr_ref) = interleaved_medians([cpp, ref], REPS)
    finally:
        torch.set_num_threads(old)
    _rows.append({"pass": name, "out_features": n, "in_features": k, "dtype": str(dtype).replace("torch.", ""),
                  "threads": threads, "cpp_us": round(1e6 * t_cpp, 1), "torch_us": round(1e6 * t_ref, 1),
                  "speedup_vs_torch": round(t_ref / t_cpp, 2),
                  "cpp_GBps": round(bytes_per_element * n * k / t_cpp / 1e9, 1),
                  "iqr_rel_cpp": round(iqr_cpp, 3), "iqr_rel_torch": round(iqr_ref, 3)})


def _minilm_scores(g):
    per_layer = [torch.randn(384, 384, generator=g) for _ in range(4)]
    per_layer += [torch.randn(1536, 384, generator=g), torch.randn(384, 1536, generator=g)]
    return per_layer * 6


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scope", ["one matrix 1536x384", "one matrix 3072x768", "MiniLM encoder, 36 matrices"])
def test_cpp_topk_threshold_vs_torch(benchmark, scope, threads):
    g = torch.Generator().manual_seed(1)
    if scope == "MiniLM encoder, 36 matrices":
        tensors = _minilm_scores(g)
    else:
        n, k = (1536, 384) if "1536" in scope else (3072, 768)
        tensors = [torch.randn(n, k, generator=g)]
    total = sum(t.numel() for t in tensors)
    k_prune = total // 2
    cpp = lambda: torch.ops.sparsebert_ext.topk_threshold(tensors, k_prune)  # noqa: E731
    ref = lambda: torch.cat([t.reshape(-1) for t in tensors]).kthvalue(k_prune + 1).values  # noqa: E731
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = benchmark(cpp)
        assert got.item() == ref().item()
        if benchmark.disabled:
            return
        (t_cpp, iqr_cpp), (t_ref, iqr_ref) = interleaved_medians([cpp, ref], max(5, REPS // 3))
    finally:
        torch.set_num_threads(old)
    _rows.append({"pass": f"topk_threshold ({scope})", "out_features": total, "in_features": 1, "dtype": "float32",
                  "threads": threads, "cpp_us": round(1e6 * t_cpp, 1), "torch_us": round(1e6 * t_ref, 1),
                  "speedup_vs_torch": round(t_ref / t_cpp, 2), "cpp_GBps": round(4 * total / t_cpp / 1e9, 1),
                  "iqr_rel_cpp": round(iqr_cpp, 3), "iqr_rel_torch": round(iqr_ref, 3)})
