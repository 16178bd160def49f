"""Issue 10 item 2: the persistent-grid forward (kernels/_gemm.py `linear_fwd_persistent_kernel`, with and
without TMA tensor descriptors for x and W) against fp64 references and against the one-program-per-tile
forward, under the Triton interpreter on CPU (compiled with SPARSEBERT_TEST_GPU=1 on a GPU).

num_sms=3 caps the grid below the tile count, so each program loops over several tiles. K=72 rows are
16-byte multiples in every dtype (TMA-eligible; K is not a multiple of the 32-wide K block); K=45 rows
are not (the pointer fallback). Tolerances as in tests/test_triton_kernels.py (fp32 accumulation, one
rounding to the output dtype)."""
import os
import subprocess
import sys

import pytest
import torch

from sparsebert.kernels import _autotune, _gemm
from sparsebert.kernels.masked_linear import masked_linear_fwd
from sparsebert.kernels.score_masked_linear import score_masked_linear_fwd
from tests.test_fused_small_tokens import inputs, packed_with_padding_set
from tests.test_triton_kernels import DEVICE, DTYPES, assert_close_to_exact, exact_fwd

# (M, K, N): M in 1, 7, 63; N and K not multiples of the blocks
SHAPES = [(1, 72, 61), (7, 45, 33), (63, 72, 61)]
INTERPRETED = DEVICE == "cpu"


def tma_possible(k, dtype):
    return (k * torch.finfo(dtype).bits // 8) % 16 == 0


class Launches:
    """Records the persistent kernel's launches: (grid size for the interpreter tile, kernel args)."""

    def __init__(self, monkeypatch):
        self.calls = []
        kernel = _gemm.linear_fwd_persistent_kernel
        original = kernel.run

        def run(*args, **kwargs):
            self.calls.append((kwargs["grid"]({"BLOCK_M": 32, "BLOCK_N": 32}), args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)


def mask_cases(k, n, dtype, keep):
    """(mask source, kind, words, threshold pointer, keep) for a packed, a uint8 and a scores mask."""
    scores = torch.randn(n, k, device=DEVICE, dtype=dtype)
    tau = scores.flatten()[3].float()  # a 0-dim device tensor: read in the kernel
    return [(packed_with_padding_set(keep), _gemm.MASK_PACKED, (k + 31) // 32, None, keep),
            (keep.to(torch.uint8), _gemm.MASK_UINT8, 0, None, keep),
            (scores, _gemm.MASK_SCORES, 0, tau, scores >= tau.to(dtype))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_persistent_matches_reference_and_tiles(m, k, n, dtype, monkeypatch):
    x, w, b, _, keep = inputs(m, k, n, dtype, seed=m)
    launches = Launches(monkeypatch)
    for src, kind, words, tau, keep_ in mask_cases(k, n, dtype, keep):
        want = exact_fwd(x, w, keep_, b)
        tiles = _gemm.fwd(x, w, b, src, kind, words, 0.0, tau, split_k=1, schedule="tiles")
        assert_close_to_exact(tiles, *want, k, dtype)
        for tma in (None, False):
            y = _gemm.fwd(x, w, b, src, kind, words, 0.0, tau, split_k=1, schedule="persistent", tma=tma, num_sms=3)
            assert_close_to_exact(y, *want, k, dtype)
            if INTERPRETED:  # one interpreter config for both kernels: the same per-tile arithmetic
                assert torch.equal(y, tiles), f"persistent (tma={tma}) differs from the tiles schedule"
    used_tma = [isinstance(args[6], _gemm.TensorDescriptor) for _, args, _ in launches.calls]
    assert used_tma == [tma_possible(k, dtype), False] * 3  # auto takes TMA exactly where it is possible


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(63, 72, 61), (7, 45, 33)])
@pytest.mark.parametrize("split_k", [2, 3])
def test_persistent_split_k_deterministic(m, k, n, dtype, split_k):
    """Split-K on the persistent grid: fp32 partials reduced in a fixed order, so with deterministic
    algorithms on repeated runs agree bit for bit (and, under the interpreter, with the tiles schedule)."""
    x, w, b, _, keep = inputs(m, k, n, dtype, seed=split_k)
    packed, words = packed_with_padding_set(keep), (k + 31) // 32
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tiles = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k, schedule="tiles")
        for tma in ((True, False) if tma_possible(k, dtype) else (False,)):
            runs = [_gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k,
                              schedule="persistent", tma=tma, num_sms=3) for _ in range(2)]
            assert torch.equal(runs[0], runs[1])
            assert_close_to_exact(runs[0], *exact_fwd(x, w, keep, b), k, dtype)
            if INTERPRETED:
                assert torch.equal(runs[0], tiles), f"split-K {split_k}, tma={tma}: differs from the tiles schedule"
    finally:
        torch.use_deterministic_algorithms(saved)


