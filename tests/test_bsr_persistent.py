"""The persistent (weight-stationary) BSR schedule under the Triton interpreter, against the fp64 product
of the same values with the error bound of an fp32 accumulation of K terms plus one rounding to the
output dtype (test_triton_kernels.assert_close_to_exact): odd token counts, empty and all-dense block
rows, every dtype; and the autotune key's density bucket. The GPU sweep of every config is in
test_gpu_kernels.py."""
import pytest
import torch

from sparsebert.kernels import bsr_linear as bsr_mod
from sparsebert.ops import reference_formats as rf

from test_sparse_format_kernels import DTYPES, block_weight
from test_triton_kernels import assert_close_to_exact, exact_fwd


def check(y, x, w, b):
    assert y.shape == (x.shape[0], w.shape[0])
    assert_close_to_exact(y, *exact_fwd(x, w, 1.0, b), x.shape[1], x.dtype)


def mixed_weight(n, k, block, dtype):
    """Block rows of every kind: empty (the first), all dense (the last), the rest at half density."""
    w = block_weight(n, k, block, 0.5, dtype)
    w[:block] = 0
    w[-block:] = torch.randn(block, k).to(dtype)
    return w


# (M, N, K, B): M never a multiple of the interpreter's BLOCK_M (16); N, K multiples of B
SHAPES = [(1, 64, 96, 16), (37, 96, 128, 32), (70, 128, 192, 64), (33, 48, 32, 16)]


@pytest.mark.parametrize("m,n,k,block", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_persistent_matches_reference(m, n, k, block, dtype):
    w = mixed_weight(n, k, block, dtype)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    fmt = rf.bsr_encode(w, block)
    check(bsr_mod.bsr_linear_fwd(x, *fmt, b, k, schedule="persistent"), x, w, b)
    check(bsr_mod.bsr_linear_fwd(x, *fmt, None, k, schedule="persistent"), x, w, None)


def test_programs_loop_over_several_m_tiles():
    """Under the interpreter (2 SMs, 16-token tiles) one block row gets at most 4 programs, so 70 tokens
    (5 tiles) make some programs run two tiles through the flattened loop."""
    assert bsr_mod.sm_count(torch.device("cpu")) == bsr_mod.INTERPRETER_SMS
    assert bsr_mod.m_splits(70, 1, 16, bsr_mod.INTERPRETER_SMS) == 4
    assert bsr_mod.m_splits(70, 8, 16, bsr_mod.INTERPRETER_SMS) == 1
    assert bsr_mod.m_splits(1, 1, 16, 132) == 1
    w = mixed_weight(64, 128, 64, torch.float32)[:64] + block_weight(64, 128, 64, 1.0)  # one dense block row
    x, b = torch.randn(70, 128), torch.randn(64)
    check(bsr_mod.bsr_linear_fwd(x, *rf.bsr_encode(w, 64), b, 128, schedule="persistent"), x, w, b)


@pytest.mark.parametrize("bias", [True, False])
def test_persistent_weight_without_blocks(bias):
    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    x, b = torch.randn(37, 32).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16) if bias else None
    check(bsr_mod.bsr_linear_fwd(x, *rf.bsr_encode(w, 16), b, 32, schedule="persistent"), x, w, b)


@pytest.mark.parametrize("schedule", ["tiles", "persistent", "auto"])
def test_no_tokens(schedule):
    w = block_weight(32, 32, 16, 1.0)
    y = bsr_mod.bsr_linear_fwd(torch.randn(0, 32), *rf.bsr_encode(w, 16), None, 32, schedule=schedule)
    assert y.shape == (0, 32)


def test_auto_schedule_is_persistent_for_many_tokens(monkeypatch):
    launched = []
    for name in ("_bsr_linear_kernel", "_bsr_linear_persistent_kernel"):
        kernel = getattr(bsr_mod, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launched.append(name)
                return kernel[grid]
        monkeypatch.setattr(bsr_mod, name, Spy())
    w = block_weight(32, 32, 16, 0.5)
    fmt = rf.bsr_encode(w, 16)
    for m in (bsr_mod.PERSISTENT_MIN_TOKENS - 1, bsr_mod.PERSISTENT_MIN_TOKENS):
        x = torch.randn(m, 32)
        check(bsr_mod.bsr_linear_fwd(x, *fmt, None, 32), x, w, None)
    assert launched == ["_bsr_linear_kernel", "_bsr_linear_persistent_kernel"]


def test_unknown_schedule_is_named():
    w = block_weight(32, 32, 16, 1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        bsr_mod.bsr_linear_fwd(torch.randn(2, 32), *rf.bsr_encode(w, 16), None, 32, schedule="fast")


def test_autotune_keys_carry_density_and_token_buckets():
    """A config tuned at density 1.0 must not be reused at 0.1: both kernels key on the density bucket."""
    for kernel in (bsr_mod._bsr_linear_kernel, bsr_mod._bsr_linear_persistent_kernel):
        assert {"M_BUCKET", "DENSITY_BUCKET", "N", "K", "B"} <= set(kernel.keys), kernel.keys
    # 3072 x 768 weight in 64-blocks: 48 block rows of 12 block columns
    assert bsr_mod.density_bucket(48 * 12, 48) == 16  # dense
    assert bsr_mod.density_bucket(58, 48) == 2  # 10%: ~1.2 blocks per row
    assert bsr_mod.density_bucket(0, 48) == 1
    assert bsr_mod.density_bucket(12 * 48 // 10, 12) == 8  # 768 x 3072 at 10%: ~4.8 blocks per row
