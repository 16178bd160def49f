"""Issue 10 item 2: the forward GEMM's packed-mask word tiles and split-K (kernels/_gemm.py), against
fp64 references, under the interpreter on CPU (compiled kernels with SPARSEBERT_TEST_GPU=1 on a GPU).

Odd shapes: K not a multiple of 32 (padding bits in the last word, set to 1 here to prove they are
ignored), tails in every dimension, splits that leave some K chunks empty. Tolerances as in
tests/test_triton_kernels.py (fp32 accumulation, one rounding to the output dtype)."""
import pytest
import torch

from sparsebert.kernels import _gemm
from sparsebert.kernels.masked_linear import masked_linear_bwd_input, masked_linear_bwd_weight, masked_linear_fwd
from tests.test_triton_kernels import DEVICE, DTYPES, assert_close_to_exact, exact_fwd, matmul_exact, pack_bits

# (M, K, N): token count, in features, out features
SHAPES = [(1, 45, 33), (7, 97, 61), (37, 130, 70)]


def packed_with_padding_set(keep):
    """pack_bits(keep) with every padding bit past K set: the kernels must ignore them."""
    packed = pack_bits(keep)
    k = keep.shape[1]
    if k % 32:
        pad = (~((1 << (k % 32)) - 1)) & 0xFFFFFFFF
        pad = pad - 2**32 if pad >= 2**31 else pad
        packed[:, -1] |= torch.tensor(pad, dtype=torch.int32)
    return packed


def inputs(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    keep = (torch.rand(n, k, generator=g) < 0.45).to(DEVICE)
    return x, w, b, dy, keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_packed_mask_word_tiles_forward_and_backward(m, k, n, dtype):
    x, w, b, dy, keep = inputs(m, k, n, dtype)
    packed = packed_with_padding_set(keep)
    assert_close_to_exact(masked_linear_fwd(x, w, b, packed, True), *exact_fwd(x, w, keep, b), k, dtype)
    assert_close_to_exact(masked_linear_bwd_input(dy, w, packed, True), *matmul_exact(dy, w.double() * keep), n, dtype)
    g, g_abs = matmul_exact(dy.t(), x)
    assert_close_to_exact(masked_linear_bwd_weight(dy, x, packed, True), g * keep, g_abs * keep, m, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_split_k_forward(m, k, n, dtype, split_k):
    """Every mask kind and the bias through the split-K partials and their reduction."""
    x, w, b, _, keep = inputs(m, k, n, dtype, seed=split_k)
    packed, words = packed_with_padding_set(keep), (k + 31) // 32
    y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k)
    assert_close_to_exact(y, *exact_fwd(x, w, keep, b), k, dtype)
    y = _gemm.fwd(x, w, None, keep.to(torch.uint8), _gemm.MASK_UINT8, 0, 0.0, None, split_k=split_k)
    assert_close_to_exact(y, *exact_fwd(x, w, keep, None), k, dtype)
    scores = torch.randn(n, k, device=DEVICE, dtype=dtype)
    tau = scores.flatten()[3].float()  # a 0-dim device tensor: read in the kernel
    y = _gemm.fwd(x, w, b, scores, _gemm.MASK_SCORES, 0, 0.0, tau, split_k=split_k)
    assert_close_to_exact(y, *exact_fwd(x, w, scores >= tau.to(dtype), b), k, dtype)


def test_split_k_is_bitwise_deterministic():
    """The partials are summed in a fixed order: repeated runs agree bit for bit, with deterministic
    algorithms on (no atomics are used, so the mode needs no other path)."""
    x, w, b, _, keep = inputs(37, 130, 70, torch.float32, seed=5)
    packed = pack_bits(keep)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 5, 0.0, None, split_k=4) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(saved)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_split_k_bad_value_raises():
    x, w, b, _, keep = inputs(3, 40, 5, torch.float32)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="split_k"):
            _gemm.fwd(x, w, b, pack_bits(keep), _gemm.MASK_PACKED, 2, 0.0, None, split_k=bad)


def test_split_k_choice_from_shapes(monkeypatch):
    """split_k_for's table (132 SMs) as predicted in linear_fwd_kernel's docstring."""
    class Props:
        multi_processor_count = 132
    monkeypatch.setattr(_gemm, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda")
    want = {(16, 768, 768): 4, (64, 768, 768): 4, (512, 768, 768): 4,
            (16, 768, 3072): 4, (64, 768, 3072): 4, (512, 768, 3072): 1,
            (16, 3072, 768): 16, (64, 3072, 768): 16, (512, 3072, 768): 4,
            (4096, 768, 768): 1}
    got = {(m, k, n): _gemm.split_k_for(m, n, k, cuda) for m, k, n in want}
    assert got == want
    assert _gemm.split_k_for(16, 768, 768, torch.device("cpu")) == 1


def test_sass_script_traces_mask_loads_through_the_ptx():
    """check_triton_sass.param_load_bytes counts the loads whose address derives from one parameter."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_triton_sass.py"
    spec = importlib.util.spec_from_file_location("check_triton_sass_h22", path)
    sass = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = sass  # its dataclasses look their module up there
    spec.loader.exec_module(sass)
    ptx = """
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b64 \t%rd2, [k_param_3];
\t.loc\t1 161 24
\tmad.wide.s32 \t%rd9, %r1, 4, %rd2;
$L__BB0_1:
\tadd.s64 \t%rd10, %rd9, 8;
\tcp.async.ca.shared.global [ %r43 + 0 ], [ %rd10 + 0 ], 0x4, %r44;
\t@%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd9 + 0 ];
\tcp.async.cg.shared.global [ %r45 + 0 ], [ %rd1 + 0 ], 0x10, %r46;
"""
    assert sass.param_load_bytes(ptx, 3) == 4 + 16
    assert sass.param_load_bytes(ptx, 0) == 16
    assert sass.param_load_bytes(ptx, 1) == 0
