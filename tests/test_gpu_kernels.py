"""Every Triton kernel in sparsebert.kernels on odd (tail) shapes and each dtype, on the `device` of the
parameter: "cpu" runs the kernels under the Triton interpreter (so a GPU run is never their first run),
"cuda" (marked `cuda`; run with SPARSEBERT_TEST_GPU=1 pytest -m cuda) runs them compiled, with more and
larger shapes. Also every autotune config of every kernel, forced once on a tail shape.

References and tolerances are those of the CPU kernel tests, imported from them: test_triton_kernels
(fp64 exact products, error bound from the accumulation), test_sparse_format_kernels (bitmask / BSR) and
test_pruned_kernels (pruned FFN / attention).
"""
import contextlib
import functools

import pytest
import torch

from sparsebert.kernels import _autotune, _gemm
from sparsebert.kernels import bitmask_linear as bitmask_mod
from sparsebert.kernels import bsr_linear as bsr_mod
from sparsebert.kernels import pruned_attention as attention_mod
from sparsebert.kernels import pruned_ffn as ffn_mod
from sparsebert.kernels.masked_linear import masked_linear_bwd_input, masked_linear_bwd_weight, masked_linear_fwd
from sparsebert.kernels.score_masked_linear import (
    score_masked_linear_bwd_input,
    score_masked_linear_bwd_weight_scores,
    score_masked_linear_fwd,
)
from sparsebert.kernels.masked_linear import masked_linear_bwd_weight_bias
from sparsebert.kernels.score_masked_linear import score_masked_linear_bwd_weight_scores_bias
from sparsebert.kernels.topk_threshold import topk_threshold
from sparsebert.ops import reference as R
from sparsebert.ops import reference_formats as rf

from _helpers import device_cases, skip_unless_triton_runs_on
from test_pruned_kernels import TOL as PRUNED_TOL
from test_sparse_format_kernels import TOL as FORMAT_TOL
from test_sparse_format_kernels import block_weight, check, sparse_weight
from test_triton_kernels import assert_close_to_exact, exact_fwd, kth_smallest, matmul_exact, pack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the pruned-kernel CPU tests cover fp32 and bf16; fp16 takes the format kernels' fp16 tolerance (the same
# arithmetic: 16-bit operands, fp32 accumulation, one rounding of the output)
PRUNED_TOLS = {**PRUNED_TOL, torch.float16: FORMAT_TOL[torch.float16]}


def _ids(v):
    return str(v).replace("torch.", "")


@pytest.fixture(autouse=True)
def _triton_on_device(request):
    device = request.node.callspec.params.get("device") if hasattr(request.node, "callspec") else None
    if device is not None:
        skip_unless_triton_runs_on(device)


def linear_inputs(m, k, n, dtype, device, bias=True):
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    dy = torch.randn(m, n, device=device, dtype=dtype)
    return x, w, b, dy


# ------------------------------------------------------------------------------------------ GEMM kernels
# (M, K, N): tails in every dimension (K = 70: a packed mask's last word has padding bits)
CPU_SHAPES = [(37, 70, 53)]
GPU_SHAPES = [(1, 33, 17), (300, 257, 129), (1000, 769, 3071), (8193, 200, 130)]  # the last: split-M weight grad


@pytest.mark.parametrize("device,m,k,n,dtype", device_cases(
    [(*s, d) for s in CPU_SHAPES for d in DTYPES], [(*s, d) for s in GPU_SHAPES for d in DTYPES]), ids=_ids)
def test_masked_linear_kernels(device, m, k, n, dtype):
    x, w, b, dy = linear_inputs(m, k, n, dtype, device)
    keep = torch.rand(n, k, device=device) < 0.4
    y_exact, y_abs = exact_fwd(x, w, keep, b)
    dx_exact, dx_abs = matmul_exact(dy, w.double() * keep)
    g, g_abs = matmul_exact(dy.t(), x)
    for mask, packed in ((keep.to(torch.uint8), False), (pack_bits(keep), True)):
        assert_close_to_exact(masked_linear_fwd(x, w, b, mask, packed), y_exact, y_abs, k, dtype)
        assert_close_to_exact(masked_linear_bwd_input(dy, w, mask, packed), dx_exact, dx_abs, n, dtype)
        dw = masked_linear_bwd_weight(dy, x, mask, packed)
        assert_close_to_exact(dw, g * keep, g_abs, m, dtype)
        assert (dw[~keep] == 0).all()


