"""Decode one tile of a bitmap-packed weight into a dense register tile (Triton device
functions), shared by ``bitmap_gemv`` (decode) and ``bitmap_unpack`` (prefill: the dense weight
for a dense matmul), so both read the one packed copy described in slimstack/formats/bitmap.py.

The mask is read as int32 words [N, Kp/32]: bit j of word w is column 32w + j. A row's kept
values sit in column order from ``row_offsets[n]``, so a kept column's value index is the
row's running count plus the kept bits before it: popcounts per word, a scan over the words of
a tile, a popcount below the column within its word.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from slimstack.kernels._checks import padded_k
from slimstack.kernels.sparse24_gemv import choose_split_k, sm_count

# A split of K first skips the tiles before it by popcounts of their mask words: capped, so
# that extra mask traffic stays small.
MAX_SPLIT_K = 4


def plan_grid(
    N: int, K: int, block_n: int, block_k: int, split_k: int | None, device: torch.device
) -> tuple[int, int, int]:
    """(Kp, row blocks, K splits) of a (row blocks, K splits) launch over a bitmap weight:
    split only where the row blocks cannot fill the SMs, at most MAX_SPLIT_K ways (or as
    `split_k` asks), never more splits than K tiles."""
    Kp = padded_k(K)
    k_tiles = triton.cdiv(Kp, block_k)
    n_blocks = triton.cdiv(N, block_n)
    planned = min(choose_split_k(n_blocks, k_tiles, sm_count(device)), MAX_SPLIT_K)
    return Kp, n_blocks, min(split_k or planned, k_tiles)


@triton.jit
def popcount32(words, HW_POPC: tl.constexpr):
    """Bits set per int32 word: the POPC instruction when compiled, SWAR arithmetic in the
    interpreter (which has no libdevice). Shifts are arithmetic; the masks drop the sign fill."""
    if HW_POPC:
        return libdevice.popc(words)
    c = words - ((words >> 1) & 0x55555555)
    c = (c & 0x33333333) + ((c >> 2) & 0x33333333)
    c = (c + (c >> 4)) & 0x0F0F0F0F
    c = c + (c >> 8)
    c = c + (c >> 16)
    return c & 0x3F


@triton.jit
def kept_before(
    mask_ptr,
    rows,
    row_mask,
    KW,
    stride_mask,
    t_start,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    """Per row, how many values the K tiles [0, t_start) keep."""
    WORDS: tl.constexpr = BLOCK_K // 32
    count = tl.zeros([BLOCK_N], dtype=tl.int64)
    for t in range(0, t_start):
        wcols = t * WORDS + tl.arange(0, WORDS)
        words = tl.load(
            mask_ptr + rows[:, None] * stride_mask + wcols[None, :],
            mask=row_mask[:, None] & (wcols[None, :] < KW),
            other=0,
        )
        count += tl.sum(popcount32(words, HW_POPC), axis=1).to(tl.int64)
    return count


@triton.jit
def load_mask_words(
    mask_ptr,
    rows,
    row_mask,
    k0,
    KW,
    stride_mask,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """The int32 mask words of W[rows, k0:k0+BLOCK_K], [BLOCK_N, BLOCK_K/32]; 0 for rows
    outside `row_mask` (so a tile decoded from them loads nothing and keeps nothing)."""
    WORDS: tl.constexpr = BLOCK_K // 32
    wcols = k0 // 32 + tl.arange(0, WORDS)
    m_ptrs = mask_ptr + rows[:, None] * stride_mask + wcols[None, :]
    if EVEN_K:
        return tl.load(m_ptrs, mask=row_mask[:, None], other=0)
    return tl.load(m_ptrs, mask=row_mask[:, None] & (wcols[None, :] < KW), other=0)


@triton.jit
def gather_kept_values(
    values_ptr,
    words,
    next_value,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    """The dense tile the mask `words` [BLOCK_N, BLOCK_K/32] describe, and each row's next
    value index after it.

    A kept column's value index is the row's running count, plus the kept bits of the words
    before its own in this tile (a scan over BLOCK_K/32 word counts), plus the kept bits
    below it in its word (a popcount). No scan runs over single columns: in Triton that
    costs a warp-shuffle ladder per element.
    """
    per_word = popcount32(words, HW_POPC)
    word_start = tl.cumsum(per_word, axis=1) - per_word
    bit = tl.arange(0, 32)[None, None, :]
    kept = (words[:, :, None] >> bit) & 1
    below = popcount32(words[:, :, None] & ~(-1 << bit), HW_POPC)
    # 64-bit row start once per row, 32-bit offsets per column: one address add each.
    row_values = values_ptr + next_value
    offset = tl.reshape(word_start[:, :, None] + below, [BLOCK_N, BLOCK_K])
    kept = tl.reshape(kept, [BLOCK_N, BLOCK_K])
    w = tl.load(row_values[:, None] + offset, mask=kept != 0, other=0.0)
    return w, next_value + tl.sum(per_word, axis=1).to(tl.int64)


@triton.jit
def bitmap_dense_tile(
    values_ptr,
    mask_ptr,
    rows,
    row_mask,
    next_value,
    k0,
    KW,
    stride_mask,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    """Dense W[rows, k0:k0+BLOCK_K] and each row's next value index after the tile."""
    words = load_mask_words(mask_ptr, rows, row_mask, k0, KW, stride_mask, BLOCK_K, EVEN_K)
    return gather_kept_values(values_ptr, words, next_value, BLOCK_N, BLOCK_K, HW_POPC)


@triton.jit
def split_rows_and_tiles(
    mask_ptr,
    row_offsets_ptr,
    N,
    KW,
    stride_mask,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    """For a grid (row blocks, K splits): this program's rows (and which exist), its run of
    K tiles [t_start, t_end), and per row the index of the run's first value."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split_k = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    num_tiles = tl.cdiv(32 * KW, BLOCK_K)
    tiles_per_split = tl.cdiv(num_tiles, split_k)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    next_value = tl.load(row_offsets_ptr + rows, mask=row_mask, other=0)
    next_value += kept_before(
        mask_ptr, rows, row_mask, KW, stride_mask, t_start, BLOCK_N, BLOCK_K, HW_POPC
    )
    return rows, row_mask, t_start, t_end, next_value
