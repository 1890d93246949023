"""The sparse24 metadata in the layout CUTLASS's Hopper sparse GEMM reads ("E").

The sm90 GEMM (csrc/cuda/sparse24_gemm_sm90.cu) reads our ``values`` unchanged as its
compressed A operand, but wants the ``meta`` nibbles permuted into CUTLASS's metadata layout.
The permutation moves whole bytes: byte ``b`` of row ``n`` of our meta (groups 2b and 2b+1)
is byte ``b`` of row ``n`` in CUTLASS's logical [rows, bytes] view, stored at

    offset(n, b) = (n // 64) * 1024 + (b // 16) * rows_aligned * 16 + in_atom(n % 64, b % 16)
    in_atom(r, c) = (c % 2) + 128 * ((c // 2) % 2) + 4 * (c // 4)
                  + 16 * (r % 8) + 2 * ((r // 8) % 2) + 256 * (r // 16)

with rows padded to a multiple of 64 (``rows_aligned``) and each row to 16 bytes (128
logical columns). This is CUTLASS 4.2's ``Sm90GemmSparseConfig::fill_layoutE`` for 16-bit
types and a tile K of 128, recast to bytes: the atom is 64 rows x 128 columns, 1024 bytes,
its modes ((8, 2, 4), (2, 2, 4)) : ((16, 2, 256), (1, 128, 4)) in (row, byte) order. Padding
bytes hold 0x44 (indices {0, 1} for both groups, a valid pattern; their values are zero).

Worked example, N = 1, Kp = 64 (8 meta bytes, rows_aligned = 64, 16 byte columns):
meta[0] = [m0 .. m7] lands at offsets in_atom(0, c) for c = 0..7, i.e. 0, 1, 128, 129, 4, 5,
132, 133; the other 1016 bytes of the 1024-byte buffer are 0x44.

The CUDA extension builds the same buffer on the device from CUTLASS's own layout function
(``sparse24_sm90_reorder_meta_cuda``); this module is the readable reference, usable on any
device, and the two are checked against each other and against CUTLASS's compressor.
"""

from __future__ import annotations

import torch

ATOM_ROWS = 64
ATOM_COLS = 128  # logical K columns per atom
ATOM_BYTE_COLS = ATOM_COLS // 8  # one meta byte covers 8 logical columns (two groups of 4)
ATOM_BYTES = ATOM_ROWS * ATOM_BYTE_COLS
PAD_BYTE = 0x44


def _check_shape(n_rows: int, kp: int) -> None:
    if not isinstance(n_rows, int) or not isinstance(kp, int):
        raise TypeError(f"n_rows and kp must be ints, got {type(n_rows)} and {type(kp)}")
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if kp < 64 or kp % 64 != 0:
        raise ValueError(f"kp (the padded K) must be a positive multiple of 64, got {kp}")


def sm90_meta_shape(n_rows: int, kp: int) -> tuple[int, int]:
    """Logical (rows, byte columns) of the CUTLASS metadata, padding included."""
    _check_shape(n_rows, kp)
    rows = -(-n_rows // ATOM_ROWS) * ATOM_ROWS
    cols = -(-kp // ATOM_COLS) * ATOM_BYTE_COLS
    return rows, cols


def sm90_meta_nbytes(n_rows: int, kp: int) -> int:
    """Bytes of the CUTLASS metadata buffer for an [n_rows, kp] weight."""
    rows, cols = sm90_meta_shape(n_rows, kp)
    return rows * cols


def sm90_meta_offsets(n_rows: int, kp: int) -> torch.Tensor:
    """int64 [rows_aligned, byte_cols_aligned]: physical byte of each logical (row, byte)."""
    rows, cols = sm90_meta_shape(n_rows, kp)
    r = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64).unsqueeze(0)
    rr, cc = r % ATOM_ROWS, c % ATOM_BYTE_COLS
    in_atom = (
        (cc % 2)
        + 128 * ((cc // 2) % 2)
        + 4 * (cc // 4)
        + 16 * (rr % 8)
        + 2 * ((rr // 8) % 2)
        + 256 * (rr // 16)
    )
    return (r // ATOM_ROWS) * ATOM_BYTES + (c // ATOM_BYTE_COLS) * (rows * ATOM_BYTE_COLS) + in_atom


def _check_meta(meta: torch.Tensor) -> tuple[int, int]:
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.uint8 or meta.dim() != 2:
        raise ValueError(f"meta must be uint8 [N, Kp/8], got {meta.dtype} {list(meta.shape)}")
    n_rows, kp = meta.shape[0], meta.shape[1] * 8
    _check_shape(n_rows, kp)
    return n_rows, kp


def reorder_meta_sm90(meta: torch.Tensor) -> torch.Tensor:
    """sparse24 ``meta`` uint8 [N, Kp/8] -> CUTLASS sm90 metadata, uint8 1-D.

    Runs on meta's device; the result has ``sm90_meta_nbytes(N, Kp)`` bytes.
    """
    n_rows, kp = _check_meta(meta)
    offsets = sm90_meta_offsets(n_rows, kp)[:n_rows, : kp // 8].to(meta.device)
    out = torch.full(
        (sm90_meta_nbytes(n_rows, kp),), PAD_BYTE, dtype=torch.uint8, device=meta.device
    )
    out[offsets.reshape(-1)] = meta.reshape(-1)
    return out


def restore_meta_sm90(meta_sm90: torch.Tensor, n_rows: int, kp: int) -> torch.Tensor:
    """Inverse of :func:`reorder_meta_sm90`: CUTLASS metadata -> uint8 [n_rows, kp/8]."""
    if not isinstance(meta_sm90, torch.Tensor) or meta_sm90.dtype != torch.uint8:
        raise TypeError("meta_sm90 must be a uint8 torch.Tensor")
    expected = sm90_meta_nbytes(n_rows, kp)
    if meta_sm90.dim() != 1 or meta_sm90.numel() != expected:
        raise ValueError(
            f"meta_sm90 for [{n_rows}, {kp}] must be 1-D with {expected} bytes, "
            f"got {list(meta_sm90.shape)}"
        )
    offsets = sm90_meta_offsets(n_rows, kp)[:n_rows, : kp // 8].to(meta_sm90.device)
    return meta_sm90[offsets.reshape(-1)].reshape(n_rows, kp // 8)
