"""Issue 10 item 2: the stream-K forward (kernels/_gemm.py `linear_fwd_streamk_kernel` + its fixup launch,
`fwd(schedule="streamk")`) against fp64 references, under the Triton interpreter on CPU (compiled with
SPARSEBERT_TEST_GPU=1 on a GPU: tests/test_gpu_kernels.py).

The interpreter config is 32x32x32, so (M, K, N) = (1, 72, 61) has 2 tiles x 3 K-iterations, (7, 45, 33)
2 x 2 and (63, 72, 61) 4 x 3; num_sms 3 and 5 make program ranges start and end inside tiles (a tile
shared by up to three programs, a program with partials of two tiles, and tiles finished in place),
num_sms = the iteration count gives every program one iteration. K=72 rows are TMA-eligible in every
dtype, K=45 rows are not (the pointer path). Tolerances as in tests/test_triton_kernels.py (fp32
accumulation in any order, one rounding to the output dtype)."""
import importlib.util

import pytest
import torch

from sparsebert import ops
from sparsebert.kernels import _autotune, _gemm
from sparsebert.kernels.masked_linear import masked_linear_fwd
from tests.test_fused_forward_persistent import mask_cases, tma_possible
from tests.test_fused_small_tokens import inputs, packed_with_padding_set
from tests.test_triton_kernels import DEVICE, DTYPES, assert_close_to_exact, exact_fwd, matmul_exact

# (M, K, N, num_sms)
CASES = [(1, 72, 61, 5), (7, 45, 33, 3), (63, 72, 61, 5)]
INTERPRETED = DEVICE == "cpu"


