"""The public ops (sparsebert.ops) on every backend available on the CPU, against the plain-torch
reference evaluated in float64: forward and backward, odd shapes, leading batch dims, non-contiguous
inputs, every dtype; opcheck on each custom op; bad input gets a clear error."""
import math

import pytest
import torch

from sparsebert import ops
from sparsebert.ops import reference as R
from _helpers import REL_TOL, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ops.available_backends("cpu")]
SHAPES = [((3, 37), 61, 97), ((1,), 64, 33), ((2, 3, 5), 97, 40)]


def _backend_param():
    out = []
    for b in ("torch", "cpp", "triton"):
        reason = None if b in CPU_BACKENDS else f"backend {b!r} not available on this CPU install"
        out.append(pytest.param(b, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return out


def _inputs(lead, k, n, dtype, bias=True):
    x = torch.randn(*lead, k).to(dtype)
    w = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w, b


def _grads(fn, tensors):
    for t in tensors:
        if t is not None:
            t.grad = None
    out = fn()
    g = torch.randn_like(out, dtype=torch.float64).to(out.dtype)
    out.backward(g)
    return out, [None if t is None else t.grad for t in tensors], g


@pytest.mark.parametrize("backend", _backend_param())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("mask_kind", ["bool", "uint8", "packed"])
def test_masked_linear_matches_reference(backend, dtype, lead, k, n, mask_kind):
    x, w, b = _inputs(lead, k, n, dtype)
    m = torch.rand(n, k) < 0.4
    mask = {"bool": m, "uint8": m.to(torch.uint8), "packed": ops.pack_mask(m)}[mask_kind]
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y, grads, g = _grads(lambda: ops.masked_linear(x, w, b, mask, backend=backend), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = R.masked_linear(*ref_leaves[:2], ref_leaves[2], m)
    y_ref.backward(g.double())
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dw", "db"), grads, ref_leaves):
        assert_close(got, ref.grad, dtype, name)
    assert torch.all(grads[1][~m] == 0), "pruned weights must get zero gradient"


@pytest.mark.parametrize("backend", _backend_param())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_score_masked_linear_matches_reference_ste(backend, dtype, lead, k, n, scores_dtype, train_weight):
    x, w, b = _inputs(lead, k, n, dtype)
    s = torch.randn(n, k).to(scores_dtype)
    tau = ops.topk_threshold(s, 0.6)
    x.requires_grad_(); s.requires_grad_(); b.requires_grad_()
    w.requires_grad_(train_weight)
    y, (dx, dw, db, ds), g = _grads(lambda: ops.score_masked_linear(x, w, b, s, tau, backend=backend), [x, w, b, s])
    rx, rw, rb = (t.detach().double().requires_grad_() for t in (x, w, b))
    rs = s.detach().double().requires_grad_()
    y_ref = R.score_masked_linear(rx, rw, rb, rs, tau.double())
    y_ref.backward(g.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, rx.grad, dtype, "dx")
    assert_close(db, rb.grad, dtype, "db")
    # dScores = (dY^T X) * W: computed in fp32 from dtype inputs, rounded to the scores' dtype.
    assert ds.dtype == scores_dtype
    assert_close(ds, rs.grad, scores_dtype if scores_dtype == torch.bfloat16 else dtype, "dscores")
    if train_weight:
        assert_close(dw, rw.grad, dtype, "dweight")
        assert torch.all(dw[s.detach() < tau] == 0)
    else:
        assert dw is None


@pytest.mark.parametrize("backend", _backend_param())
def test_topk_threshold_prunes_exact_fraction(backend):
    mats = [torch.randn(97, 61), torch.randn(33, 40).to(torch.bfloat16), torch.randn(7, 3)]
    n = sum(t.numel() for t in mats)
    for sparsity in (0.0, 0.3, 0.5, 0.9, 0.999):
        tau = ops.topk_threshold(mats, sparsity, backend=backend)
        assert tau.dim() == 0 and tau.dtype == torch.float32
        kept = sum(int((t.float() >= tau).sum()) for t in mats)
        # bf16 values tie often: count what the threshold keeps against the exact reference.
        tau_ref = R.topk_threshold(mats, sparsity)
        assert tau.item() == tau_ref.item()
        if sparsity == 0:
            assert kept == n and math.isinf(tau.item())
    single = torch.randn(111, 97)
    for sparsity in (0.1, 0.5, 0.7):
        tau = ops.topk_threshold(single, sparsity, backend=backend)
        assert int((single >= tau).sum()) == single.numel() - round(sparsity * single.numel())


def test_pack_unpack_roundtrip_awkward_widths():
    for k in (1, 31, 32, 33, 61, 97):
        m = torch.rand(5, k) < 0.5
        p = ops.pack_mask(m)
        assert p.dtype == torch.int32 and p.shape == (5, (k + 31) // 32)
        assert torch.equal(ops.unpack_mask(p, k), m)


@pytest.mark.parametrize("backend", _backend_param())
def test_non_contiguous_inputs(backend):
    x = torch.randn(61, 2, 37).transpose(0, 2)  # (37, 2, 61), non-contiguous
    w = torch.randn(61, 97).t()  # (97, 61), non-contiguous
    m = torch.rand(97, 61) < 0.5
    y = ops.masked_linear(x, w, None, m.t().contiguous().t(), backend=backend)
    assert_close(y, R.masked_linear(x.double(), w.double(), None, m), torch.float32, "y")


@pytest.mark.parametrize("backend", _backend_param())
def test_opcheck(backend):
    x = torch.randn(7, 13, requires_grad=True)
    w = torch.randn(5, 13, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    m = (torch.rand(5, 13) < 0.5).to(torch.uint8)
    s = torch.randn(5, 13, requires_grad=True)
    tau = torch.tensor(0.1)
    torch.library.opcheck(torch.ops.sparsebert.masked_linear.default, (x, w, b, m, False, backend))
    torch.library.opcheck(torch.ops.sparsebert.masked_linear.default, (x, w, None, ops.pack_mask(m), True, backend))
    torch.library.opcheck(torch.ops.sparsebert.score_masked_linear.default, (x, w, b, s, tau, backend))
    torch.library.opcheck(torch.ops.sparsebert.topk_threshold.default, ([s.detach(), w.detach()], 17, backend))
    torch.library.opcheck(torch.ops.sparsebert.topk_threshold_at_rank.default,
                          ([s.detach(), w.detach()], torch.tensor(17), backend))


def test_compiles_under_torch_compile():
    lin = torch.compile(lambda x, w, b, s, t: ops.score_masked_linear(x, w, b, s, t, backend="torch"),
                        backend="aot_eager", fullgraph=True)
    x, w, b = torch.randn(4, 9), torch.randn(6, 9), torch.randn(6)
    s = torch.randn(6, 9)
    assert_close(lin(x, w, b, s, torch.tensor(0.0)), R.score_masked_linear(x, w, b, s, 0.0), torch.float32, "y")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.masked_linear(torch.randn(3, 5), torch.randn(4, 6), None, torch.ones(4, 6, dtype=torch.bool)), "x has 5 features"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.ones(4, 5, dtype=torch.bool)), "mask must have shape"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.ones(4, 6)), "mask must be bool or uint8"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(3), torch.ones(4, 6, dtype=torch.bool)), "bias has 3"),
        (lambda: ops.masked_linear(torch.randn(3, 6).half(), torch.randn(4, 6), None, torch.ones(4, 6, dtype=torch.bool)), "x has dtype"),
        (lambda: ops.masked_linear(torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 6).double(), None, torch.ones(4, 6, dtype=torch.bool)), "x must be float32"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.ones(4, 2, dtype=torch.int32)), "bit-packed int32 mask must have shape"),
        (lambda: ops.score_masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4, 5), 0.0), "scores must have the weight's shape"),
        (lambda: ops.score_masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4, 6), float("nan")), "threshold is NaN"),
        (lambda: ops.score_masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4, 6), torch.tensor(float("nan"))), "threshold is NaN"),
        (lambda: ops.score_masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(4, 6), "0.5"), "threshold must be"),
        (lambda: ops.topk_threshold(torch.randn(4, 6), 1.0), r"sparsity must be in \[0, 1\)"),
        (lambda: ops.topk_threshold(torch.randn(4, 6), -0.1), r"sparsity must be in \[0, 1\)"),
        (lambda: ops.topk_threshold([], 0.5), "non-empty list"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.ones(4, 6, dtype=torch.bool), backend="fast"), "backend must be one of"),
        (lambda: ops.masked_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.ones(4, 6, dtype=torch.bool), backend="cuda"), "not available"),
    ],
)
def test_bad_input_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_auto_backend_on_cpu_is_fastest_available():
    assert ops.resolve_backend("auto", "cpu") == ("cpp" if "cpp" in ops.available_backends("cpu") else "torch")
    assert REL_TOL[torch.float32] <= 1e-5
