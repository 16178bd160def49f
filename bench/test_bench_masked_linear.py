"""pytest-benchmark entries for the masked linears on the CPU (small shapes, fast).

    pytest bench/test_bench_masked_linear.py --benchmark-enable      # time them
    pytest bench/test_bench_masked_linear.py                         # with the repo's pytest.ini: run once

The unfused torch reference (W * (s >= tau) materialized, then F.linear, autograd through it) and dense
F.linear are compared with the ops-layer path on the C++ CPU backend ("cpp"); those entries skip with a
reason when the extension is not built. The GPU benchmark is bench/bench_masked_linear_gpu.py.
"""
import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import reference

TOKENS, IN_FEATURES, OUT_FEATURES = 128, 256, 384


def _cpp_available():
    try:
        from sparsebert.ops import available_backends
    except Exception:
        return False
    return "cpp" in available_backends("cpu")


needs_cpp = pytest.mark.skipif(not _cpp_available(), reason="sparsebert._C (C++ CPU backend) is not built")


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    x = torch.randn(TOKENS, IN_FEATURES)
    w = torch.randn(OUT_FEATURES, IN_FEATURES) / IN_FEATURES ** 0.5
    b = torch.randn(OUT_FEATURES)
    scores = torch.randn(OUT_FEATURES, IN_FEATURES)
    tau = scores.flatten().kthvalue(scores.numel() // 2).values
    dy = torch.randn(TOKENS, OUT_FEATURES)
    return x, w, b, scores, tau, dy


def _fwd_bwd(fn, x, w, b, scores, tau, dy):
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]

    def step():
        for t in leaves:
            t.grad = None
        y = fn(*leaves, tau)
        y.backward(dy)
        return y

    return step, leaves


@pytest.mark.benchmark(group="score_masked_linear fwd")
def test_dense_fwd(benchmark, inputs):
    x, w, b, scores, tau, dy = inputs
    y = benchmark(F.linear, x, w, b)
    assert y.shape == (TOKENS, OUT_FEATURES)


@pytest.mark.benchmark(group="score_masked_linear fwd")
def test_unfused_reference_fwd(benchmark, inputs):
    x, w, b, scores, tau, dy = inputs
    y = benchmark(reference.score_masked_linear, x, w, b, scores, tau)
    torch.testing.assert_close(y, F.linear(x, w * (scores >= tau), b))


@needs_cpp
@pytest.mark.benchmark(group="score_masked_linear fwd")
def test_cpp_fwd(benchmark, inputs):
    from sparsebert.ops import score_masked_linear

    x, w, b, scores, tau, dy = inputs
    y = benchmark(score_masked_linear, x, w, b, scores, tau, backend="cpp")
    torch.testing.assert_close(y, reference.score_masked_linear(x, w, b, scores, tau), rtol=1e-5, atol=1e-5)


@pytest.mark.benchmark(group="score_masked_linear fwd+bwd")
def test_unfused_reference_fwd_bwd(benchmark, inputs):
    step, leaves = _fwd_bwd(reference.score_masked_linear, *inputs)
    benchmark(step)
    assert leaves[3].grad is not None and leaves[3].grad.abs().sum() > 0


@needs_cpp
@pytest.mark.benchmark(group="score_masked_linear fwd+bwd")
def test_cpp_fwd_bwd(benchmark, inputs):
    from sparsebert.ops import score_masked_linear

    step, leaves = _fwd_bwd(lambda x, w, b, s, tau: score_masked_linear(x, w, b, s, tau, backend="cpp"), *inputs)
    benchmark(step)
    ref_step, ref_leaves = _fwd_bwd(reference.score_masked_linear, *inputs)
    ref_step()
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="masked_linear fwd")
def test_unfused_masked_fwd(benchmark, inputs):
    x, w, b, scores, tau, dy = inputs
    mask = scores >= tau
    y = benchmark(lambda: F.linear(x, w * mask, b))
    assert y.shape == (TOKENS, OUT_FEATURES)


@needs_cpp
@pytest.mark.benchmark(group="masked_linear fwd")
def test_cpp_masked_fwd(benchmark, inputs):
    from sparsebert.ops import masked_linear, pack_mask

    x, w, b, scores, tau, dy = inputs
    mask = scores >= tau
    packed = pack_mask(mask)
    y = benchmark(masked_linear, x, w, b, packed, backend="cpp")
    torch.testing.assert_close(y, F.linear(x, w * mask, b), rtol=1e-5, atol=1e-5)


def test_results_files_append_and_keep_environment(tmp_path):
    """bench/_results.py: rows of two runs land in one CSV (union of columns) and one JSON (two runs)."""
    import csv
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import save_results, slug

    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "python": "3.11"}
    csv_path, json_path = save_results("demo", [{"tokens": 512, "ms": 0.5}], results_dir=tmp_path, env=env,
                                       date="2030-01-02")
    save_results("demo", [{"tokens": 4096, "ms": 1.5, "version": "fused"}], results_dir=tmp_path, env=env,
                 date="2030-01-02")
    assert csv_path.name == "nvidia-h100-80gb-hbm3-2030-01-02.csv" and slug(env["gpu"]) in json_path.name
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["tokens"] for r in rows] == ["512", "4096"]
    assert rows[0]["version"] == "" and rows[1]["version"] == "fused" and rows[0]["triton"] == "3.6.0"
    runs = json.loads(json_path.read_text())["runs"]
    assert len(runs) == 2 and runs[1]["environment"] == env and runs[1]["rows"][0]["ms"] == 1.5
