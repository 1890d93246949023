"""The mma.sp m16n8k32 fragment layout of csrc/cuda/common.cuh, as Python, for the probe test.

Lane l has g = l // 4, t = l % 4. A is 16 x 32 logical with 2:4 sparsity along k, stored
compressed as 16 x 16 (group j of row r keeps two values, at stored columns 2j and 2j + 1) plus a
nibble i0 | i1 << 2 per group (the sparse24 nibble). B is 32 x 8, C is 16 x 8.

    a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   a[2] = A(g, 2t+8..)   a[3] = A(g+8, 2t+8..)
    b[i] = B(2t + 8i .. 2t + 8i + 1, g)
    c[0..1] = C(g, 2t..2t+1)                           c[2..3] = C(g+8, 2t..2t+1)
    e (selector s = 0, 1): lane 4g + 2s + p (p = 0, 1) holds row g's nibbles of groups
    4p..4p+3 in bits 0..15 (group 4p + q at bits 4q) and row g + 8's in bits 16..31; the
    other two lanes of the quad supply nothing.

Two 16-bit elements share a 32-bit register, the lower column in the low half.
"""

from __future__ import annotations

import torch

LANES = 32


def random_sparse24(
    rows: int, cols: int, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """A dense [rows, cols] matrix with exactly two nonzeros in every group of four columns,
    positions drawn uniformly from the six patterns, values away from zero."""
    groups = cols // 4
    scores = torch.rand(rows, groups, 4, generator=generator)
    keep = scores.topk(2, dim=-1).indices
    mask = torch.zeros(rows, groups, 4, dtype=torch.bool).scatter_(-1, keep, True)
    values = torch.randn(rows, groups, 4, generator=generator)
    values = values.sign() * (values.abs() + 0.25)
    return (values * mask).reshape(rows, cols).to(dtype)


def compress(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical [16, 32] 2:4 -> (stored [16, 16], nibbles [16, 8] int)."""
    rows, cols = a.shape
    groups = a.reshape(rows, cols // 4, 4)
    kept = groups != 0
    assert bool((kept.sum(-1) == 2).all()), "every group needs exactly two nonzeros"
    index = torch.arange(4).expand_as(groups)
    positions = index[kept].reshape(rows, cols // 4, 2)  # ascending: i0 < i1
    stored = groups[kept].reshape(rows, cols // 2)
    nibbles = positions[..., 0] | (positions[..., 1] << 2)
    return stored, nibbles


def _pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two 16-bit tensors -> int32 tensor, lo in the low half."""
    return torch.stack([lo, hi], dim=-1).contiguous().view(torch.int32).squeeze(-1)


def fragments(
    a: torch.Tensor, b: torch.Tensor, selector: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-lane registers (a [32, 4], b [32, 4], e [32], int32) for C = A @ B."""
    assert selector in (0, 1)
    assert a.shape == (16, 32) and b.shape == (32, 8) and a.dtype == b.dtype
    stored, nibbles = compress(a)
    lane = torch.arange(LANES)
    g, t = lane // 4, lane % 4
    a_regs = torch.stack(
        [
            _pair(stored[g, 2 * t], stored[g, 2 * t + 1]),
            _pair(stored[g + 8, 2 * t], stored[g + 8, 2 * t + 1]),
            _pair(stored[g, 2 * t + 8], stored[g, 2 * t + 9]),
            _pair(stored[g + 8, 2 * t + 8], stored[g + 8, 2 * t + 9]),
        ],
        dim=1,
    )
    b_regs = torch.stack([_pair(b[2 * t + 8 * i, g], b[2 * t + 8 * i + 1, g]) for i in range(4)], 1)
    p = (t % 2).unsqueeze(1)
    q = torch.arange(4).unsqueeze(0)
    shifts = 4 * q
    low = (nibbles[g.unsqueeze(1), 4 * p + q] << shifts).sum(1)
    high = (nibbles[(g + 8).unsqueeze(1), 4 * p + q] << shifts).sum(1)
    e = low | (high << 16)
    # The lanes the selector leaves out get a different valid pattern (indices 0, 1
    # everywhere), so a wrong assumption about which lanes supply metadata shows.
    e = torch.where(t // 2 == selector, e, torch.full_like(e, 0x44444444))
    return a_regs, b_regs, e.to(torch.int64).to(torch.int32)


def accumulator(c_regs: torch.Tensor) -> torch.Tensor:
    """Lanes' c [32, 4] float -> C [16, 8]."""
    lane = torch.arange(LANES)
    g, t = lane // 4, lane % 4
    c = torch.full((16, 8), float("nan"), dtype=c_regs.dtype)
    c[g, 2 * t] = c_regs[:, 0]
    c[g, 2 * t + 1] = c_regs[:, 1]
    c[g + 8, 2 * t] = c_regs[:, 2]
    c[g + 8, 2 * t + 1] = c_regs[:, 3]
    return c


def a_from_fragments(
    a_regs: torch.Tensor, e: torch.Tensor, dtype: torch.dtype, selector: int = 0
) -> torch.Tensor:
    """Inverse of ``fragments`` for A: what the layout says the lanes hold, as a dense [16, 32]."""
    halves = a_regs.contiguous().view(dtype).reshape(LANES, 4, 2)
    stored = torch.zeros(16, 16, dtype=dtype)
    nibbles = torch.zeros(16, 8, dtype=torch.int64)
    words = e.to(torch.int64) & 0xFFFFFFFF
    for lane in range(LANES):
        g, t = divmod(lane, 4)
        stored[g, 2 * t : 2 * t + 2] = halves[lane, 0]
        stored[g + 8, 2 * t : 2 * t + 2] = halves[lane, 1]
        stored[g, 2 * t + 8 : 2 * t + 10] = halves[lane, 2]
        stored[g + 8, 2 * t + 8 : 2 * t + 10] = halves[lane, 3]
        if t // 2 == selector:
            p = t % 2
            for q in range(4):
                nibbles[g, 4 * p + q] = (words[lane] >> (4 * q)) & 15
                nibbles[g + 8, 4 * p + q] = (words[lane] >> (16 + 4 * q)) & 15
    dense = torch.zeros(16, 8, 4, dtype=dtype)
    pairs = stored.reshape(16, 8, 2)
    dense.scatter_(-1, (nibbles & 3).unsqueeze(-1), pairs[..., :1])
    dense.scatter_(-1, (nibbles >> 2).unsqueeze(-1), pairs[..., 1:])
    return dense.reshape(16, 32)
