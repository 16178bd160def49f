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

sparse-rows (unstructured, row by row; the CPU inference format, float32 only):
    values (nnz,) float32: the nonzeros row by row, columns ascending inside a row;
    col_indices (nnz,) int16 when K <= 32768, else int32: each nonzero's column;
    row_offsets (N + 1,) int32: row n's nonzeros are values[row_offsets[n]:row_offsets[n + 1]].
    Bytes per weight = density * (4 + 2) + 4 / K (int16 indices).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import device_check
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
    # checked on the device (no host sync: this decoder is the "torch" backend's forward)
    device_check(tiles_m.sum() == values.numel(), f"the bitmask's set bits and values ({values.numel()} entries) "
                 "disagree in number")
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
    rows = torch.repeat_interleave(torch.arange(nb, device=values.device), counts, output_size=col_indices.shape[0])
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
    # output_size from the shape: without it repeat_interleave reads counts.sum() on the host (a sync)
    rows = torch.repeat_interleave(torch.arange(nb, device=x.device), counts, output_size=col_indices.shape[0])
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


# ------------------------------------------------------------------------------------------ sparse-rows
def sparse_rows_index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when in_features <= 32768 (2 bytes per nonzero), else int32."""
    return torch.int16 if in_features <= 32768 else torch.int32


def sparse_rows_encode(weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense (N, K) float32 weight -> (values (nnz,) float32, col_indices (nnz,) int16/int32, row_offsets
    (N + 1,) int32); zeros of `weight` are the pruned entries, nonzeros row by row, columns ascending."""
    _check_weight(weight)
    if weight.dtype != torch.float32:
        raise TypeError(f"the sparse-rows format stores float32 values, got weight dtype {weight.dtype}")
    n, k = weight.shape
    rows, cols = (weight != 0).nonzero(as_tuple=True)  # row-major: ascending columns inside each row
    if rows.numel() >= 2**31:
        raise ValueError(f"weight has {rows.numel()} nonzeros; the sparse-rows format indexes them with int32")
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    values = weight[rows, cols].contiguous()
    return values, cols.to(sparse_rows_index_dtype(k)).contiguous(), offsets.to(torch.int32)


def sparse_rows_decode(values: Tensor, col_indices: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """Inverse of `sparse_rows_encode`: the dense (N, in_features) weight."""
    n = row_offsets.numel() - 1
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    # output_size from the shape: without it repeat_interleave reads counts.sum() on the host (a sync)
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), counts, output_size=values.shape[0])
    dense = torch.zeros(n, in_features, dtype=values.dtype, device=values.device)
    dense[rows, col_indices.long()] = values
    return dense


def sparse_rows_linear(x: Tensor, values: Tensor, col_indices: Tensor, row_offsets: Tensor, bias: Optional[Tensor],
                       in_features: int) -> Tensor:
    """Reference: y = x @ W.T + bias with W decoded from the sparse-rows format."""
    return F.linear(x, sparse_rows_decode(values, col_indices, row_offsets, in_features), bias)


# ------------------------------------------------------------------------- row-group slots (one token)
# A second layout of a sparse-rows weight, for the one-token product y = W x on a CPU, where a gather per
# nonzero (what the sparse-rows kernel does) costs more than the bytes: rows in groups of 8 (the 8 lanes of
# an AVX2 vector), columns in chunks of 8 (one vector of x). For group g and chunk c, with m = the most
# nonzeros any of the group's rows has in the chunk, m "slots" follow each other; slot j holds for each lane
# (row 8g + r) the row's j-th nonzero in the chunk: its value and its column inside the chunk (0..7), or
# (0.0, 0) when the row has fewer. A kernel then computes acc[r] += value[r] * x[8c + lane[r]] for 8 rows
# with one in-register permute of x's chunk (no memory gather).
#     slot_values    (S, 8) float32
#     slot_lanes     (S, 8) uint8: column inside the chunk
#     slot_chunks    (S,) int32: the chunk c
#     group_offsets  (ceil(N / 8) + 1,) int32: group g's slots at [group_offsets[g], group_offsets[g + 1])
# Chunks ascend inside a group. Bytes: 44 per slot; slots ~ nnz / (8 * lane use), lane use ~40-50% for
# uniformly random 80-90% sparsity (0.35-0.55x dense fp32 bytes).
SLOT_ROWS = 8
SLOT_COLS = 8


