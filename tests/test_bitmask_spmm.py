"""The tc-bitmask format (tile-contiguous bitmask + values) and `sparsebert.ops.bitmask_spmm`.

Triton runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py). The CUDA kernel cannot run here:
it is compiled for sm_90a with its resources checked by scripts/check_cuda_resources.py (test below, needs
nvcc), checked against a host loop by the CMake self-test (csrc/cuda/selftest.cu, GPU suite), and against
the torch reference by the `cuda`-marked test (GPU only).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import bitmask_spmm
from sparsebert.ops import reference_formats as rf
from sparsebert.ops.bitmask_spmm import spmm_backends
from sparsebert.ops.sparse_formats import validate_tc_bitmask_format
from tests._helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sparse_weight(n, k, density, dtype, device="cpu"):
    w = torch.randn(n, k, device=device) * (torch.rand(n, k, device=device) < density)
    return w.to(dtype)


def reference(x, w, b):
    """fp32 product of the same (possibly 16-bit) values."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


# --------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 45), (64, 64), (130, 200), (3, 700)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_encode_decode_round_trip(dtype, shape, density):
    w = sparse_weight(*shape, density, dtype)
    data, offsets = rf.tc_bitmask_encode(w)
    assert data.dtype == dtype and offsets.dtype == torch.int32
    nt, kt = -(-shape[0] // 64), -(-shape[1] // 64)
    assert offsets.shape == (nt * kt + 1,) and int(offsets[-1]) == data.numel()
    assert (offsets.long() * data.element_size() % 16 == 0).all(), "every tile starts 16-byte aligned"
    assert torch.equal(rf.tc_bitmask_decode(data, offsets, *shape), w)
    validate_tc_bitmask_format(data, offsets, *shape)


def test_subtile_order_matches_the_mma_fragments():
    """Element (9, 17) of a tile: rows R=0, Qr=1, row 1; columns S=1, Qc=0, column 1 -> word 5, bit 9."""
    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    w[9, 17], w[63, 0] = 5.0, 7.0  # (63, 0): R=3, Qr=1, row 7; S=0, Qc=0, col 0 -> word 49, bit 56
    data, offsets = rf.tc_bitmask_encode(w)
    words = data.view(torch.int64)[:64]
    assert words.nonzero().flatten().tolist() == [5, 49]
    assert int(words[5]) == 1 << 9 and int(words[49]) == 1 << 56
    header = rf.tc_header_elems(torch.bfloat16)
    assert data[header:header + 2].tolist() == [5.0, 7.0]  # word order first
    assert data.numel() == header + 8  # two values padded to 16 bytes


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (768, 768)])
def test_memory_at_most_045_of_dense_bf16_at_30_percent(shape):
    torch.manual_seed(0)
    w = sparse_weight(*shape, 0.3, torch.bfloat16)
    data, offsets = rf.tc_bitmask_encode(w)
    ratio = rf.tc_bitmask_nbytes(data, offsets) / (w.numel() * 2)
    assert ratio <= 0.45, ratio
    assert ratio >= 0.3 * 1.0 + 1 / 16, "the bitmask (1 bit per weight) and the values must all be counted"


