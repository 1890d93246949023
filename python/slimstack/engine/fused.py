"""Which implementation of RMSNorm / RoPE / SwiGLU / decode attention a model runs with.

CUDA gets the fused Triton kernels from `slimstack.kernels` (one pass over memory each,
each residual add inside the RMSNorm after it, RoPE rotating q and k in place, decode
attention with the KV cache split across the SMs); CPU gets the native ones of
`engine.cpu_kernels` (one call each, where the references are a dozen small ops); torch.compile
(whose inductor fuses the torch ops itself) gets the torch references in `engine.model`.
"""

from __future__ import annotations

import torch

from slimstack.engine.cpu_kernels import native_kernels
from slimstack.engine.model import REFERENCE_KERNELS, Kernels, decode_attention_reference

BACKENDS = ("auto", "torch", "triton", "native")


def triton_kernels() -> Kernels:
    from slimstack.kernels.decode_attention import MAX_GROUP, MAX_HEAD_DIM, decode_attention
    from slimstack.kernels.rmsnorm import add_rmsnorm, rmsnorm
    from slimstack.kernels.rope import apply_rope_, rope_to_cache_
    from slimstack.kernels.swiglu import swiglu

    def rotary_in_place(q, k, cos, sin):
        apply_rope_(q, k, cos, sin)
        return q, k

    def rotary_to_cache(q, k, v, cos, sin, k_cache, v_cache, slot):
        rope_to_cache_(q, k, v, cos, sin, k_cache, v_cache, slot)  # one launch, not four
        return q

    def attention_split_kv(q, k, v, mask):
        # flash-decoding (the cache split along T): SDPA runs one program per head at decode
        if q.shape[2] <= MAX_GROUP and q.shape[3] <= MAX_HEAD_DIM:
            return decode_attention(q, k, v, mask)
        return decode_attention_reference(q, k, v, mask)

    return Kernels(
        "triton", rmsnorm, add_rmsnorm, rotary_in_place, swiglu, attention_split_kv,
        rotary_to_cache,
    )  # fmt: skip


def select_kernels(device: torch.device | str, backend: str = "auto") -> Kernels:
    """`backend` "auto": Triton on CUDA when it imports, else torch; native on CPU when the
    extension is built, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "torch":
        return REFERENCE_KERNELS
    if backend == "native" or (backend == "auto" and not on_cuda):
        if on_cuda:
            raise ValueError("the native decoder kernels are CPU kernels; use kernels='triton'")
        kernels = native_kernels()
        if backend == "native" and kernels is REFERENCE_KERNELS:
            raise RuntimeError("kernels='native' needs the extension slimstack._C, not built")
        return kernels
    if backend == "triton" and not on_cuda:
        raise ValueError("the Triton kernels need a CUDA device; use kernels='torch' on CPU")
    try:
        return triton_kernels()
    except ImportError:
        if backend == "triton":
            raise
        return REFERENCE_KERNELS
