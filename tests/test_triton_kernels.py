"""Triton kernels (sparsebert.kernels) against plain-torch references written here, and against
sparsebert.ops.reference.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small but awkward: tails in
every dimension, M = 1, K not a multiple of 32 (packed masks with padding bits). `pytest -m cuda` with
SPARSEBERT_TEST_GPU=1 runs the compiled kernels (autotuned configs, split-M weight gradient) on a GPU.

Tolerances come from the arithmetic, not from trial: the kernels accumulate in fp32 and round once to
the output dtype, so |out - exact| <= eps(out dtype) * |exact| + (n + 2) * eps(fp32) * sum_i |a_i b_i|,
with `exact` computed in fp64 from the same (already rounded) inputs.
"""
import math

import pytest
import torch

from sparsebert.kernels import _gemm
from sparsebert.kernels.masked_linear import masked_linear_bwd_input, masked_linear_bwd_weight, masked_linear_fwd
from sparsebert.kernels.score_masked_linear import (
    score_masked_linear_bwd_input,
    score_masked_linear_bwd_weight_scores,
    score_masked_linear_fwd,
)
from sparsebert.kernels.topk_threshold import topk_threshold

try:
    from sparsebert.ops import reference as ops_reference
except Exception:  # pragma: no cover - only while the ops layer is incomplete
    ops_reference = None

DEVICE = "cuda" if (torch.cuda.is_available() and not _gemm.INTERPRET) else "cpu"
needs_reference = pytest.mark.skipif(
    ops_reference is None or not hasattr(ops_reference, "score_masked_linear"),
    reason="sparsebert.ops.reference is not importable",
)

