"""bitmap_gemv: y = x @ W^T for decode (M = 1..16) with an unstructured bitmap-packed weight.

Layout (slimstack/formats/bitmap.py): ``bitmask`` uint8 [N, Kp/8] (read here as int32 words [N, Kp/32],
bit j of word w = column 32w + j), ``values`` 1-D with row n's kept values in column order
from ``row_offsets[n]``.

Each program owns BLOCK_N rows and walks K in BLOCK_K steps, carrying per row the index of
its next kept value. A step turns each kept column into its value index with popcounts
(per word, then below the column in its word) and one masked load (kept columns only,
consecutive addresses, so sectors are fully used) fills a dense [BLOCK_N, BLOCK_K] tile.
The dense tile then meets a plain slice of x: FMA for M = 1, tl.dot with x^T padded to 16
columns for M >= 2 (as in sparse24_gemv). A split of K must first skip the values of the
tiles before it, by popcounts of their mask words, so split-K is capped at 4 to keep that
extra mask traffic small.

A tile's gather depends on its mask words, and its row starts on every tile before it, so
Triton's pipeliner stages none of it: the loop is pipelined by hand (words two tiles ahead,
the gather and x one tile ahead). Without that, each step waited for two dependent global
round trips (the 2026-12-04 H200 run: 0.28-0.62x of cuBLAS at M = 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._bitmap_tile import (
    bitmap_dense_tile,
    gather_kept_values,
    load_mask_words,
    plan_grid,
    split_rows_and_tiles,
)
from slimstack.kernels._checks import (
    addressed_elements,
    as_int32_words,
    check_activation,
    check_bitmap_packed,
    check_config,
    check_flags,
    check_int32_offsets,
    check_runnable,
    check_same_device,
    check_size,
)
from slimstack.kernels.sparse24_gemv import (
    MAX_M,
    GemvConfig,
    block_m_for,
)
from slimstack.kernels.splitk_sum import splitk_sum


@triton.jit
def _x_tile(x_ptr, k0, K, offs_m, m_mask, stride_xm, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """x[:, k0:k0+BLOCK_K] as the step's operand: x^T [BLOCK_K, BLOCK_M] for tl.dot, the one
    row [BLOCK_K] in fp32 for the FMA path; 0 past K."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if USE_DOT:  # one return: triton checks every return of a function against the first
        x = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + cols[:, None],
            mask=m_mask[None, :] & (cols[:, None] < K),
            other=0.0,
        )
    else:
        # fp32 here, before Triton broadcasts the row to every row of the tile: one
        # conversion per column instead of one per element (the same values)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return x


