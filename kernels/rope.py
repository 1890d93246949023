"""apply_rope_: rotary position embedding applied in place to q and k (HF rotate_half form).

For each head vector t = [t1, t2] (halves of head_dim D):
    t1' = t1 * cos[:D/2] - t2 * sin[:D/2]
    t2' = t2 * cos[D/2:] + t1 * sin[D/2:]
which is HF's ``t * cos + rotate_half(t) * sin`` with rotate_half(t) = [-t2, t1]. cos and sin
are the [.., D] tables HF's rotary embedding returns (already gathered at each token's
position), so this kernel knows nothing of positions or scaling variants.

Layout: q [B, S, Hq, D] and k [B, S, Hk, D], any strides with a unit last stride, so HF's
[B, H, S, D] tensors work too, passed as ``q.transpose(1, 2)``. One program rotates every
head of one token, reading that token's cos/sin row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_runnable, check_same_device
from slimstack.kernels._pdl import pdl_launch, pdl_prologue


@triton.jit
def _rotate_halves(t1, t2, cos1, cos2, sin1, sin2):
    """HF's rotate_half form on the two halves of head vectors (fp32)."""
    return t1 * cos1[None, :] - t2 * sin1[None, :], t2 * cos2[None, :] + t1 * sin2[None, :]


@triton.jit
def _rope_kernel(
    t_ptr,
    cos_ptr,
    sin_ptr,
    S,
    H,
    stride_tb,
    stride_ts,
    stride_th,
    stride_cb,
    stride_cs,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    token = tl.program_id(0)
    b = (token // S).to(tl.int64)
    s = (token % S).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    c_row = b * stride_cb + s * stride_cs
    cos1 = tl.load(cos_ptr + c_row + dims, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_row + dims, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)

    ptr1 = t_ptr + b * stride_tb + s * stride_ts + heads[:, None] * stride_th + dims[None, :]
    mask = (heads[:, None] < H) & dmask[None, :]
    t1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = _rotate_halves(t1, t2, cos1, cos2, sin1, sin2)
    tl.store(ptr1, out1.to(t_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(t_ptr.dtype.element_ty), mask=mask)


def _table_strides(op: str, name: str, table: torch.Tensor, B: int, S: int, D: int) -> tuple:
    """(batch stride, seq stride) of a [S, D] or [B or 1, S, D] table; batch stride 0 broadcasts."""
    if table.dim() == 2 and tuple(table.shape) == (S, D):
        return 0, table.stride(0)
    if table.dim() == 3 and table.shape[0] in (1, B) and tuple(table.shape[1:]) == (S, D):
        return (table.stride(0) if table.shape[0] == B and B > 1 else 0), table.stride(1)
    raise ValueError(
        f"{op}: {name} must have shape [S={S}, D={D}] or [B={B} or 1, S, D], "
        f"got {list(table.shape)}"
    )


def _validate(q, k, cos, sin, op: str = "apply_rope_") -> tuple[tuple, tuple]:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: q and k must be [B, S, H, D], got {list(q.shape)} and {list(k.shape)}"
        )
    B, S, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"{op}: k {list(k.shape)} does not match q {list(q.shape)} in B, S, D")
    if D % 2:
        raise ValueError(f"{op}: head_dim must be even, got {D}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a unit stride in its last dim (head_dim)")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"{op}: cos and sin must have the same shape and strides")
    check_same_device(op, q, first="q", k=k, cos=cos, sin=sin)
    check_runnable(op, _rope_kernel, q.device)
    return _table_strides(op, "cos", cos, B, S, D), (B, S, D)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, table_strides: tuple) -> None:
    B, S, H, D = t.shape
    half = D // 2
    pdl = pdl_launch(t.device)
    _rope_kernel[(B * S,)](
        t, cos, sin, S, H, t.stride(0), t.stride(1), t.stride(2), *table_strides,
        HALF=half, BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4, **pdl,
    )  # fmt: skip


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [B, S, Hq, D] and k [B, S, Hk, D] in place by cos/sin [S, D] or [B|1, S, D]."""
    table_strides, (B, S, _) = _validate(q, k, cos, sin)
    if B * S == 0:
        return
    for t in (q, k):
        if t.shape[2]:
            _rotate(t, cos, sin, table_strides)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF apply_rotary_pos_emb on [B, S, H, D] tensors, computed in fp32; returns new tensors."""

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    c = cos.float().reshape(-1, *cos.shape[-2:]).unsqueeze(2)  # [B|1, S, 1, D]
    s = sin.float().reshape(-1, *sin.shape[-2:]).unsqueeze(2)
    rotated = [(t.float() * c + rotate_half(t.float()) * s).to(t.dtype) for t in (q, k)]
    return rotated[0], rotated[1]


