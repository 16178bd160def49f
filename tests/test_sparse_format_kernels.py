"""Compressed-weight formats and their kernels against the dense reference.

Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py); the C++ CPU kernel is
called directly through torch.ops.sparsebert_ext (from the built extension, or JIT-built from
csrc/cpu/bitmask_linear_cpu.cpp when the extension is not built yet). `-m cuda` runs the compiled Triton
kernels on a GPU.
"""
import os
import pathlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import reference_formats as rf
from sparsebert.ops import sparse_formats as sf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def sparse_weight(n, k, density, dtype=torch.float32, device="cpu"):
    w = torch.randn(n, k, device=device)
    return (w * (torch.rand(n, k, device=device) < density)).to(dtype)


def block_weight(n, k, block, density, dtype=torch.float32, device="cpu"):
    keep = torch.rand(n // block, k // block, device=device) < density
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (torch.randn(n, k, device=device) * keep).to(dtype)


def check(y, x, w, b):
    """y against the fp64 product of the same values, within the bound the arithmetic allows: the output's
    rounding to its dtype (eps * |y|) plus an fp32 accumulation over K terms, in any order
    ((K + 2) * eps_fp32 * sum_k |x_k w_k| + |b|; Higham's deterministic bound, the one tests/
    test_triton_kernels.py uses). A fixed 1e-5 for fp32 was not derived from anything: on a GPU, K = 3072
    and values around 80, the summation order alone moves fp32 results by ~1.5e-4 (first GPU run)."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert torch.isfinite(y).all()
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    exact, abs_sum = xd @ wd.t(), xd.abs() @ wd.abs().t()
    if b is not None:
        exact, abs_sum = exact + b.double(), abs_sum + b.double().abs()
    k = x.shape[-1]
    tol = torch.finfo(y.dtype).eps * exact.abs() + (k + 2) * torch.finfo(torch.float32).eps * abs_sum
    err = (y.reshape(exact.shape).double() - exact).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (f"max error {err.flatten()[worst].item():.3e} > tol {tol.flatten()[worst].item():.3e} "
                                f"(out {y.flatten()[worst].item()}, exact {exact.flatten()[worst].item()})")


def test_check_bound_catches_one_dropped_weight():
    """The derived bound is tight enough to fail: dropping the largest product of one output (K = 3072, 10%
    density, fp32) is caught, while the exact fp32 result of the same values passes."""
    torch.manual_seed(0)
    w = sparse_weight(64, 3072, 0.1)
    x, b = torch.randn(5, 3072), torch.randn(64)
    check(F.linear(x, w, b), x, w, b)
    k = (x[2] * w[7]).abs().argmax()
    w_dropped = w.clone()
    w_dropped[7, k] = 0
    with pytest.raises(AssertionError, match="max error"):
        check(F.linear(x, w_dropped, b), x, w, b)


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("shape", [(1, 1), (17, 45), (64, 96), (33, 130)])
@pytest.mark.parametrize("tile", [(16, 32), (32, 64)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bitmask_encode_decode_round_trip(shape, tile, density):
    w = sparse_weight(*shape, density, torch.bfloat16)
    values, bitmask, offsets = rf.bitmask_encode(w, *tile)
    assert values.numel() == int((w != 0).sum()) and values.dtype == w.dtype
    assert bitmask.shape == (shape[0], -(-shape[1] // 32)) and bitmask.dtype == torch.int32
    assert offsets.shape == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    assert torch.equal(rf.bitmask_decode(values, bitmask, offsets, shape[1], *tile), w)


def test_bitmask_bytes_meet_the_target():
    """bf16 at 30% density: <= 0.45x the dense bytes (model and measured)."""
    w = sparse_weight(768, 3072, 0.3, torch.bfloat16)
    nbytes = rf.bitmask_nbytes(*rf.bitmask_encode(w, 32, 64))
    assert nbytes / (w.numel() * 2) <= 0.45
    model = rf.bitmask_bytes_per_weight(float((w != 0).float().mean()), 2, 32, 64)
    assert abs(nbytes / w.numel() - model) < 1e-3


@pytest.mark.parametrize("shape,block", [((64, 96), 16), ((64, 64), 32), ((128, 64), 64)])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_bsr_encode_decode_round_trip(shape, block, density):
    w = block_weight(*shape, block, density)
    values, crow, col = rf.bsr_encode(w, block)
    assert values.shape[1:] == (block, block) and crow.dtype == col.dtype == torch.int32
    assert torch.equal(rf.bsr_decode(values, crow, col, shape[1]), w)
    torch.testing.assert_close(rf.bsr_decode(values, crow, col, shape[1]),
                               torch.sparse_bsr_tensor(crow, col, values, size=shape).to_dense())


@pytest.mark.parametrize("shape", [(3, 8), (5, 12), (64, 96)])
def test_2to4_encode_decode_round_trip(shape):
    from sparsebert.nn.granularity import nm_mask_from_scores
    w = torch.randn(shape)
    w = w * nm_mask_from_scores(w.abs())
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # fewer than 2 nonzeros in a group
    values, meta = rf.nm24_encode(w)
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], -(-shape[1] // 8))
    assert torch.equal(rf.nm24_decode(values, meta, shape[1]), w)
    assert rf.is_2to4(w)


def test_format_encoders_refuse_what_they_cannot_serve():
    with pytest.raises(ValueError, match="not 2:4"):
        rf.nm24_encode(torch.ones(4, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        rf.nm24_encode(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="divisible by 32"):
        rf.bsr_encode(torch.zeros(64, 48), 32)
    with pytest.raises(ValueError, match="block_size"):
        rf.bsr_encode(torch.zeros(64, 64), 8)
    with pytest.raises(ValueError, match="tile_k"):
        rf.bitmask_encode(torch.zeros(4, 4), 16, 48)
    with pytest.raises(TypeError, match="floating"):
        rf.bitmask_encode(torch.zeros(4, 4, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ Triton
# tiles of 1, 2, 4 and 8 bitmask words per row (the kernel loads each row's words of a tile once)
BITMASK_CASES = [(1, 17, 45, (16, 32)), (5, 64, 96, (32, 64)), (19, 40, 130, (16, 64)), (33, 16, 32, (16, 32)),
                 (3, 70, 300, (32, 128)), (5, 40, 513, (16, 256))]


@pytest.mark.parametrize("m,n,k,tile", BITMASK_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_triton_matches_reference(m, n, k, tile, dtype):
    from sparsebert.kernels.bitmask_linear import bitmask_linear_fwd
    w = sparse_weight(n, k, 0.3, dtype)
    w[: n // 2, : min(k, 32)] = 0  # empty stretches of rows, partial tiles
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    fmt = rf.bitmask_encode(w, *tile)
    for split_k in (1, 3):
        check(bitmask_linear_fwd(x, *fmt, b, k, *tile, split_k=split_k), x, w, b)
    check(bitmask_linear_fwd(x, *fmt, None, k, *tile), x, w, None)


@pytest.mark.parametrize("m,n,k,block", [(1, 64, 96, 16), (7, 64, 64, 32), (20, 128, 64, 64), (33, 32, 48, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_triton_matches_reference(m, n, k, block, dtype):
    from sparsebert.kernels.bsr_linear import bsr_linear_fwd
    w = block_weight(n, k, block, 0.5, dtype)
    w[:block] = 0  # one empty block row
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    fmt = rf.bsr_encode(w, block)
    check(bsr_linear_fwd(x, *fmt, b, k), x, w, b)
    check(bsr_linear_fwd(x, *fmt, None, k), x, w, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_blockwise_torch_path_matches_reference(dtype):
    w = block_weight(96, 64, 32, 0.5, dtype)
    x, b = torch.randn(9, 64).to(dtype), torch.randn(96).to(dtype)
    check(rf.bsr_linear_blockwise(x, *rf.bsr_encode(w, 32), b, 64), x, w, b)


# ------------------------------------------------------------------------------------------ C++
@pytest.fixture(scope="module")
def cpp_op():
    if not sf._cpp_has("bitmask_linear_fwd"):
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("the sparsebert._C extension is not built and no C++ compiler is present to JIT-build it")
        from torch.utils.cpp_extension import load
        load(name="sparsebert_bitmask_linear_cpu_jit", sources=[str(ROOT / "csrc/cpu/bitmask_linear_cpu.cpp")],
             extra_cflags=["-O2"], is_python_module=False, verbose=False)
    return torch.ops.sparsebert_ext.bitmask_linear_fwd


@pytest.mark.parametrize("m,n,k,tile", BITMASK_CASES + [(4, 100, 300, (32, 128))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_cpp_matches_reference(cpp_op, m, n, k, tile, dtype):
    w = sparse_weight(n, k, 0.3, dtype)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    values, bitmask, offsets = rf.bitmask_encode(w, *tile)
    check(cpp_op(x, values, bitmask, offsets, k, *tile, b), x, w, b)
    check(cpp_op(x, values, bitmask, offsets, k, *tile, None), x, w, None)


def test_bitmask_cpp_rejects_bad_inputs(cpp_op):
    w = sparse_weight(8, 64, 0.5)
    values, bitmask, offsets = rf.bitmask_encode(w, 16, 32)
    with pytest.raises(RuntimeError, match="in_features"):
        cpp_op(torch.randn(2, 63), values, bitmask, offsets, 64, 16, 32, None)
    with pytest.raises(RuntimeError, match="tile_offsets"):
        cpp_op(torch.randn(2, 64), values, bitmask, offsets[:, :1].contiguous(), 64, 16, 32, None)
    with pytest.raises(RuntimeError, match="disagree"):
        cpp_op(torch.randn(2, 64), values[:3].contiguous(), bitmask, offsets, 64, 16, 32, None)


# ------------------------------------------------------------------------------------------ ops layer
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_bitmask_op_backends_and_batch_dims(backend, request):
    if backend == "cpp":
        request.getfixturevalue("cpp_op")
    w = sparse_weight(40, 70, 0.3)
    fmt = rf.bitmask_encode(w, 16, 32)
    b = torch.randn(40)
    x = torch.randn(3, 70, 5).transpose(1, 2)  # (3, 5, 70), non-contiguous
    y = sf.bitmask_linear(x, *fmt, b, 70, 16, 32, backend=backend)
    check(y, x, w, b)
    torch.testing.assert_close(y, sf.bitmask_linear_reference(x, *fmt, b, 70, 16, 32), **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bsr_op_backends_and_batch_dims(backend):
    w = block_weight(64, 48, 16, 0.5)
    fmt = rf.bsr_encode(w, 16)
    x = torch.randn(2, 3, 48)
    check(sf.bsr_linear(x, *fmt, None, 48, backend=backend), x, w, None)


def test_ops_pass_opcheck():
    w = sparse_weight(24, 40, 0.4)
    x, b = torch.randn(3, 40), torch.randn(24)
    torch.library.opcheck(torch.ops.sparsebert.bitmask_linear.default,
                          (x, *rf.bitmask_encode(w, 16, 32), b, 40, 16, 32, "torch"))
    wb = block_weight(32, 48, 16, 0.5)
    torch.library.opcheck(torch.ops.sparsebert.bsr_linear.default,
                          (torch.randn(3, 48), *rf.bsr_encode(wb, 16), torch.randn(32), 48, "torch"))


def test_ops_reject_bad_inputs_with_clear_errors():
    w = sparse_weight(16, 64, 0.5)
    fmt = rf.bitmask_encode(w, 16, 32)
    with pytest.raises(ValueError, match="in_features = 64"):
        sf.bitmask_linear(torch.randn(2, 60), *fmt, None, 64, 16, 32)
    with pytest.raises(TypeError, match="dtype"):
        sf.bitmask_linear(torch.randn(2, 64, dtype=torch.float16), *fmt, None, 64, 16, 32)
    with pytest.raises(ValueError, match="tile_offsets"):
        sf.bitmask_linear(torch.randn(2, 64), *fmt, None, 64, 16, 64)
    with pytest.raises(TypeError, match="bitmask must be int32"):
        sf.bitmask_linear(torch.randn(2, 64), fmt[0], fmt[1].long(), fmt[2], None, 64, 16, 32)
    with pytest.raises(ValueError, match="bias"):
        sf.bitmask_linear(torch.randn(2, 64), *fmt, torch.randn(3), 64, 16, 32)
    with pytest.raises(ValueError, match="backend"):
        sf.bitmask_linear(torch.randn(2, 64), *fmt, None, 64, 16, 32, backend="cuda")
    bfmt = rf.bsr_encode(block_weight(32, 64, 32, 1.0), 32)
    with pytest.raises(ValueError, match="in_features = 64"):
        sf.bsr_linear(torch.randn(2, 32), *bfmt, None, 64)
    with pytest.raises(ValueError, match="col_indices"):
        sf.bsr_linear(torch.randn(2, 64), bfmt[0], bfmt[1], bfmt[2][:0], None, 64)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_reference(m, dtype):
    w = sparse_weight(768, 3072, 0.1, dtype, "cuda")
    x, b = torch.randn(m, 3072, device="cuda").to(dtype), torch.randn(768, device="cuda").to(dtype)
    check(sf.bitmask_linear(x, *rf.bitmask_encode(w, 32, 64), b, 3072, 32, 64, backend="triton"), x, w, b)
    for block in rf.BSR_BLOCK_SIZES:
        wb = block_weight(768, 3072, block, 0.1, dtype, "cuda")
        check(sf.bsr_linear(x, *rf.bsr_encode(wb, block), b, 3072, backend="triton"), x, wb, b)