# (M, K, N): token count, in features, out features
SHAPES = [(1, 64, 33), (111, 61, 97), (111, 97, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------------
# plain-torch references (fp64, exact up to the final rounding) and the tolerance check
# ----------------------------------------------------------------------------------------------------
def pack_bits(mask):
    """(N, K) bool -> (N, ceil(K/32)) int32, bit k % 32 of word k // 32, LSB first; padding bits 0."""
    n, k = mask.shape
    words = (k + 31) // 32
    bits = torch.zeros(n, words * 32, dtype=torch.int64, device=mask.device)
    bits[:, :k] = mask.to(torch.int64)
    packed = (bits.view(n, words, 32) << torch.arange(32, device=mask.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def random_mask(n, k, density=0.5):
    return torch.rand(n, k, device=DEVICE) < density


def keep_of(scores, threshold):
    """torch's own `scores >= threshold` (threshold rounded to the scores' dtype)."""
    return scores >= threshold


def matmul_exact(a, b):
    """(a @ b in fp64, |a| @ |b| in fp64) from tensors of any float dtype."""
    a, b = a.double(), b.double()
    return a @ b, a.abs() @ b.abs()


def assert_close_to_exact(out, exact, abs_sum, reduce_len, dtype):
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert out.shape == exact.shape
    assert torch.isfinite(out).all()
    tol = torch.finfo(dtype).eps * exact.abs() + (reduce_len + 2) * torch.finfo(torch.float32).eps * abs_sum
    err = (out.double() - exact).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (
        f"max error {err.flatten()[worst].item():.3e} > tol {tol.flatten()[worst].item():.3e} "
        f"(out {out.flatten()[worst].item()}, exact {exact.flatten()[worst].item()})")


def linear_inputs(m, k, n, dtype, bias=True):
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    return x, w, b, dy


def exact_fwd(x, w, keep, b):
    y, s = matmul_exact(x, (w.double() * keep).t())
    if b is not None:
        y, s = y + b.double(), s + b.double().abs()
    return y, s


# ----------------------------------------------------------------------------------------------------
# masked_linear
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_masked_linear_fwd(m, k, n, dtype):
    x, w, b, _ = linear_inputs(m, k, n, dtype, bias=(m != 1))
    keep = random_mask(n, k)
    y_exact, y_abs = exact_fwd(x, w, keep, b)
    for mask, packed in ((keep.to(torch.uint8), False), (pack_bits(keep), True)):
        y = masked_linear_fwd(x, w, b, mask, packed)
        assert_close_to_exact(y, y_exact, y_abs, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_masked_linear_bwd(m, k, n, dtype):
    x, w, _, dy = linear_inputs(m, k, n, dtype)
    keep = random_mask(n, k, density=0.3)
    packed = k % 32 != 0  # packed masks on the shapes whose last word has padding bits
    mask = pack_bits(keep) if packed else keep.to(torch.uint8)

    dx = masked_linear_bwd_input(dy, w, mask, packed)
    dx_exact, dx_abs = matmul_exact(dy, w.double() * keep)
    assert_close_to_exact(dx, dx_exact, dx_abs, n, dtype)

    dw = masked_linear_bwd_weight(dy, x, mask, packed)
    g, g_abs = matmul_exact(dy.t(), x)
    assert_close_to_exact(dw, g * keep, g_abs, m, dtype)
    assert (dw[~keep] == 0).all()


def test_masked_linear_all_and_none_kept():
    x, w, b, dy = linear_inputs(37, 61, 33, torch.float32)
    ones = torch.ones(33, 61, dtype=torch.bool, device=DEVICE)
    y_exact, y_abs = exact_fwd(x, w, ones, b)
    assert_close_to_exact(masked_linear_fwd(x, w, b, pack_bits(ones), True), y_exact, y_abs, 61, torch.float32)
    assert_close_to_exact(masked_linear_fwd(x, w, b, ones, False), y_exact, y_abs, 61, torch.float32)  # bool mask
    zeros = torch.zeros(33, 61, dtype=torch.uint8, device=DEVICE)
    assert torch.equal(masked_linear_fwd(x, w, b, zeros, False), b.expand(37, 33))
    assert torch.equal(masked_linear_bwd_input(dy, w, zeros, False), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------
# score_masked_linear
# ----------------------------------------------------------------------------------------------------
# (m, k, n, x/weight dtype, scores dtype)
SCORE_CASES = [
    (111, 61, 97, torch.float32, torch.float32),
    (111, 97, 33, torch.float32, torch.bfloat16),  # bf16 scores beside fp32 weights
    (1, 64, 33, torch.bfloat16, torch.bfloat16),
    (111, 61, 97, torch.bfloat16, torch.float32),
    (37, 97, 33, torch.float16, torch.float16),
]


def score_inputs(m, k, n, dtype, scores_dtype):
    x, w, b, dy = linear_inputs(m, k, n, dtype)
    scores = torch.randn(n, k, device=DEVICE, dtype=scores_dtype)
    threshold = scores.flatten()[7].item()  # a value of the scores: ties at the threshold are kept
    return x, w, b, dy, scores, threshold


@pytest.mark.parametrize("m,k,n,dtype,scores_dtype", SCORE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_score_masked_linear(m, k, n, dtype, scores_dtype):
    x, w, b, dy, scores, threshold = score_inputs(m, k, n, dtype, scores_dtype)
    keep = keep_of(scores, threshold)
    assert 0 < keep.sum() < keep.numel()

    y_exact, y_abs = exact_fwd(x, w, keep, b)
    assert_close_to_exact(score_masked_linear_fwd(x, w, b, scores, threshold), y_exact, y_abs, k, dtype)
    tau_tensor = torch.tensor(threshold, dtype=torch.float32, device=DEVICE)
    assert_close_to_exact(score_masked_linear_fwd(x, w, None, scores, tau_tensor), *exact_fwd(x, w, keep, None), k, dtype)

    dx = score_masked_linear_bwd_input(dy, w, scores, tau_tensor)
    assert_close_to_exact(dx, *matmul_exact(dy, w.double() * keep), n, dtype)

    g, g_abs = matmul_exact(dy.t(), x)
    dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, w, scores, threshold, True)
    # dscores = G * W: one more fp32 rounding of the product, covered by the (n + 2) term
    assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), m, scores_dtype)
    assert_close_to_exact(dweight, g * keep, g_abs, m, dtype)
    dscores_only, none = score_masked_linear_bwd_weight_scores(dy, x, w, scores, tau_tensor, False)
    assert none is None
    assert torch.equal(dscores_only, dscores)


@pytest.mark.parametrize("scores_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_threshold_rounds_to_scores_dtype_like_torch(scores_dtype):
    """A threshold between two representable scores is compared as torch does: rounded to the scores'
    dtype first (so a score equal to the rounded threshold is kept), by float and by tensor alike."""
    n, k = 33, 40
    scores = torch.randn(n, k, device=DEVICE).to(scores_dtype)
    s0 = scores[3, 5].float().item()
    # a threshold an eighth of an ulp above s0: it rounds back to s0 in the scores' dtype
    ulp = torch.finfo(scores_dtype).eps * 2 ** math.floor(math.log2(abs(s0)))
    threshold = s0 + ulp / 8
    assert torch.tensor(threshold, dtype=scores_dtype).item() == s0
    keep = keep_of(scores, threshold)
    assert keep[3, 5] and not (scores.float() >= threshold)[3, 5]
    x, w, _, _ = linear_inputs(5, k, n, torch.float32, bias=False)
    for thr in (threshold, torch.tensor(threshold, dtype=torch.float32, device=DEVICE)):
        assert_close_to_exact(score_masked_linear_fwd(x, w, None, scores, thr), *exact_fwd(x, w, keep, None), k, torch.float32)


@pytest.mark.parametrize("split_m", [2, 3])
def test_weight_gradient_split_over_tokens(split_m):
    """The split-M path (used on GPUs when the (N, K) output has few tiles) sums its partials exactly."""
    x, w, _, dy, scores, threshold = score_inputs(111, 61, 97, torch.bfloat16, torch.bfloat16)
    keep = keep_of(scores, threshold)
    dweight, dscores = _gemm.bwd_weight(dy, x, w, scores, _gemm.MASK_SCORES, 0, threshold, None,
                                        torch.bfloat16, torch.bfloat16, split_m=split_m)
    g, g_abs = matmul_exact(dy.t(), x)
    assert_close_to_exact(dweight, g * keep, g_abs, 111, torch.bfloat16)
    assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), 111, torch.bfloat16)
    keep_u8 = random_mask(97, 61)
    dw, none = _gemm.bwd_weight(dy, x, None, pack_bits(keep_u8), _gemm.MASK_PACKED, 2, 0.0, None,
                                torch.bfloat16, None, split_m=split_m)
    assert none is None
    assert_close_to_exact(dw, g * keep_u8, g_abs, 111, torch.bfloat16)


@needs_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_against_ops_reference(dtype):
    """Forward and autograd backward of sparsebert.ops.reference vs the kernels."""
    m, k, n = 37, 61, 33
    x, w, b, dy = linear_inputs(m, k, n, dtype)
    keep = random_mask(n, k)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = ops_reference.masked_linear(xr, wr, b, pack_bits(keep))
    y_ref.backward(dy)
    torch.testing.assert_close(masked_linear_fwd(x, w, b, pack_bits(keep), True), y_ref, **tol)
    torch.testing.assert_close(masked_linear_bwd_input(dy, w, keep.to(torch.uint8), False), xr.grad, **tol)
    torch.testing.assert_close(masked_linear_bwd_weight(dy, x, pack_bits(keep), True), wr.grad, **tol)

    scores = torch.randn(n, k, device=DEVICE, dtype=dtype)
    tau = torch.tensor(scores.flatten()[11].item(), device=DEVICE)
    xr, wr, sr = (t.clone().requires_grad_() for t in (x, w, scores))
    y_ref = ops_reference.score_masked_linear(xr, wr, b, sr, tau)
    y_ref.backward(dy)
    torch.testing.assert_close(score_masked_linear_fwd(x, w, b, scores, tau), y_ref, **tol)
    torch.testing.assert_close(score_masked_linear_bwd_input(dy, w, scores, tau), xr.grad, **tol)
    dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, w, scores, tau, True)
    torch.testing.assert_close(dscores, sr.grad, **tol)
    torch.testing.assert_close(dweight, wr.grad, **tol)


def test_bad_inputs_raise_clear_errors():
    x, w, b, dy = linear_inputs(4, 61, 33, torch.float32)
    keep = random_mask(33, 61)
    with pytest.raises(TypeError, match="weight"):
        masked_linear_fwd(x, w.double(), b, keep, False)
    with pytest.raises(ValueError, match="weight"):
        masked_linear_fwd(x, w[:, :60].contiguous(), b, keep, False)
    with pytest.raises(ValueError, match="contiguous"):
        masked_linear_fwd(x.t().contiguous().t(), w, b, keep, False)
    with pytest.raises(TypeError, match="mask"):
        masked_linear_fwd(x, w, b, keep, True)  # a dense mask passed as packed
    with pytest.raises(ValueError, match="mask"):
        masked_linear_fwd(x, w, b, pack_bits(keep)[:, :1].contiguous(), True)  # (33, 1) words for K = 61
    with pytest.raises(TypeError, match="mask"):
        masked_linear_fwd(x, w, b, keep.to(torch.int32), False)
    with pytest.raises(TypeError, match="packed"):
        masked_linear_fwd(x, w, b, keep, 0)
    with pytest.raises(ValueError, match="bias"):
        masked_linear_fwd(x, w, b[:5], keep, False)
    with pytest.raises(ValueError, match="dy"):
        masked_linear_bwd_weight(dy[:3], x, keep, False)
    with pytest.raises(TypeError, match="threshold"):
        score_masked_linear_fwd(x, w, b, torch.randn_like(w), "0.5")
    with pytest.raises(ValueError, match="threshold"):
        score_masked_linear_fwd(x, w, b, torch.randn_like(w), torch.zeros(2))
    with pytest.raises(TypeError, match="scores"):
        score_masked_linear_fwd(x, w, b, torch.ones_like(w, dtype=torch.int32), 0.5)
    with pytest.raises(TypeError, match="need_dweight"):
        score_masked_linear_bwd_weight_scores(dy, x, w, torch.randn_like(w), 0.5, 1)


# ----------------------------------------------------------------------------------------------------
# topk_threshold
# ----------------------------------------------------------------------------------------------------
def kth_smallest(tensors, k_prune):
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    return -math.inf if k_prune == 0 else flat.kthvalue(k_prune + 1).values.item()


def test_topk_threshold_several_tensors_of_mixed_dtypes():
    tensors = [torch.randn(37, 61, device=DEVICE), torch.randn(1000, device=DEVICE).to(torch.bfloat16),
               torch.randn(5, 7, device=DEVICE).half(), torch.randn(3, 100, device=DEVICE)]
    n = sum(t.numel() for t in tensors)
    for k_prune in (0, 1, 5, 777, n // 2, n - 2, n - 1):
        tau = topk_threshold(tensors, k_prune)
        assert tau.dtype == torch.float32 and tau.dim() == 0
        assert tau.item() == kth_smallest(tensors, k_prune), k_prune
        if k_prune:
            kept = sum(int((t.float() >= tau).sum()) for t in tensors)
            assert kept == n - k_prune  # continuous random values: no ties


def test_topk_threshold_ties_signed_zeros_and_infinities():
    values = torch.tensor([3.0, -0.0, 0.0, -1.0, -1.0, 2.0, math.inf, -math.inf, 1e-40, -1e-40, 2.0, 2.0], device=DEVICE)
    for k_prune in range(values.numel()):
        assert topk_threshold(values, k_prune).item() == kth_smallest([values], k_prune), k_prune
    ties = torch.full((300,), 0.5, device=DEVICE)
    assert topk_threshold([ties], 299).item() == 0.5


def test_topk_threshold_single_tensor_matches_ops_reference():
    scores = torch.randn(97, 61, device=DEVICE).to(torch.bfloat16)
    k_prune = 4000
    assert topk_threshold(scores, k_prune).item() == kth_smallest([scores], k_prune)
    if ops_reference is not None and hasattr(ops_reference, "topk_threshold"):
        ref = ops_reference.topk_threshold(scores, k_prune / scores.numel())
        assert topk_threshold([scores], k_prune).item() == ref.item()


def test_topk_threshold_bad_inputs():
    s = torch.randn(10, device=DEVICE)
    # k_prune == n prunes everything: +inf on every backend (issue 8: backends agree at the edges)
    assert torch.isposinf(topk_threshold([s], 10)).all()
    with pytest.raises(ValueError, match="k_prune"):
        topk_threshold([s], 11)
    with pytest.raises(ValueError, match="k_prune"):
        topk_threshold([s], -1)
    with pytest.raises(TypeError, match="k_prune"):
        topk_threshold([s], 2.0)
    with pytest.raises(ValueError, match="at least one"):
        topk_threshold([], 0)
    with pytest.raises(TypeError, match="scores_list"):
        topk_threshold([s, torch.arange(3, device=DEVICE)], 1)


# ----------------------------------------------------------------------------------------------------
# GPU only: the compiled, autotuned kernels at BERT-like shapes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("m,k,n", [(512, 768, 3072), (4096, 768, 768), (1000, 3072, 768)])
def test_gpu_bert_shapes_bf16(m, k, n):
    if _gemm.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: set SPARSEBERT_TEST_GPU=1 to test the compiled kernels")
    x, w, b, dy = linear_inputs(m, k, n, torch.bfloat16)
    scores = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    tau = topk_threshold([scores], scores.numel() // 2)
    assert tau.item() == kth_smallest([scores], scores.numel() // 2)
    keep = scores >= tau
    assert_close_to_exact(score_masked_linear_fwd(x, w, b, scores, tau), *exact_fwd(x, w, keep, b), k, torch.bfloat16)
    assert_close_to_exact(score_masked_linear_bwd_input(dy, w, scores, tau), *matmul_exact(dy, w.double() * keep), n,
                          torch.bfloat16)
    dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, w, scores, tau, True)
    g, g_abs = matmul_exact(dy.t(), x)
    assert_close_to_exact(dweight, g * keep, g_abs, m, torch.bfloat16)
    assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), m, torch.bfloat16)