@triton.jit
def _rope_to_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    HQ,
    HK,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_cb,
    stride_cache_b,
    stride_cache_h,
    stride_cache_t,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    c_row = b * stride_cb
    cos1 = tl.load(cos_ptr + c_row + dims, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_row + dims, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_row + HALF + dims, mask=dmask, other=0.0).to(tl.float32)

    # q: rotated in place
    q1_ptr = q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    q_mask = (heads[:, None] < HQ) & dmask[None, :]
    q1 = tl.load(q1_ptr, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q1_ptr + HALF, mask=q_mask, other=0.0).to(tl.float32)
    out1, out2 = _rotate_halves(q1, q2, cos1, cos2, sin1, sin2)
    tl.store(q1_ptr, out1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q1_ptr + HALF, out2.to(q_ptr.dtype.element_ty), mask=q_mask)

    # k: rotated into the cache at the slot; v: copied there
    kv_mask = (heads[:, None] < HK) & dmask[None, :]
    cache_at = b * stride_cache_b + heads[:, None] * stride_cache_h + slot * stride_cache_t
    k1_ptr = k_ptr + b * stride_kb + heads[:, None] * stride_kh + dims[None, :]
    k1 = tl.load(k1_ptr, mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + HALF, mask=kv_mask, other=0.0).to(tl.float32)
    kc1_ptr = kc_ptr + cache_at + dims[None, :]
    out1, out2 = _rotate_halves(k1, k2, cos1, cos2, sin1, sin2)
    tl.store(kc1_ptr, out1.to(kc_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(kc1_ptr + HALF, out2.to(kc_ptr.dtype.element_ty), mask=kv_mask)
    v1_ptr = v_ptr + b * stride_vb + heads[:, None] * stride_vh + dims[None, :]
    vc1_ptr = vc_ptr + cache_at + dims[None, :]
    tl.store(vc1_ptr, tl.load(v1_ptr, mask=kv_mask, other=0.0), mask=kv_mask)
    tl.store(vc1_ptr + HALF, tl.load(v1_ptr + HALF, mask=kv_mask, other=0.0), mask=kv_mask)


def rope_to_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """One decode step's RoPE and KV-cache write in one launch: q [B, 1, Hq, D] rotated in
    place, k [B, 1, Hk, D] rotated into k_cache [B, Hk, T, D] at ``slot`` (a device tensor
    [1], read by the kernel: no host sync), v copied into v_cache there. The same roundings
    as apply_rope_ followed by the cache's index_copy_."""
    op = "rope_to_cache_"
    table_strides, (B, S, D) = _validate(q, k, cos, sin, op)
    if S != 1:
        raise ValueError(f"{op}: one token per sequence (decode), got S={S}")
    hk = k.shape[2]
    if tuple(v.shape) != tuple(k.shape) or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError(f"{op}: v must be like k {list(k.shape)}, got {list(v.shape)} {v.dtype}")
    want = (B, hk, k_cache.shape[2] if k_cache.dim() == 4 else -1, D)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape) != want or cache.dtype != k.dtype:
            raise ValueError(
                f"{op}: {name} must be {k.dtype} [B={B}, Hk={hk}, T, D={D}], got "
                f"{cache.dtype} {list(cache.shape)}"
            )
        if cache.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a unit stride in its last dim")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must have the same strides")
    if slot.dtype != torch.int64 or slot.numel() != 1:
        raise ValueError(
            f"{op}: slot must be one int64 element, got {slot.dtype} {list(slot.shape)}"
        )
    check_same_device(op, q, first="q", v=v, k_cache=k_cache, v_cache=v_cache, slot=slot)
    if B == 0:
        return
    half = D // 2
    pdl = pdl_launch(q.device)
    _rope_to_cache_kernel[(B,)](
        q, k, v, cos, sin, k_cache, v_cache, slot, q.shape[2], hk,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        table_strides[0], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HALF=half, BLOCK_H=triton.next_power_of_2(max(q.shape[2], hk)),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl,
    )  # fmt: skip