# split-K, the persistent grid and stream-K (issue 10 item 2) compiled: small token counts at BERT-base
# widths, where split_k_for splits K, plus tails; persistent and stream-K with and without TMA (K=769 rows
# are not 16-byte multiples: the pointer fallback). The CPU runs of the same paths are in
# tests/test_fused_forward_persistent.py and tests/test_fused_forward_streamk.py.
SPLIT_K_GPU_SHAPES = [(8, 768, 768), (64, 768, 3072), (63, 3072, 768), (300, 769, 129)]


@pytest.mark.parametrize("device,m,k,n,dtype", device_cases(
    [], [(*s, d) for s in SPLIT_K_GPU_SHAPES for d in DTYPES]), ids=_ids)
def test_masked_linear_fwd_split_k_and_persistent(device, m, k, n, dtype):
    x, w, b, _ = linear_inputs(m, k, n, dtype, device)
    keep = torch.rand(n, k, device=device) < 0.4
    packed, words = pack_bits(keep), (k + 31) // 32
    want = exact_fwd(x, w, keep, b)
    assert_close_to_exact(masked_linear_fwd(x, w, b, packed, True), *want, k, dtype)  # split_k_for's choice
    split_k = 3  # uneven chunks (the automatic choice above is a power of two); one value: fewer compiles
    tiles = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k, schedule="tiles")
    assert_close_to_exact(tiles, *want, k, dtype)
    for tma in (None, False):
        for num_sms in (None, 3):  # the device's SM count, and a grid far below the items
            y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k,
                          schedule="persistent", tma=tma, num_sms=num_sms)
            assert_close_to_exact(y, *want, k, dtype)
    with deterministic():
        runs = [_gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, split_k=split_k,
                          schedule="persistent") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    for tma in (None, False):  # stream-K: the device's SM count, and 3 programs (ranges end mid-tile)
        for num_sms in (None, 3):
            y = _gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, schedule="streamk", tma=tma,
                          num_sms=num_sms)
            assert_close_to_exact(y, *want, k, dtype)
    with deterministic():
        runs = [_gemm.fwd(x, w, b, packed, _gemm.MASK_PACKED, words, 0.0, None, schedule="streamk")
                for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@contextlib.contextmanager
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


# (x / weight dtype, scores dtype)
SCORE_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("device,m,k,n,dtype,scores_dtype", device_cases(
    [(*s, *d) for s in CPU_SHAPES for d in SCORE_DTYPES],
    [(*s, *d) for s in GPU_SHAPES for d in SCORE_DTYPES + [(torch.float32, torch.bfloat16)]]), ids=_ids)
def test_score_masked_linear_kernels(device, m, k, n, dtype, scores_dtype):
    x, w, b, dy = linear_inputs(m, k, n, dtype, device)
    scores = torch.randn(n, k, device=device, dtype=scores_dtype)
    tau = scores.flatten()[7].float()  # 0-dim device tensor holding a score: ties at tau are kept
    keep = scores >= tau.to(scores_dtype)
    assert 0 < int(keep.sum()) < keep.numel()
    threshold = float(tau.cpu())
    assert_close_to_exact(score_masked_linear_fwd(x, w, b, scores, tau), *exact_fwd(x, w, keep, b), k, dtype)
    assert_close_to_exact(score_masked_linear_fwd(x, w, None, scores, threshold), *exact_fwd(x, w, keep, None), k,
                          dtype)
    assert_close_to_exact(score_masked_linear_bwd_input(dy, w, scores, tau), *matmul_exact(dy, w.double() * keep), n,
                          dtype)
    g, g_abs = matmul_exact(dy.t(), x)
    dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, w, scores, tau, True)
    assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), m, scores_dtype)
    assert_close_to_exact(dweight, g * keep, g_abs, m, dtype)
    dscores_only, none = score_masked_linear_bwd_weight_scores(dy, x, w, scores, threshold, False)
    assert none is None and torch.equal(dscores_only, dscores)


@pytest.mark.parametrize("device,m,k,n,dtype", device_cases(
    [], [(*s, d) for s in GPU_SHAPES for d in DTYPES]), ids=_ids)
