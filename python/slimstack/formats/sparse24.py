"""The ``sparse24`` packed layout: 2 of every 4 consecutive weights along K are kept.

Dense W is [N, K] (nn.Linear layout), y = x @ W^T. K is zero-padded to Kp, a multiple
of 64. Each row splits into groups of 4 columns; group g = columns 4g..4g+3 keeps two
in-group positions i0 < i1 (its nonzeros, topped up with its lowest-index zeros).

- ``values`` [N, Kp/2], W's dtype: values[n, 2g] = W[n, 4g+i0], values[n, 2g+1] = W[n, 4g+i1].
- ``meta`` uint8 [N, Kp/8]: nibble i0 | (i1 << 2) per group; byte b holds group 2b in its
  low nibble and group 2b+1 in its high nibble. Read as little-endian uint16 [N, Kp/16],
  nibble g%4 of word g//4 is group g: the per-group encoding mma.sp uses for 16-bit types.

Column of values[n, j] = 4*(j//2) + ((meta[n, j//4] >> (4*((j//2)%2) + 2*(j%2))) & 3).
Bytes: N*Kp/2*sizeof(dtype) + N*Kp/8, i.e. 0.5625x dense for fp16/bf16.

Worked example, one row with K = 8 (Kp = 64; groups 2..15 are padding)::

    W[0]      = [0, 1.5, 0, -2 | 3, 0, 0, 0]
    group 0   : nonzeros at 1, 3          -> i0=1, i1=3, nibble 1 | 3<<2 = 0xD
    group 1   : one nonzero at 0, top up 1 -> i0=0, i1=1, nibble 0 | 1<<2 = 0x4
    values[0] = [1.5, -2, 3, 0, 0, 0, ...]  (padding groups store 0, 0)
    meta[0]   = [0x4D, 0x44, 0x44, ...]     (padding groups: i0=0, i1=1 -> 0x4)

Zeros count by value (-0.0 is a zero). Kept values are stored bit for bit, so unpack
reproduces W exactly, except that a dropped -0.0 comes back as +0.0 (numerically equal).
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

GROUP = 4
KEEP = 2
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@dataclass
class Sparse24Weight(PackedWeight):
    """A 2:4 weight packed as ``values`` + ``meta`` (see the module docstring)."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    version: int = FORMAT_VERSION
    TENSORS: ClassVar[tuple[str, ...]] = ("values", "meta")
    format: ClassVar[str] = "sparse24"

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        kp = padded_k(k)
        dtype_name(self.dtype)
        expect(
            self.version == FORMAT_VERSION, f"sparse24 version {self.version} != {FORMAT_VERSION}"
        )
        expect(n > 0 and k > 0, f"sparse24 shape must be positive, got {self.shape}")
        expect(
            self.values.dtype == self.dtype and tuple(self.values.shape) == (n, kp // 2),
            f"sparse24 values must be {self.dtype} [{n}, {kp // 2}], got "
            f"{self.values.dtype} {list(self.values.shape)}",
        )
        expect(
            self.meta.dtype == torch.uint8 and tuple(self.meta.shape) == (n, kp // 8),
            f"sparse24 meta must be uint8 [{n}, {kp // 8}], got "
            f"{self.meta.dtype} {list(self.meta.shape)}",
        )
        expect(
            self.values.device == self.meta.device,
            f"sparse24 values and meta are on different devices "
            f"({self.values.device} vs {self.meta.device})",
        )
        expect(
            self.values.is_contiguous() and self.meta.is_contiguous(),
            "sparse24 values and meta must be contiguous",
        )

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Sparse24Weight:
        return Sparse24Weight(
            self.values.to(device, non_blocking=non_blocking),
            self.meta.to(device, non_blocking=non_blocking),
            self.shape,
            self.dtype,
        )

    def validate(self) -> None:
        """Check the data itself: every nibble names two distinct in-group positions i0 < i1,
        and every value stored for a padding column (past K) is zero. Either corruption would
        make the backends disagree (the kernels multiply padding by x's zero padding, NaN
        included; unpack drops it). Syncs, so only on load."""
        nibbles = torch.stack([self.meta & 0xF, self.meta >> 4], dim=-1).reshape(
            self.meta.shape[0], -1
        )
        bad = ((nibbles & 3) >= (nibbles >> 2)).nonzero()
        if bad.numel():
            row, group = (int(i) for i in bad[0])
            nibble = int(nibbles[row, group])
            raise ValueError(
                f"sparse24 meta is corrupt: row {row}, group {group} has nibble {nibble:#x} "
                f"(i0={nibble & 3}, i1={nibble >> 2}); each group needs in-group positions "
                "i0 < i1 in 0..3"
            )
        padding = (kept_columns(self) >= self.shape[1]) & (self.values != 0)
        if bool(padding.any()):
            row, slot = (int(i) for i in padding.nonzero()[0])
            raise ValueError(
                f"sparse24 values are corrupt: row {row}, slot {slot} holds "
                f"{float(self.values[row, slot])} for a padding column past K={self.shape[1]}; "
                "padding must be zero"
            )

    def unpack(self) -> torch.Tensor:
        return unpack_sparse24(self)


def _groups_nonzero(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad K to Kp and view as groups: (grouped weight [N, Kp/4, 4], nonzero mask)."""
    grouped = pad_columns(weight.detach(), padded_k(weight.shape[1])).reshape(
        weight.shape[0], -1, GROUP
    )
    return grouped, grouped != 0


def is_sparse24(weight: torch.Tensor) -> bool:
    """True iff every group of 4 consecutive columns holds at most 2 nonzeros."""
    check_dense_weight(weight)
    _, nonzero = _groups_nonzero(weight)
    return bool((nonzero.sum(-1) <= KEEP).all())


def pack_sparse24(weight: torch.Tensor) -> Sparse24Weight:
    """Pack a 2:4 weight [N, K]; raises ValueError naming the first group that is not 2:4."""
    check_dense_weight(weight)
    n, k = weight.shape
    grouped, nonzero = _groups_nonzero(weight)
    too_dense = nonzero.sum(-1) > KEEP
    if bool(too_dense.any()):
        row, group = (int(i) for i in too_dense.nonzero()[0])
        count = int(nonzero[row, group].sum())
        raise ValueError(
            f"weight {n}x{k} is not 2:4 sparse: row {row}, group {group} (columns "
            f"{GROUP * group}..{min(GROUP * group + 3, k - 1)}) has {count} nonzeros; at most "
            f"{KEEP} of every {GROUP} consecutive values along K may be nonzero"
        )
    # Keep nonzeros first, then the lowest-index zeros; a stable sort of this key gives
    # the two kept positions, re-sorted so that i0 < i1.
    in_group = torch.arange(GROUP, device=weight.device)
    key = (~nonzero).to(torch.int64) * GROUP + in_group
    kept = key.argsort(dim=-1, stable=True)[..., :KEEP].sort(dim=-1).values
    # gather / scatter on the bits: PyTorch's CPU kernels rewrite 16-bit NaN payloads
    bits = _INT_VIEW[weight.dtype]
    values = grouped.view(bits).gather(-1, kept).reshape(n, -1).view(weight.dtype).contiguous()
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).reshape(n, -1, 2)
    meta = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8).contiguous()
    return Sparse24Weight(values, meta, (n, k), weight.dtype)


def kept_columns(packed: Sparse24Weight) -> torch.Tensor:
    """int64 [N, Kp/2]: the dense column of every entry of ``packed.values``."""
    meta = packed.meta.to(torch.int64)
    nibbles = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)
    in_group = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)  # [N, Kp/4, 2]
    base = GROUP * torch.arange(nibbles.shape[1], device=meta.device).view(1, -1, 1)
    return (base + in_group).reshape(meta.shape[0], -1)


def unpack_sparse24(packed: Sparse24Weight) -> torch.Tensor:
    """Rebuild the dense weight [N, K] (padding columns dropped)."""
    n, k = packed.shape
    bits = _INT_VIEW[packed.dtype]
    dense = torch.zeros((n, packed.kp), dtype=bits, device=packed.values.device)
    dense.scatter_(1, kept_columns(packed), packed.values.view(bits))
    return dense[:, :k].view(packed.dtype).contiguous()
