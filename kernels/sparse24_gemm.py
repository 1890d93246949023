"""sparse24_gemm: y = x @ W^T for prefill (M >= 17) with a packed 2:4 weight.

Triton has no sparse tensor-core instruction, so each program decodes its [BLOCK_N, BLOCK_K]
slice of W into a dense register tile (kernels/_sparse24_tile.py) and feeds tl.dot, in one of
two orientations (the W_AS_A constexpr):

- W as the A operand, acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T: the tokens are wgmma's N, so
  small M pads nothing (used up to M = 64). A from registers still needs the dot-operand
  layout: the decoded tile goes through shared memory in pieces, 5 barriers per K step.
- W as the B operand, acc[BLOCK_M, BLOCK_N] = x_tile @ W_tile^T (large M): the decoded tile is
  stored once into wgmma's shared-memory layout (3 barriers per K step, no ldmatrix).

Why the large tiles are 256 x 64 on 8 warps, held to 128 registers (sm_90 SASS, triton 3.6,
per K step of one CTA): the decode issues ~450 cycles against ~512 of wgmma, and at 128
registers two CTAs share an SM, so one's decode runs under the other's wgmma. The previous
256 x 128 W-as-A tile (232 registers, one CTA per SM) issued ~778 against ~1024 with nothing to
overlap them: ~0.57 of the tensor-core peak at best, and 0.40-0.52x of cuBLAS measured on the
H200 (2026-12-04). The decode's ALU work per weight element is amortised over BLOCK_M rows of
x. Programs are grouped along N so neighbouring programs share x tiles in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import (
    addressed_elements,
    as_int32_words,
    check_activation,
    check_config,
    check_int32_offsets,
    check_packed,
    check_runnable,
    check_same_device,
    check_size,
    padded_k,
)
from slimstack.kernels._sparse24_tile import sparse24_dense_tile
from slimstack.kernels.sparse24_gemv import sm_count


@triton.jit
def _sparse24_gemm_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    out_ptr,
    M,
    N,
    K,
    KV,
    stride_xm,
    stride_v,
    stride_meta,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    W_AS_A: tl.constexpr,
):
    # Grouped order: GROUP_N consecutive programs walk down N for one M block, so the x tile
    # they share stays in L2 while each weight tile is read once per M block.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * blocks_m
    group = pid // per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_m = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M

    acc = tl.zeros([BLOCK_N, BLOCK_M] if W_AS_A else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, 2 * KV, BLOCK_K):
        w = sparse24_dense_tile(
            values_ptr, meta_ptr, rows, row_mask, k0, KV, stride_v, stride_meta,
            BLOCK_N, BLOCK_K, EVEN_K,
        )  # fmt: skip
        cols = k0 + tl.arange(0, BLOCK_K)
        if W_AS_A:  # acc[BLOCK_N, BLOCK_M] = W @ x^T
            x_t = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + cols[:, None],
                mask=m_mask[None, :] & (cols[:, None] < K),
                other=0.0,
            )
            acc = tl.dot(w, x_t, acc, input_precision=INPUT_PRECISION)
        else:  # acc[BLOCK_M, BLOCK_N] = x @ W^T
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                mask=m_mask[:, None] & (cols[None, :] < K),
                other=0.0,
            )
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if W_AS_A:
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + rows[:, None]
        out_mask = m_mask[None, :] & row_mask[:, None]
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + rows[None, :]
        out_mask = m_mask[:, None] & row_mask[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch shape; block_k is a multiple of 64 (the packed K tile).

    w_as_a: the decoded weight is the dot's A operand (else B; see the module docstring).
    maxnreg: registers per thread that ptxas may use (None: its own choice)."""

    block_m: int
    block_n: int
    block_k: int = 64
    group_n: int = 8
    num_warps: int = 4
    num_stages: int = 3
    w_as_a: bool = True
    maxnreg: int | None = None


ALIGN_ELEMENTS = 8  # 16 bytes of a 16-bit type: what vectorised x loads and stores need
MAX_UNALIGNED_BLOCK_M = 64


# The 2026-12-04 large-M tile (W as A, one CTA per SM): the benchmark's triton_w_as_a rows.
PREVIOUS_LARGE_M_CONFIG = GemmConfig(block_m=256, block_n=128, num_warps=8, num_stages=3)


def default_config(
    M: int, N: int | None = None, sm_count: int = 132, aligned: bool = True
) -> GemmConfig:
    """Tiles by problem size (from SASS: per K step, decode issue cycles vs wgmma cycles).

    Small M: W as A, narrow x tiles, fewer padded rows. Large M: W as B in 256 x 64 tiles at
    128 registers, two CTAs per SM (module docstring), once they fill two per SM; below that
    128 x 64 tiles on 4 warps (170 registers, three CTAs per SM; ~366 issue cycles per K step
    for ~256 of wgmma). When K or N is not a multiple of 8 (``aligned`` False), x moves in
    scalar loads whose addresses cost registers: the big tiles then spill, so those shapes stay
    on 64-row tiles.
    """
    if M <= 32:
        return GemmConfig(block_m=32, block_n=64, num_warps=4, num_stages=4)
    if M <= 64 or not aligned:
        return GemmConfig(block_m=64, block_n=64, num_warps=4, num_stages=4)
    if N is not None and triton.cdiv(M, 256) * triton.cdiv(N, 64) >= 2 * sm_count:
        return GemmConfig(
            block_m=256, block_n=64, num_warps=8, num_stages=3, w_as_a=False, maxnreg=128
        )
    return GemmConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, w_as_a=False)


def _validate(x, values, meta, N, K, config) -> int:
    op = "sparse24_gemm"
    check_size(op, "N", N)
    check_size(op, "K", K)
    M = check_activation(op, x, K)
    Kp = padded_k(K)
    check_packed(op, "values", values, (N, Kp // 2), x.dtype)
    check_packed(op, "meta", meta, (N, Kp // 8), torch.uint8)
    check_same_device(op, x, values=values, meta=meta)
    check_runnable(op, _sparse24_gemm_kernel, x.device)
    check_int32_offsets(op, addressed_elements(x), values.numel(), M * N)
    if config is not None:
        check_config(op, config)
        if min(config.block_m, config.block_n) < 16:
            raise ValueError(f"{op}: tl.dot needs block_m and block_n >= 16, got {config}")
    return M


def sparse24_gemm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    N: int,
    K: int,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T, W packed as 2:4 (values [N, Kp/2], meta uint8 [N, Kp/8])."""
    M = _validate(x, values, meta, N, K, config)
    if M == 0:
        return x.new_empty((0, N))
    if x.stride(1) != 1:
        x = x.contiguous()
    aligned = K % ALIGN_ELEMENTS == 0 and N % ALIGN_ELEMENTS == 0
    cfg = config or default_config(M, N, sm_count(x.device), aligned)
    Kp = padded_k(K)
    words = as_int32_words("sparse24_gemm", "meta", meta)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _sparse24_gemm_kernel[grid](
        x, values, words, out, M, N, K, Kp // 2,
        x.stride(0), values.stride(0), words.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
        EVEN_K=Kp % cfg.block_k == 0,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        W_AS_A=cfg.w_as_a,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )  # fmt: skip
    return out


def sparse24_gemm_reference(x: torch.Tensor, dense_weight: torch.Tensor) -> torch.Tensor:
    """float64 reference on the (already masked) dense weight, cast to x's dtype."""
    return (x.double() @ dense_weight.double().t()).to(x.dtype)
