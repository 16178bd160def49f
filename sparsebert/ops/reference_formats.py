"""Compressed sparse weight formats in plain torch: encoders, decoders and the reference products.

Three inference formats for a weight W of shape (N, K) = (out_features, in_features):

bitmask (unstructured), tiled "load as sparse, compute as dense":
    values        (nnz,) in W's dtype: the nonzeros, tile by tile. Tiles are TILE_N x TILE_K, ordered
                  row-major over the (ceil(N/TILE_N), ceil(K/TILE_K)) grid; inside a tile, row-major.
    bitmask       (N, ceil(K/32)) int32: the `pack_mask` layout (bit k % 32 of word k // 32, LSB first).
    tile_offsets  (ceil(N/TILE_N), ceil(K/TILE_K)) int32: index in `values` of each tile's first nonzero.
    A kernel finds element (r, c) of a tile at tile_offsets + (nonzeros before row r in the tile)
    + (nonzeros before column c in row r): prefix popcounts of the bitmask, no per-row index needed.
    Bytes per weight = density * sizeof(dtype) + 1/8 + 4 / (TILE_N * TILE_K).
    TILE_K must be a multiple of 32 so tiles start on word boundaries.

bsr (block-sparse rows, blocks B x B, B in {16, 32, 64}); torch's BSR layout:
    values (nnzb, B, B), crow_indices (N/B + 1,) int32, col_indices (nnzb,) int32 (block columns,
    ascending inside each block row). N and K must be multiples of B.

2:4 (semi-structured): in every group of 4 consecutive weights of a row at most 2 are nonzero.
    values (N, K/2) in W's dtype: the 2 kept weights of each group (ascending position);
    meta (N, ceil(K/8)) uint8: per group a nibble idx0 | idx1 << 2 (positions 0..3 in the group),
    group 2j in the low nibble of byte j, group 2j+1 in the high nibble. K must be a multiple of 4.
    Bytes per weight = sizeof(dtype) / 2 + 1/8.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import pack_mask, unpack_mask

BSR_BLOCK_SIZES = (16, 32, 64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_weight(weight) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")


def check_tile(tile_n: int, tile_k: int) -> None:
    if not (isinstance(tile_n, int) and tile_n >= 16 and tile_n & (tile_n - 1) == 0):
        raise ValueError(f"tile_n must be a power of two >= 16 (tl.dot needs 16), got {tile_n!r}")
    if not (isinstance(tile_k, int) and tile_k >= 32 and tile_k & (tile_k - 1) == 0):
        raise ValueError(f"tile_k must be a power of two >= 32 (whole bitmask words per tile), got {tile_k!r}")


# ---------------------------------------------------------------------------------------------- bitmask
def _to_tiles(t: Tensor, tile_n: int, tile_k: int) -> Tensor:
    """(N, K) -> (NT, KT, tile_n, tile_k), zero-padded."""
    n, k = t.shape
    nt, kt = _cdiv(n, tile_n), _cdiv(k, tile_k)
    padded = t.new_zeros(nt * tile_n, kt * tile_k)
    padded[:n, :k] = t
    return padded.view(nt, tile_n, kt, tile_k).permute(0, 2, 1, 3)


def bitmask_encode(weight: Tensor, tile_n: int = 32, tile_k: int = 64) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense (N, K) weight -> (values, bitmask, tile_offsets); zeros of `weight` are the pruned entries."""
    _check_weight(weight)
    check_tile(tile_n, tile_k)
    mask = weight != 0
    tiles_w = _to_tiles(weight, tile_n, tile_k)
    tiles_m = _to_tiles(mask, tile_n, tile_k)
    values = tiles_w[tiles_m].contiguous()  # boolean indexing walks (NT, KT, r, c) in row-major order
    counts = tiles_m.sum(dim=(2, 3)).reshape(-1).to(torch.int64)
    offsets = (torch.cumsum(counts, 0) - counts).view(tiles_m.shape[0], tiles_m.shape[1])
    if values.numel() >= 2**31:
        raise ValueError(f"weight has {values.numel()} nonzeros; the bitmask format indexes them with int32")
    return values, pack_mask(mask), offsets.to(torch.int32).contiguous()


