"""Bitmask-compressed linear, "load as sparse, compute as dense": y = x @ W.T + bias.

W (N, K) is stored as its nonzero `values` (tile by tile, row-major inside a TILE_N x TILE_K tile), a
`bitmask` (N, ceil(K/32)) int32 (bit k % 32 of word k // 32) and `tile_offsets` (N tiles, K tiles) int32,
the index of each tile's first nonzero in `values` (see sparsebert/ops/reference_formats.py).

Each program owns a BLOCK_M x TILE_N output tile and walks the K tiles (every SPLIT_K-th one when split-K
is on). Per K tile it loads the bitmask words, turns them into a 0/1 tile, finds each nonzero's position
in `values` by prefix sums of the bits (row-wise inclusive scan + exclusive scan of row counts), gathers
the values into a dense TILE_N x TILE_K tile in registers and feeds it to `tl.dot` with the activations.
Tokens are the small dimension (1 to 64), so the bytes of W decide the time: at density d a bf16 weight
costs 2d + 1/8 bytes instead of 2. With split-K the fp32 partial sums meet through relaxed atomic adds
(the order of the adds, hence the last bits of y, varies between runs); in deterministic mode (explicit,
or `torch.use_deterministic_algorithms(True)`) each split writes its own fp32 partial and torch sums them
in a fixed order: bitwise-reproducible, at the cost of a (SPLIT_K, M, N) fp32 buffer.
"""

import torch
import triton
import triton.language as tl

from ._interpreter import exact_dot
from ._autotune import select


def _configs():
    # quick: BLOCK_M 16 (4 warps, 2 stages) and 64 (4 warps, 3 stages)
    return select("bitmask_linear", [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64) for w in (4, 8) for s in (2, 3, 4)
    ], [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)], quick=(0, 13))


def _prune_configs(configs, named_args, **kwargs):
    """Keep BLOCK_M no larger than needed for the token count (but keep at least one config)."""
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "TILE_N", "TILE_K", "SPLIT_K"],
                 reset_to_zero=["y_ptr"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _bitmask_linear_kernel(
    x_ptr, values_ptr, bitmask_ptr, tile_offsets_ptr, bias_ptr, y_ptr,
    M, N, K, n_words, n_ktiles, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, DETERMINISTIC: tl.constexpr,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    cols = tl.arange(0, TILE_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    mask_rows = bitmask_ptr + offs_n.to(tl.int64)[:, None] * n_words

    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    for kt in range(pid_k, n_ktiles, SPLIT_K):
        offs_k = kt * TILE_K + cols
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        # Expand the bitmask words of this tile into 0/1 entries (each word is read by its 32 columns).
        word = offs_k // 32
        words = tl.load(mask_rows + word[None, :], mask=n_ok[:, None] & (word[None, :] < n_words), other=0)
        bits = (words >> (offs_k % 32)[None, :]) & 1
        # Position of each nonzero in `values`: tile start + nonzeros of earlier rows + earlier columns.
        before_in_row = tl.cumsum(bits, axis=1) - bits
        row_count = tl.sum(bits, axis=1)
        before_row = tl.cumsum(row_count, axis=0) - row_count
        start = tl.load(tile_offsets_ptr + pid_n * n_ktiles + kt)
        w = tl.load(values_ptr + (start + before_row[:, None] + before_in_row), mask=bits != 0, other=0.0)
        if IEEE:  # fp32 inputs, or bf16 under the interpreter (whose bf16 tl.dot is wrong): exact fp32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if pid_k == 0:
            acc += bias[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    elif DETERMINISTIC:  # y is (SPLIT_K, M, N) fp32: one slice per split, summed by the launcher
        tl.store(y_ptrs + pid_k.to(tl.int64) * M * stride_ym, acc, mask=y_mask)
    else:  # only the sum matters, no ordering with other memory operations: relaxed
        tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(m: int, n: int, n_ktiles: int, tile_n: int, device: torch.device) -> int:
    """Split K until there are about two programs per SM (few tokens leave too few output tiles)."""
    if m > 256:
        return 1
    tiles = triton.cdiv(n, tile_n) * triton.cdiv(m, 64)
    split = 1
    while split * 2 <= n_ktiles and tiles * split < 2 * _num_sms(device):
        split *= 2
    return split


def bitmask_linear_fwd(x, values, bitmask, tile_offsets, bias, in_features: int, tile_n: int, tile_k: int,
                       split_k: int = 0, deterministic=None):
    """x (M, K) contiguous -> y (M, N) in x's dtype. Inputs are validated by sparsebert.ops.
    split_k = 0 picks it from the shape (see `choose_split_k`). deterministic: None follows
    `torch.are_deterministic_algorithms_enabled()`; True sums the split-K partials in a fixed order."""
    m, k = x.shape
    n = bitmask.shape[0]
    n_ktiles = triton.cdiv(k, tile_k)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if split_k <= 0:
        split_k = choose_split_k(m, n, n_ktiles, tile_n, x.device)
    split_k = max(1, min(split_k, n_ktiles))
    if split_k == 1:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    elif deterministic:
        y = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    else:
        y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, tile_n), split_k)  # noqa: E731
    _bitmask_linear_kernel[grid](
        x, values, bitmask, tile_offsets, bias if bias is not None else x, y,
        m, n, k, bitmask.shape[1], n_ktiles, x.stride(0), n, triton.next_power_of_2(max(m, 1)),
        HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype), SPLIT_K=split_k, DETERMINISTIC=bool(deterministic),
        TILE_N=tile_n, TILE_K=tile_k,
    )
    if split_k == 1:
        return y
    if deterministic:
        y = y.sum(0)  # a fixed-order reduction (no atomics)
    return y.to(x.dtype)
