"""sparse24_unpack: the dense weight W [N, K] of a 2:4-packed one, for a dense prefill matmul.

Triton has no sparse tensor cores, so its fused 2:4 GEMM (sparse24_gemm) decodes every weight
tile once per M tile it meets: at M = 2048 each 4096 x 4096 tile is decoded 8 times by the
256-row tiles. Unpacking once instead costs one pass over the packed bytes (0.5625x dense)
plus one write of W, ~3.1 bytes per weight element against 2 * M FLOPs of cuBLAS's dense
GEMM: at 3.5 TB/s and ~700 TFLOP/s, unpack / GEMM ~ 312 / M, so ~0.87x of dense at M = 2048
and ~0.96x at M = 8192 whatever the shape. A floor the fused kernel must beat (the benchmark's
``triton_unpack`` rows of sparse24_gemm), and a path where it does not.

Each program decodes one [BLOCK_N, BLOCK_K] tile (kernels/_sparse24_tile.py: the same decode
as the GEMMs') and stores it; 2:4 tiles sit at fixed offsets, so every tile is independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import (
    as_int32_words,
    check_config,
    check_float_values,
    check_int32_offsets,
    check_packed,
    check_runnable,
    check_same_device,
    check_size,
    padded_k,
)
from slimstack.kernels._sparse24_tile import sparse24_dense_tile
from slimstack.kernels._unpacked_mm import unpacked_matmul


@dataclass(frozen=True)
class UnpackConfig:
    """Rows and columns per tile; block_k is a multiple of 64 (the packed K tile)."""

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 1


@triton.jit
def _sparse24_unpack_kernel(
    values_ptr,
    meta_ptr,
    out_ptr,
    N,
    K,
    KV,
    stride_v,
    stride_meta,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    w = sparse24_dense_tile(
        values_ptr, meta_ptr, rows, row_mask, k0, KV, stride_v, stride_meta,
        BLOCK_N, BLOCK_K, EVEN_K,
    )  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, w, mask=row_mask[:, None] & (cols[None, :] < K))


def _validate(values, meta, N, K, config) -> None:
    op = "sparse24_unpack"
    check_size(op, "N", N)
    check_size(op, "K", K)
    check_float_values(op, values)
    Kp = padded_k(K)
    check_packed(op, "values", values, (N, Kp // 2), values.dtype)
    check_packed(op, "meta", meta, (N, Kp // 8), torch.uint8)
    check_same_device(op, values, first="values", meta=meta)
    check_runnable(op, _sparse24_unpack_kernel, values.device)
    check_int32_offsets(op, values.numel())  # the dense output is addressed with int64 rows
    if config is not None:
        check_config(op, config)


def sparse24_unpack(
    values: torch.Tensor,
    meta: torch.Tensor,
    N: int,
    K: int,
    *,
    config: UnpackConfig | None = None,
) -> torch.Tensor:
    """Dense W [N, K] (values' dtype) of a 2:4-packed weight; padding columns dropped."""
    _validate(values, meta, N, K, config)
    cfg = config or UnpackConfig()
    Kp = padded_k(K)
    words = as_int32_words("sparse24_unpack", "meta", meta)
    out = torch.empty((N, K), dtype=values.dtype, device=values.device)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(Kp, cfg.block_k))
    _sparse24_unpack_kernel[grid](
        values, words, out, N, K, Kp // 2, values.stride(0), words.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=Kp % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def sparse24_mm_unpacked(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, N: int, K: int
) -> torch.Tensor:
    """y[M, N] = x @ W^T for any M: W unpacked by the kernel above, then one dense matmul."""
    return unpacked_matmul(
        "sparse24_mm_unpacked", x, K, values.dtype, lambda: sparse24_unpack(values, meta, N, K)
    )