def bitmask_decode(values: Tensor, bitmask: Tensor, tile_offsets: Tensor, in_features: int,
                   tile_n: int, tile_k: int) -> Tensor:
    """Inverse of `bitmask_encode`: the dense (N, K) weight."""
    mask = unpack_mask(bitmask, in_features)
    tiles_m = _to_tiles(mask, tile_n, tile_k)
    if int(tiles_m.sum()) != values.numel():
        raise ValueError(f"bitmask has {int(tiles_m.sum())} set bits but values has {values.numel()} entries")
    tiles_w = torch.zeros(tiles_m.shape, dtype=values.dtype, device=values.device)
    tiles_w[tiles_m] = values
    nt, kt = tiles_m.shape[:2]
    dense = tiles_w.permute(0, 2, 1, 3).reshape(nt * tile_n, kt * tile_k)
    return dense[: bitmask.shape[0], :in_features].contiguous()


def bitmask_nbytes(values: Tensor, bitmask: Tensor, tile_offsets: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (values, bitmask, tile_offsets))


def bitmask_linear(x: Tensor, values: Tensor, bitmask: Tensor, tile_offsets: Tensor, bias: Optional[Tensor],
                   in_features: int, tile_n: int, tile_k: int) -> Tensor:
    """Reference: y = x @ W.T + bias with W decoded from the bitmask format."""
    return F.linear(x, bitmask_decode(values, bitmask, tile_offsets, in_features, tile_n, tile_k), bias)


# -------------------------------------------------------------------------------------------------- bsr
def check_block(block: int) -> None:
    if block not in BSR_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BSR_BLOCK_SIZES}, got {block!r}")


