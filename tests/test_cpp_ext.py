"""The C++ CPU kernels of sparsebert._C (torch.ops.sparsebert_ext.*) against plain torch math.

Awkward shapes (M = 3*37, K = 61 not a multiple of 32, N = 97), fp32 / bf16 / fp16, packed and byte
masks; the reference is computed in float64 from the same (already rounded) inputs, and the tolerance
is the output dtype's rounding (plus fp32 accumulation), scaled by the typical output magnitude.
"""
import json
import math

import pytest
import torch

from sparsebert.ops import _ext

pytestmark = pytest.mark.skipif(not (_ext.load() and _ext.has_cpu()),
                                reason=f"sparsebert._C CPU kernels not built ({_ext.load_error()})")

M, K, N = 3 * 37, 61, 97
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # ~ a few ulps of each dtype


def ops():
    return torch.ops.sparsebert_ext


def assert_close(got, want, dtype, reduction_len):
    """got (dtype) vs a float64 reference; error allowed: rtol * (|want| + sqrt(reduction_len))."""
    assert got.dtype == dtype, f"expected {dtype}, got {got.dtype}"
    rtol = RTOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * math.sqrt(reduction_len))


def reference_pack(mask):
    """Plain torch pack: int32 words, bit k % 32 (LSB first) of word k // 32, zero padding bits."""
    k = mask.shape[-1]
    words = (k + 31) // 32
    bits = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.int64)
    bits[..., :k] = (mask != 0).to(torch.int64)
    value = (bits.view(*mask.shape[:-1], words, 32) << torch.arange(32)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def random_problem(dtype, with_bias=True):
    x = torch.randn(M, K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype) if with_bias else None
    keep = torch.rand(N, K) < 0.6
    return x, weight, bias, keep


def mask_arg(keep, packed):
    return ops().pack_mask(keep) if packed else keep.to(torch.uint8)


# ---------------------------------------------------------------- masked_linear ---------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_linear_fwd(dtype, packed, with_bias):
    x, weight, bias, keep = random_problem(dtype, with_bias)
    y = ops().masked_linear_fwd(x, weight, bias, mask_arg(keep, packed), packed)
    want = x.double() @ (weight.double() * keep).T
    if bias is not None:
        want = want + bias.double()
    assert y.shape == (M, N)
    assert_close(y, want, dtype, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_masked_linear_bwd_input(dtype, packed):
    _, weight, _, keep = random_problem(dtype)
    dy = torch.randn(M, N, dtype=dtype)
    dx = ops().masked_linear_bwd_input(dy, weight, mask_arg(keep, packed), packed)
    assert dx.shape == (M, K)
    assert_close(dx, dy.double() @ (weight.double() * keep), dtype, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_masked_linear_bwd_weight(dtype, packed):
    x, _, _, keep = random_problem(dtype)
    dy = torch.randn(M, N, dtype=dtype)
    dw = ops().masked_linear_bwd_weight(dy, x, mask_arg(keep, packed), packed)
    assert dw.shape == (N, K)
    want = (dy.double().T @ x.double()) * keep
    assert_close(dw, want, dtype, M)
    assert torch.all(dw[~keep] == 0)


def test_bool_mask_equals_uint8_mask():
    x, weight, bias, keep = random_problem(torch.float32)
    a = ops().masked_linear_fwd(x, weight, bias, keep, False)
    b = ops().masked_linear_fwd(x, weight, bias, keep.to(torch.uint8), False)
    assert torch.equal(a, b)


# ---------------------------------------------------------- score_masked_linear ---------------------------
SCORE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]  # (weight/x dtype, scores dtype)


def score_problem(dtype, score_dtype):
    x, weight, bias, _ = random_problem(dtype)
    scores = torch.randn(N, K, dtype=score_dtype)
    threshold = 0.1  # not representable in bf16/fp16: torch rounds it to the scores dtype, so must the kernel
    keep = scores >= threshold
    return x, weight, bias, scores, threshold, keep


@pytest.mark.parametrize("dtype,score_dtype", SCORE_DTYPES)
def test_score_masked_linear_fwd(dtype, score_dtype):
    x, weight, bias, scores, threshold, keep = score_problem(dtype, score_dtype)
    y = ops().score_masked_linear_fwd(x, weight, bias, scores, threshold)
    assert_close(y, x.double() @ (weight.double() * keep).T + bias.double(), dtype, K)
    y_nobias = ops().score_masked_linear_fwd(x, weight, None, scores, threshold)
    assert_close(y_nobias, x.double() @ (weight.double() * keep).T, dtype, K)


@pytest.mark.parametrize("dtype,score_dtype", SCORE_DTYPES)
def test_score_masked_linear_bwd_input(dtype, score_dtype):
    _, weight, _, scores, threshold, keep = score_problem(dtype, score_dtype)
    dy = torch.randn(M, N, dtype=dtype)
    dx = ops().score_masked_linear_bwd_input(dy, weight, scores, threshold)
    assert_close(dx, dy.double() @ (weight.double() * keep), dtype, N)


@pytest.mark.parametrize("dtype,score_dtype", SCORE_DTYPES)
@pytest.mark.parametrize("need_dweight", [True, False])
def test_score_masked_linear_bwd_weight_scores(dtype, score_dtype, need_dweight):
    x, weight, _, scores, threshold, keep = score_problem(dtype, score_dtype)
    dy = torch.randn(M, N, dtype=dtype)
    dscores, dweight = ops().score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, need_dweight)
    grad = dy.double().T @ x.double()
    assert_close(dscores, grad * weight.double(), score_dtype, M)
    if need_dweight:
        assert_close(dweight, grad * keep, dtype, M)
    else:
        assert dweight is None


def test_threshold_is_inclusive_and_rounded_like_torch():
    scores = torch.tensor([[0.5, 0.25, 1.0 + 2**-9, -1.0]], dtype=torch.bfloat16)  # 1+2^-9 rounds to 1 in bf16
    weight = torch.ones(1, 4, dtype=torch.bfloat16)
    x = torch.eye(4, dtype=torch.bfloat16)
    for threshold in (0.5, 1.0 + 2**-9, 0.3):
        y = ops().score_masked_linear_fwd(x, weight, None, scores, threshold)
        assert torch.equal(y[:, 0] != 0, (scores >= threshold)[0]), threshold


# ------------------------------------------------------------------ topk_threshold ------------------------
def reference_threshold(tensors, k_prune):
    flat = torch.cat([t.float().flatten() for t in tensors])
    if k_prune == 0:
        return float("-inf")
    if k_prune == flat.numel():
        return float("inf")
    return flat.sort().values[k_prune].item()


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)])
def test_topk_threshold_exact(dtypes):
    tensors = [torch.randn(37, 61).to(dt) if i % 2 == 0 else torch.randn(5, 3, 7).to(dt) for i, dt in enumerate(dtypes)]
    n = sum(t.numel() for t in tensors)
    for k_prune in (0, 1, n // 3, n // 2, n - 1, n):
        tau = ops().topk_threshold(tensors, k_prune)
        assert tau.dim() == 0 and tau.dtype == torch.float32
        assert tau.item() == reference_threshold(tensors, k_prune)
    # with distinct values, `scores >= tau` keeps exactly n - k_prune
    distinct = [torch.randperm(n).float().view(-1) / 7.0]
    for k_prune in (1, n // 2, n - 1):
        tau = ops().topk_threshold(distinct, k_prune)
        assert int((distinct[0] >= tau).sum()) == n - k_prune


def test_topk_threshold_ties_and_signed_zero():
    t = torch.tensor([0.0, -0.0, 1.0, 1.0, -2.0, 1.0, 3.0])
    for k in range(1, t.numel()):  # k_prune = 0 is -inf by contract
        assert ops().topk_threshold([t], k).item() == t.sort().values[k].item()


@pytest.mark.parametrize("case", ["normal", "one_bin", "few_values", "specials"])
def test_topk_threshold_exact_over_many_chunks_and_threads(case):
    """Large inputs: the radix pass runs over many parallel chunks and threads; ranks on both sides of
    the histogram bins' edges, a bin holding every key, ties, and -0 / inf / -inf among the keys."""
    g = torch.Generator().manual_seed(9)
    if case == "normal":
        tensors = [torch.randn(700, 301, generator=g), torch.randn(90001, generator=g).bfloat16()]
    elif case == "one_bin":  # every key shares its top 12 bits: the finish runs over all of them
        tensors = [1.0 + torch.rand(400_000, generator=g) * 0.001]
    elif case == "few_values":
        tensors = [torch.randint(0, 3, (300_000,), generator=g).float() - 1.0]
    else:
        t = torch.randn(250_000, generator=g)
        t[::7] = 0.0
        t[1::7] = -0.0
        t[2::97] = float("inf")
        t[3::89] = float("-inf")
        tensors = [t, t[:77_777].half()]
    n = sum(t.numel() for t in tensors)
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).sort().values
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k_prune in (1, 2, n // 10, n // 2, n // 2 + 1, n - 2, n - 1):
            assert ops().topk_threshold(tensors, k_prune).item() == flat[k_prune].item(), k_prune
    finally:
        torch.set_num_threads(old)


def test_topk_threshold_rejects_bad_k():
    with pytest.raises(RuntimeError, match="k_prune"):
        ops().topk_threshold([torch.randn(10)], 11)
    with pytest.raises(RuntimeError, match="k_prune"):
        ops().topk_threshold([torch.randn(10)], -1)


# ---------------------------------------------------------------- pack / unpack ---------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (7, 33), (N, K), (2, 3, 70)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_pack_unpack_roundtrip(shape, dtype):
    keep = torch.rand(*shape) < 0.5
    packed = ops().pack_mask(keep.to(dtype))
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], (shape[-1] + 31) // 32)
    assert torch.equal(packed, reference_pack(keep))
    unpacked = ops().unpack_mask(packed, shape[-1])
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, keep)