def test_validator_names_what_is_wrong():
    w = sparse_weight(70, 90, 0.3, torch.bfloat16)
    data, offsets = rf.tc_bitmask_encode(w)
    with pytest.raises(ValueError, match="tile_offsets must have 5 entries"):
        validate_tc_bitmask_format(data, offsets[:-1], 70, 90)
    bad = offsets.clone()
    bad[1] += 8
    with pytest.raises(ValueError, match="tile 0 spans"):
        validate_tc_bitmask_format(data, bad, 70, 90)
    with pytest.raises(TypeError, match="tile_offsets must be int32"):
        validate_tc_bitmask_format(data, offsets.long(), 70, 90)
    extra_bit = data.clone()
    extra_bit.view(torch.int64)[int(offsets[1]) * 2 // 8 + 8] = -1  # 64 more set bits in tile 1 (word 8 was 0)
    with pytest.raises(ValueError, match="tile 1 "):
        validate_tc_bitmask_format(extra_bit, offsets, 70, 90)


def test_validator_catches_a_bit_past_the_edge_with_consistent_counts():
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    w[0, 65] = 1.0  # column 65: inside a (64, 128) weight, past the edge of a (64, 65) one (same tile grid)
    data, offsets = rf.tc_bitmask_encode(w)
    validate_tc_bitmask_format(data, offsets, 64, 128)
    with pytest.raises(ValueError, match="tile 1 has bitmask bits set past the weight's edges"):
        validate_tc_bitmask_format(data, offsets, 64, 65)


# ------------------------------------------------------------------------------------------------ op
CASES = [(1, 1, 1), (5, 17, 45), (13, 130, 200), (33, 64, 129), (64, 70, 64), (3, 65, 700)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", CASES)
def test_torch_backend_matches_dense(dtype, m, n, k):
    w = sparse_weight(n, k, 0.3, dtype)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    data, offsets = rf.tc_bitmask_encode(w)
    y = bitmask_spmm(x, data, offsets, b, n, k, backend="torch")
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y.float(), reference(x, w, b), dtype, "torch backend")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("split_k", [0, 1, 3])
def test_triton_fallback_matches_dense(dtype, m, n, k, split_k):
    torch.manual_seed(m * 1000 + n + k)
    w = sparse_weight(n, k, 0.3, dtype)
    x, b = torch.randn(m, k).to(dtype), (torch.randn(n).to(dtype) if n % 2 else None)
    data, offsets = rf.tc_bitmask_encode(w)
    y = bitmask_spmm(x, data, offsets, b, n, k, backend="triton", split_k=split_k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y.float(), reference(x, w, b), dtype, f"triton split_k={split_k}")
    again = bitmask_spmm(x, data, offsets, b, n, k, backend="triton", split_k=split_k)
    assert torch.equal(y, again), "the split-K reduction must be bitwise reproducible"


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_triton_fallback_empty_and_full_tiles(density):
    w = sparse_weight(96, 150, density, torch.bfloat16)
    x = torch.randn(2, 4, 150).to(torch.bfloat16)  # leading batch dims
    data, offsets = rf.tc_bitmask_encode(w)
    y = bitmask_spmm(x, data, offsets, None, 96, 150, backend="triton", split_k=2)
    assert y.shape == (2, 4, 96)
    if density == 0.0:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert_close(y.float(), reference(x, w, None), torch.bfloat16, "full tiles")


def test_bad_input_is_named():
    w = sparse_weight(20, 40, 0.3, torch.bfloat16)
    data, offsets = rf.tc_bitmask_encode(w)
    x = torch.randn(3, 40).to(torch.bfloat16)
    with pytest.raises(ValueError, match="in_features = 41"):
        bitmask_spmm(x, data, offsets, None, 20, 41)
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        bitmask_spmm(x.float(), data, offsets, None, 20, 40)
    with pytest.raises(ValueError, match="tile_offsets must have 2 entries"):
        bitmask_spmm(x, data, torch.zeros(3, dtype=torch.int32), None, 20, 40)
    with pytest.raises(TypeError, match="tile_offsets must be int32"):
        bitmask_spmm(x, data, offsets.long(), None, 20, 40)
    with pytest.raises(ValueError, match="bias must have out_features = 20"):
        bitmask_spmm(x, data, offsets, torch.zeros(21, dtype=torch.bfloat16), 20, 40)
    with pytest.raises(ValueError, match="split_k"):
        bitmask_spmm(x, data, offsets, None, 20, 40, split_k=-1)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        bitmask_spmm(x, data[:-1], offsets, None, 20, 40)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        bitmask_spmm(x.float(), data.float(), offsets, None, 20, 40, backend="cuda")


def test_misaligned_data_view_is_copied_not_misread():
    w = sparse_weight(20, 40, 0.5, torch.float16)
    data, offsets = rf.tc_bitmask_encode(w)
    shifted = torch.cat([torch.zeros(1, dtype=data.dtype), data])[1:]  # same values, 2 bytes off alignment
    x = torch.randn(3, 40).to(torch.float16)
    y = bitmask_spmm(x, shifted, offsets, None, 20, 40, backend="triton")
    assert_close(y.float(), reference(x, w, None), torch.float16, "misaligned view")


# ------------------------------------------------------------------------------------------ CUDA kernel
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", CASES + [(8, 768, 3072), (64, 3072, 768), (16, 768, 768), (100, 193, 333)])
@pytest.mark.parametrize("density", [0.1, 0.3])
@pytest.mark.parametrize("split_k", [0, 1, 3])
def test_cuda_kernel_matches_reference(dtype, m, n, k, density, split_k):
    if "cuda" not in spmm_backends(dtype):
        pytest.skip("the extension was built without the CUDA bitmask_spmm kernel")
    w = sparse_weight(n, k, density, dtype, "cuda")
    x, b = torch.randn(m, k, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype)
    data, offsets = rf.tc_bitmask_encode(w)
    y = bitmask_spmm(x, data, offsets, b, n, k, backend="cuda", split_k=split_k)
    assert_close(y.float(), reference(x, w, b), dtype, f"cuda split_k={split_k}")
    assert torch.equal(y, bitmask_spmm(x, data, offsets, b, n, k, backend="cuda", split_k=split_k))
    ref = bitmask_spmm(x, data, offsets, b, n, k, backend="torch")
    assert_close(y.float(), ref.float(), dtype, "cuda vs torch backend")


# ------------------------------------------------------------------------------ resources (needs nvcc)
sys.path.insert(0, str(ROOT / "scripts"))
import check_cuda_resources  # noqa: E402


def test_ptxas_parser_flags_spills():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 35844 bytes smem\n"
           "ptxas info    : Compiling entry function '_Z1jv' for 'sm_90a'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers\n")
    k, j = check_cuda_resources.parse_ptxas(log)
    assert (k["name"], k["registers"], k["spill_stores"], k["spill_loads"], k["smem"]) == ("_Z1kv", 255, 8, 4, 35844)
    assert (j["registers"], j["spill_stores"], j["smem"]) == (40, 0, 0)


@pytest.mark.skipif(check_cuda_resources.find_nvcc() is None, reason="nvcc not found (PATH, NVCC, CUDA_HOME)")
def test_cuda_kernels_compile_for_sm90a_without_spills():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_resources.py")], capture_output=True,
                          text=True, timeout=3600, env={**os.environ})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "bitmask_spmm.cu sm_90a: 8 kernels" in proc.stdout, proc.stdout
    assert "check_cuda_resources: no spills" in proc.stdout