def bsr_encode(weight: Tensor, block: int = 32) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense (N, K) -> (values (nnzb, B, B), crow_indices int32, col_indices int32); a block is kept
    when any of its entries is nonzero."""
    _check_weight(weight)
    check_block(block)
    n, k = weight.shape
    if n % block or k % block:
        raise ValueError(f"bsr with block_size {block} needs both weight dims divisible by {block}, got "
                         f"shape {tuple(weight.shape)}; use block_size that divides them or the bitmask format")
    blocks = weight.view(n // block, block, k // block, block).permute(0, 2, 1, 3)  # (NB, KB, B, B)
    keep = (blocks != 0).flatten(2).any(-1)  # (NB, KB)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order: ascending columns inside each row
    values = blocks[rows, cols].contiguous()
    crow = torch.zeros(n // block + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(keep.sum(1), 0)
    return values, crow.to(torch.int32), cols.to(torch.int32).contiguous()


def bsr_decode(values: Tensor, crow_indices: Tensor, col_indices: Tensor, in_features: int) -> Tensor:
    block = values.shape[-1]
    nb = crow_indices.numel() - 1
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nb, device=values.device), counts)
    blocks = torch.zeros(nb, in_features // block, block, block, dtype=values.dtype, device=values.device)
    blocks[rows, col_indices.long()] = values
    return blocks.permute(0, 2, 1, 3).reshape(nb * block, in_features)


def bsr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor],
               in_features: int) -> Tensor:
    """Reference: y = x @ W.T + bias with W decoded from BSR."""
    return F.linear(x, bsr_decode(values, crow_indices, col_indices, in_features), bias)


def bsr_linear_blockwise(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                         bias: Optional[Tensor], in_features: int) -> Tensor:
    """The same product in torch without densifying W: gather the x blocks each nonzero block needs, one
    batched product, scatter-add into block rows. Work and memory scale with the nonzero blocks (CPU path)."""
    m = x.shape[0]
    block = values.shape[-1]
    nb = crow_indices.numel() - 1
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nb, device=x.device), counts)
    xb = x.reshape(m, in_features // block, block)[:, col_indices.long()]  # (M, nnzb, B)
    acc_dtype = torch.float32 if x.dtype != torch.float64 else x.dtype
    partial = torch.einsum("mjc,jrc->jmr", xb.to(acc_dtype), values.to(acc_dtype))  # (nnzb, M, B)
    out = torch.zeros(nb, m, block, dtype=acc_dtype, device=x.device).index_add_(0, rows, partial)
    y = out.permute(1, 0, 2).reshape(m, nb * block)
    if bias is not None:
        y = y + bias.to(acc_dtype)
    return y.to(x.dtype)


# -------------------------------------------------------------------------------------------------- 2:4
def is_2to4(weight: Tensor) -> bool:
    """True when every group of 4 consecutive weights of each row has at most 2 nonzeros."""
    n, k = weight.shape
    return k % 4 == 0 and bool(((weight != 0).view(n, k // 4, 4).sum(-1) <= 2).all())


def nm24_encode(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Dense (N, K) with a 2:4 zero pattern -> (values (N, K/2), meta (N, ceil(K/8)) uint8)."""
    _check_weight(weight)
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got weight shape {tuple(weight.shape)}")
    groups = weight.view(n, k // 4, 4)
    nz = groups != 0
    if bool((nz.sum(-1) > 2).any()):
        bad = int((nz.sum(-1) > 2).sum())
        raise ValueError(f"weight is not 2:4 sparse: {bad} groups of 4 have more than 2 nonzeros; prune with "
                         f"granularity '2:4' (sparsebert.nn.granularity.nm_mask_from_scores) first")
    # Keep the nonzeros, topped up with the first zero positions, in ascending position order.
    pos = torch.arange(4, device=weight.device)
    rank = (~nz).to(torch.int64) * 4 + pos  # nonzeros first, then zeros, each ascending
    idx = rank.argsort(-1)[..., :2].sort(-1).values  # (N, G, 2)
    values = groups.gather(-1, idx).reshape(n, k // 2).contiguous()
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # (N, G)
    g = k // 4
    if g % 2:
        nibble = torch.cat([nibble, nibble.new_zeros(n, 1)], 1)
    meta = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()
    return values, meta


def nm24_decode(values: Tensor, meta: Tensor, in_features: int) -> Tensor:
    n = values.shape[0]
    g = in_features // 4
    nibble = torch.stack([meta & 0xF, meta >> 4], -1).reshape(n, -1)[:, :g].to(torch.int64)
    idx = torch.stack([nibble & 3, nibble >> 2], -1)  # (N, G, 2)
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.view(n, g, 2))
    return dense.view(n, in_features)


def nm24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], in_features: int) -> Tensor:
    """Reference: y = x @ W.T + bias with W decoded from the 2:4 format."""
    return F.linear(x, nm24_decode(values, meta, in_features), bias)


def dense_nbytes(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    return out_features * in_features * torch.empty((), dtype=dtype).element_size()


def bitmask_bytes_per_weight(density: float, dtype_bytes: int = 2, tile_n: int = 32, tile_k: int = 64) -> float:
    """Model of the bitmask format's size: density * dtype_bytes + 1/8 + 4 / (tile_n * tile_k)."""
    return density * dtype_bytes + 1 / 8 + 4 / (tile_n * tile_k)


__all__ = [
    "BSR_BLOCK_SIZES", "bitmask_encode", "bitmask_decode", "bitmask_linear", "bitmask_nbytes",
    "bitmask_bytes_per_weight", "bsr_encode", "bsr_decode", "bsr_linear", "bsr_linear_blockwise", "is_2to4",
    "nm24_encode", "nm24_decode", "nm24_linear", "dense_nbytes", "check_tile", "check_block",
]
