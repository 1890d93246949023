"""Decode one tile of a packed 2:4 weight into a dense register tile (Triton device function).

Shared by ``sparse24_gemv`` (decode) and ``sparse24_gemm`` (prefill) so both read the one
packed copy of the weight described in slimstack/formats/sparse24.py:

- ``values`` [N, Kp/2]: the two kept entries of every group of four columns, in column order;
- ``meta`` viewed as int32 words [N, Kp/32]: word w of a row holds groups 8w..8w+7, one nibble
  each (group g at bits 4*(g%8)), nibble = i0 | (i1 << 2) with i0 < i1 the in-group columns.
  That byte layout read as little-endian int32 gives exactly this.

Worked example, one group: W[n, 4g:4g+4] = [0, a, 0, b] -> values (a, b), nibble 1 | 3<<2 = 0xD.
Decoding scatters a and b back: column 1 gets a (i0 == 1), column 3 gets b (i1 == 3).

Because i0 < i1, column 0 can only come from i0 and column 3 only from i1; columns 1 and 2
come from either. That is 6 compares + 6 selects per group of four outputs, no gathers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_sparse24_tile(
    values_ptr,
    meta_ptr,
    rows,
    row_mask,
    k0,
    KV,
    stride_v,
    stride_meta,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Raw packed tile for W[rows, k0:k0+BLOCK_K]: values [BLOCK_N, BLOCK_K/2] and int32 meta
    words [BLOCK_N, BLOCK_K/32]; k0 is a multiple of BLOCK_K (>= 64), ``KV`` = Kp/2.

    Split from the decode so a loop can prefetch the next raw tile (a few registers per
    thread) while it decodes the current one. Masked-off rows and columns past Kp read as 0.
    """
    vcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    wcols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    v_ptrs = values_ptr + rows[:, None] * stride_v + vcols[None, :]
    m_ptrs = meta_ptr + rows[:, None] * stride_meta + wcols[None, :]
    if EVEN_K:
        v = tl.load(v_ptrs, mask=row_mask[:, None], other=0.0)
        words = tl.load(m_ptrs, mask=row_mask[:, None], other=0)
    else:
        v = tl.load(v_ptrs, mask=row_mask[:, None] & (vcols[None, :] < KV), other=0.0)
        words = tl.load(m_ptrs, mask=row_mask[:, None] & (wcols[None, :] < KV // 16), other=0)
    return v, words


@triton.jit
def decode_sparse24_columns(v, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The raw tile's W[:, 4g + c] for c = 0, 1, 2, 3: four [BLOCK_N, BLOCK_K/4] tiles, in
    the values dtype (column c of every group of four, groups in order)."""
    GROUPS: tl.constexpr = BLOCK_K // 4
    shifts = 4 * tl.arange(0, 8)
    nibbles = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, [BLOCK_N, GROUPS])
    i0 = nibbles & 3
    i1 = nibbles >> 2
    v0, v1 = tl.split(tl.reshape(v, [BLOCK_N, GROUPS, 2]))

    zero = tl.zeros_like(v0)
    col0 = tl.where(i0 == 0, v0, zero)
    col1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    col2 = tl.where(i1 == 2, v1, tl.where(i0 == 2, v0, zero))
    col3 = tl.where(i1 == 3, v1, zero)
    return col0, col1, col2, col3


@triton.jit
def load_x_columns(
    x_ptr,
    offs_m,
    m_mask,
    stride_xm,
    k0,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_X: tl.constexpr,
):
    """The x operands of decode_sparse24_columns' four tiles: x[offs_m, k0 + 4g + c]^T for
    c = 0, 1, 2, 3, four [BLOCK_K/4, BLOCK_M] tiles from one load of [groups, tokens, 4]
    (8-byte pieces per token and group); 0 outside `m_mask` and past K. EVEN_X: K is a
    multiple of BLOCK_K (no column past K)."""
    GROUPS: tl.constexpr = BLOCK_K // 4
    cols = k0 + 4 * tl.arange(0, GROUPS)[:, None, None] + tl.arange(0, 4)[None, None, :]
    ptrs = x_ptr + offs_m[None, :, None] * stride_xm + cols
    if EVEN_X:
        x4 = tl.load(ptrs, mask=m_mask[None, :, None], other=0.0)
    else:
        x4 = tl.load(ptrs, mask=m_mask[None, :, None] & (cols < K), other=0.0)
    even, odd = tl.split(tl.reshape(x4, [GROUPS, BLOCK_M, 2, 2]))  # c = 2j + i: i = 0 / 1
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def decode_sparse24_tile(v, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile, in the values dtype, from a raw tile."""
    col0, col1, col2, col3 = decode_sparse24_columns(v, words, BLOCK_N, BLOCK_K)
    # join(join(c0, c2), join(c1, c3)) has c_t at flat position t of its trailing 2x2.
    dense = tl.join(tl.join(col0, col2), tl.join(col1, col3))
    return tl.reshape(dense, [BLOCK_N, BLOCK_K])


@triton.jit
def sparse24_dense_tile(
    values_ptr,
    meta_ptr,
    rows,
    row_mask,
    k0,
    KV,
    stride_v,
    stride_meta,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Dense W[rows, k0:k0+BLOCK_K]: load_sparse24_tile then decode_sparse24_tile."""
    v, words = load_sparse24_tile(
        values_ptr, meta_ptr, rows, row_mask, k0, KV, stride_v, stride_meta, BLOCK_K, EVEN_K
    )
    return decode_sparse24_tile(v, words, BLOCK_N, BLOCK_K)