def test_grid_is_capped_and_loops(monkeypatch):
    """min(tiles * split, num_sms) programs, NUM_PROGRAMS = num_sms as the loop stride; num_sms None on
    CPU tensors = DEFAULT_SMS (132); TMA descriptors get the config's block shapes."""
    x, w, b, _, keep = inputs(63, 72, 61, torch.float32)
    packed = packed_with_padding_set(keep)
    launches = Launches(monkeypatch)
    _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 3, 0.0, None, split_k=3, schedule="persistent", num_sms=3)
    _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 3, 0.0, None, split_k=1, schedule="persistent", num_sms=3)
    _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 3, 0.0, None, split_k=2, schedule="persistent", tma=False)
    grids = [grid for grid, _, _ in launches.calls]
    num_programs = [args[15] for _, args, _ in launches.calls]
    expected_programs = _gemm.sm_count(x.device)  # num_sms=None: DEFAULT_SMS on CPU tensors
    assert grids == [(3,), (3,), (min(4 * 2, expected_programs),)]  # 2 x 2 tiles of 32 x 32
    assert num_programs == [3, 3, expected_programs]
    if DEVICE == "cpu":
        assert _gemm.sm_count(x.device) == _gemm.DEFAULT_SMS == 132
        x_desc, w_desc = launches.calls[0][1][6:8]
        assert isinstance(x_desc, _gemm.TensorDescriptor) and isinstance(w_desc, _gemm.TensorDescriptor)
        assert (x_desc.block_shape, w_desc.block_shape) == ([32, 32], [32, 32])  # the interpreter config


def test_default_schedule_follows_the_config_flag(monkeypatch):
    x, w, b, _, keep = inputs(7, 72, 33, torch.float32)
    launches = Launches(monkeypatch)
    monkeypatch.setattr(_gemm, "FWD_SCHEDULE", "tiles")
    masked_linear_fwd(x, w, b, keep.to(torch.uint8), False)
    assert launches.calls == []
    monkeypatch.setattr(_gemm, "FWD_SCHEDULE", "persistent")
    y = masked_linear_fwd(x, w, b, keep.to(torch.uint8), False)
    assert len(launches.calls) == 1
    assert_close_to_exact(y, *exact_fwd(x, w, keep, b), 72, torch.float32)
    scores = torch.randn(33, 72, device=DEVICE)
    y = score_masked_linear_fwd(x, w, None, scores, 0.1, schedule="tiles")  # an explicit schedule wins
    assert len(launches.calls) == 1
    assert_close_to_exact(y, *exact_fwd(x, w, scores >= 0.1, None), 72, torch.float32)
    y = masked_linear_fwd(x, w, b, keep.to(torch.uint8), False, schedule="persistent")
    assert len(launches.calls) == 2


def test_schedule_flag_is_validated_at_import():
    env = {**os.environ, "SPARSEBERT_FWD_SCHEDULE": "stream-k"}
    proc = subprocess.run([sys.executable, "-c", "import sparsebert.kernels._autotune"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "SPARSEBERT_FWD_SCHEDULE must be one of" in proc.stderr
    assert _autotune.FWD_SCHEDULE in _autotune.FWD_SCHEDULES


def test_bad_schedule_arguments_raise_before_launch(monkeypatch):
    x, w, b, _, keep = inputs(7, 45, 33, torch.float32)
    launches = Launches(monkeypatch)
    packed = packed_with_padding_set(keep)

    def call(**kw):
        return _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 2, 0.0, None, **kw)

    for kw, match in [(dict(schedule="stream-k"), "schedule must be one of"),
                      (dict(schedule="persistent", tma="yes"), "tma must be"),
                      (dict(schedule="persistent", num_sms=0), "num_sms must be a positive int"),
                      (dict(schedule="persistent", num_sms=True), "num_sms must be a positive int"),
                      (dict(schedule="persistent", num_sms=2.5), "num_sms must be a positive int"),
                      (dict(schedule="tiles", num_sms=3), "schedule='persistent' only"),
                      (dict(schedule="tiles", tma=True), "schedule='persistent' only"),
                      (dict(schedule="persistent", tma=True), "not a multiple of 16 bytes")]:  # K=45 fp32 rows
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="schedule must be one of"):
        masked_linear_fwd(x, w, b, packed, True, schedule="Persistent")
    assert launches.calls == []


def test_tma_feature_detection(monkeypatch):
    """The reasons TMA is refused; the interpreter accepts aligned rows on CPU tensors."""
    x = torch.randn(4, 72)
    w = torch.randn(8, 72)
    monkeypatch.setattr(_gemm, "INTERPRET", True)
    assert _gemm.tma_unsupported(x, w) is None
    assert "16-byte aligned" in _gemm.tma_unsupported(torch.randn(4 * 72 + 1)[1:].view(4, 72), w)
    assert "16 bytes" in _gemm.tma_unsupported(torch.randn(4, 45), torch.randn(8, 45))
    monkeypatch.setattr(_gemm, "INTERPRET", False)
    assert "CUDA tensors" in _gemm.tma_unsupported(x, w)
    monkeypatch.setattr(_gemm, "TensorDescriptor", None)
    assert "no triton.tools.tensor_descriptor" in _gemm.tma_unsupported(x, w)


def test_tma_needs_sm90(monkeypatch):
    monkeypatch.setattr(_gemm, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))

    class FakeCuda:  # only .device and the pointer/shape queries are read
        device = torch.device("cuda")
        shape = (4, 72)

        def data_ptr(self):
            return 0

        def element_size(self):
            return 2

    assert "sm_90" in _gemm.tma_unsupported(FakeCuda(), FakeCuda())


def test_compile_counter_specialises_descriptors_by_dtype_and_block():
    """A descriptor argument counts as (dtype, block shape), not as the repr of its tensor's values."""
    desc = _gemm.TensorDescriptor(torch.zeros(4, 64, dtype=torch.bfloat16), [4, 64], [64, 1], [32, 32])
    assert _autotune._specialisation(desc, False) == ("tensordesc", "torch.bfloat16", (32, 32))
