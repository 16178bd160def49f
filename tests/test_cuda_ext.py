"""The CUDA kernels of sparsebert._C (torch.ops.sparsebert_ext.* on CUDA tensors) against plain torch
math in float64 on random odd shapes, fp32 / fp16 / bf16, byte / packed / score masks. fp32 runs the
SIMT path (exact fp32 FMAs, no TF32); fp16 / bf16 run the tensor-core path (fp32 accumulation).
Skipped without a GPU (conftest) or when the extension was built without its CUDA kernels."""
import math

import pytest
import torch

from sparsebert.ops import _ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_ext.load() and _ext.has_cuda()),
                       reason="sparsebert._C was built without its CUDA kernels" if _ext.load()
                       else f"sparsebert._C not loaded ({_ext.load_error()})"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(1, 1, 1), (3 * 37, 97, 61), (130, 45, 200), (257, 129, 33)]  # (M, N, K), none tile-aligned


def ops():
    return torch.ops.sparsebert_ext


def assert_close(got, want, dtype, reduction_len):
    assert got.is_cuda and got.dtype == dtype, (got.device, got.dtype)
    rtol = RTOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=rtol * math.sqrt(max(reduction_len, 1)))


def problem(M, N, K, dtype):
    g = torch.Generator(device="cuda").manual_seed(M * 7919 + N * 31 + K)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    weight = torch.randn(N, K, device="cuda", dtype=dtype, generator=g)
    bias = torch.randn(N, device="cuda", dtype=dtype, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=g)
    keep = torch.rand(N, K, device="cuda", generator=g) < 0.6
    return x, weight, bias, dy, keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
def test_masked_linear(dtype, shape, packed):
    M, N, K = shape
    x, weight, bias, dy, keep = problem(M, N, K, dtype)
    mask = ops().pack_mask(keep) if packed else keep.to(torch.uint8)
    w_eff = weight.double() * keep
    assert_close(ops().masked_linear_fwd(x, weight, bias, mask, packed), x.double() @ w_eff.T + bias.double(), dtype, K)
    assert_close(ops().masked_linear_fwd(x, weight, None, mask, packed), x.double() @ w_eff.T, dtype, K)
    assert_close(ops().masked_linear_bwd_input(dy, weight, mask, packed), dy.double() @ w_eff, dtype, N)
    assert_close(ops().masked_linear_bwd_weight(dy, x, mask, packed), (dy.double().T @ x.double()) * keep, dtype, M)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_score_masked_linear(dtype, score_dtype, shape):
    M, N, K = shape
    x, weight, bias, dy, _ = problem(M, N, K, dtype)
    scores = torch.randn(N, K, device="cuda", dtype=score_dtype)
    threshold = 0.1
    keep = scores >= threshold  # torch rounds the threshold to the scores dtype; so must the kernel
    w_eff = weight.double() * keep
    assert_close(ops().score_masked_linear_fwd(x, weight, bias, scores, threshold),
                 x.double() @ w_eff.T + bias.double(), dtype, K)
    assert_close(ops().score_masked_linear_bwd_input(dy, weight, scores, threshold), dy.double() @ w_eff, dtype, N)
    grad = dy.double().T @ x.double()
    dscores, dweight = ops().score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, True)
    assert_close(dscores, grad * weight.double(), score_dtype, M)
    assert_close(dweight, grad * keep, dtype, M)
    dscores_only, none = ops().score_masked_linear_bwd_weight_scores(dy, x, weight, scores, threshold, False)
    assert none is None
    torch.testing.assert_close(dscores_only, dscores, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_threshold_matches_sort(dtype):
    tensors = [torch.randn(97, 61, device="cuda").to(dtype), torch.randn(3, 1000, device="cuda").to(dtype)]
    flat = torch.cat([t.float().flatten() for t in tensors]).sort().values
    n = flat.numel()
    for k in (1, 7, n // 2, n - 1):
        tau = ops().topk_threshold(tensors, k)
        assert tau.is_cuda and tau.dtype == torch.float32 and tau.dim() == 0
        assert tau.item() == flat[k].item(), k
    assert ops().topk_threshold(tensors, 0).item() == float("-inf")
    assert ops().topk_threshold(tensors, n).item() == float("inf")


def test_topk_threshold_ties_negatives_and_large():
    ties = (torch.randint(-3, 4, (100003,), device="cuda").float() * 0.5)
    ties[5] = -0.0
    sorted_ties = ties.sort().values
    for k in (1, 12345, 99999):
        assert ops().topk_threshold([ties], k).item() == sorted_ties[k].item()
    big = torch.randn(3_000_001, device="cuda")
    k = 1_234_567
    assert ops().topk_threshold([big], k).item() == big.kthvalue(k + 1).values.item()


@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (7, 33), (97, 61), (2, 3, 70), (64, 3072)])
def test_pack_unpack_match_cpu(shape):
    keep = torch.rand(*shape, device="cuda") < 0.5
    packed = ops().pack_mask(keep)
    assert packed.is_cuda and packed.dtype == torch.int32
    assert torch.equal(packed.cpu(), ops().pack_mask(keep.cpu()))  # the CPU kernel is tested against plain torch
    assert torch.equal(ops().unpack_mask(packed, shape[-1]), keep)


def test_non_default_stream():
    x, weight, bias, _, keep = problem(130, 45, 200, torch.bfloat16)
    want = ops().masked_linear_fwd(x, weight, bias, keep, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        got = ops().masked_linear_fwd(x, weight, bias, keep, False)
    stream.synchronize()
    assert torch.equal(got, want)
