"""The ``bitmap`` packed layout: unstructured sparsity (about 50%), one bit per weight.

Dense W is [N, K] (nn.Linear layout), y = x @ W^T; K is zero-padded to Kp (multiple of 64).

- ``bitmask`` uint8 [N, Kp/8]: bit j (LSB first) of byte b is 1 iff column 8b+j is kept,
  i.e. W[n, 8b+j] != 0.
- ``values`` 1-D, W's dtype: row n's kept values in column order start at row_offsets[n];
  each row's slot is padded with zeros to a multiple of 8 elements (16-byte aligned rows
  for 16-bit types).
- ``row_offsets`` int64 [N+1]: row_offsets[0] = 0, all multiples of 8, the last one is
  values.numel().

Bytes at 50%: N*K/2*sizeof(dtype) + N*Kp/8 + 8N, about 0.5625x dense for 16-bit types.

Worked example, two rows with K = 8 (Kp = 64)::

    W[0]        = [0, 1.5, 0, -2, 3, 0, 0, 0]   kept columns 1, 3, 4
    W[1]        = [0, 0, 0, 0, 0, 0, 0, 7]      kept column 7
    bitmask[0]  = [0b00011010 = 0x1A, 0, 0, 0, 0, 0, 0, 0]
    bitmask[1]  = [0b10000000 = 0x80, 0, 0, 0, 0, 0, 0, 0]
    values      = [1.5, -2, 3, 0, 0, 0, 0, 0,   7, 0, 0, 0, 0, 0, 0, 0]
    row_offsets = [0, 8, 16]

Zeros count by value (-0.0 is a zero). Kept values are stored bit for bit, so unpack
reproduces W exactly, except that -0.0 comes back as +0.0 (numerically equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimstack.formats.common import (
    FORMAT_VERSION,
    PackedWeight,
    check_dense_weight,
    dtype_name,
    expect,
    pad_columns,
    padded_k,
)

ROW_ALIGN = 8  # elements; each row's values slot is a multiple of this
_BIT_WEIGHTS = [1 << j for j in range(8)]  # pack: bit j of a byte is column 8b + j


@dataclass
class BitmapWeight(PackedWeight):
    """An unstructured sparse weight packed as ``bitmask`` + compacted ``values``."""

    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    version: int = FORMAT_VERSION
    TENSORS: ClassVar[tuple[str, ...]] = ("values", "bitmask", "row_offsets")
    format: ClassVar[str] = "bitmap"

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        kp = padded_k(k)
        dtype_name(self.dtype)
        expect(self.version == FORMAT_VERSION, f"bitmap version {self.version} != {FORMAT_VERSION}")
        expect(n > 0 and k > 0, f"bitmap shape must be positive, got {self.shape}")
        expect(
            self.values.dtype == self.dtype and self.values.dim() == 1,
            f"bitmap values must be 1-D {self.dtype}, got {self.values.dtype} "
            f"{list(self.values.shape)}",
        )
        expect(
            self.bitmask.dtype == torch.uint8 and tuple(self.bitmask.shape) == (n, kp // 8),
            f"bitmap bitmask must be uint8 [{n}, {kp // 8}], got "
            f"{self.bitmask.dtype} {list(self.bitmask.shape)}",
        )
        expect(
            self.row_offsets.dtype == torch.int64 and tuple(self.row_offsets.shape) == (n + 1,),
            f"bitmap row_offsets must be int64 [{n + 1}], got "
            f"{self.row_offsets.dtype} {list(self.row_offsets.shape)}",
        )
        devices = {t.device for t in (self.values, self.bitmask, self.row_offsets)}
        expect(len(devices) == 1, f"bitmap tensors are on different devices: {devices}")
        expect(
            all(t.is_contiguous() for t in (self.values, self.bitmask, self.row_offsets)),
            "bitmap values, bitmask and row_offsets must be contiguous",
        )

    def to(self, device: str | torch.device, non_blocking: bool = False) -> BitmapWeight:
        return BitmapWeight(
            self.values.to(device, non_blocking=non_blocking),
            self.bitmask.to(device, non_blocking=non_blocking),
            self.row_offsets.to(device, non_blocking=non_blocking),
            self.shape,
            self.dtype,
        )

    def validate(self) -> None:
        """Check the data itself (offsets vs. bit counts); syncs, so only on load."""
        offsets = self.row_offsets.cpu()
        slots = offsets[1:] - offsets[:-1]
        kept = row_counts(self.bitmask).cpu()
        expect(int(offsets[0]) == 0, f"bitmap row_offsets[0] must be 0, got {int(offsets[0])}")
        expect(
            int(offsets[-1]) == self.values.numel(),
            f"bitmap row_offsets[-1] = {int(offsets[-1])} but values has {self.values.numel()}",
        )
        expect(bool((offsets % ROW_ALIGN == 0).all()), "bitmap row_offsets must be multiples of 8")
        short = (slots < kept).nonzero()
        expect(
            short.numel() == 0,
            f"bitmap row {int(short[0]) if short.numel() else -1} has more set bits than "
            "its values slot",
        )
        n, k = self.shape
        if k % 8:  # the mask's last byte of a row covers padding columns k..: none is kept
            tail = (self.bitmask[:, k // 8] >> (k % 8)) != 0
            past = tail | (self.bitmask[:, k // 8 + 1 :] != 0).any(dim=1)
        else:
            past = (self.bitmask[:, k // 8 :] != 0).any(dim=1)
        bad = past.nonzero()
        expect(
            bad.numel() == 0,
            f"bitmap row {int(bad[0]) if bad.numel() else -1} keeps a padding column past "
            f"K={k}; the mask bits past K must be 0",
        )

    def unpack(self) -> torch.Tensor:
        return unpack_bitmap(self)


def _bits(bitmask: torch.Tensor) -> torch.Tensor:
    """bool [N, Kp]: the unpacked bits, LSB first within each byte."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)