def test_fused_db_kernels(device, m, k, n, dtype):
    """Compiled twin of tests/test_fused_db.py: db reduced in the weight-gradient kernel (the last shape
    takes the split-M path and its finalize kernel); dW and dScores unchanged by it."""
    x, w, _, dy = linear_inputs(m, k, n, dtype, device)
    keep = torch.rand(n, k, device=device) < 0.4
    scores = torch.randn(n, k, device=device, dtype=dtype)
    db_exact, db_abs = dy.double().sum(0), dy.double().abs().sum(0)
    g, g_abs = matmul_exact(dy.t(), x)
    dw, db = masked_linear_bwd_weight_bias(dy, x, pack_bits(keep), True, True)
    assert_close_to_exact(db, db_exact, db_abs, m, dtype)
    assert torch.equal(dw, masked_linear_bwd_weight(dy, x, pack_bits(keep), True))
    dscores, dweight, db_s = score_masked_linear_bwd_weight_scores_bias(dy, x, w, scores, 0.25, True, True)
    assert_close_to_exact(db_s, db_exact, db_abs, m, dtype)
    assert_close_to_exact(dweight, g * (scores >= 0.25), g_abs, m, dtype)
    assert torch.equal(dscores, score_masked_linear_bwd_weight_scores(dy, x, w, scores, 0.25, False)[0])
    again = masked_linear_bwd_weight_bias(dy, x, pack_bits(keep), True, True)  # deterministic: no atomics
    assert torch.equal(again[0], dw) and torch.equal(again[1], db)


@pytest.mark.parametrize("device,sizes", device_cases(
    [(((37, 70), (1001,), (5, 7)),)], [(((1000, 769), (3_000_001,), (129, 257)),)]), ids=_ids)
