"""sparse-rows format: C++ kernel (AVX2 and scalar paths) and torch backend against the plain-torch reference,
the SparseRowsLinear layer, bad packed input, and compress(format="auto") / the explicit-format speed check."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebert.nn.compress import BitmaskLinear, compress
from sparsebert.nn.cpu_sparse import (FormatChoice, SlowerThanDenseWarning, SparseRowsLinear, choose_cpu_format,
                                      interleaved_median_timer)
from sparsebert.ops import reference_formats as rf
from sparsebert.ops.sparse_rows_linear import (cpp_available, sparse_rows_linear, sparse_rows_linear_reference,
                                               validate_sparse_rows_format)

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="sparsebert._C without the sparse-rows kernel")

# fp32 products over K <= 333 terms of N(0, 1) values: the kernel and the reference sum in different orders.
RTOL, ATOL = 1e-5, 1e-4


def _weight(n, k, density, seed=0, empty_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    for r in empty_rows:
        if r < n:
            w[r] = 0
    return w


def _kernel(x, v, c, o, k, b, simd):
    return torch.ops.sparsebert_ext.sparse_rows_linear_fwd(x, v, c, o, k, b, simd)


@needs_cpp
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("tokens", [1, 3, 17, 128])
@pytest.mark.parametrize("nk", [(37, 45), (100, 333)])
def test_kernel_matches_reference(simd, density, tokens, nk):
    n, k = nk
    w = _weight(n, k, density)
    v, c, o = rf.sparse_rows_encode(w)
    assert c.dtype == torch.int16 and int((o[1:] == o[:-1]).sum()) >= 1  # an empty row is in the test
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1))
    for bias in (torch.randn(n), None):
        y = _kernel(x, v, c, o, k, bias, simd)
        torch.testing.assert_close(y, sparse_rows_linear_reference(x, v, c, o, bias, k), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=RTOL, atol=ATOL)


@needs_cpp
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "scalar"])
def test_kernel_int32_indices_and_wide_k(simd):
    n, k = 9, 40000  # int16 cannot index 40000 columns: the encoder picks int32
    w = _weight(n, k, 0.01)
    v, c, o = rf.sparse_rows_encode(w)
    assert c.dtype == torch.int32
    x = torch.randn(5, k)
    torch.testing.assert_close(_kernel(x, v, c, o, k, None, simd), F.linear(x, w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_op_noncontiguous_and_batched_input(backend):
    if backend == "auto" and not cpp_available():
        pytest.skip("no C++ kernel")
    n, k = 29, 70
    w = _weight(n, k, 0.3)
    v, c, o = rf.sparse_rows_encode(w)
    b = torch.randn(n)
    base = torch.randn(2, k, 11)
    x = base.transpose(1, 2)  # (2, 11, k), not contiguous
    assert not x.is_contiguous()
    y = sparse_rows_linear(x, v, c, o, b, k, backend=backend)
    assert y.shape == (2, 11, n)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)
    x1 = torch.randn(k, 3)[:, 1]  # one token, strided
    torch.testing.assert_close(sparse_rows_linear(x1, v, c, o, b, k, backend=backend), F.linear(x1, w, b),
                               rtol=RTOL, atol=ATOL)


def test_other_dtypes_refused_clearly():
    w = _weight(8, 16, 0.5)
    v, c, o = rf.sparse_rows_encode(w)
    with pytest.raises(TypeError, match="x must be float32"):
        sparse_rows_linear(torch.randn(2, 16, dtype=torch.bfloat16), v, c, o, None, 16)
    with pytest.raises(TypeError, match="values must be float32"):
        sparse_rows_linear(torch.randn(2, 16), v.half(), c, o, None, 16)
    with pytest.raises(TypeError, match="float32"):
        SparseRowsLinear(w.to(torch.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        rf.sparse_rows_encode(w.half())


def test_bad_packed_input_refused_naming_the_tensor():
    n, k = 10, 50
    w = _weight(n, k, 0.3)
    v, c, o = rf.sparse_rows_encode(w)
    x = torch.randn(3, k)
    with pytest.raises(ValueError, match="col_indices has"):
        sparse_rows_linear(x, v, c[:-1], o, None, k)
    with pytest.raises(TypeError, match="col_indices must be int16 or int32"):
        sparse_rows_linear(x, v, c.long(), o, None, k)
    with pytest.raises(TypeError, match="row_offsets must be"):
        sparse_rows_linear(x, v, c, o.long(), None, k)
    with pytest.raises(ValueError, match="bias must have out_features"):
        sparse_rows_linear(x, v, c, o, torch.randn(n + 1), k)
    bad_c = c.clone()
    bad_c[5] = k  # out of range
    with pytest.raises(ValueError, match=r"col_indices\[5\] = 50 is out of range"):
        validate_sparse_rows_format(v, bad_c, o, k, n)
    neg_c = c.clone()
    neg_c[2] = -1
    with pytest.raises(ValueError, match="col_indices.*out of range"):
        validate_sparse_rows_format(v, neg_c, o, k, n)
    bad_o = o.clone()
    bad_o[4], bad_o[5] = o[5], o[4] - 1
    with pytest.raises(ValueError, match="row_offsets decreases"):
        validate_sparse_rows_format(v, c, bad_o, k, n)
    with pytest.raises(ValueError, match="row_offsets must start at 0 and end at nnz"):
        validate_sparse_rows_format(v[:-1], c[:-1], o, k, n)
    swapped = c.clone()
    s, e = int(o[0]), int(o[1])
    assert e - s >= 2
    swapped[s], swapped[s + 1] = c[s + 1], c[s]
    with pytest.raises(ValueError, match="strictly ascending"):
        validate_sparse_rows_format(v, swapped, o, k, n)
    layer = SparseRowsLinear(w)
    state = layer.state_dict()
    state["col_indices"] = bad_c
    with pytest.raises(ValueError, match="SparseRowsLinear.*col_indices"):
        layer.load_state_dict(state)


@needs_cpp
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_kernel_refuses_bad_contents_without_reading_out_of_bounds(simd, tokens):
    n, k = 10, 50
    v, c, o = rf.sparse_rows_encode(_weight(n, k, 0.3))
    x = torch.randn(tokens, k)
    bad_c = c.clone()
    bad_c[-1] = 30000  # far past x
    with pytest.raises(RuntimeError, match="col_indices holds an index outside"):
        _kernel(x, v, bad_c, o, k, None, simd)
    # the one range pass before any row: every position (vector body and remainder), int16 and int32,
    # negative indices (read as unsigned), and K itself (one past the end)
    big = rf.sparse_rows_encode(_weight(64, 50, 0.5))
    for idx_dtype in (torch.int16, torch.int32):
        cols = big[1].to(idx_dtype)
        for pos in (0, 17, cols.numel() // 2, cols.numel() - 1):
            for value in (-1, k):
                bad = cols.clone()
                bad[pos] = value
                with pytest.raises(RuntimeError, match="col_indices holds an index outside"):
                    _kernel(x, big[0], bad, big[2], k, None, simd)
        torch.testing.assert_close(_kernel(x, big[0], cols, big[2], k, None, simd),
                                   x @ rf.sparse_rows_decode(big[0], cols, big[2], k).t(), rtol=RTOL, atol=ATOL)
    bad_o = o.clone()
    bad_o[-1] += 1
    with pytest.raises(RuntimeError, match="row_offsets must start at 0 and end at nnz"):
        _kernel(x, v, c, bad_o, k, None, simd)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _kernel(x.double(), v, c, o, k, None, simd)


def test_layer_roundtrip_and_bytes():
    w = _weight(48, 96, 0.1)
    b = torch.randn(48)
    layer = SparseRowsLinear(w, b)
    assert torch.equal(layer.dense_weight(), w)
    nnz = int((w != 0).sum())
    slots = layer.slot_values.shape[0]
    assert layer.weight_nbytes() == nnz * (4 + 2) + 49 * 4 + slots * (8 * 4 + 8 + 4) + (48 // 8 + 1) * 4
    lean = SparseRowsLinear(w, b, matvec_slots=False)  # the sparse-rows tensors alone
    assert lean.weight_nbytes() == nnz * (4 + 2) + 49 * 4 and lean.slot_values is None
    x = torch.randn(4, 7, 96)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(layer.to_linear()(x), F.linear(x, w, b))


# ------------------------------------------------------------------------------ choosing sparse or dense
def _stub_timer(sparse_s, dense_s, calls=None):
    """Deterministic Timer: fixed seconds per candidate and token count; still calls each candidate once."""
    def timer(candidates, tokens):
        out = {}
        for name, fn in candidates.items():
            fn()
            out[name] = (sparse_s if name == "sparse" else dense_s)[tokens]
        if calls is not None:
            calls.append(tokens)
        return out
    return timer


@needs_cpp
def test_choice_with_stubbed_timer_is_deterministic():
    w = _weight(32, 64, 0.1)
    calls = []
    fast = choose_cpu_format(w, tokens=(1, 16), margin=0.1,
                             timer=_stub_timer({1: 1.0, 16: 1.0}, {1: 1.2, 16: 1.11}, calls))
    assert fast.format == "sparse-rows" and calls == [1, 16]
    assert fast.speedups == pytest.approx({1: 1.2, 16: 1.11})
    # 5% faster is inside the 10% margin: dense
    near = choose_cpu_format(w, tokens=(1, 16), timer=_stub_timer({1: 1.0, 16: 1.0}, {1: 2.0, 16: 1.05}))
    assert near.format == "dense" and "16 tokens" in near.reason
    # faster at one token count, slower at another: dense (a layer must never get slower)
    mixed = choose_cpu_format(w, tokens=(1, 16), timer=_stub_timer({1: 1.0, 16: 2.0}, {1: 5.0, 16: 1.0}))
    assert mixed.format == "dense" and mixed.speedups[16] == pytest.approx(0.5)


def test_choice_skips_what_the_kernel_does_not_serve():
    assert choose_cpu_format(_weight(8, 16, 0.1).half()).format == "dense"
    choice = choose_cpu_format(_weight(8, 16, 0.1).double())
    assert choice.format == "dense" and "float32" in choice.reason and choice.speedups == {}


def _model(n_layers=3):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(n_layers)])
    with torch.no_grad():
        for lin in model:
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
    return model


@needs_cpp
def test_compress_auto_per_layer_with_stubbed_timer():
    model = _model()
    x = torch.randn(5, 64)
    expected = model(x)

    def timer(candidates, tokens):  # layer "1" (the second) is "slow" sparse, the others fast
        for fn in candidates.values():
            fn()
        slow = timer.layer == 1
        timer.calls += 1
        if timer.calls % 2 == 0:
            timer.layer += 1
        return {"sparse": 2.0 if slow else 1.0, "dense": 1.0 if slow else 2.0}
    timer.layer, timer.calls = 0, 0
    compress(model, format="auto", tokens=(1, 8), timer=timer)
    assert [type(m).__name__ for m in model] == ["SparseRowsLinear", "Linear", "SparseRowsLinear"]
    assert {n: c["format"] for n, c in model.compress_choices.items()} == {
        "0": "sparse-rows", "1": "dense", "2": "sparse-rows"}
    assert model.compress_choices["1"]["speedups"] == {1: 0.5, 8: 0.5}
    torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)


@needs_cpp
def test_compress_auto_real_timing_returns_a_valid_choice():
    model = _model(2)
    x = torch.randn(3, 64)
    expected = model(x)
    compress(model, format="auto", tokens=(1, 4), timer=interleaved_median_timer(reps=3, warmup=1))
    for name, choice in model.compress_choices.items():
        assert choice["format"] in ("sparse-rows", "dense")
        assert set(choice["speedups"]) == {1, 4} and all(r > 0 for r in choice["speedups"].values())
        assert type(model.get_submodule(name)).__name__ == ("SparseRowsLinear" if choice["format"] == "sparse-rows"
                                                            else "Linear")
    torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)


def test_compress_explicit_format_warns_when_slower_than_dense():
    model = _model(2)

    def timer(candidates, tokens):  # the compressed layer measures 4x slower than dense
        return {"sparse": 4.0, "dense": 1.0}
    with pytest.warns(SlowerThanDenseWarning, match=r"module '0' \(64, 64\).*0\.25x dense speed at 1 tokens"):
        compress(model, format="bitmask", tokens=(1, 8), timer=timer)
    assert isinstance(model[0], BitmaskLinear) and model.compress_choices["1"]["speedups"] == {1: 0.25, 8: 0.25}
    fast = _model(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowerThanDenseWarning)
        compress(fast, format="bitmask", tokens=(1,), timer=lambda c, t: {"sparse": 1.0, "dense": 2.0})
    quiet = _model(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowerThanDenseWarning)
        compress(quiet, format="bitmask", speed_check=False, timer=timer)


def test_format_choice_as_dict():
    c = FormatChoice("dense", {1: 0.9}, "slower")
    assert c.as_dict() == {"format": "dense", "speedups": {1: 0.9}, "reason": "slower"}