def test_pack_bit_order_lsb_first():
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 0] = mask[0, 31] = mask[0, 33] = True
    packed = ops().pack_mask(mask)
    assert packed.tolist() == [[1 - 2**31, 2]]  # bits 0 and 31 of word 0 (int32 wraps), bit 1 of word 1


# ---------------------------------------------------------------- last line of defense --------------------
def test_bad_inputs_raise_with_argument_names():
    x, weight, bias, keep = random_problem(torch.float32)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops().masked_linear_fwd(x, weight, bias, keep[:, :-1].to(torch.uint8), False)
    with pytest.raises(RuntimeError, match="packed mask must be int32"):
        ops().masked_linear_fwd(x, weight, bias, keep.to(torch.uint8), True)
    with pytest.raises(RuntimeError, match="x and weight must share a dtype"):
        ops().masked_linear_fwd(x.half(), weight, bias, keep, False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops().masked_linear_fwd(x.t().contiguous().t(), weight, bias, keep, False)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops().masked_linear_fwd(x, weight, bias[:-1], keep, False)
    with pytest.raises(RuntimeError, match="scores must have shape"):
        ops().score_masked_linear_fwd(x, weight, bias, torch.randn(N, K + 1), 0.0)
    with pytest.raises(RuntimeError, match="words per row"):
        ops().unpack_mask(ops().pack_mask(keep), K + 40)


def test_build_info():
    info = _ext.build_info()
    assert info["cpu"] is True and info["torch_version"]
    assert set(info) >= {"cuda", "cuda_arch_list", "nvcc_version", "torch_version", "openmp", "cpu_sources"}
    assert "masked_linear_cpu.cpp" in info["cpu_sources"]
    assert json.loads(torch.ops.sparsebert_ext.build_info()) == info
    assert _ext.has_cuda() == bool(info["cuda"])