def test_topk_threshold_kernel(device, sizes):
    tensors = [torch.randn(s, device=device).to(d) for s, d in zip(sizes, DTYPES)]  # fp32, fp16, bf16 mixed
    n = sum(t.numel() for t in tensors)
    for k_prune in (0, 1, 777, n // 2, n - 1):
        tau = topk_threshold(tensors, k_prune)
        assert tau.device.type == device and tau.dtype == torch.float32 and tau.dim() == 0
        assert tau.item() == kth_smallest(tensors, k_prune), k_prune
    for t in tensors:  # one tensor of each dtype alone
        assert topk_threshold(t, t.numel() // 3).item() == kth_smallest([t], t.numel() // 3)


# ------------------------------------------------------------------------------------------ sparse formats
@pytest.mark.parametrize("device,m,n,k,tile,dtype", device_cases(
    [(37, 53, 70, (16, 32), d) for d in DTYPES],
    [(m, 768 + 5, 3072 + 31, (32, 64), d) for m in (1, 63, 300) for d in DTYPES]), ids=_ids)
def test_bitmask_linear_kernel(device, m, n, k, tile, dtype):
    w = sparse_weight(n, k, 0.3, dtype, device)
    w[: n // 2, : min(k, 32)] = 0  # empty stretches of rows, partial tiles
    x, b = torch.randn(m, k, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    fmt = rf.bitmask_encode(w, *tile)
    for split_k in (1, 3):
        check(bitmask_mod.bitmask_linear_fwd(x, *fmt, b, k, *tile, split_k=split_k), x, w, b)
    check(bitmask_mod.bitmask_linear_fwd(x, *fmt, None, k, *tile), x, w, None)  # split-K chosen from the shape


@pytest.mark.parametrize("device,m,n,k,block,dtype", device_cases(
    [(37, 64, 96, 16, d) for d in DTYPES] + [(37, 64, 128, 64, torch.bfloat16)],
    [(m, 768, 3072, blk, d) for m in (1, 300) for blk in rf.BSR_BLOCK_SIZES for d in DTYPES]), ids=_ids)
def test_bsr_linear_kernel(device, m, n, k, block, dtype):
    w = block_weight(n, k, block, 0.5, dtype, device)
    w[:block] = 0  # one empty block row
    x, b = torch.randn(m, k, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    fmt = rf.bsr_encode(w, block)
    check(bsr_mod.bsr_linear_fwd(x, *fmt, b, k), x, w, b)
    check(bsr_mod.bsr_linear_fwd(x, *fmt, None, k), x, w, None)


# ------------------------------------------------------------------------------------------ pruned kernels
def ffn_inputs(m, d, inter, n_keep, dtype, device):
    x = torch.randn(m, d, device=device).to(dtype)
    w_in, b_in = (torch.randn(inter, d, device=device) / d ** 0.5).to(dtype), torch.randn(inter, device=device).to(dtype)
    w_out, b_out = (torch.randn(d, inter, device=device) / inter ** 0.5).to(dtype), torch.randn(d, device=device).to(dtype)
    keep = torch.randperm(inter, device=device)[:n_keep].sort().values
    return x, w_in, b_in, w_out, b_out, keep


@pytest.mark.parametrize("device,m,d,inter,n_keep,dtype", device_cases(
    [(37, 70, 53, 29, d) for d in DTYPES], [(m, 768, 3072, 1001, d) for m in (1, 300) for d in DTYPES]), ids=_ids)
def test_pruned_ffn_kernel(device, m, d, inter, n_keep, dtype):
    x, w_in, b_in, w_out, b_out, keep = ffn_inputs(m, d, inter, n_keep, dtype, device)
    got = ffn_mod.pruned_ffn(x, w_in, b_in, w_out, b_out, keep)
    want = R.pruned_ffn(*(t.float() for t in (x, w_in, b_in, w_out, b_out)), keep)  # fp32 from the same values
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **PRUNED_TOLS[dtype])
    # one-sided gathers, no bias: rows only (FFN-in) and columns only (FFN-out)
    h = ffn_mod.gathered_linear(x, w_in, None, rows=keep, gelu=True)
    torch.testing.assert_close(h.float(), torch.nn.functional.gelu(x.float() @ w_in.float()[keep].t()),
                               **PRUNED_TOLS[dtype])


def attention_inputs(batch, length, d, head_size, dtype, device):
    x = torch.randn(batch, length, d, device=device).to(dtype)
    ws = []
    for _ in range(4):
        ws += [(torch.randn(d, d, device=device) / d ** 0.5).to(dtype), torch.randn(d, device=device).to(dtype) * 0.1]
    key_mask = torch.ones(batch, length, dtype=torch.int32, device=device)
    key_mask[0, length // 2:] = 0  # padding in some rows; every row keeps at least one key
    key_mask[-1, 1:] = 0
    return x, ws, key_mask


@pytest.mark.parametrize("device,batch,length,d,head_size,heads,dtype", device_cases(
    [(3, 19, 40, 8, [0, 2, 3], d) for d in DTYPES],
    [(b, L, 768, 64, hs, d) for b, L in ((2, 129), (5, 384)) for hs in ([0, 3, 4, 7, 11], list(range(12)))
     for d in DTYPES]), ids=_ids)
def test_pruned_attention_kernel(device, batch, length, d, head_size, heads, dtype):
    x, ws, key_mask = attention_inputs(batch, length, d, head_size, dtype, device)
    heads = torch.tensor(heads, device=device)
    got = attention_mod.pruned_attention(x, *ws, heads, head_size, key_mask)
    want = R.pruned_attention(x.float(), *(w.float() for w in ws), heads, head_size, key_mask)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **PRUNED_TOLS[dtype])


# ------------------------------------------------------------------------------------------ autotune configs
def full_gpu_configs(config_fn):
    """A kernel's full GPU config list (as `@triton.autotune` gets it on a GPU with SPARSEBERT_AUTOTUNE=full),
    also under the interpreter and in quick mode."""
    saved = _autotune.INTERPRET, _autotune.MODE
    _autotune.INTERPRET, _autotune.MODE = False, "full"
    try:
        return config_fn()
    finally:
        _autotune.INTERPRET, _autotune.MODE = saved


forced = _autotune.forced_config  # one config per launch (see kernels/_autotune.py)


# (M, K, N) tail shapes. GPU: a tail for every tile of every list (257 = 256 + 1 tokens, 129 = 128 + 1 and
# 200 = 3 * 64 + 8 features). CPU: small, so the interpreter stays fast; one partial tile for the big tiles.
TAIL = {"cuda": (257, 200, 129), "cpu": (37, 70, 53)}


def _gemm_fwd(dtype, device):
    M_TAIL, K_TAIL, N_TAIL = TAIL[device]
    x, w, b, _ = linear_inputs(M_TAIL, K_TAIL, N_TAIL, dtype, device)
    keep = torch.rand(N_TAIL, K_TAIL, device=device) < 0.4
    scores = torch.randn(N_TAIL, K_TAIL, device=device, dtype=dtype)
    tau = scores.flatten()[5].float()
    keep_s = scores >= tau.to(dtype)

    def run():
        assert_close_to_exact(masked_linear_fwd(x, w, b, pack_bits(keep), True), *exact_fwd(x, w, keep, b), K_TAIL, dtype)
        assert_close_to_exact(score_masked_linear_fwd(x, w, None, scores, tau), *exact_fwd(x, w, keep_s, None), K_TAIL,
                              dtype)
    return run


def _gemm_fwd_scheduled(schedule, split_k):
    """The persistent / stream-K forward at the tail shape with K rounded up to a multiple of 8 (TMA-eligible
    rows), on a 3-program grid: every config's persistent programs loop (here with split-K 2), and stream-K
    ranges start and end inside tiles."""
    def problem(dtype, device):
        M_TAIL, K_TAIL, N_TAIL = TAIL[device]
        k = -(-K_TAIL // 8) * 8
        x, w, b, _ = linear_inputs(M_TAIL, k, N_TAIL, dtype, device)
        keep = torch.rand(N_TAIL, k, device=device) < 0.4

        def run():
            for tma in (None, False):
                y = _gemm.fwd(x, w, b, pack_bits(keep), _gemm.MASK_PACKED, (k + 31) // 32, 0.0, None,
                              split_k=split_k, schedule=schedule, tma=tma, num_sms=3)
                assert_close_to_exact(y, *exact_fwd(x, w, keep, b), k, dtype)
        return run
    return problem


def _gemm_bwd_input(dtype, device):
    M_TAIL, K_TAIL, N_TAIL = TAIL[device]
    _, w, _, dy = linear_inputs(M_TAIL, K_TAIL, N_TAIL, dtype, device)
    keep = torch.rand(N_TAIL, K_TAIL, device=device) < 0.4
    scores = torch.randn(N_TAIL, K_TAIL, device=device, dtype=dtype)
    keep_s = scores >= 0.25

    def run():
        assert_close_to_exact(masked_linear_bwd_input(dy, w, keep.to(torch.uint8), False),
                              *matmul_exact(dy, w.double() * keep), N_TAIL, dtype)
        assert_close_to_exact(score_masked_linear_bwd_input(dy, w, scores, 0.25),
                              *matmul_exact(dy, w.double() * keep_s), N_TAIL, dtype)
    return run


def _gemm_bwd_weight(dtype, device):
    M_TAIL, K_TAIL, N_TAIL = TAIL[device]
    x, w, _, dy = linear_inputs(M_TAIL, K_TAIL, N_TAIL, dtype, device)
    keep = torch.rand(N_TAIL, K_TAIL, device=device) < 0.4
    scores = torch.randn(N_TAIL, K_TAIL, device=device, dtype=dtype)
    keep_s = scores >= 0.25
    g, g_abs = matmul_exact(dy.t(), x)

    db_exact, db_abs = dy.double().sum(0), dy.double().abs().sum(0)

    def run():  # the db-reducing variant (masked) and the plain one (scores)
        dw, db = masked_linear_bwd_weight_bias(dy, x, pack_bits(keep), True, True)
        assert_close_to_exact(dw, g * keep, g_abs, M_TAIL, dtype)
        assert_close_to_exact(db, db_exact, db_abs, M_TAIL, dtype)
        dscores, dweight = score_masked_linear_bwd_weight_scores(dy, x, w, scores, 0.25, True)
        assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), M_TAIL, dtype)
        assert_close_to_exact(dweight, g * keep_s, g_abs, M_TAIL, dtype)
    return run


def _bitmask(dtype, device):
    M_TAIL, K_TAIL, N_TAIL = TAIL[device]
    w = sparse_weight(N_TAIL, K_TAIL, 0.3, dtype, device)
    x, b = torch.randn(M_TAIL, K_TAIL, device=device).to(dtype), torch.randn(N_TAIL, device=device).to(dtype)
    fmt = rf.bitmask_encode(w, 32, 64)

    def run():
        for split_k in (1, 2):
            check(bitmask_mod.bitmask_linear_fwd(x, *fmt, b, K_TAIL, 32, 64, split_k=split_k), x, w, b)
    return run


def _bsr(dtype, device, schedule="tiles"):
    m, k = TAIL[device][0], (192 if device == "cuda" else 128)
    w = block_weight(128, k, 64, 0.6, dtype, device)  # 64 x 64 blocks: the largest block of every config
    w[:64] = 0  # an empty block row
    if schedule == "persistent":
        w[64:] = torch.randn(64, k, device=device).to(dtype)  # and an all-dense one
    x, b = torch.randn(m, k, device=device).to(dtype), torch.randn(128, device=device).to(dtype)
    fmt = rf.bsr_encode(w, 64)

    def run():
        check(bsr_mod.bsr_linear_fwd(x, *fmt, b, k, schedule=schedule), x, w, b)
    return run


def _bsr_persistent(dtype, device):
    return _bsr(dtype, device, "persistent")


def _ffn(dtype, device):
    M_TAIL, K_TAIL, N_TAIL = TAIL[device]
    x, w_in, b_in, w_out, b_out, keep = ffn_inputs(M_TAIL, K_TAIL, N_TAIL + 1, N_TAIL // 2, dtype, device)
    want = R.pruned_ffn(*(t.float() for t in (x, w_in, b_in, w_out, b_out)), keep)

    def run():
        torch.testing.assert_close(ffn_mod.pruned_ffn(x, w_in, b_in, w_out, b_out, keep).float(), want,
                                   **PRUNED_TOLS[dtype])
    return run


def _attention(dtype, device):
    length, d, heads = (129, 96, [0, 2]) if device == "cuda" else (21, 64, [1])
    x, ws, key_mask = attention_inputs(2, length, d, 32, dtype, device)
    heads = torch.tensor(heads, device=device)
    want = R.pruned_attention(x.float(), *(w.float() for w in ws), heads, 32, key_mask)

    def run():
        got = attention_mod.pruned_attention(x, *ws, heads, 32, key_mask)
        torch.testing.assert_close(got.float(), want, **PRUNED_TOLS[dtype])
    return run


# name -> (autotuner, its module's config function, problem builder returning a checked call)
AUTOTUNED = {
    "gemm_fwd": (_gemm.linear_fwd_kernel, _gemm._configs, _gemm_fwd),
    "gemm_fwd_persistent": (_gemm.linear_fwd_persistent_kernel,
                            functools.partial(_gemm._tma_tile_configs, "_gemm.linear_fwd_persistent_kernel"),
                            _gemm_fwd_scheduled("persistent", split_k=2)),
    "gemm_fwd_streamk": (_gemm.linear_fwd_streamk_kernel,
                         functools.partial(_gemm._tma_tile_configs, "_gemm.linear_fwd_streamk_kernel"),
                         _gemm_fwd_scheduled("streamk", split_k=None)),
    "gemm_bwd_input": (_gemm.linear_bwd_input_kernel, _gemm._configs, _gemm_bwd_input),
    "gemm_bwd_weight": (_gemm.linear_bwd_weight_kernel, _gemm._configs, _gemm_bwd_weight),
    "bitmask_linear": (bitmask_mod._bitmask_linear_kernel, bitmask_mod._configs, _bitmask),
    "bsr_linear": (bsr_mod._bsr_linear_kernel, bsr_mod._configs, _bsr),
    "bsr_linear_persistent": (bsr_mod._bsr_linear_persistent_kernel, bsr_mod._persistent_configs, _bsr_persistent),
    "gathered_linear": (ffn_mod._gathered_linear_kernel, ffn_mod._configs, _ffn),
    "attention": (attention_mod._attention_kernel, attention_mod._attn_configs, _attention),
}


def test_every_autotuned_kernel_is_listed():
    """A new @triton.autotune kernel in sparsebert.kernels must join AUTOTUNED (and so the sweep below)."""
    from triton.runtime.autotuner import Autotuner
    modules = (_gemm, bitmask_mod, bsr_mod, ffn_mod, attention_mod)
    found = {id(v) for mod in modules for v in vars(mod).values() if isinstance(v, Autotuner)}
    assert found == {id(a) for a, _, _ in AUTOTUNED.values()}


@pytest.mark.parametrize("device,kernel", device_cases(list(AUTOTUNED)), ids=_ids)
def test_every_autotune_config_on_a_tail_shape(device, kernel):
    """Each config of the kernel's full GPU list forced once, in bf16 (the dtype the lists are tuned for;
    the per-dtype tests above run the configs the autotuner picks). On CPU the interpreter ignores
    num_warps / num_stages, so each distinct tile shape runs once, on a smaller tail shape."""
    autotuner, config_fn, problem = AUTOTUNED[kernel]
    configs = full_gpu_configs(config_fn)
    assert configs, f"{kernel}: empty GPU config list"
    if device == "cpu":  # the interpreter ignores num_warps / num_stages: each tile shape once
        configs = list({tuple(sorted(c.kwargs.items())): c for c in configs}.values())
    run = problem(torch.bfloat16, device)
    failures = []  # every failing config, not only the first: a GPU run is too scarce to learn one per run
    for config in configs + list(autotuner.configs):  # + what this run's autotuner holds (the interpreter's)
        with forced(autotuner, config):
            try:
                run()
            except AssertionError as exc:
                failures.append(f"{kernel} with config {config}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(configs) + len(autotuner.configs)} configs failed:\n" + \
        "\n".join(failures)


# ------------------------------------------------------------------ CUTLASS sm90 path of the CUDA C++ backend
# (csrc/cuda/cutlass_masked_gemm.cu via cuda_ops_bind.cpp, docs/CUTLASS.md): bf16 and fp16 for every op (N and K
# multiples of 8); fp32 for the forward and input grad only, on tf32 tensor cores, and only when the caller allows
# tf32 (N and K multiples of 4).
def _cutlass_skip_reason():
    from sparsebert.ops import _ext
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not (_ext.load() and _ext.has_cuda()):
        return "sparsebert._C has no CUDA kernels"
    if not _ext.has_cutlass():
        return "sparsebert._C built without the CUTLASS GEMMs (TORCH_CUDA_ARCH_LIST=9.0a with nvidia-cutlass)"
    if torch.cuda.get_device_capability() != (9, 0):
        return "needs a compute capability 9.0 GPU"
    return None


CUTLASS_SHAPES = [(1, 8, 8), (77, 200, 136), (333, 264, 776), (1000, 768, 3072)]  # (M, N, K), partial tiles
# tf32 keeps 10 of an fp32 operand's 23 mantissa bits (truncated): each product is off by < 2 * 2^-10 + 2^-20
TF32_PRODUCT_REL_ERR = 2 * 2.0**-10 + 2.0**-20


def _cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@contextlib.contextmanager
def _allow_tf32(allow):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _cutlass_ops_check(m, n, k, expect_cutlass, dt=torch.bfloat16, scores_dt=None, tf32=False):
    """Every masked-linear op of the CUDA C++ backend on `dt` data (scores in `scores_dt`, default `dt`) against
    fp64 math. `expect_cutlass`: whether the CUTLASS kernels (and only they, for the GEMMs) ran, one bool for
    every op or a dict {"fwd", "bwd_input", "bwd_weight", "bwd_weight_scores"} -> bool. `tf32`: the forward and
    input grad may run on tf32 tensor cores, so their bound adds the tf32 operand rounding."""
    ns = torch.ops.sparsebert_ext
    scores_dt = scores_dt or dt
    x, w, b, dy = linear_inputs(m, k, n, dt, "cuda")
    keep = torch.rand(n, k, device="cuda") < 0.6
    scores = torch.randn(n, k, device="cuda", dtype=scores_dt)
    tau = scores.flatten()[5].float()  # a score: ties at tau are kept
    skeep = scores >= tau.to(scores_dt)
    g, g_abs = matmul_exact(dy.t(), x)

    def close_linear(out, exact, abs_sum, reduce_len):
        if tf32:  # the tf32 rounding of the operands on top of the fp32 bound
            err = (out.double() - exact).abs()
            assert (err <= torch.finfo(dt).eps * exact.abs() + ((reduce_len + 2) * torch.finfo(torch.float32).eps
                                                                + TF32_PRODUCT_REL_ERR) * abs_sum).all()
            assert out.dtype == dt and torch.isfinite(out).all()
        else:
            assert_close_to_exact(out, exact, abs_sum, reduce_len, dt)

    for mask, packed in ((keep.to(torch.uint8), False), (pack_bits(keep), True)):
        close_linear(ns.masked_linear_fwd(x, w, b, mask, packed), *exact_fwd(x, w, keep, b), k)
        close_linear(ns.masked_linear_fwd(x, w, None, mask, packed), *exact_fwd(x, w, keep, None), k)
        close_linear(ns.masked_linear_bwd_input(dy, w, mask, packed), *matmul_exact(dy, w.double() * keep), n)
        dw = ns.masked_linear_bwd_weight(dy, x, mask, packed)
        assert_close_to_exact(dw, g * keep, g_abs, m, dt)
        assert (dw[~keep] == 0).all()
    close_linear(ns.score_masked_linear_fwd.tensor(x, w, b, scores, tau), *exact_fwd(x, w, skeep, b), k)
    close_linear(ns.score_masked_linear_bwd_input.tensor(dy, w, scores, tau), *matmul_exact(dy, w.double() * skeep), n)
    dscores, dweight = ns.score_masked_linear_bwd_weight_scores.tensor(dy, x, w, scores, tau, True)
    assert_close_to_exact(dscores, g * w.double(), g_abs * w.double().abs(), m, scores_dt)
    assert_close_to_exact(dweight, g * skeep, g_abs, m, dt)
    dscores_only, none = ns.score_masked_linear_bwd_weight_scores(dy, x, w, scores, float(tau.cpu()), False)
    assert none is None and torch.equal(dscores_only, dscores)
    ops = {
        "fwd": lambda: ns.masked_linear_fwd(x, w, b, keep.to(torch.uint8), False),
        "bwd_input": lambda: ns.score_masked_linear_bwd_input.tensor(dy, w, scores, tau),
        "bwd_weight": lambda: ns.masked_linear_bwd_weight(dy, x, keep.to(torch.uint8), False),
        "bwd_weight_scores": lambda: ns.score_masked_linear_bwd_weight_scores.tensor(dy, x, w, scores, tau, True),
    }
    for name, fn in ops.items():
        expect = expect_cutlass[name] if isinstance(expect_cutlass, dict) else expect_cutlass
        ran = any("cutlass" in kernel for kernel in _cuda_kernel_names(fn))
        assert ran == expect, f"{name} ({dt}): CUTLASS kernel ran = {ran}, expected {expect}"


@pytest.mark.cuda
@pytest.mark.skipif(_cutlass_skip_reason() is not None, reason=str(_cutlass_skip_reason()))
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,k", CUTLASS_SHAPES, ids=str)
def test_cutlass_bound_path(m, n, k, dt):
    _cutlass_ops_check(m, n, k, expect_cutlass=True, dt=dt)


@pytest.mark.cuda
@pytest.mark.skipif(_cutlass_skip_reason() is not None, reason=str(_cutlass_skip_reason()))
@pytest.mark.parametrize("m,n,k", CUTLASS_SHAPES + [(5, 12, 20)], ids=str)
def test_cutlass_fp32_only_with_tf32(m, n, k):
    """fp32 runs on CUTLASS (tf32 tensor cores) only when the caller allows tf32, and only the forward and input
    grad (no fp32 weight-gradient instantiation); torch's default (no tf32) keeps the fp32 WMMA kernels."""
    with _allow_tf32(False):
        _cutlass_ops_check(m, n, k, expect_cutlass=False, dt=torch.float32)
    with _allow_tf32(True):
        _cutlass_ops_check(m, n, k, dt=torch.float32, tf32=True,
                           expect_cutlass={"fwd": True, "bwd_input": True, "bwd_weight": False,
                                           "bwd_weight_scores": False})


@pytest.mark.cuda
@pytest.mark.skipif(_cutlass_skip_reason() is not None, reason=str(_cutlass_skip_reason()))
@pytest.mark.parametrize("dt,scores_dt", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16)], ids=str)
def test_cutlass_mixed_scores_dtype_falls_back(dt, scores_dt):
    """Scores of another dtype than the weight: the EVT reads them in the weight's type, so the score weight grad
    runs the WMMA kernels; the GEMMs on the masked weight (forward, input grad, mask weight grad) stay on CUTLASS."""
    _cutlass_ops_check(77, 200, 136, dt=dt, scores_dt=scores_dt,
                       expect_cutlass={"fwd": True, "bwd_input": True, "bwd_weight": True,
                                       "bwd_weight_scores": False})


@pytest.mark.cuda
@pytest.mark.skipif(_cutlass_skip_reason() is not None, reason=str(_cutlass_skip_reason()))
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=str)
def test_cutlass_path_falls_back(monkeypatch, dt):
    """K not a multiple of 8, or SPARSEBERT_CUTLASS_DISPATCH=0: the WMMA kernels run, with the same results."""
    _cutlass_ops_check(77, 200, 70, expect_cutlass=False, dt=dt)
    monkeypatch.setenv("SPARSEBERT_CUTLASS_DISPATCH", "0")
    _cutlass_ops_check(77, 200, 136, expect_cutlass=False, dt=dt)
    with _allow_tf32(True):
        _cutlass_ops_check(77, 200, 136, expect_cutlass=False, dt=torch.float32, tf32=True)