class Launches:
    """Records the stream-K kernel's and its fixup's launches: (grid, args, kwargs)."""

    def __init__(self, monkeypatch):
        self.main, self.fixup = [], []
        for kernel, calls in ((_gemm.linear_fwd_streamk_kernel, self.main),
                              (_gemm.linear_fwd_streamk_fixup_kernel, self.fixup)):
            self._wrap(monkeypatch, kernel, calls)

    @staticmethod
    def _wrap(monkeypatch, kernel, calls):
        original = kernel.run

        def run(*args, **kwargs):
            grid = kwargs["grid"]
            calls.append((grid({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}) if callable(grid) else grid, args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)


def iterations(m, k, n, block=32):
    return -(-m // block) * -(-n // block) * -(-k // block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,num_sms", CASES)
def test_streamk_matches_reference(m, k, n, num_sms, dtype, monkeypatch):
    """Every mask kind (packed with padding bits set, uint8, scores with a device threshold), with and
    without bias; TMA where the rows allow it (tma=None), pointers otherwise."""
    x, w, b, _, keep = inputs(m, k, n, dtype, seed=m + num_sms)
    launches = Launches(monkeypatch)
    for i, (src, kind, words, tau, keep_) in enumerate(mask_cases(k, n, dtype, keep)):
        bias = None if i == 1 else b
        y = _gemm.fwd(x, w, bias, src, kind, words, 0.0, tau, schedule="streamk", num_sms=num_sms)
        assert_close_to_exact(y, *exact_fwd(x, w, keep_, bias), k, dtype)
    used_tma = [isinstance(args[6], _gemm.TensorDescriptor) for _, args, _ in launches.main]
    assert used_tma == [tma_possible(k, dtype)] * 3
    if INTERPRETED:  # grids of the interpreter's 32x32x32 config
        programs = min(num_sms, iterations(m, k, n))
        assert [grid for grid, _, _ in launches.main] == [(programs,)] * 3
        tiles = -(-m // 32) * -(-n // 32)
        assert [(grid, args[6]) for grid, args, _ in launches.fixup] == [((tiles,), programs)] * 3  # NUM_PROGRAMS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamk_python_threshold_and_pointer_path(dtype):
    """A Python-float threshold (rounded on the host) and tma=False on TMA-eligible rows."""
    m, k, n = 7, 72, 33
    x, w, b, _, _ = inputs(m, k, n, dtype, seed=3)
    scores = torch.randn(n, k, device=DEVICE, dtype=dtype)
    tau = 0.25
    val, ptr = _gemm.threshold_args(tau, scores)
    y = _gemm.fwd(x, w, b, scores, _gemm.MASK_SCORES, 0, val, ptr, schedule="streamk", tma=False, num_sms=5)
    assert_close_to_exact(y, *exact_fwd(x, w, scores >= torch.tensor(tau, dtype=dtype), b), k, dtype)


def test_streamk_deterministic_and_grid_caps(monkeypatch):
    """Two runs agree bit for bit (the fixup sums a tile's partials in program order, no atomics);
    num_sms equal to the iteration count (one iteration per program, every tile fixed up) and above it
    (the grid is capped at the iterations) give the same results."""
    m, k, n = 7, 72, 61  # 2 tiles x 3 iterations; num_sms=5: programs [0,1) [1,2) [2,3) [3,4) [4,6)
    x, w, b, _, keep = inputs(m, k, n, torch.float32, seed=11)
    packed = packed_with_padding_set(keep)
    want = exact_fwd(x, w, keep, b)
    total = iterations(m, k, n)
    launches = Launches(monkeypatch)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 3, 0.0, None, schedule="streamk", num_sms=5)
                for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        for num_sms in (total, 1000):
            y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 3, 0.0, None, schedule="streamk", num_sms=num_sms)
            assert_close_to_exact(y, *want, k, torch.float32)
    finally:
        torch.use_deterministic_algorithms(saved)
    assert_close_to_exact(runs[0], *want, k, torch.float32)
    if not INTERPRETED:
        return  # the counts below are the interpreter config's (32x32x32)
    assert [grid for grid, _, _ in launches.main] == [(5,), (5,), (total,), (total,)]
    assert [args[6] for _, args, _ in launches.fixup] == [5, 5, total, total]
    # workspace: two slots of one 32x32 tile per launched program, not per requested one
    assert [tuple(args[5].shape) for _, args, _ in launches.main] == [(10, 1024)] * 2 + [(2 * total, 1024)] * 2


def test_streamk_default_sm_count_and_empty_k(monkeypatch):
    """num_sms None = DEFAULT_SMS on CPU tensors (capped at the iterations); K = 0 gives y = bias."""
    x, w, b, _, keep = inputs(7, 45, 33, torch.float32, seed=5)
    launches = Launches(monkeypatch)
    y = _gemm.fwd(x, w, b, keep.to(torch.uint8), _gemm.MASK_UINT8, 0, 0.0, None, schedule="streamk")
    assert_close_to_exact(y, *exact_fwd(x, w, keep, b), 45, torch.float32)
    if INTERPRETED:
        assert launches.main[0][0] == (min(_gemm.DEFAULT_SMS, iterations(7, 45, 33)),)
    empty = torch.empty(7, 0, device=DEVICE)
    y = _gemm.fwd(empty, torch.empty(33, 0, device=DEVICE), b, torch.empty(33, 0, dtype=torch.uint8, device=DEVICE),
                  _gemm.MASK_UINT8, 0, 0.0, None, schedule="streamk")
    assert torch.equal(y, b.expand(7, 33))
    assert len(launches.main) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_forward_and_backward_with_streamk_schedule(dtype, monkeypatch):
    """SPARSEBERT_FWD_SCHEDULE=streamk (the module flag it sets): the public op's forward takes the
    stream-K grid and its backward (dx, dW * m, db) is unchanged."""
    m, k, n = 7, 45, 33
    x, w, b, dy, keep = inputs(m, k, n, dtype, seed=7)
    launches = Launches(monkeypatch)
    monkeypatch.setattr(_gemm, "FWD_SCHEDULE", "streamk")
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = ops.masked_linear(xg, wg, bg, keep.to(torch.uint8), backend="triton")
    y.backward(dy)
    assert len(launches.main) == 1 and len(launches.fixup) == 1
    assert_close_to_exact(y.detach(), *exact_fwd(x, w, keep, b), k, dtype)
    assert_close_to_exact(xg.grad, *matmul_exact(dy, w.double() * keep), n, dtype)
    g, g_abs = matmul_exact(dy.t(), x)
    assert_close_to_exact(wg.grad, g * keep, g_abs * keep, m, dtype)
    assert_close_to_exact(bg.grad, dy.double().sum(0), dy.double().abs().sum(0), m, dtype)


def test_schedule_flag_accepts_streamk(monkeypatch):
    """SPARSEBERT_FWD_SCHEDULE=streamk passes the import-time check (a fresh copy of _autotune, executed
    in-process: a subprocess would import torch again)."""
    monkeypatch.setenv("SPARSEBERT_FWD_SCHEDULE", " StreamK ")
    spec = importlib.util.spec_from_file_location("sparsebert.kernels._autotune_flag_check", _autotune.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.FWD_SCHEDULE == "streamk" and "streamk" in _autotune.FWD_SCHEDULES


def test_bad_streamk_arguments_raise_before_launch(monkeypatch):
    x, w, b, _, keep = inputs(7, 45, 33, torch.float32)
    packed = packed_with_padding_set(keep)
    launches = Launches(monkeypatch)

    def call(**kw):
        return _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 2, 0.0, None, **kw)

    for kw, match in [(dict(schedule="stream-k"), "schedule must be one of"),
                      (dict(schedule="streamk", num_sms=0), "num_sms must be a positive int"),
                      (dict(schedule="streamk", num_sms=-3), "num_sms must be a positive int"),
                      (dict(schedule="streamk", num_sms=1.5), "num_sms must be a positive int"),
                      (dict(schedule="streamk", split_k=2), "schedule='streamk' splits K itself"),
                      (dict(schedule="streamk", tma="on"), "tma must be"),
                      (dict(schedule="streamk", tma=True), "not a multiple of 16 bytes"),  # K=45 fp32 rows
                      (dict(schedule="tiles", num_sms=3), "schedule='streamk' and schedule='persistent' only")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="schedule must be one of"):
        masked_linear_fwd(x, w, b, packed, True, schedule="stream_k")
    assert launches.main == [] and launches.fixup == []


@pytest.mark.skipif(not INTERPRETED, reason="swaps the autotuner's benchmarker for a recording one: on a GPU "
                    "the real autotuner runs these kernels (tests/test_gpu_kernels.py)")
def test_autotuning_times_each_config_with_its_fixup(monkeypatch):
    """While the autotuner benchmarks stream-K configs, each timed call is the main kernel and the fixup
    that config needs (the post-hook `_streamk_fixup_in_bench`), so y is complete after every timed call;
    without the hook the shared tiles would hold no result and the fixup's cost would go untimed."""
    import triton
    kern = _gemm.linear_fwd_streamk_kernel
    m, k, n = 37, 100, 45  # 32x32x32: 4 tiles x 4 iterations, 16x32x32: 6 tiles x 4; num_sms 3 shares tiles
    x, w, b, _, keep = inputs(m, k, n, torch.float32, seed=21)
    packed = packed_with_padding_set(keep)
    want = exact_fwd(x, w, keep, b)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3}, num_warps=1, num_stages=1,
                             pre_hook=_gemm._set_tma_blocks) for bm in (32, 16)]
    timed = []

    def recording_bench(kernel_call, quantiles=None):
        y = kern.nargs["y_ptr"]
        y.fill_(float("nan"))
        kernel_call()
        timed.append(y.clone())
        return [float(len(timed))] * 3  # the first config "wins"

    monkeypatch.setattr(kern, "configs", configs)
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setitem(vars(kern), "do_bench", recording_bench)  # over the cached_property, undone after
    y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, 4, 0.0, None, schedule="streamk", num_sms=3)
    assert len(timed) == 2
    for got in (*timed, y):
        assert not got.isnan().any()
        assert_close_to_exact(got, *want, k, torch.float32)
    assert kern.best_config is configs[0]
