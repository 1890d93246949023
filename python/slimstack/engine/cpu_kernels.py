"""The decoder layer's elementwise pieces on CPU, native (csrc/cpu/decoder_ops.cpp).

A 2:4 TinyLlama's decode step spent ~110 us per layer in the torch references of these
(a dozen small ops, each a dispatch and a pass over memory) around ~1.2 ms of linears; the
native versions take one call each (bench/decoder_pieces.py, bf16, per call as the engine
makes it): RMSNorm with its residual add 3.4 us (torch 14), rotary into the cache 3.0 us
(28), attention over 131 of 256 slots 16 us (28), over 1501 of 2048 149 us (167). Each is a
`torch.library` custom op with a fake, so torch.compile sees one opaque node; eager calls
skip the dispatcher (`eager_direct`) as the sparse matmuls do. They take float32 and
bfloat16; other dtypes run the torch references.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from slimstack.engine.model import (
    REFERENCE_KERNELS,
    Kernels,
    add_rms_norm_reference,
    decode_attention_reference,
    rms_norm_reference,
    rotary_reference,
    rotary_to_cache_reference,
    swiglu_reference,
)
from slimstack.ops.library import _require_native, eager_direct, native_extension

NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether the extension was built with the CPU decoder ops."""
    ext = native_extension()
    return ext is not None and hasattr(ext, "rms_norm_cpu")


# The implementations: the extension flattens rows, copies inputs whose last dimension is
# strided and allocates outputs itself (from Python those cost more than the kernels).
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _require_native("rms_norm").rms_norm_cpu(x, weight, eps)


def _add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _require_native("add_rms_norm").add_rms_norm_cpu(x, delta, weight, eps)


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return _require_native("swiglu").swiglu_cpu(gate, up)


def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    ext = _require_native("rotary")
    return ext.rope_cpu(q, cos, sin), ext.rope_cpu(k, cos, sin)


def _rotary_to_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot: Tensor,
) -> Tensor:
    ext = _require_native("rotary_to_cache")
    return ext.rope_to_cache_cpu(q, k, v, cos, sin, k_cache, v_cache, slot)


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return _require_native("decode_attention").decode_attention_cpu(q, k, v, mask)


def _op(name: str, fn, mutates: tuple[str, ...] = ()):
    return torch.library.custom_op(
        f"slimstack::{name}_cpu", mutates_args=mutates, device_types="cpu"
    )(fn)


rms_norm_op = _op("rms_norm", _rms_norm)
add_rms_norm_op = _op("add_rms_norm", _add_rms_norm)
swiglu_op = _op("swiglu", _swiglu)
rotary_op = _op("rotary", _rotary)
rotary_to_cache_op = _op("rotary_to_cache", _rotary_to_cache, ("k_cache", "v_cache"))
decode_attention_op = _op("decode_attention", _decode_attention)


def _fresh(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# the fakes: every output is a fresh contiguous tensor shaped like an input
rms_norm_op.register_fake(lambda x, weight, eps: _fresh(x))
add_rms_norm_op.register_fake(lambda x, delta, weight, eps: (_fresh(x), _fresh(x)))
swiglu_op.register_fake(lambda gate, up: _fresh(gate))
rotary_op.register_fake(lambda q, k, cos, sin: (_fresh(q), _fresh(k)))
rotary_to_cache_op.register_fake(lambda q, k, v, cos, sin, k_cache, v_cache, slot: _fresh(q))
decode_attention_op.register_fake(lambda q, k, v, mask: _fresh(q))


# ----------------------------------------------------------------------------- kernels
def _native(x: Tensor) -> bool:
    return x.dtype in NATIVE_DTYPES and x.device.type == "cpu"


def _routed(impl: Callable[..., Any], op: Callable[..., Any], reference: Callable[..., Any]):
    """The bundle's entry for one piece, routed by its first tensor: torch's reference for
    other dtypes and devices, the implementation itself in plain eager calls, the custom op
    where tracing or autograd must see one node."""

    def run(first: Tensor, *args: Any) -> Any:
        if not _native(first):
            return reference(first, *args)
        return (impl if eager_direct(first) else op)(first, *args)

    run.__name__ = run.__qualname__ = impl.__name__.lstrip("_")
    return run


rms_norm = _routed(_rms_norm, rms_norm_op, rms_norm_reference)
add_rms_norm = _routed(_add_rms_norm, add_rms_norm_op, add_rms_norm_reference)
swiglu = _routed(_swiglu, swiglu_op, swiglu_reference)
rotary = _routed(_rotary, rotary_op, rotary_reference)
rotary_to_cache = _routed(_rotary_to_cache, rotary_to_cache_op, rotary_to_cache_reference)
decode_attention = _routed(_decode_attention, decode_attention_op, decode_attention_reference)


def native_kernels() -> Kernels:
    """The CPU bundle; the torch references where the extension lacks the ops."""
    if not available():
        return REFERENCE_KERNELS
    # SwiGLU stays torch's: the native one (an exp and a division per element) measured
    # 0.88x of it at a decode step (bench/decoder_pieces.py); it is kept, tested, for rework
    return Kernels(
        "native", rms_norm, add_rms_norm, rotary, swiglu_reference, decode_attention,
        rotary_to_cache,
    )  # fmt: skip
