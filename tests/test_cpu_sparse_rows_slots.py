"""Row-group slots, the one-token layout of a sparse-rows weight: the plain-torch encoder and matvec
(sparsebert.ops.reference_formats), the C++ kernel (AVX2 and scalar paths, csrc/cpu/sparse_rows_slots_cpu.cpp)
against an fp64 product, the op's routing of one-token inputs, SparseRowsLinear's slots (built, rebuilt
on load, not saved, optional), and bad slot tensors refused naming them."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsebert.nn.compress import compress, load_compressed, save_compressed
from sparsebert.nn.cpu_sparse import SparseRowsLinear
from sparsebert.ops import reference_formats as rf
from sparsebert.ops.sparse_rows_linear import slots_available, sparse_rows_linear, sparse_rows_slots

srl = importlib.import_module("sparsebert.ops.sparse_rows_linear")  # the module (the package exports the op)
needs_kernel = pytest.mark.skipif(not slots_available(), reason="sparsebert._C without the row-group slots kernel")

# N not a multiple of 8 (a partial last group), K not a multiple of 8 (a partial last chunk), K < 8, one row
SHAPES = [(37, 45), (100, 333), (8, 8), (5, 3), (1, 17), (64, 64)]


def _weight(n, k, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    if n > 3:
        w[3] = 0  # an empty row
    return w


def _check(y, x, w, b):
    """|y - exact| <= eps32 |exact| + (K + 2) eps32 sum_k |x_k w_nk| (+ |b|): fp32 sums in any order."""
    xd, wd = x.double().reshape(1, -1), w.double()
    exact, spread = xd @ wd.t(), xd.abs() @ wd.abs().t()
    if b is not None:
        exact, spread = exact + b.double(), spread + b.double().abs()
    eps = torch.finfo(torch.float32).eps
    bound = eps * exact.abs() + (w.shape[1] + 2) * eps * spread
    err = (y.double().reshape(1, -1) - exact).abs()
    assert bool((err <= bound).all()), f"max error over bound {float((err / bound.clamp_min(1e-30)).max()):.3g}"


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("nk", SHAPES)
def test_reference_encoder_and_matvec(nk, density):
    n, k = nk
    w = _weight(n, k, density)
    fmt = rf.sparse_rows_encode(w)
    sv, sl, sc, go = rf.sparse_rows_slots_encode(*fmt, k)
    assert sv.shape[1] == 8 and sl.dtype == torch.uint8 and sc.dtype == torch.int32 and go.numel() == -(-n // 8) + 1
    assert int(go[-1]) == sv.shape[0] and bool((go[1:] >= go[:-1]).all())
    assert int((sv != 0).sum()) == int((w != 0).sum())  # every nonzero in exactly one lane of one slot
    # chunks ascend inside each group
    for g in range(go.numel() - 1):
        c = sc[int(go[g]):int(go[g + 1])]
        assert bool((c[1:] >= c[:-1]).all())
    x, b = torch.randn(1, k), torch.randn(n)
    _check(rf.sparse_rows_slots_matvec(x, sv, sl, sc, go, b, n), x, w, b)


@needs_kernel
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("nk", SHAPES)
def test_kernel_matches_exact_product(nk, density, simd):
    n, k = nk
    w = _weight(n, k, density, seed=n + k)
    slots = rf.sparse_rows_slots_encode(*rf.sparse_rows_encode(w), k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    for b in (torch.randn(n), None):
        y = torch.ops.sparsebert_ext.sparse_rows_slots_matvec(x, *slots, b, n, simd)
        assert y.shape == (1, n)
        _check(y, x, w, b)
    # x with a stride (a column of a matrix): the kernel copies it
    xs = torch.randn(k, 3)[:, 1].reshape(1, k)
    _check(torch.ops.sparsebert_ext.sparse_rows_slots_matvec(xs, *slots, None, n, simd), xs, w, None)


@needs_kernel
def test_kernel_catches_one_dropped_slot():
    """The check is tight enough to see one nonzero gone (the kernel reads every slot)."""
    w = _weight(40, 96, 0.2)
    sv, sl, sc, go = rf.sparse_rows_slots_encode(*rf.sparse_rows_encode(w), 96)
    x = torch.randn(1, 96)
    sv_missing = sv.clone()
    r, c = (sv_missing != 0).nonzero()[0].tolist()
    sv_missing[r, c] = 0
    with pytest.raises(AssertionError, match="over bound"):
        _check(torch.ops.sparsebert_ext.sparse_rows_slots_matvec(x, sv_missing, sl, sc, go, None, 40), x, w, None)


@needs_kernel
@pytest.mark.parametrize("shape", [(96,), (1, 96), (1, 1, 96)])
def test_op_routes_one_token_to_the_slots_kernel(shape, monkeypatch):
    w, b = _weight(40, 96, 0.2), torch.randn(40)
    fmt = rf.sparse_rows_encode(w)
    slots = sparse_rows_slots(*fmt, 96)
    calls = []
    real = srl._cpp_slots()
    monkeypatch.setattr(srl, "_cpp_slots", lambda: (lambda *a: calls.append(1) or real(*a)))
    x = torch.randn(shape)
    y = sparse_rows_linear(x, *fmt, b, 96, slots=slots)
    assert y.shape == (*shape[:-1], 40) and calls == [1]
    _check(y, x, w, b)
    # more than one token: the gather kernel, slots or not
    sparse_rows_linear(torch.randn(2, 96), *fmt, b, 96, slots=slots)
    assert calls == [1]


@needs_kernel
def test_bad_slots_are_refused_naming_them():
    w = _weight(40, 96, 0.2)
    fmt = rf.sparse_rows_encode(w)
    sv, sl, sc, go = sparse_rows_slots(*fmt, 96)
    x = torch.randn(1, 96)
    bad_chunk = sc.clone()
    bad_chunk[0] = 12  # ceil(96 / 8) = 12 chunks: 12 is one past the end
    with pytest.raises(ValueError, match="slots: .*chunk index outside"):
        sparse_rows_linear(x, *fmt, None, 96, slots=(sv, sl, bad_chunk, go))
    bad_groups = go.clone()
    bad_groups[-1] -= 1
    with pytest.raises(ValueError, match="slots: group_offsets must start at 0 and end at S"):
        sparse_rows_linear(x, *fmt, None, 96, slots=(sv, sl, sc, bad_groups))
    with pytest.raises(ValueError, match="slots: slot_lanes must be a contiguous uint8"):
        sparse_rows_linear(x, *fmt, None, 96, slots=(sv, sl.to(torch.int32), sc, go))
    with pytest.raises(TypeError, match="slots must be the 4 tensors"):
        sparse_rows_linear(x, *fmt, None, 96, slots=(sv, sl, sc))
    with pytest.raises(TypeError, match="x"):  # a bad x is still named as x
        sparse_rows_linear(x.double(), *fmt, None, 96, slots=(sv, sl, sc, go))
    # 96 numbers that are not one token of 96 features: refused, not read as one token
    with pytest.raises(ValueError, match="x must have in_features = 96"):
        sparse_rows_linear(torch.randn(2, 48), *fmt, None, 96, slots=(sv, sl, sc, go))


@needs_kernel
def test_layer_holds_slots_rebuilds_them_on_load_and_never_saves_them(tmp_path):
    w, b = _weight(40, 96, 0.2), torch.randn(40)
    layer = SparseRowsLinear(w, b)
    assert layer.slot_values is not None
    assert not any(k.startswith(("slot_", "group_offsets")) for k in layer.state_dict())
    x1 = torch.randn(1, 96)
    _check(layer(x1), x1, w, b)
    # load another weight's state into it (same nonzero count: buffers keep their shapes): the slots follow
    w2 = -2 * w
    other = SparseRowsLinear(w2, b)
    layer.load_state_dict(other.state_dict())
    _check(layer(x1), x1, w2, b)
    assert torch.equal(layer.slot_values, other.slot_values)
    # a partial, non-strict load of the weight (bias missing): the slots are dropped, never left stale
    partial = {k: v for k, v in SparseRowsLinear(w, b).state_dict().items() if k != "bias"}
    layer.load_state_dict(partial, strict=False)
    assert layer.slot_values is None
    _check(layer(x1), x1, w, b)  # the gather kernel, on the loaded weight
    # a state dict without this layer's tensors leaves its slots alone
    holder = nn.Sequential(SparseRowsLinear(w, b))
    holder.load_state_dict({}, strict=False)
    assert holder[0].slot_values is not None
    # save / load of a compressed model keeps the option
    model = nn.Sequential(nn.Linear(96, 40))
    with torch.no_grad():
        model[0].weight.copy_(w)
        model[0].bias.copy_(b)
    compress(model, "sparse-rows", speed_check=False)
    assert isinstance(model[0], SparseRowsLinear) and model[0].matvec_slots  # the default
    save_compressed(model, tmp_path / "default.safetensors")
    assert load_compressed(tmp_path / "default.safetensors", nn.Sequential(nn.Linear(96, 40)))[0].slot_values is not None
    model[0] = SparseRowsLinear(w, b, matvec_slots=False)
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(96, 40)))
    assert isinstance(loaded[0], SparseRowsLinear) and loaded[0].matvec_slots is False
    assert loaded[0].slot_values is None
    _check(loaded[0](x1), x1, w, b)


def test_matvec_slots_option_is_checked():
    with pytest.raises(TypeError, match="matvec_slots must be a bool"):
        SparseRowsLinear(_weight(8, 8, 0.5), matvec_slots="yes")


def _one_token_timer(lean_s, slotted_s, calls):
    """Timer stub: dense 1.0 s at every token count; the sparse layer 0.5 s above one token and, at one token,
    `lean_s` the first time it is timed there (the layer without slots), `slotted_s` after."""
    def timer(candidates, tokens):
        for fn in candidates.values():
            fn()
        calls.append(tokens)
        sparse = 0.5 if tokens != 1 else (lean_s if calls.count(1) == 1 else slotted_s)
        return {"sparse": sparse, "dense": 1.0}
    return timer


@needs_kernel
def test_auto_choice_adds_slots_only_where_one_token_needs_them():
    from sparsebert.nn.cpu_sparse import choose_cpu_format

    w, b = _weight(40, 96, 0.2), torch.randn(40)
    # without slots fast enough everywhere: the lean layer (least memory), one-token timed once
    calls = []
    choice = choose_cpu_format(w, b, tokens=(1, 16), timer=_one_token_timer(0.5, 0.5, calls))
    assert choice.format == "sparse-rows" and choice.module.matvec_slots is False and calls == [1, 16]
    # too slow at one token without slots, fast with them: the layer with slots, its one-token time in the report
    calls = []
    choice = choose_cpu_format(w, b, tokens=(1, 16), timer=_one_token_timer(2.0, 0.5, calls))
    assert choice.format == "sparse-rows" and choice.module.matvec_slots is True and calls == [1, 16, 1]
    assert choice.speedups == {1: 2.0, 16: 2.0} and "row-group slots" in choice.reason
    # slow at one token either way: dense
    calls = []
    choice = choose_cpu_format(w, b, tokens=(1, 16), timer=_one_token_timer(2.0, 2.0, calls))
    assert choice.format == "dense" and choice.speedups[1] == 0.5
