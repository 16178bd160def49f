"""db = dy.sum(0) reduced inside the Triton weight-gradient kernel (issue 10 item 1).

The programs of the first K tile column sum the dy tiles they stream for G = dy^T x, so the backward
reads dy once for both; with split-M the per-split fp32 sums are added in order by the finalize kernel.
Checked here under TRITON_INTERPRET=1 (the compiled twins are in test_gpu_kernels.py, marked cuda):
db against the fp64 sum on odd shapes (M = 1, M below the 32-token step, tails in N and K) in every
dtype, with the fp32-accumulation bound of test_triton_kernels (eps(dtype) * |sum| + (M + 2) *
eps(fp32) * sum |dy|); dW and dScores unchanged by the extra reduction; split-M; and forward + backward
through the public ops against the reference ops, bias trained or not.
"""
import pytest
import torch

from sparsebert import ops
from sparsebert.kernels import _gemm
from sparsebert.kernels.masked_linear import masked_linear_bwd_weight, masked_linear_bwd_weight_bias
from sparsebert.kernels.score_masked_linear import (
    score_masked_linear_bwd_weight_scores,
    score_masked_linear_bwd_weight_scores_bias,
)
from sparsebert.ops import reference as R
from sparsebert.ops._backends import available_backends, impl

from test_triton_kernels import assert_close_to_exact, matmul_exact, pack_bits

pytestmark = pytest.mark.skipif(not _gemm.INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 (conftest sets it)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N); the interpreter's tile is 32 x 32 with a 32-token step: M = 1, M < 32, 2 and 3 token steps,
# tails in N (several row tiles) and K (several column tiles: only the first one writes db)
SHAPES = [(1, 33, 17), (5, 40, 45), (37, 70, 53), (70, 33, 65)]


def _ids(v):
    return str(v).replace("torch.", "")


def exact_db(dy):
    """(fp64 sum over the tokens, fp64 sum of |dy|): the reference and its error scale."""
    return dy.double().sum(0), dy.double().abs().sum(0)


def _inputs(m, k, n, dtype):
    x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    w, scores = torch.randn(n, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    return x, dy, w, scores


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernels_reduce_db_and_leave_dw_unchanged(m, k, n, dtype):
    x, dy, w, scores = _inputs(m, k, n, dtype)
    keep = torch.rand(n, k) < 0.4
    db_exact, db_abs = exact_db(dy)
    g, g_abs = matmul_exact(dy.t(), x)
    for mask, packed in ((keep.to(torch.uint8), False), (pack_bits(keep), True)):
        dw, db = masked_linear_bwd_weight_bias(dy, x, mask, packed, True)
        assert db.shape == (n,)
        assert_close_to_exact(db, db_exact, db_abs, m, dtype)
        assert torch.equal(dw, masked_linear_bwd_weight(dy, x, mask, packed))
        assert_close_to_exact(dw, g * keep, g_abs, m, dtype)
    tau = scores.flatten()[3].float()
    ds, dw, db = score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, tau, True, True)
    assert_close_to_exact(db, db_exact, db_abs, m, dtype)
    ds_plain, dw_plain = score_masked_linear_bwd_weight_scores(dy, x, w, scores, tau, True)
    assert torch.equal(ds, ds_plain) and torch.equal(dw, dw_plain)
    ds_only, none, db_only = score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, tau, False, True)
    assert none is None and torch.equal(ds_only, ds) and torch.equal(db_only, db)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_split_m_reduces_db_in_the_finalize_pass(dtype):
    """Split-M (GPU only when chosen automatically): each split's fp32 db partial, summed in order. Split 4
    of 70 tokens in 32-token chunks leaves the last split empty (its partial must be zeros)."""
    m, k, n = 70, 40, 45
    x, dy, _, _ = _inputs(m, k, n, dtype)
    keep = (torch.rand(n, k) < 0.5).to(torch.uint8)
    db_exact, db_abs = exact_db(dy)
    g, g_abs = matmul_exact(dy.t(), x)
    for split in (1, 2, 3, 4):
        args = (dy, x, None, keep, _gemm.MASK_UINT8, 0, 0.0, None, dtype, None, dtype)
        dw, none, db = _gemm.bwd_weight_bias(*args, split_m=split)
        assert none is None
        assert_close_to_exact(db, db_exact, db_abs, m, dtype)
        assert_close_to_exact(dw, g * keep, g_abs, m, dtype)
        again = _gemm.bwd_weight_bias(*args, split_m=split)  # deterministic: no atomics
        assert torch.equal(again[0], dw) and torch.equal(again[2], db)


