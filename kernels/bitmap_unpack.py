"""bitmap_unpack: the dense weight W [N, K] of a bitmap-packed one, for prefill's dense matmul.

There is no bitmap GEMM: past decode (M > 16) the product is compute-bound and a dense GEMM on
the tensor cores beats any gather-based kernel, so ``y = x @ bitmap_unpack(...)^T`` costs one
pass over the packed bytes (0.56x dense) plus one write of W: about 1.6x a dense weight's bytes
on top of cuBLAS, which a 7B layer's GEMM at M = 2048 hides well (~70 us of tensor-core work
against ~15 us of unpack on 4096 x 4096).

Each program owns BLOCK_N rows and a contiguous run of K tiles; it decodes a tile into registers
(``bitmap_dense_tile``: popcounts and one masked load of consecutive values) and stores it. A
run that does not start at column 0 first skips the values of the tiles before it by popcounts
of their mask words (mask bytes only: 1/16 of the values' bytes at 50% for 16-bit types), so K
is split only as far as it takes to cover the SMs, and at most 4 ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimstack.kernels._bitmap_tile import bitmap_dense_tile, plan_grid, split_rows_and_tiles
from slimstack.kernels._checks import (
    as_int32_words,
    check_bitmap_packed,
    check_config,
    check_float_values,
    check_int32_offsets,
    check_runnable,
    check_same_device,
    check_size,
)
from slimstack.kernels._unpacked_mm import unpacked_matmul


@dataclass(frozen=True)
class UnpackConfig:
    """Rows and columns per tile; block_k is a multiple of 64 (the packed K tile)."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None  # None: decided from N and the SM count


@triton.jit
def _bitmap_unpack_kernel(
    values_ptr,
    mask_ptr,
    row_offsets_ptr,
    out_ptr,
    N,
    K,
    KW,
    stride_mask,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    rows, row_mask, t_start, t_end, next_value = split_rows_and_tiles(
        mask_ptr, row_offsets_ptr, N, KW, stride_mask, BLOCK_N, BLOCK_K, HW_POPC
    )
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        w, next_value = bitmap_dense_tile(
            values_ptr, mask_ptr, rows, row_mask, next_value, k0, KW, stride_mask,
            BLOCK_N, BLOCK_K, EVEN_K, HW_POPC,
        )  # fmt: skip
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_rows + cols[None, :], w, mask=row_mask[:, None] & (cols[None, :] < K))


def _validate(values, bitmask, row_offsets, N, K, config) -> None:
    op = "bitmap_unpack"
    check_size(op, "N", N)
    check_size(op, "K", K)
    check_float_values(op, values)
    check_bitmap_packed(op, values, bitmask, row_offsets, N, K, values.dtype)
    check_same_device(op, values, first="values", bitmask=bitmask, row_offsets=row_offsets)
    check_runnable(op, _bitmap_unpack_kernel, values.device)
    check_int32_offsets(op, values.numel())  # the dense output is addressed with int64 rows
    if config is not None:
        check_config(op, config)


def bitmap_unpack(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    N: int,
    K: int,
    *,
    config: UnpackConfig | None = None,
) -> torch.Tensor:
    """Dense W [N, K] (values' dtype) of a bitmap-packed weight; padding columns dropped."""
    _validate(values, bitmask, row_offsets, N, K, config)
    if values.numel() == 0:  # an all-zero weight: nothing to load (and a null pointer)
        return values.new_zeros((N, K))
    cfg = config or UnpackConfig()
    Kp, n_blocks, split = plan_grid(N, K, cfg.block_n, cfg.block_k, cfg.split_k, values.device)
    words = as_int32_words("bitmap_unpack", "bitmask", bitmask)
    out = torch.empty((N, K), dtype=values.dtype, device=values.device)
    _bitmap_unpack_kernel[(n_blocks, split)](
        values, words, row_offsets, out, N, K, Kp // 32, words.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=Kp % cfg.block_k == 0,
        HW_POPC=type(_bitmap_unpack_kernel).__name__ != "InterpretedFunction",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def bitmap_mm_unpacked(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    N: int,
    K: int,
) -> torch.Tensor:
    """y[M, N] = x @ W^T for any M: W unpacked by the kernel above, then one dense matmul."""
    return unpacked_matmul(
        "bitmap_mm_unpacked", x, K, values.dtype,
        lambda: bitmap_unpack(values, bitmask, row_offsets, N, K),
    )  # fmt: skip