def row_counts(bitmask: torch.Tensor) -> torch.Tensor:
    """int64 [N]: number of kept values per row."""
    return _bits(bitmask).sum(-1)


def _slot_starts(kept: torch.Tensor) -> torch.Tensor:
    """Where each kept value goes in ``values``: row offset + rank within its row."""
    counts = kept.sum(-1)
    slots = (counts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    row_offsets = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=kept.device)
    row_offsets[1:] = slots.cumsum(0)
    rank = kept.to(torch.int64).cumsum(-1) - 1
    return row_offsets, (row_offsets[:-1, None] + rank)[kept]


def pack_bitmap(weight: torch.Tensor) -> BitmapWeight:
    """Pack any fp32/fp16/bf16 weight [N, K] into the bitmap layout (keeps its nonzeros)."""
    check_dense_weight(weight)
    n, k = weight.shape
    padded = pad_columns(weight.detach(), padded_k(k))
    kept = padded != 0
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=weight.device)
    bitmask = (kept.reshape(n, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    row_offsets, positions = _slot_starts(kept)
    values = padded.new_zeros(int(row_offsets[-1]))
    values[positions] = padded[kept]
    return BitmapWeight(values, bitmask.contiguous(), row_offsets, (n, k), weight.dtype)


def unpack_bitmap(packed: BitmapWeight) -> torch.Tensor:
    """Rebuild the dense weight [N, K] (padding columns dropped).

    Fixed shapes and no boolean indexing: no host sync, so it can run inside a CUDA graph.
    """
    n, k = packed.shape
    if packed.values.numel() == 0:
        return packed.values.new_zeros((n, k))
    kept = _bits(packed.bitmask)
    rank = kept.to(torch.int64).cumsum(-1) - 1
    slot = (packed.row_offsets[:-1, None] + rank).clamp_(0, packed.values.numel() - 1)
    dense = torch.where(kept, packed.values[slot], packed.values.new_zeros(()))
    return dense[:, :k].contiguous()
