"""decode_attention: one new token per sequence attending over a static KV cache (split-KV).

q [B, Hkv, G, D] holds the G query heads that share each key/value head (grouped-query
attention without copying the cache); k, v [B, Hkv, T, D] are the cache; ``allowed`` [B, T]
(or the engine's [B, 1, 1, T]) says which slots the token sees (padding, the current slot and
what precedes it, a sliding window). Returns softmax(q k^T * scale + mask) v, [B, Hkv, G, D].

Why not SDPA: with a mask and one query token its kernels parallelise over (batch, heads,
query blocks) only: 8 programs for a Mistral-7B layer at batch 1, each streaming the whole
cache (an H200 decode step grew 1.24 ms from prompt 128 to 2048 where its KV bytes take 0.1
ms). Here the cache is also split along T (flash-decoding): every program takes a run of
BLOCK_T-slot tiles, keeps a running max / sum / weighted value sum in registers, and writes
them; a second kernel merges the runs in split order (deterministic). A tile that no row of
the mask allows (slots past the current one, left padding) is skipped without loading it, so
a step reads the cache only up to its position.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_same_device
from slimstack.kernels._pdl import pdl_launch, pdl_prologue
from slimstack.kernels.sparse24_gemv import sm_count

MAX_GROUP = 64  # query heads per key/value head the kernel takes (BLOCK_G registers)
MAX_HEAD_DIM = 256  # BLOCK_D: the fp32 accumulator is BLOCK_G x BLOCK_D per program


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    acc_ptr,
    stats_ptr,
    HKV,
    G,
    D,
    T,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qg,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_mb,
    TILES_PER_SPLIT,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_head = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_head = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    t_first = split * TILES_PER_SPLIT * BLOCK_T
    for i in range(TILES_PER_SPLIT):
        offs_t = t_first + i * BLOCK_T + tl.arange(0, BLOCK_T)
        allowed = tl.load(mask_ptr + b * stride_mb + offs_t, mask=offs_t < T, other=0) != 0
        if tl.max(allowed.to(tl.int32), axis=0) > 0:  # else: nothing here is attended
            kv_mask = allowed[:, None] & d_mask[None, :]
            k = tl.load(
                k_head + offs_t[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
            )
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale
            s = tl.where(allowed[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: some slot is allowed
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_head + offs_t[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new

    # partials of this run: acc [BLOCK_G, BLOCK_D], then (max, sum) [2, BLOCK_G]
    run = pid_bh * num_splits + split
    tl.store(
        acc_ptr + run * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :],
        acc,
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(stats_ptr + run * 2 * BLOCK_G + offs_g, m_i, mask=g_mask)
    tl.store(stats_ptr + run * 2 * BLOCK_G + BLOCK_G + offs_g, l_i, mask=g_mask)


@triton.jit
def _decode_attention_merge_kernel(
    acc_ptr,
    stats_ptr,
    out_ptr,
    HKV,
    G,
    D,
    NUM_SPLITS,
    stride_ob,
    stride_oh,
    stride_og,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    tile_mask = g_mask[:, None] & (offs_d < D)[None, :]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(NUM_SPLITS):
        run = pid_bh * NUM_SPLITS + s
        m_s = tl.load(stats_ptr + run * 2 * BLOCK_G + offs_g, mask=g_mask, other=float("-inf"))
        l_s = tl.load(stats_ptr + run * 2 * BLOCK_G + BLOCK_G + offs_g, mask=g_mask, other=0.0)
        acc_s = tl.load(
            acc_ptr + run * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :],
            mask=tile_mask,
            other=0.0,
        )
        m_new = tl.maximum(m, m_s)
        # a run that saw no allowed slot has m_s = -inf: weight 0 (and -inf - -inf is NaN)
        keep = m_new > float("-inf")
        old = tl.where(keep, tl.exp(m - m_new), 0.0)
        new = tl.where(keep, tl.exp(m_s - m_new), 0.0)
        total = total * old + l_s * new
        out = out * old[:, None] + acc_s * new[:, None]
        m = m_new
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=tile_mask,
    )


def _check(q, k, v, allowed) -> torch.Tensor:
    op = "decode_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor, got {getattr(t, 'shape', t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous last dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, group, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(
            f"{op}: k and v must be [B={batch}, Hkv={heads}, T, D={dim}], got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if group > MAX_GROUP:
        raise ValueError(f"{op}: at most {MAX_GROUP} query heads per key/value head, got {group}")
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dimension at most {MAX_HEAD_DIM}, got {dim}")
    if allowed.dim() == 4:  # the engine's [B, 1, 1, T]
        allowed = allowed.reshape(allowed.shape[0], allowed.shape[-1])
    if allowed.dtype != torch.bool or tuple(allowed.shape) != (batch, k.shape[2]):
        raise ValueError(
            f"{op}: the mask must be bool [B={batch}, T={k.shape[2]}] (or [B, 1, 1, T]), got "
            f"{allowed.dtype} {tuple(allowed.shape)}"
        )
    check_same_device(op, q, first="q", k=k, v=v, mask=allowed)
    return allowed


def plan_splits(batch_heads: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, tiles per split): at least about two programs per SM, every split at least
    one tile (rounding the split count up, not the tiles per split: 34 tiles for 33 wanted
    splits stay 34 splits of one, not 17 of two)."""
    want = max(1, min(tiles, math.ceil(2 * sms / max(batch_heads, 1))))
    per_split = max(1, tiles // want)
    return math.ceil(tiles / per_split), per_split


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    block_t: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked to ``allowed``) v for q [B, Hkv, G, D] over the cache
    k, v [B, Hkv, T, D]; every row must allow at least one slot."""
    allowed = _check(q, k, v, allowed)
    batch, heads, group, dim = q.shape
    length = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return out
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot's smallest operand
    block_d = max(16, triton.next_power_of_2(dim))
    tiles = triton.cdiv(length, block_t)
    if splits is None:
        splits, per_split = plan_splits(batch * heads, tiles, sm_count(q.device))
    else:
        per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
        splits = triton.cdiv(tiles, per_split)
    runs = batch * heads * splits
    acc = torch.empty((runs, block_g, block_d), dtype=torch.float32, device=q.device)
    stats = torch.empty((runs, 2, block_g), dtype=torch.float32, device=q.device)
    mask_bytes = allowed.contiguous().view(torch.uint8)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    pdl = pdl_launch(q.device)
    _decode_attention_split_kernel[(batch * heads, splits)](
        q, k, v, mask_bytes, acc, stats, heads, group, dim, length,
        scale if scale is not None else dim**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask_bytes.stride(0), per_split,
        BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d, INPUT_PRECISION=precision,
        num_warps=4, **pdl,
    )  # fmt: skip
    _decode_attention_merge_kernel[(batch * heads,)](
        acc, stats, out, heads, group, dim, splits, out.stride(0), out.stride(1), out.stride(2),
        BLOCK_G=block_g, BLOCK_D=block_d, num_warps=4, **pdl,
    )  # fmt: skip
    return out


def decode_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """float64 softmax attention of the G query rows per key/value head, cast to q's dtype."""
    if allowed.dim() == 4:
        allowed = allowed.reshape(allowed.shape[0], allowed.shape[-1])
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)