def sparse_rows_slots_encode(values: Tensor, col_indices: Tensor, row_offsets: Tensor,
                             in_features: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A sparse-rows weight -> (slot_values, slot_lanes, slot_chunks, group_offsets), the row-group slots."""
    n = row_offsets.numel() - 1
    dev = values.device
    groups, chunks = _cdiv(n, SLOT_ROWS), max(1, _cdiv(in_features, SLOT_COLS))
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=values.shape[0])
    cols = col_indices.long()
    cell = (rows // SLOT_ROWS) * chunks + cols // SLOT_COLS  # (group, chunk), group-major
    lane = rows % SLOT_ROWS
    key = cell * SLOT_ROWS + lane
    # entries are row-major with ascending columns, so a stable sort by key keeps each (cell, lane) in column
    # order: rank = position among the entries of the same key
    order = torch.sort(key, stable=True).indices
    key_sorted = key[order]
    per_key = torch.bincount(key_sorted, minlength=groups * chunks * SLOT_ROWS)
    first = torch.cumsum(per_key, 0) - per_key
    rank = torch.arange(key_sorted.numel(), device=dev) - first[key_sorted]
    slots_per_cell = per_key.view(groups * chunks, SLOT_ROWS).amax(1)
    cell_base = torch.cumsum(slots_per_cell, 0) - slots_per_cell
    total = int(slots_per_cell.sum())
    if total >= 2**31:
        raise ValueError(f"the row-group slots of this weight number {total}; int32 offsets cannot index them")
    slot = cell_base[cell[order]] + rank
    slot_values = torch.zeros(total, SLOT_ROWS, dtype=values.dtype, device=dev)
    slot_lanes = torch.zeros(total, SLOT_ROWS, dtype=torch.uint8, device=dev)
    slot_values[slot, lane[order]] = values[order]
    slot_lanes[slot, lane[order]] = (cols[order] % SLOT_COLS).to(torch.uint8)
    cell_of_slot = torch.repeat_interleave(torch.arange(groups * chunks, device=dev), slots_per_cell,
                                           output_size=total)
    slot_chunks = (cell_of_slot % chunks).to(torch.int32)
    group_offsets = torch.zeros(groups + 1, dtype=torch.int64, device=dev)
    group_offsets[1:] = torch.cumsum(slots_per_cell.view(groups, chunks).sum(1), 0)
    return slot_values, slot_lanes, slot_chunks.contiguous(), group_offsets.to(torch.int32)


def sparse_rows_slots_nbytes(slot_values: Tensor, slot_lanes: Tensor, slot_chunks: Tensor,
                             group_offsets: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (slot_values, slot_lanes, slot_chunks, group_offsets))


def sparse_rows_slots_matvec(x: Tensor, slot_values: Tensor, slot_lanes: Tensor, slot_chunks: Tensor,
                             group_offsets: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """Reference: y (1, out_features) = x (1, K) @ W.T + bias with W in the row-group slots."""
    k = x.shape[-1]
    chunks = max(1, _cdiv(k, SLOT_COLS))
    xp = torch.zeros(chunks * SLOT_COLS, dtype=x.dtype, device=x.device)
    xp[:k] = x.reshape(-1)
    cols = slot_chunks.long()[:, None] * SLOT_COLS + slot_lanes.long()
    prod = slot_values * xp[cols]  # (S, 8)
    groups = group_offsets.numel() - 1
    group_of_slot = torch.repeat_interleave(torch.arange(groups, device=x.device),
                                            (group_offsets[1:] - group_offsets[:-1]).long(), output_size=prod.shape[0])
    y = torch.zeros(groups, SLOT_ROWS, dtype=x.dtype, device=x.device).index_add_(0, group_of_slot, prod)
    y = y.reshape(1, -1)[:, :out_features]
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------ tc-bitmask (v2)
# Tile-contiguous bitmask format ("tc-bitmask"), read by the SpInfer / Flash-LLM style SpMM
# (csrc/cuda/bitmask_spmm.cu, kernels/bitmask_spmm.py, op sparsebert.ops.bitmask_spmm):
#     W (N, K) is cut into 64 x 64 tiles (zero-padded at the edges), tile t = i * KT + j for tile row i,
#     tile column j (KT = ceil(K / 64)); the tiles of one tile row are adjacent, so a K range is one
#     contiguous byte range.
#     data          (total,) in W's dtype. Tile t occupies data[tile_offsets[t] : tile_offsets[t + 1]]:
#                   64 uint64 bitmask words (512 bytes, little-endian, reinterpreted as W's dtype), then
#                   the tile's nonzeros, then zeros up to a multiple of 16 bytes (every tile 16-byte aligned).
#     tile_offsets  (NT * KT + 1,) int32: element offsets of the tiles in `data`; the last is data.numel().
#     Inside a tile, word s (s = 0..63) covers the 8 x 8 sub-tile in the order the mma.sync m16n8k16 A
#     fragments consume them: s = ((R * 4 + S) * 4 + Qc * 2 + Qr), where the sub-tile holds tile rows
#     R*16 + Qr*8 + (0..7) and tile columns S*16 + Qc*8 + (0..7); bit p = 8 * row + col (row, col in 0..7).
#     The nonzeros follow word order, then bit order; the value of set bit p of word s sits at
#     sum(popcount(word[s'] for s' < s)) + popcount(word[s] & ((1 << p) - 1)).
#     Bytes per weight = density * sizeof(dtype) + 1/8 + (padding <= 14 bytes + 4) / 4096.
TC_TILE = 64
TC_HEADER_BYTES = 512


def tc_header_elems(dtype: torch.dtype) -> int:
    """Number of `dtype` elements the 64 bitmask words of a tile occupy."""
    return TC_HEADER_BYTES // torch.empty((), dtype=dtype).element_size()


def _tc_subtiles(t: Tensor) -> Tensor:
    """(N, K) -> (NT * KT, 64 sub-tiles, 64 positions) in the tc-bitmask order, zero-padded."""
    tiles = _to_tiles(t, TC_TILE, TC_TILE)  # (NT, KT, 64 r, 64 c)
    nt, kt = tiles.shape[:2]
    # r = R*16 + Qr*8 + ri, c = S*16 + Qc*8 + ci  ->  (R, S, Qc, Qr, ri, ci)
    six = tiles.reshape(nt, kt, 4, 2, 8, 4, 2, 8).permute(0, 1, 2, 5, 6, 3, 4, 7)
    return six.reshape(nt * kt, 64, 64)


def _tc_from_subtiles(sub: Tensor, nt: int, kt: int) -> Tensor:
    """Inverse of `_tc_subtiles` (without the crop): (NT * KT, 64, 64) -> (NT * 64, KT * 64)."""
    six = sub.reshape(nt, kt, 4, 4, 2, 2, 8, 8).permute(0, 2, 5, 6, 1, 3, 4, 7)  # (NT, R, Qr, ri, KT, S, Qc, ci)
    return six.reshape(nt * TC_TILE, kt * TC_TILE)


def tc_bitmask_encode(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Dense (N, K) weight -> (data, tile_offsets) in the tc-bitmask format; zeros are the pruned entries."""
    _check_weight(weight)
    n, k = weight.shape
    nt, kt = _cdiv(n, TC_TILE), _cdiv(k, TC_TILE)
    elem = weight.element_size()
    header, align = TC_HEADER_BYTES // elem, 16 // elem
    sub_w = _tc_subtiles(weight)
    bits = sub_w != 0  # (T, 64, 64)
    shifts = torch.arange(64, device=weight.device, dtype=torch.int64)
    words = (bits.to(torch.int64) << shifts).sum(-1)  # distinct bits: the sum is the OR (bit 63 wraps to the sign)
    counts = bits.sum(dim=(1, 2)).to(torch.int64)
    lengths = header + (counts + align - 1) // align * align
    offsets = torch.zeros(nt * kt + 1, dtype=torch.int64, device=weight.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    if total >= 2**31:
        raise ValueError(f"the tc-bitmask data of a weight of shape {(n, k)} has {total} elements; int32 offsets "
                         "index at most 2**31 - 1")
    data = torch.zeros(total, dtype=weight.dtype, device=weight.device)
    data64 = data.view(torch.int64)  # every tile is a multiple of 16 bytes long
    words_at = offsets[:-1] * elem // 8
    data64[words_at[:, None] + shifts] = words
    flat = bits.reshape(bits.shape[0], -1)
    rank = torch.cumsum(flat.to(torch.int64), 1) - 1
    where = (offsets[:-1, None] + header + rank)[flat]
    data[where] = sub_w.reshape(flat.shape)[flat]
    return data, offsets.to(torch.int32)


def tc_bitmask_decode(data: Tensor, tile_offsets: Tensor, out_features: int, in_features: int) -> Tensor:
    """Inverse of `tc_bitmask_encode`: the dense (out_features, in_features) weight. No host sync."""
    nt, kt = _cdiv(out_features, TC_TILE), _cdiv(in_features, TC_TILE)
    elem = data.element_size()
    header = TC_HEADER_BYTES // elem
    starts = tile_offsets[:-1].to(torch.int64)
    shifts = torch.arange(64, device=data.device, dtype=torch.int64)
    words = data.view(torch.int64)[(starts * elem // 8)[:, None] + shifts]  # (T, 64)
    bits = ((words[:, :, None] >> shifts) & 1).bool().reshape(nt * kt, 4096)
    rank = torch.cumsum(bits.to(torch.int64), 1) - 1
    where = (starts[:, None] + header + rank).clamp(0, max(data.numel() - 1, 0))
    sub = torch.where(bits, data[where], torch.zeros((), dtype=data.dtype, device=data.device))
    dense = _tc_from_subtiles(sub, nt, kt)
    return dense[:out_features, :in_features].contiguous()


def tc_bitmask_nbytes(data: Tensor, tile_offsets: Tensor) -> int:
    return data.numel() * data.element_size() + tile_offsets.numel() * tile_offsets.element_size()


def bitmask_spmm(x: Tensor, data: Tensor, tile_offsets: Tensor, bias: Optional[Tensor], out_features: int,
                 in_features: int) -> Tensor:
    """Reference: y = x @ W.T + bias with W decoded from the tc-bitmask format."""
    return F.linear(x, tc_bitmask_decode(data, tile_offsets, out_features, in_features), bias)


def dense_nbytes(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    return out_features * in_features * torch.empty((), dtype=dtype).element_size()


def bitmask_bytes_per_weight(density: float, dtype_bytes: int = 2, tile_n: int = 32, tile_k: int = 64) -> float:
    """Model of the bitmask format's size: density * dtype_bytes + 1/8 + 4 / (tile_n * tile_k)."""
    return density * dtype_bytes + 1 / 8 + 4 / (tile_n * tile_k)


__all__ = [
    "BSR_BLOCK_SIZES", "bitmask_encode", "bitmask_decode", "bitmask_linear", "bitmask_nbytes",
    "bitmask_bytes_per_weight", "bsr_encode", "bsr_decode", "bsr_linear", "bsr_linear_blockwise", "is_2to4",
    "nm24_encode", "nm24_decode", "nm24_linear", "dense_nbytes", "check_tile", "check_block",
    "sparse_rows_encode", "sparse_rows_decode", "sparse_rows_linear", "sparse_rows_index_dtype",
    "SLOT_ROWS", "SLOT_COLS", "sparse_rows_slots_encode", "sparse_rows_slots_nbytes", "sparse_rows_slots_matvec",
    "TC_TILE", "TC_HEADER_BYTES", "tc_header_elems", "tc_bitmask_encode", "tc_bitmask_decode",
    "tc_bitmask_nbytes", "bitmask_spmm",
]
