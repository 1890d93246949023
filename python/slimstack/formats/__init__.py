"""Packed sparse weight formats: the one place that knows the layouts.

See ``sparse24`` and ``bitmap`` for each layout (format version 1) with a worked example:
their docstrings are the contract every kernel reads, and ``cutlass_sm90`` derives the
metadata order of CUTLASS's Hopper sparse GEMM from the sparse24 layout.
"""

from slimstack.formats.bitmap import BitmapWeight, pack_bitmap, unpack_bitmap
from slimstack.formats.common import (
    FORMAT_VERSION,
    K_TILE,
    load_packed,
    padded_k,
    zero_fraction,
)
from slimstack.formats.sparse24 import (
    Sparse24Weight,
    is_sparse24,
    pack_sparse24,
    unpack_sparse24,
)

PackedWeight = Sparse24Weight | BitmapWeight

__all__ = [
    "FORMAT_VERSION",
    "K_TILE",
    "BitmapWeight",
    "PackedWeight",
    "Sparse24Weight",
    "is_sparse24",
    "load_packed",
    "pack_bitmap",
    "pack_sparse24",
    "padded_k",
    "unpack_bitmap",
    "unpack_sparse24",
    "zero_fraction",
]
