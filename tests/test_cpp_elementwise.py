"""The C++ CPU elementwise passes (csrc/cpu/sparsebert_cpu.h, branch-free selects) bit for bit against torch.

masked_weight, score_masked_weight, score_masked_weight_grad and the masked weight gradient select a value
or +0 by the bits of the value (no branch), so they must agree with `torch.where(keep, v, +0)` exactly: NaN,
inf and -0.0 kept as they are, a pruned entry +0 whatever it held, packed masks correct in the last,
partial word of a row (K = 1, 31, 32, 33, 95), every weight dtype, scores in another dtype than the weight.
Timing: bench/bench_cpp_elementwise.py.
"""
import pytest
import torch

from sparsebert.ops import _ext

pytestmark = pytest.mark.skipif(not (_ext.load() and _ext.has_cpu()),
                                reason=f"sparsebert._C CPU kernels not built ({_ext.load_error()})")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KS = [1, 31, 32, 33, 95]


def ext():
    return torch.ops.sparsebert_ext


def specials(t):
    """t with NaN, +-inf and -0.0 written at fixed places (rows 0-1 when there are enough entries)."""
    t = t.clone()
    flat = t.view(-1)
    for i, v in enumerate((float("nan"), float("inf"), float("-inf"), -0.0)):
        flat[(7 * i + 3) % flat.numel()] = v
    return t


def same_bits(got, want):
    """Equal as bits: NaN == NaN, -0.0 != +0.0."""
    assert got.dtype == want.dtype and got.shape == want.shape
    int_type = {2: torch.int16, 4: torch.int32}[got.element_size()]
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(int_type), want[~nan].view(int_type)), "values differ (bits)"


def keep_or_plus_zero(keep, v):
    return torch.where(keep, v, torch.zeros((), dtype=v.dtype))


def random_keep(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g) < 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mask_kind", ["uint8", "bool", "packed"])
def test_masked_weight_bits(dtype, k, mask_kind):
    torch.manual_seed(k)
    w = specials(torch.randn(37, k).to(dtype))
    keep = random_keep(37, k, seed=k)
    keep.view(-1)[:4] = torch.tensor([True, False, True, False])[: min(4, keep.numel())]  # NaN kept, inf pruned
    mask = {"uint8": keep.to(torch.uint8), "bool": keep, "packed": ext().pack_mask(keep)}[mask_kind]
    got = ext().masked_weight(w, mask, mask_kind == "packed")
    same_bits(got, keep_or_plus_zero(keep, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scores_dtype", DTYPES)
def test_score_masked_weight_bits(dtype, scores_dtype):
    torch.manual_seed(3)
    w = specials(torch.randn(41, 33).to(dtype))
    s = torch.randn(41, 33).to(scores_dtype)
    s.view(-1)[5] = float("inf")
    s.view(-1)[6] = float("-inf")
    tau = torch.tensor(0.3)  # not representable in bf16/fp16: compared as torch compares (rounded)
    got = ext().score_masked_weight(w, s, tau)
    same_bits(got, keep_or_plus_zero(s >= tau, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_score_masked_weight_grad_bits(dtype, scores_dtype, need):
    torch.manual_seed(4)
    g = specials(torch.randn(29, 95))
    w = torch.randn(29, 95).to(dtype)
    s = torch.randn(29, 95).to(scores_dtype)
    tau = torch.tensor(-0.2)
    ds, dw = ext().score_masked_weight_grad(g, w, s, tau, *need)
    assert (ds is not None) == need[0] and (dw is not None) == need[1]
    if need[0]:
        same_bits(ds, (g * w.float()).to(scores_dtype))
    if need[1]:
        same_bits(dw, keep_or_plus_zero(s >= tau, g).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_masked_weight_gradient_is_the_kept_gradient(dtype, packed):
    torch.manual_seed(5)
    x = torch.randn(17, 33).to(dtype)
    dy = torch.randn(17, 23).to(dtype)
    keep = random_keep(23, 33, seed=6)
    dw = ext().masked_linear_bwd_weight(dy, x, ext().pack_mask(keep) if packed else keep.to(torch.uint8), packed)
    g = dy.float().t() @ x.float()  # what the op computes first (fp32), then masks and rounds once
    torch.testing.assert_close(dw.float(), keep_or_plus_zero(keep, g).to(dtype).float(), rtol=1e-5, atol=1e-5)
    assert torch.all(dw[~keep].view(torch.int16 if dtype != torch.float32 else torch.int32) == 0)  # +0, not -0
