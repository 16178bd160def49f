"""Defects fixed before the first GPU run (issue 8 section 2, issue 13): int32 offsets, host syncs in the
hot paths, trusted compressed formats, backend edge semantics, split-K determinism, torch.compile with a
changing target sparsity."""
import math
import os
import sys

import pytest
import torch

from sparsebert import ops
from sparsebert.nn.compress import BitmaskLinear, BSRLinear
from sparsebert.nn.sparse_linear import SparseLinear
from sparsebert.ops import pruned, reference, reference_formats as rf
from sparsebert.ops.sparse_formats import validate_bitmask_format, validate_bsr_format

from _helpers import REL_TOL, assert_close

CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ops.available_backends("cpu")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_CODE = (os.path.join(ROOT, "sparsebert") + os.sep, os.path.join(ROOT, "kernels") + os.sep)


# ------------------------------------------------------------------------------------------- int32 offsets
def test_int32_guards_refuse_sizes_past_2_31_without_allocating():
    from sparsebert.kernels import _gemm
    from sparsebert.kernels.pruned_attention import check_attention_size
    from sparsebert.kernels.topk_threshold import check_count

    big = torch.empty(2**20, 2**11, dtype=torch.float16, device="meta")  # 2**31 elements, no memory
    with pytest.raises(ValueError, match="weight has 2147483648 elements"):
        _gemm.check_matrix("weight", big)
    _gemm.check_matrix("weight", torch.empty(2**20, 2**11 - 1, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="int32"):
        check_attention_size(2**21, 1024)
    with pytest.raises(ValueError, match="query blocks"):
        check_attention_size(2**21, 64)
    check_attention_size(512, 768)
    with pytest.raises(ValueError, match="int32"):
        check_count(2**31 - 1, torch.device("cpu"))
    check_count(2**30, torch.device("cpu"))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int64_indexed_kernels_match_reference(dtype):
    torch.manual_seed(1)
    # masked linear: tokens on int64 offsets (y, dx, and the weight gradient's token loop)
    x = torch.randn(37, 45, dtype=dtype, requires_grad=True)
    w = torch.randn(29, 45, dtype=dtype, requires_grad=True)
    mask = torch.rand(29, 45) > 0.4
    y = ops.masked_linear(x, w, None, mask, backend="triton")
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = reference.masked_linear(xr, wr, None, mask)
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, dtype, "dw")
    # the split-M weight gradient (a 64-bit pointer walk over the partials)
    from sparsebert.kernels import _gemm
    m_u8 = mask.to(torch.uint8)
    dw, _ = _gemm.bwd_weight(dy.to(dtype), x.detach(), None, m_u8, _gemm.MASK_UINT8, 0, 0.0, None, dtype, None,
                             split_m=3)
    assert_close(dw, wr.grad, dtype, "dw split_m=3")
    # gathered linear / pruned FFN / pruned attention (batch x heads now on grid axis 0)
    xf = torch.randn(2, 19, 24, dtype=dtype)
    w_in, b_in = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype)
    w_out, b_out = torch.randn(24, 40, dtype=dtype), torch.randn(24, dtype=dtype)
    keep = torch.tensor([0, 3, 7, 8, 20, 39])
    out = ops_pruned_ffn(xf, w_in, b_in, w_out, b_out, keep)
    ref = reference.pruned_ffn(xf.double(), w_in.double(), b_in.double(), w_out.double(), b_out.double(), keep)
    assert_close(out, ref, dtype, "pruned_ffn")
    ws = [torch.randn(24, 24, dtype=dtype) / 5 for _ in range(4)]
    bs = [torch.randn(24, dtype=dtype) for _ in range(4)]
    heads = torch.tensor([0, 2, 3])
    key_mask = torch.ones(2, 19, dtype=torch.int32)
    key_mask[1, 15:] = 0
    args = [t for pair in zip(ws, bs) for t in pair]
    out = pruned.pruned_attention(xf, *args, heads, 4, key_mask, backend="triton")
    ref = reference.pruned_attention(xf.double(), *[a.double() for a in args], heads, 4, key_mask)
    assert_close(out, ref, dtype, "pruned_attention")


def ops_pruned_ffn(*args):
    return pruned.pruned_ffn(*args, backend="triton")


