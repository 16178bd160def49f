"""Gathered-index linear layers for head/neuron-pruned encoders (Triton), and the pruned FFN built on them.

``gathered_linear(x, weight, bias, rows=None, cols=None, gelu=False)`` computes
``act(x @ weight[rows][:, cols].T + bias[rows])`` without materialising the gathered weight: the kernel
reads only the kept rows (output features) or columns (input features) of the dense weight. ``x`` is
(M, K) with K = len(cols) (or the full width when cols is None). fp32 accumulation, output in x's dtype.

Weight layout: a row gather (kept output features) reads the row-major (N, K) weight, each kept row
contiguous along K. A column gather (kept input features) reads the weight column-major, i.e. the rows of
W^T (K, N), each kept one contiguous along N, so the loads stay vectorised: a row-major weight is
transposed once per call (one pass over the dense weight); keep it column-major (``w.t().contiguous().t()``)
to skip that. The autotuning key is the next power of two of M, N and K, so a new token count or layer
width in the same bucket reuses the tuning.

``pruned_ffn(x, w_in, b_in, w_out, b_out, keep)``: FFN-in on the kept neurons' rows with a fused exact
GELU, then FFN-out on the same kept columns: ``gelu(x W_in[keep]^T + b_in[keep]) W_out[:, keep]^T + b_out``.
Forward only; for the masked (not removed) model while pruning. A pruned model is served by
``sparsebert.nn.inference.for_inference`` (smaller layers, cuBLAS, SDPA). The masked dense model is the
reference and the training path.
"""

import torch
import triton
import triton.language as tl

from ._interpreter import exact_dot
from ._autotune import select


def _configs():
    # quick: 128x128x32 and 64x64x64
    return select("pruned_ffn", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                     (64, 64, 64, 4, 3), (128, 256, 64, 8, 3), (32, 64, 32, 2, 4)]],
        [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)], quick=(0, 3))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "GATHER_ROWS", "GATHER_COLS"])
@triton.jit
def _gathered_linear_kernel(x_ptr, w_ptr, b_ptr, rows_ptr, cols_ptr, y_ptr, M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                            HAS_BIAS: tl.constexpr, GATHER_ROWS: tl.constexpr, GATHER_COLS: tl.constexpr,
                            GELU: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 offsets: M * K, M * N and the dense weight's size may each pass 2**31
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # which rows of the dense weight feed these outputs
    if GATHER_ROWS:
        w_rows = tl.load(rows_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
    else:
        w_rows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        if GATHER_COLS:  # column-major weight (stride_wn == 1): each kept column is one contiguous row of W^T
            w_cols = tl.load(cols_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
            w = tl.load(w_ptr + w_cols[:, None] * stride_wk + w_rows[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        else:  # row-major weight (stride_wk == 1, specialised by Triton): contiguous along K
            w = tl.load(w_ptr + w_rows[None, :] * stride_wn + offs_k.to(tl.int64)[:, None] * stride_wk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:  # exact (erf) GELU, as BERT's "gelu"
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


def bucket(n: int) -> int:
    """Autotuning key of a size: its next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def weight_layout(weight, gather_cols: bool):
    """The (N, K) weight as the kernel reads it: column-major (stride(0) == 1) for a column gather,
    row-major otherwise; copied only when it is not already so."""
    if gather_cols:
        return weight if weight.stride(0) == 1 and weight.stride(1) == weight.shape[0] else weight.t().contiguous().t()
    return weight if weight.stride(1) == 1 and weight.stride(0) == weight.shape[1] else weight.contiguous()


def gathered_linear(x, weight, bias=None, rows=None, cols=None, gelu: bool = False):
    """``act(x @ weight[rows][:, cols].T + bias[rows])``; rows/cols are int index tensors or None."""
    M, K = x.shape
    n_rows = weight.shape[0] if rows is None else rows.numel()
    k_expected = weight.shape[1] if cols is None else cols.numel()
    if K != k_expected:
        raise ValueError(f"x has {K} features but the gathered weight expects {k_expected}")
    y = torch.empty(M, n_rows, device=x.device, dtype=x.dtype)
    if M == 0 or n_rows == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += (bias if rows is None else bias[rows]).to(y.dtype)
        return torch.nn.functional.gelu(y) if gelu else y
    if rows is not None and cols is not None:
        raise ValueError("gathered_linear gathers rows or columns of the weight, not both")
    weight = weight_layout(weight, gather_cols=cols is not None)
    rows_t = rows.to(device=x.device, dtype=torch.int32).contiguous() if rows is not None else x
    cols_t = cols.to(device=x.device, dtype=torch.int32).contiguous() if cols is not None else x
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(n_rows, meta["BLOCK_N"]))
    _gathered_linear_kernel[grid](x, weight, bias if bias is not None else x, rows_t, cols_t, y, M, n_rows, K,
                                  bucket(M), bucket(n_rows), bucket(K),
                                  x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                                  y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                                  GATHER_ROWS=rows is not None, GATHER_COLS=cols is not None, GELU=gelu,
                                  IEEE=exact_dot(x.dtype))
    return y


def pruned_ffn(x, w_in, b_in, w_out, b_out, keep):
    """FFN on the kept neurons ``keep`` (int index tensor) of dense weights; x (M, d)."""
    h = gathered_linear(x, w_in, b_in, rows=keep, gelu=True)
    return gathered_linear(h, w_out, b_out, cols=keep)