def test_db_not_asked_for_degenerate_shapes_and_bad_flag():
    x, dy, w, scores = _inputs(9, 20, 11, torch.float32)
    keep = torch.ones(11, 20, dtype=torch.uint8)
    dw, db = masked_linear_bwd_weight_bias(dy, x, keep, False, False)
    assert db is None and torch.equal(dw, masked_linear_bwd_weight(dy, x, keep, False))
    assert score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, 0.0, True, False)[2] is None
    # no tokens: db = 0; no input features (no GEMM tile): db still dy.sum(0); no output features: empty
    assert torch.equal(masked_linear_bwd_weight_bias(dy[:0], x[:0], keep, False, True)[1], torch.zeros(11))
    db = masked_linear_bwd_weight_bias(dy, x[:, :0], keep[:, :0], False, True)[1]
    torch.testing.assert_close(db, dy.sum(0), rtol=0, atol=1e-5)
    assert masked_linear_bwd_weight_bias(dy[:, :0], x, keep[:0], False, True)[1].shape == (0,)
    with pytest.raises(TypeError, match="need_dbias"):
        masked_linear_bwd_weight_bias(dy, x, keep, False, 1)
    with pytest.raises(TypeError, match="need_dbias"):
        score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, 0.0, True, None)


def test_every_cpu_backend_has_the_same_weight_grad_interface():
    """torch, cpp (if built) and triton return (dW, db) / (dScores, dW, db) alike; db = dy.sum(0)."""
    x, dy, w, scores = _inputs(37, 70, 53, torch.float32)
    keep = (torch.rand(53, 70) < 0.5).to(torch.uint8)
    db_exact, db_abs = exact_db(dy)
    backends = available_backends("cpu")
    assert "triton" in backends and "torch" in backends
    for name in backends:
        be = impl(name)
        dw, db = be.masked_linear_bwd_weight_bias(dy, x, keep, False, True)
        assert_close_to_exact(db, db_exact, db_abs, 37, torch.float32)
        assert be.masked_linear_bwd_weight_bias(dy, x, keep, False, False)[1] is None
        ds, dw, db = be.score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, 0.1, True, True)
        assert_close_to_exact(db, db_exact, db_abs, 37, torch.float32)
        assert be.score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, 0.1, False, False)[1:] == (None, None)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The dbias dtype of each launch of the weight-gradient kernel (None: db not reduced there)."""
    calls = []
    real = _gemm.bwd_weight_bias

    def spy(*args, **kwargs):
        calls.append(args[10])
        return real(*args, **kwargs)

    monkeypatch.setattr(_gemm, "bwd_weight_bias", spy)
    return calls


def _grads(fn, leaves, dy):
    y = fn()
    return y, torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("op", ["masked", "packed", "scores"])
@pytest.mark.parametrize("train_bias", [True, False])
def test_ops_backward_takes_db_from_the_kernel(op, train_bias, dtype, kernel_calls):
    """Forward + backward through the public op on the Triton backend vs the reference op in fp64: every
    gradient within the precision bound, and db comes out of the weight-gradient kernel launch."""
    m, k, n = 37, 70, 53
    x, dy, w, scores = _inputs(m, k, n, dtype)
    x = x.reshape(1, m, k).requires_grad_()  # a leading batch dim, as a layer sees it
    w.requires_grad_()
    b = torch.randn(n, dtype=dtype).requires_grad_(train_bias)
    keep = torch.rand(n, k) < 0.4
    tau = scores.flatten()[3].float()
    if op == "scores":
        scores.requires_grad_()
        run = lambda xx, ww, bb, ss: ops.score_masked_linear(xx, ww, bb, ss, tau, backend="triton")  # noqa: E731
        ref = lambda xx, ww, bb, ss: R.score_masked_linear(xx, ww, bb, ss, tau)  # noqa: E731
        keep = scores >= tau.to(dtype)
    else:
        mask = pack_bits(keep) if op == "packed" else keep
        run = lambda xx, ww, bb, ss: ops.masked_linear(xx, ww, bb, mask, backend="triton")  # noqa: E731
        ref = lambda xx, ww, bb, ss: R.masked_linear(xx, ww, bb, mask)  # noqa: E731
    dy3 = dy.reshape(1, m, n)
    leaves = [x, w, b, scores]
    y, grads = _grads(lambda: run(x, w, b, scores), leaves, dy3)
    d64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    y64, grads64 = _grads(lambda: ref(*d64), d64, dy3.double())

    assert kernel_calls == [dtype if train_bias else None]  # one launch of the weight-gradient kernel
    y_abs = matmul_exact(x.detach().reshape(m, k), (w.detach().double() * keep).t())[1] + b.detach().double().abs()
    assert_close_to_exact(y.detach().reshape(m, n), y64.detach().reshape(m, n), y_abs, k, dtype)
    got = dict(zip([name for name, t in zip("xwbs", leaves) if t.requires_grad], grads))
    want = dict(zip([name for name, t in zip("xwbs", d64) if t.requires_grad], grads64))
    assert set(got) == ({"x", "w", "b"} if train_bias else {"x", "w"}) | ({"s"} if op == "scores" else set())
    g_abs = matmul_exact(dy.t(), x.detach().reshape(m, k))[1]
    assert_close_to_exact(got["w"], want["w"], g_abs, m, dtype)
    assert_close_to_exact(got["x"].reshape(m, k), want["x"].reshape(m, k),
                          matmul_exact(dy, w.detach().double() * keep)[1], n, dtype)
    if op == "scores":
        assert_close_to_exact(got["s"], want["s"], g_abs * w.detach().double().abs(), m, dtype)
    if train_bias:
        assert_close_to_exact(got["b"], want["b"], exact_db(dy)[1], m, dtype)


def test_ops_backward_without_a_weight_gemm_still_gives_db(kernel_calls):
    """Frozen weight (masked op) or frozen weight and scores: no weight-gradient GEMM runs, db is dy.sum(0);
    frozen weight with trained scores: the kernel runs for dScores and reduces db."""
    m, k, n = 9, 20, 11
    x, dy, w, scores = _inputs(m, k, n, torch.float32)
    b = torch.randn(n).requires_grad_()
    db_exact, db_abs = exact_db(dy)
    keep = torch.rand(n, k) < 0.5
    (db,) = torch.autograd.grad(ops.masked_linear(x, w, b, keep, backend="triton"), [b], dy)
    assert_close_to_exact(db, db_exact, db_abs, m, torch.float32)
    (db,) = torch.autograd.grad(ops.score_masked_linear(x, w, b, scores, 0.1, backend="triton"), [b], dy)
    assert_close_to_exact(db, db_exact, db_abs, m, torch.float32)
    assert kernel_calls == []
    scores.requires_grad_()
    _, db = torch.autograd.grad(ops.score_masked_linear(x, w, b, scores, 0.1, backend="triton"), [scores, b], dy)
    assert_close_to_exact(db, db_exact, db_abs, m, torch.float32)
    assert kernel_calls == [torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_grad_custom_ops_opcheck(backend):
    """The changed schemas (need_dbias, db output) and their fake impls agree with the real ones."""
    x, dy, w, scores = _inputs(9, 20, 11, torch.float32)
    keep = (torch.rand(11, 20) < 0.5).to(torch.uint8)
    tau = torch.tensor(0.1)
    for need_db in (True, False):
        torch.library.opcheck(torch.ops.sparsebert.masked_linear_bwd_weight.default, (dy, x, keep, False, need_db, backend))
        torch.library.opcheck(torch.ops.sparsebert.score_masked_linear_bwd_weight_scores.default,
                              (dy, x, w, scores, tau, True, need_db, backend))