# ----------------------------------------------------------------------------------------------- host syncs
class _SyncSpy:
    """Records host round trips started from sparsebert's own code (not torch's or the interpreter's):
    Tensor.item/tolist/__bool__/__float__/__int__/cpu/numpy, and torch.tensor/as_tensor with data."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), f"Tensor.{name}"))
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), f"torch.{name}"))

    def _wrap(self, fn, what):
        spy = self

        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OUR_CODE):
                spy.calls.append(f"{what} from {os.path.relpath(caller, ROOT)}:{sys._getframe(1).f_lineno}")
            return fn(*args, **kwargs)

        return wrapped


def _hot_paths(backend):
    """(name, thunk) pairs: a forward + backward (where there is one) of every op and of SparseLinear."""
    torch.manual_seed(2)
    x = torch.randn(5, 3, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    scores = torch.randn(24, 40, requires_grad=True)
    mask = torch.rand(24, 40) > 0.5
    wz = w.detach().clone()
    wz[torch.rand_like(wz) < 0.5] = 0
    bm = rf.bitmask_encode(wz, 16, 32)
    wb = torch.randn(32, 64)
    wb[:16, 16:48] = 0
    bsr = rf.bsr_encode(wb, 16)
    layer_t = SparseLinear(40, 24, mode="scores", target_sparsity=0.6, backend=backend)
    layer_f = SparseLinear(40, 24, mode="scores", threshold=0.3, backend=backend)
    layer_m = SparseLinear(40, 24, mode="mask", mask=mask, backend=backend)
    fmt = "torch" if backend == "cpp" else backend
    xa, xb = torch.randn(2, 7, 40), torch.randn(3, 64)
    wa = [torch.randn(40, 40) for _ in range(4)]
    ba = [torch.randn(40) for _ in range(4)]
    att = [t for pair in zip(wa, ba) for t in pair]
    paths = [
        ("masked_linear", lambda: ops.masked_linear(x, w, b, mask, backend=backend).sum().backward()),
        ("masked_linear packed", lambda: ops.masked_linear(x, w, b, ops.pack_mask(mask), backend=backend).sum().backward()),
        ("topk_threshold", lambda: ops.topk_threshold([scores, w], 0.3, backend=backend)),
        ("SparseLinear mask", lambda: layer_m(x).sum().backward()),
        ("bitmask_linear", lambda: ops.bitmask_linear(x, *bm, b, 40, 16, 32, backend=backend)),
        ("bsr_linear", lambda: ops.bsr_linear(xb, *bsr, None, 64, backend=fmt)),
        ("pruned_ffn", lambda: pruned.pruned_ffn(x.detach(), w, b, w.t().contiguous(), None, torch.tensor([1, 5, 9]),
                                                backend=fmt)),
        ("pruned_attention", lambda: pruned.pruned_attention(xa, *att, torch.tensor([0, 3]), 10, backend=fmt)),
        # every backend, the C++ one included, takes the threshold as a 0-dim tensor (no float(threshold))
        ("score_masked_linear float tau", lambda: ops.score_masked_linear(x, w, b, scores, 0.1, backend=backend)
         .sum().backward()),
        ("score_masked_linear tensor tau", lambda: ops.score_masked_linear(
            x, w, b, scores, ops.topk_threshold(scores, 0.5, backend=backend), backend=backend).sum().backward()),
        ("SparseLinear scores target", lambda: layer_t(x).sum().backward()),
        ("SparseLinear scores threshold", lambda: layer_f(x).sum().backward()),
        ("topk_threshold tensor sparsity", lambda: ops.topk_threshold(
            [scores, w], torch.full((), 0.3, dtype=torch.float64), backend=backend)),
    ]
    if backend in ("torch", "triton"):  # the weight pass of size dispatch (its elementwise kernel's backend)
        from sparsebert.ops.masked_linear import masked_linear_weight_pass
        from sparsebert.ops.score_masked_linear import score_masked_linear_weight_pass
        paths += [
            ("masked_linear weight pass", lambda: masked_linear_weight_pass(
                x, w, b, ops.pack_mask(mask), pass_kernel=backend).sum().backward()),
            ("score_masked_linear weight pass", lambda: score_masked_linear_weight_pass(
                x, w, b, scores, ops.topk_threshold(scores, 0.5, backend=backend), pass_kernel=backend)
             .sum().backward()),
        ]
    return paths


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_host_sync_in_forward_and_backward(backend, monkeypatch):
    paths = _hot_paths(backend)
    for name, run in paths:
        run()  # warm up (first calls may probe backends, compile, autotune)
    spy = _SyncSpy(monkeypatch)
    for name, run in paths:
        before = len(spy.calls)
        run()
        assert len(spy.calls) == before, f"{name} on {backend}: host round trip {spy.calls[before:]}"


def test_sync_spy_catches_a_host_round_trip(monkeypatch):
    """The spy is live: code in sparsebert/ doing what the old hot paths did (.item(), torch.tensor([...],
    device=...), int(t.min())) is caught."""
    spy = _SyncSpy(monkeypatch)
    source = "def probe(t):\n    return t.isnan().any().item(), torch.tensor([0, 1], device=t.device), int(t.min())\n"
    namespace = {"torch": torch}
    exec(compile(source, os.path.join(ROOT, "sparsebert", "ops", "_probe.py"), "exec"), namespace)
    namespace["probe"](torch.ones(3))
    assert len(spy.calls) == 3, spy.calls


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda", "auto"])
def test_no_host_sync_on_cuda(backend):
    """"cuda": the C++/CUDA ops read the threshold and the top-k rank on the device; "auto": the size dispatch
    (weight pass + cuBLAS at 64 tokens with the default table)."""
    if backend == "cuda":
        from sparsebert.ops import _ext
        if not _ext.has_cuda():
            pytest.skip("the sparsebert._C extension was built without CUDA")
    torch.manual_seed(3)
    dev = "cuda"
    x = torch.randn(64, 768, device=dev, dtype=torch.bfloat16, requires_grad=True)
    layer = SparseLinear(768, 3072, mode="scores", target_sparsity=0.7, backend=backend, device=dev,
                         dtype=torch.bfloat16)
    mask_layer = SparseLinear(768, 3072, mode="mask", backend=backend, device=dev, dtype=torch.bfloat16)
    for _ in range(2):  # the first pass autotunes (which synchronizes); the second must not
        layer(x).float().sum().backward()
        mask_layer(x).float().sum().backward()
        ops.topk_threshold([layer.scores, mask_layer.weight], 0.5, backend=backend)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().sum().backward()
        mask_layer(x).float().sum().backward()
        ops.topk_threshold([layer.scores, mask_layer.weight], 0.5, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# -------------------------------------------------------------------------------- compressed format checks
def _bsr():
    torch.manual_seed(4)
    w = torch.randn(48, 64)
    w[:16, :32] = 0
    w[32:, 16:] = 0
    return w, rf.bsr_encode(w, 16)


def _bitmask():
    torch.manual_seed(5)
    w = torch.randn(40, 70)
    w[torch.rand_like(w) < 0.6] = 0
    return w, rf.bitmask_encode(w, 16, 32)


def test_bsr_validator_names_the_bad_tensor():
    w, (values, crow, col) = _bsr()
    validate_bsr_format(values, crow, col, 64, 48)
    bad_col = col.clone()
    bad_col[2] = 4  # 64 / 16 = 4 block columns: out of range
    with pytest.raises(ValueError, match=r"col_indices\[2\] = 4 is out of range"):
        validate_bsr_format(values, crow, bad_col, 64, 48)
    bad_crow = crow.clone()
    bad_crow[1] = bad_crow[2] + 1
    with pytest.raises(ValueError, match="crow_indices decreases"):
        validate_bsr_format(values, bad_crow, col, 64, 48)
    with pytest.raises(ValueError, match="col_indices has"):
        validate_bsr_format(values[:-1], crow, col, 64, 48)
    dup = col.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="strictly ascending"):
        validate_bsr_format(values, crow, dup, 64, 48)


def test_bitmask_validator_names_the_bad_tensor():
    w, (values, bitmask, offsets) = _bitmask()
    validate_bitmask_format(values, bitmask, offsets, 70, 16, 32)
    with pytest.raises(ValueError, match="values has"):
        validate_bitmask_format(values[:-3], bitmask, offsets, 70, 16, 32)
    shifted = offsets.clone()
    shifted.view(-1)[1:] += 1
    with pytest.raises(ValueError, match=r"tile_offsets\[0, 1\]"):
        validate_bitmask_format(values, bitmask, shifted, 70, 16, 32)
    padded = bitmask.clone()
    padded[0, -1] |= 1 << 10  # bit 70 % 32 + 4: past in_features
    with pytest.raises(ValueError, match="past in_features"):
        validate_bitmask_format(values, padded, offsets, 70, 16, 32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bsr_layer_refuses_a_corrupt_state_dict(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip("needs TRITON_INTERPRET=1")
    w, _ = _bsr()
    layer = BSRLinear(w, None, block_size=16, backend=backend)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["col_indices"][0] = 99
    with pytest.raises(ValueError, match="col_indices"):
        layer.load_state_dict(state)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["crow_indices"][1] = state["crow_indices"][2] + 1
    with pytest.raises(ValueError, match="crow_indices"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitmask_layer_refuses_a_corrupt_state_dict(backend):
    w, _ = _bitmask()
    layer = BitmaskLinear(w, None, tile=(16, 32), backend="cpp" if backend == "cpp" else backend)
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    state = dict(good, tile_offsets=good["tile_offsets"] + 1)
    with pytest.raises(ValueError, match="tile_offsets"):
        layer.load_state_dict(state)
    layer.load_state_dict(good)  # a good state still loads, and the layer still computes W x
    x = torch.randn(3, 70)
    assert_close(layer(x), x.double() @ w.double().t(), torch.float32, "after reload")


# ------------------------------------------------------------------------------------ backend edge semantics
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_k_prune_equal_n_is_plus_inf(backend):
    from sparsebert.ops._backends import impl
    s = [torch.randn(7, 3), torch.randn(5)]
    assert impl(backend).topk_threshold(s, 26).item() == math.inf
    assert impl(backend).topk_threshold(s, 0).item() == -math.inf
    with pytest.raises((ValueError, RuntimeError), match="k_prune"):
        impl(backend).topk_threshold(s, 27)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_scores_are_refused_naming_the_tensor(backend):
    s = torch.randn(10, 10)
    s[torch.rand_like(s) < 0.3] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\] contains NaN"):
        ops.topk_threshold([torch.randn(4, 4), s], 0.5, backend=backend)
    with pytest.raises(ValueError, match="scores contains NaN"):
        ops.topk_threshold(s, 0.5, backend=backend)
    for kwargs in ({"target_sparsity": 0.5}, {"threshold": 0.0}):
        layer = SparseLinear(10, 10, mode="scores", backend=backend, **kwargs)
        with torch.no_grad():
            layer.scores.copy_(s)
        with pytest.raises(ValueError, match="NaN"):
            layer(torch.randn(2, 10))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_a_masked_out_weight_never_reaches_the_output(backend, dtype):
    torch.manual_seed(6)
    w = torch.randn(12, 33, dtype=dtype)
    mask = torch.rand(12, 33) > 0.5
    mask[0, :] = True
    w[~mask] = float("nan")  # every pruned weight is NaN
    w[1, 0], mask[1, 0] = float("inf"), False
    x = torch.randn(4, 33, dtype=dtype, requires_grad=True)
    clean = torch.where(mask, w, torch.zeros((), dtype=dtype)).double()
    wp = w.clone().requires_grad_()
    y = ops.masked_linear(x, wp, None, mask, backend=backend)
    assert_close(y, x.detach().double() @ clean.t(), dtype, "masked_linear y")
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(wp.grad).all()
    scores = torch.where(mask, torch.ones((), dtype=dtype), -torch.ones((), dtype=dtype))
    y = ops.score_masked_linear(x, w, None, scores, 0.0, backend=backend)
    assert_close(y, x.detach().double() @ clean.t(), dtype, "score_masked_linear y")
    ref = reference.masked_linear(x.detach(), w, None, mask)
    assert torch.isfinite(ref).all()
    ref = reference.score_masked_linear(x.detach(), w, None, scores, 0.0)
    assert torch.isfinite(ref).all()


def test_float_mask_of_probabilities_is_refused():
    layer = SparseLinear(6, 4)
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        layer.set_mask(torch.rand(4, 6))
    layer.set_mask(torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]] * 4))
    assert layer.mask.sum().item() == 12
    layer.set_mask(torch.rand(4, 6) > 0.5)


# ------------------------------------------------------------------------ torch.compile with a moving target
SPARSITIES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sparsities", [SPARSITIES, SPARSITIES + (0.05, 0.15, 0.3, 0.45)])
def test_compile_fullgraph_survives_a_changing_target_sparsity(backend, sparsities):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(7)
    layer = SparseLinear(32, 16, mode="scores", target_sparsity=0.5, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(3, 32)
    frames_after_first = None
    for sparsity in sparsities:
        layer.set_target_sparsity(sparsity)
        y = compiled(x)
        frames_after_first = frames_after_first or counter.frame_count
        y.sum().backward()
        kept = layer.scores.detach() >= ops.topk_threshold(layer.scores, sparsity, backend="torch")
        assert kept.sum().item() == 16 * 32 - round(sparsity * 16 * 32)
        ref = x.double() @ (layer.weight.detach().double() * kept).t() + layer.bias.detach().double()
        assert_close(y, ref, torch.float32, f"sparsity {sparsity}")
    # The number to prune travels as a device tensor (SparseLinear's `_topk_rank` buffer into
    # sparsebert::topk_threshold_at_rank): a new sparsity is data, never a recompile.
    assert counter.frame_count == frames_after_first, f"recompiled: {counter.frame_count} > {frames_after_first}"
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_topk_threshold_with_a_tensor_sparsity_never_recompiles(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(10)
    scores = [torch.randn(17, 9), torch.randn(31)]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda s, p: ops.topk_threshold(s, p, backend=backend), fullgraph=True, backend=counter)
    sparsity = torch.zeros((), dtype=torch.float64)
    first = None
    for value in (0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 0.99, 0.05, 0.6, 0.25):
        sparsity.fill_(value)
        got = compiled(scores, sparsity)
        first = first or counter.frame_count
        assert got.item() == ops.topk_threshold(scores, value, backend="torch").item(), value
    assert counter.frame_count == first, f"recompiled: {counter.frame_count} > {first}"
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_threshold_at_rank_tensor_matches_int(backend):
    from sparsebert.ops.topk_threshold import topk_threshold_at_rank
    torch.manual_seed(11)
    scores = [torch.randn(13, 7, dtype=torch.bfloat16), torch.randn(20)]
    n = 13 * 7 + 20
    for k in (0, 1, 37, n - 1, n):
        want = topk_threshold_at_rank(scores, k, backend=backend)
        got = topk_threshold_at_rank(scores, torch.tensor(k), backend=backend)
        assert got.item() == want.item(), k
    with pytest.raises(TypeError, match="k_prune must be an integer tensor"):
        topk_threshold_at_rank(scores, torch.tensor(3.0), backend=backend)
    with pytest.raises(ValueError, match="sparsity must be a 0-dim tensor"):
        ops.topk_threshold(scores, torch.tensor([0.5]), backend=backend)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        ops.topk_threshold(scores, torch.tensor(1.0), backend=backend)


# ------------------------------------------------------------------------------------ bitmask split-K
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_split_k_is_reproducible(dtype):
    """Split-K partials are summed in a fixed order by one reduction kernel (no atomics): the same bits on
    every run, whatever torch's deterministic switch says, and the bias added once."""
    from sparsebert.kernels.bitmask_linear import bitmask_linear_fwd
    torch.manual_seed(8)
    w = torch.randn(33, 200, dtype=dtype)
    w[torch.rand_like(w, dtype=torch.float32) < 0.6] = 0
    values, bitmask, offsets = rf.bitmask_encode(w, 16, 32)
    x, bias = torch.randn(5, 200, dtype=dtype), torch.randn(33, dtype=dtype)
    ref = x.double() @ w.double().t() + bias.double()
    first = bitmask_linear_fwd(x, values, bitmask, offsets, bias, 200, 16, 32, split_k=4)
    assert_close(first, ref, dtype, "split-K")
    for _ in range(2):
        assert torch.equal(bitmask_linear_fwd(x, values, bitmask, offsets, bias, 200, 16, 32, split_k=4), first)
    try:
        torch.use_deterministic_algorithms(True)
        followed = bitmask_linear_fwd(x, values, bitmask, offsets, bias, 200, 16, 32, split_k=4)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(followed, first)


@pytest.mark.cuda
def test_bitmask_split_k_reproducible_on_cuda():
    from sparsebert.kernels.bitmask_linear import bitmask_linear_fwd
    torch.manual_seed(9)
    w = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16)
    w[torch.rand_like(w, dtype=torch.float32) < 0.7] = 0
    values, bitmask, offsets = rf.bitmask_encode(w, 32, 64)
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    outs = [bitmask_linear_fwd(x, values, bitmask, offsets, None, 768, 32, 64, split_k=8) for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert_close(outs[0], x.double() @ w.double().t(), torch.bfloat16, "split-K on cuda")
