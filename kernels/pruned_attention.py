"""Head-pruned self-attention (Triton): Q/K/V projections of the kept heads only (gathered weight rows),
a fused softmax attention over the kept heads (online softmax over key blocks, key-padding mask), and the
output projection over the kept heads' columns.

``pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size, key_mask)``: x (B, L, d);
``heads`` int index tensor of kept heads (any number, also per layer); ``key_mask`` (B, L), nonzero =
attend. Returns (B, L, d) = ``softmax(Q_h K_h^T / sqrt(d_h) + mask) V_h`` over kept heads h, projected by
``W_o[:, kept dims]`` plus ``b_o``. Forward only. For the masked (not removed) model while pruning; a pruned
model is served by ``sparsebert.nn.inference.for_inference`` (smaller layers, cuBLAS, SDPA). ``W_o`` is read
column-major (see ``pruned_ffn.gathered_linear``).
"""

import torch
import triton
import triton.language as tl

from .pruned_ffn import bucket, gathered_linear

from ._interpreter import exact_dot
from ._autotune import select


def _attn_configs():
    # quick: 64x64 and 128x64
    return select("pruned_attention", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 2), (128, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2)]],
        [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)], quick=(0, 1))


@triton.autotune(configs=_attn_configs(), key=["L_BUCKET", "HEAD_DIM"])
@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, L, L_BUCKET, n_heads, scale,
                      stride_b, stride_t, stride_mb, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q, k, v, o: (B, L, n_heads * HEAD_DIM) with equal strides; one program = one query block of one head
    # batch x heads on grid axis 0 (up to 2**31 - 1 programs; axis 1 is capped at 65535 on CUDA)
    # HEAD_DIM is a constexpr (the d_mask folds away when it is a power of two); L_BUCKET (next power of two
    # of L) is only the autotuning key, so a new length in the same bucket reuses the tuned config
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # int64: B * L * width may pass 2**31
    h = pid_bh % n_heads
    base = b * stride_b + h * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + offs_d[None, :],
                mask=(offs_m[:, None] < L) & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + offs_n[:, None] * stride_t + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        keep = tl.load(mask_ptr + b * stride_mb + offs_n, mask=n_ok, other=0) != 0
        s = tl.where(keep[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        p = tl.where(keep[None, :], p, 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + base + offs_m[:, None] * stride_t + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < L) & d_ok[None, :])


_GRID_AXIS1_LIMIT = 65535  # CUDA's cap on gridDim.y


def check_attention_size(seq_len: int, width: int) -> None:
    """Refuse shapes the kernel cannot index: offsets inside one sequence (L * width) are int32 (the batch
    offset is int64), and the query blocks sit on grid axis 1 (at most 65535 of the smallest block)."""
    min_block_m = min(c.kwargs["BLOCK_M"] for c in _attn_configs())
    if seq_len * width >= 2**31:
        raise ValueError(f"one sequence of {seq_len} tokens x {width} features has {seq_len * width} elements; "
                         "the attention kernel indexes a sequence with int32 (limit 2**31 - 1)")
    if triton.cdiv(seq_len, min_block_m) > _GRID_AXIS1_LIMIT:
        raise ValueError(f"seq_len {seq_len} needs more than {_GRID_AXIS1_LIMIT} query blocks of {min_block_m}; "
                         f"split the sequence (limit {_GRID_AXIS1_LIMIT * min_block_m} tokens)")


def attention(q, k, v, key_mask, head_size: int):
    """Softmax attention on (B, L, H*d_h) tensors laid out head-major in the last dim."""
    B, L, width = q.shape
    check_attention_size(L, width)
    n_heads = width // head_size
    o = torch.empty_like(q)
    if n_heads == 0 or L == 0:
        return o
    key_mask = key_mask.to(torch.int32).contiguous()
    block_d = max(16, triton.next_power_of_2(head_size))
    grid = lambda meta: (B * n_heads, triton.cdiv(L, meta["BLOCK_M"]))  # noqa: E731
    _attention_kernel[grid](q, k, v, key_mask, o, L, bucket(L), n_heads, head_size ** -0.5, q.stride(0), q.stride(1),
                            key_mask.stride(0), HEAD_DIM=head_size, BLOCK_D=block_d, IEEE=exact_dot(q.dtype))
    return o


def pruned_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, head_size: int, key_mask):
    B, L, d = x.shape
    heads = heads.to(device=x.device, dtype=torch.long)
    dims = (heads[:, None] * head_size + torch.arange(head_size, device=x.device)).flatten()
    x2 = x.reshape(B * L, d).contiguous()
    q = gathered_linear(x2, wq, bq, rows=dims).view(B, L, -1)
    k = gathered_linear(x2, wk, bk, rows=dims).view(B, L, -1)
    v = gathered_linear(x2, wv, bv, rows=dims).view(B, L, -1)
    ctx = attention(q, k, v, key_mask, head_size)
    return gathered_linear(ctx.view(B * L, -1), wo, bo, cols=dims).view(B, L, -1)
