"""sparse24_gemv: y = x @ W^T for decode (M = 1..16 rows) with a packed 2:4 weight.

Memory-bound: each program streams BLOCK_N rows of ``values`` (128-bit contiguous loads) and
their int32 metadata words once; the bytes moved are 0.5625x the dense weight's for 16-bit
types. Two inner products, chosen by M (a constexpr):
- M = 1: no dense tile. Each kept value gathers its x from a shared-memory copy of the
  step's BLOCK_K slice of x (tl.gather, the slice in a bank-conflict-free order) and does one
  FMA, half the FLOPs of a decoded tile. The next raw tile and x slice are prefetched into
  registers while the current ones are used.
- M 2..16: the 2:4 tile is decoded (kernels/_sparse24_tile.py) into its four in-group
  columns, W[:, 4g + c] for c = 0..3, and each meets the matching columns of x^T, padded to
  16 tokens, in its own tl.dot: the same products as one dot on the dense tile without
  interleaving the columns into it. The padding is free on tensor cores, while FMA work would
  grow with every row of x; Triton's pipeliner stages these loads through shared memory
  (cp.async).
Small N leaves SMs idle, so there the K range is split across programs (fp32 partials,
summed in slice order by one more launch, kernels/splitk_sum.py). Accumulation is fp32; the
output has x's dtype.
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
    check_flags,
    check_int32_offsets,
    check_packed,
    check_runnable,
    check_same_device,
    check_size,
    padded_k,
)
from slimstack.kernels._sparse24_tile import (
    decode_sparse24_columns,
    load_sparse24_tile,
    load_x_columns,
    sparse24_dense_tile,
)
from slimstack.kernels.splitk_sum import splitk_sum

MAX_M = 16
_DOT_MIN_M = 2  # M > 1 goes to the tensor cores, x^T padded to 16 columns


@triton.jit
def _value_columns(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step-local column of every kept value of the tile, [BLOCK_N, BLOCK_K/2]: value j of a
    row sits in group j // 2 at in-group index (word[j // 16] >> 2 * (j % 16)) & 3 (the
    sparse24 meta nibbles read as 2-bit fields of the little-endian int32 words)."""
    VALUES: tl.constexpr = BLOCK_K // 2
    fields = (words[:, :, None] >> (2 * tl.arange(0, 16))[None, None, :]) & 3
    return 4 * (tl.arange(0, VALUES) // 2)[None, :] + tl.reshape(fields, [BLOCK_N, VALUES])


@triton.jit
def _gathered_x(x_ptr, words, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_X: tl.constexpr):  # fmt: skip
    """x at the column of every kept value of the tile, one global (L1) load per value at a
    64-bit address (the 2026-12-04 kernel)."""
    cols = k0 + _value_columns(words, BLOCK_N, BLOCK_K)
    if EVEN_X:  # K % BLOCK_K == 0: no column past K, and one compare less per value
        return tl.load(x_ptr + cols)
    return tl.load(x_ptr + cols, mask=cols < K, other=0.0)


@triton.jit
def _swizzled(c):
    """Where step-local column c of x sits in the shared-memory copy that tl.gather reads:
    bits 1-3 xor bits 6-8. Lane L of a warp gathers the columns of groups 4L..4L+3 (16L up
    to 16L + 15), so in column order the 32 lanes' 2-byte reads fall on 4 of the 32 banks
    (8 lanes each); the xor spreads them over all 32 (at most 2 per bank, as the in-group
    index varies). An involution: the same function maps back."""
    return c ^ (((c >> 6) & 7) << 1)


@triton.jit
def _x_slice(x_ptr, k0, limit, BLOCK_K: tl.constexpr):
    """x[k0 : k0 + BLOCK_K] in _swizzled order, 0 at and past column `limit`."""
    cols = k0 + _swizzled(tl.arange(0, BLOCK_K))
    return tl.load(x_ptr + cols, mask=cols < limit, other=0.0)


@triton.jit
def _gathered_from_slice(x_slice, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x at the column of every kept value of the tile, read from the step's slice with
    tl.gather: a shared-memory copy, 32-bit addresses, one LDS per value. pos(4m + f) =
    pos(4m) ^ f for f < 4, so the swizzle of the group part is loop-invariant."""
    VALUES: tl.constexpr = BLOCK_K // 2
    group_pos = _swizzled(4 * (tl.arange(0, VALUES) // 2))
    fields = _value_columns(words, BLOCK_N, BLOCK_K) & 3
    flat = tl.reshape(group_pos[None, :] ^ fields, [BLOCK_N * VALUES])
    return tl.reshape(tl.gather(x_slice, flat, 0), [BLOCK_N, VALUES])


@triton.jit
def _sparse24_gemv_kernel(
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
    stride_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    COLUMN_DOTS: tl.constexpr,
    SMEM_GATHER: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_X: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split_k = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M

    num_tiles = tl.cdiv(2 * KV, BLOCK_K)
    tiles_per_split = tl.cdiv(num_tiles, split_k)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

    if USE_DOT and COLUMN_DOTS:
        # One tl.dot per in-group column c: W[:, 4g + c] (as decoded, no interleave into a
        # dense tile) against x[:, 4g + c], whose four column sets come from one load of x^T
        # as [groups, tokens, 4]. The sm_90 step (64 x 128, triton 3.6): 514 instructions
        # per warp, 2 barriers, 4 waited wgmma groups, against 718, 5 and 8 for one dot on
        # the interleaved tile (`column_dots=False`).
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in range(t_start, t_end):
            k0 = t * BLOCK_K
            v, words = load_sparse24_tile(
                values_ptr, meta_ptr, rows, row_mask, k0, KV, stride_v, stride_meta,
                BLOCK_K, EVEN_K,
            )  # fmt: skip
            w0, w1, w2, w3 = decode_sparse24_columns(v, words, BLOCK_N, BLOCK_K)
            x0, x1, x2, x3 = load_x_columns(
                x_ptr, offs_m, m_mask, stride_xm, k0, K, BLOCK_M, BLOCK_K, EVEN_X
            )
            acc = tl.dot(w0, x0, acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(w1, x1, acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(w2, x2, acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(w3, x3, acc, input_precision=INPUT_PRECISION)
        y = tl.trans(acc)
    elif USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in range(t_start, t_end):
            k0 = t * BLOCK_K
            w = sparse24_dense_tile(
                values_ptr, meta_ptr, rows, row_mask, k0, KV, stride_v, stride_meta,
                BLOCK_N, BLOCK_K, EVEN_K,
            )  # fmt: skip
            cols = k0 + tl.arange(0, BLOCK_K)
            x_t = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + cols[:, None],
                mask=m_mask[None, :] & (cols[:, None] < K),
                other=0.0,
            )
            acc = tl.dot(w, x_t, acc, input_precision=INPUT_PRECISION)
        y = tl.trans(acc)
    else:
        # M == 1: no dense tile at all. Each kept value gathers its x (from the step's slice
        # in shared memory, or with SMEM_GATHER off an L1 hit: the CTA reads the same BLOCK_K
        # slice of x) and does one FMA into a [BLOCK_N, BLOCK_K/2] fp32 accumulator reduced
        # once at the end: half the FLOPs of a decoded tile and no layout shuffles. Plain
        # loads are not staged by Triton's pipeliner, so the next raw tile (and x slice) is
        # prefetched by hand into registers: twice the bytes in flight for ~20 registers.
        # (Row masks are rebuilt from a scalar limit: the interpreter rejects bool & scalar.)
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        live_rows = rows < tl.where(t_start < t_end, N, 0)
        v, words = load_sparse24_tile(
            values_ptr, meta_ptr, rows, live_rows, t_start * BLOCK_K, KV, stride_v, stride_meta,
            BLOCK_K, EVEN_K,
        )  # fmt: skip
        if SMEM_GATHER:  # the step's x slice is loaded one step ahead too
            x_slice = _x_slice(x_ptr, t_start * BLOCK_K, tl.where(t_start < t_end, K, 0), BLOCK_K)
        for t in range(t_start, t_end):
            k0 = t * BLOCK_K
            next_rows = rows < tl.where(t + 1 < t_end, N, 0)
            v_next, words_next = load_sparse24_tile(
                values_ptr, meta_ptr, rows, next_rows, k0 + BLOCK_K, KV, stride_v, stride_meta,
                BLOCK_K, EVEN_K,
            )  # fmt: skip
            if SMEM_GATHER:
                limit = tl.where(t + 1 < t_end, K, 0)
                x_next = _x_slice(x_ptr, k0 + BLOCK_K, limit, BLOCK_K)
                x = _gathered_from_slice(x_slice, words, BLOCK_N, BLOCK_K)
                x_slice = x_next
            else:
                x = _gathered_x(x_ptr, words, k0, K, BLOCK_N, BLOCK_K, EVEN_X)
            acc += v.to(tl.float32) * x.to(tl.float32)
            v, words = v_next, words_next
        y = tl.sum(acc, axis=1)[None, :]

    out_ptrs = out_ptr + pid_k * stride_split + offs_m[:, None] * N + rows[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape and launch shape; block_k is a multiple of 64 (the packed K tile)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None  # None: decided from N and the SM count
    use_dot: bool | None = None  # None: by M; True sends M = 1 to the tensor-core path too


def block_m_for(M: int, use_dot: bool | None = None) -> int:
    """1 selects the FMA path (M = 1 only); 16, the smallest tl.dot operand, the tensor cores."""
    if use_dot is None:
        use_dot = M >= _DOT_MIN_M
    if not use_dot and M > 1:
        raise ValueError(f"the FMA path takes M = 1 only, got M = {M} with use_dot=False")
    return 16 if use_dot else 1


def default_config(M: int) -> GemvConfig:
    """Per program and K step: 8 KB of values in flight, fp32 accumulators without spills."""
    if M < _DOT_MIN_M:
        return GemvConfig(block_n=16, block_k=512, num_warps=4)
    return GemvConfig(block_n=64, block_k=128, num_warps=4)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: behave as on an H100 so the same plan is tested


def choose_split_k(n_blocks: int, k_tiles: int, sm_count: int) -> int:
    """Split K only when the N blocks alone cannot fill the GPU (about two programs per SM)."""
    if n_blocks >= sm_count:
        return 1
    split = min(max(1, 2 * sm_count // n_blocks), k_tiles, 16)
    # Every split gets at least one tile.
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def _validate(x, values, meta, N, K, config) -> int:
    op = "sparse24_gemv"
    check_size(op, "N", N)
    check_size(op, "K", K)
    M = check_activation(op, x, K, max_m=MAX_M)
    Kp = padded_k(K)
    check_packed(op, "values", values, (N, Kp // 2), x.dtype)
    check_packed(op, "meta", meta, (N, Kp // 8), torch.uint8)
    check_same_device(op, x, values=values, meta=meta)
    check_runnable(op, _sparse24_gemv_kernel, x.device)
    check_int32_offsets(op, addressed_elements(x), values.numel(), M * N)
    if config is not None:
        check_config(op, config)
    return M


def sparse24_gemv(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    N: int,
    K: int,
    *,
    config: GemvConfig | None = None,
    column_dots: bool = True,
    smem_gather: bool = True,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T for M <= 16, W packed as 2:4 (values [N, Kp/2], meta [N, Kp/8]).

    `column_dots` (the tensor-core path, M >= 2): one tl.dot per in-group column of the
    decoded tile; False runs one tl.dot on the interleaved dense tile (the 2026-12-04 kernel,
    kept for the benchmark's A/B row). Both accumulate in fp32; the sums' order differs.
    `smem_gather` (the FMA path, M = 1): x gathered from a shared-memory copy of each step's
    slice; False gathers it from global memory as the 2026-12-04 kernel did (same values,
    same sums).
    """
    M = _validate(x, values, meta, N, K, config)
    check_flags("sparse24_gemv", column_dots=column_dots, smem_gather=smem_gather)
    if M == 0:
        return x.new_empty((0, N))
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(M)
    block_m = block_m_for(M, cfg.use_dot)
    Kp = padded_k(K)
    k_tiles = triton.cdiv(Kp, cfg.block_k)
    n_blocks = triton.cdiv(N, cfg.block_n)
    split = cfg.split_k or choose_split_k(n_blocks, k_tiles, sm_count(x.device))
    split = min(split, k_tiles)

    words = as_int32_words("sparse24_gemv", "meta", meta)
    if split == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _sparse24_gemv_kernel[(n_blocks, split)](
        x, values, words, out, M, N, K, Kp // 2,
        x.stride(0), values.stride(0), words.stride(0), M * N,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_DOT=block_m >= 16, COLUMN_DOTS=column_dots, SMEM_GATHER=smem_gather,
        EVEN_K=Kp % cfg.block_k == 0,
        EVEN_X=K % cfg.block_k == 0,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split == 1:
        return out
    return splitk_sum(out, x.dtype)


def sparse24_gemv_reference(x: torch.Tensor, dense_weight: torch.Tensor) -> torch.Tensor:
    """float64 reference on the (already masked) dense weight, cast to x's dtype."""
    return (x.double() @ dense_weight.double().t()).to(x.dtype)