@triton.jit
def _accumulate(acc, w, x, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += w @ x^T on the tensor cores, or acc [BLOCK_N, BLOCK_K] +=
    w * x (M = 1: one FMA per column, reduced once after the loop)."""
    if USE_DOT:
        acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)
    else:
        acc += w.to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _bitmap_gemv_kernel(
    x_ptr,
    values_ptr,
    mask_ptr,
    row_offsets_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    stride_xm,
    stride_mask,
    stride_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
    HW_POPC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, row_mask, t_start, t_end, next_value = split_rows_and_tiles(
        mask_ptr, row_offsets_ptr, N, KW, stride_mask, BLOCK_N, BLOCK_K, HW_POPC
    )
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)

    if PREFETCH:
        # Software-pipelined by hand: a step uses the values gathered by the step before,
        # gathers the next tile's (their mask words were loaded two steps ahead) and loads the
        # next x, so no round trip (words, the gather their popcounts address, x) is waited
        # on in the step that issues it. Tiles past the run read nothing: their rows are
        # masked and their words 0. (Row masks are rebuilt from a scalar limit: the
        # interpreter rejects bool & scalar.)
        live = rows < tl.where(t_start < t_end, N, 0)
        words = load_mask_words(
            mask_ptr, rows, live, t_start * BLOCK_K, KW, stride_mask, BLOCK_K, EVEN_K
        )
        w, next_value = gather_kept_values(values_ptr, words, next_value, BLOCK_N, BLOCK_K, HW_POPC)
        live = rows < tl.where(t_start + 1 < t_end, N, 0)
        words_next = load_mask_words(
            mask_ptr, rows, live, (t_start + 1) * BLOCK_K, KW, stride_mask, BLOCK_K, EVEN_K
        )
        x = _x_tile(x_ptr, t_start * BLOCK_K, K, offs_m, m_mask, stride_xm, BLOCK_K, USE_DOT)
        for t in range(t_start, t_end):
            k_next = (t + 1) * BLOCK_K
            live = rows < tl.where(t + 2 < t_end, N, 0)
            words_after = load_mask_words(
                mask_ptr, rows, live, k_next + BLOCK_K, KW, stride_mask, BLOCK_K, EVEN_K
            )
            w_next, next_value = gather_kept_values(
                values_ptr, words_next, next_value, BLOCK_N, BLOCK_K, HW_POPC
            )
            x_next = _x_tile(x_ptr, k_next, K, offs_m, m_mask, stride_xm, BLOCK_K, USE_DOT)
            acc = _accumulate(acc, w, x, USE_DOT, INPUT_PRECISION)
            w, words_next, x = w_next, words_after, x_next
    else:
        # The 2026-12-04 loop: each tile's words, gather and x are waited on in its own step.
        for t in range(t_start, t_end):
            k0 = t * BLOCK_K
            w, next_value = bitmap_dense_tile(
                values_ptr, mask_ptr, rows, row_mask, next_value, k0, KW, stride_mask,
                BLOCK_N, BLOCK_K, EVEN_K, HW_POPC,
            )  # fmt: skip
            x = _x_tile(x_ptr, k0, K, offs_m, m_mask, stride_xm, BLOCK_K, USE_DOT)
            acc = _accumulate(acc, w, x, USE_DOT, INPUT_PRECISION)

    if USE_DOT:
        y = tl.trans(acc)
    else:
        y = tl.sum(acc, axis=1)[None, :]
    out_ptrs = out_ptr + tl.program_id(1) * stride_split + offs_m[:, None] * N + rows[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


def default_config(M: int) -> GemvConfig:
    """Smaller K steps than sparse24: the 0/1 tile and its prefix sum live in registers too."""
    if block_m_for(M) == 1:
        return GemvConfig(block_n=16, block_k=256, num_warps=4)
    return GemvConfig(block_n=64, block_k=64, num_warps=4)


def _validate(x, values, bitmask, row_offsets, N, K, config) -> int:
    op = "bitmap_gemv"
    check_size(op, "N", N)
    check_size(op, "K", K)
    # there is no bitmap GEMM to send larger M to (the sparse24 GEMV's advice)
    larger = (
        f"there is no bitmap GEMM: pass at most {MAX_M} rows per call, or call "
        "slimstack.ops.sparse_linear, which runs any M on another backend"
    )
    M = check_activation(op, x, K, max_m=MAX_M, larger=larger)
    check_bitmap_packed(op, values, bitmask, row_offsets, N, K, x.dtype)
    check_same_device(op, x, values=values, bitmask=bitmask, row_offsets=row_offsets)
    check_runnable(op, _bitmap_gemv_kernel, x.device)
    check_int32_offsets(op, addressed_elements(x), values.numel(), M * N)
    if config is not None:
        check_config(op, config)
    return M


def bitmap_gemv(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    N: int,
    K: int,
    *,
    config: GemvConfig | None = None,
    prefetch: bool = True,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T for M <= 16, W bitmap-packed (values, bitmask, row_offsets).

    `prefetch` (M = 1): the software-pipelined loop; False runs the loop of the 2026-12-04 GPU
    run (each tile's words, gather and x waited on in turn), kept for the benchmark's A/B row.
    """
    M = _validate(x, values, bitmask, row_offsets, N, K, config)
    check_flags("bitmap_gemv", prefetch=prefetch)
    if M == 0:
        return x.new_empty((0, N))
    if values.numel() == 0:  # an all-zero weight: nothing to load (and a null pointer)
        return x.new_zeros((M, N))
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(M)
    block_m = block_m_for(M, cfg.use_dot)
    Kp, n_blocks, split = plan_grid(N, K, cfg.block_n, cfg.block_k, cfg.split_k, x.device)

    words = as_int32_words("bitmap_gemv", "bitmask", bitmask)
    if split == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _bitmap_gemv_kernel[(n_blocks, split)](
        x, values, words, row_offsets, out, M, N, K, Kp // 32,
        x.stride(0), words.stride(0), M * N,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_DOT=block_m >= 16, PREFETCH=prefetch, EVEN_K=Kp % cfg.block_k == 0,
        HW_POPC=type(_bitmap_gemv_kernel).__name__ != "InterpretedFunction",
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split == 1:
        return out
    return splitk_sum(out, x.dtype)


def bitmap_gemv_reference(x: torch.Tensor, dense_weight: torch.Tensor) -> torch.Tensor:
    """float64 reference on the (already masked) dense weight, cast to x's dtype."""
    return (x.double() @ dense_weight.double().t()).to(x.dtype)
