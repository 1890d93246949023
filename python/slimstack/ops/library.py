"""The sparse matmuls as ``torch.library`` custom ops, so torch.compile and CUDA graphs see
one opaque node with a known output shape instead of tracing into kernel launchers.

- ``slimstack::sparse24_mm`` / ``slimstack::bitmap_mm``: the native extension, its CPU
  kernel on CPU tensors and its CUDA kernels on CUDA tensors.
- ``slimstack::sparse24_mm_triton`` / ``slimstack::bitmap_mm_triton``: the Triton launchers
  in ``slimstack.kernels`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); bitmap
  past decode unpacks W with a Triton kernel for one dense matmul.

All take x [M, K] (contiguous, the packed weight's dtype) and return y [M, N] in x's dtype.
Which op runs is decided by ``slimstack.ops.dispatch``; nothing here chooses a backend.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from slimstack.devices import pdl_enabled
from slimstack.ops.derived import DerivedCache

# decode kernels (GEMV) take at most this many rows; larger M goes to the GEMMs
GEMV_MAX_M = 16


@cache
def native_extension() -> ModuleType | None:
    """slimstack._C, or None when the package was installed without it."""
    try:
        return importlib.import_module("slimstack._C")
    except ImportError:
        return None


def _require_native(op: str) -> ModuleType:
    ext = native_extension()
    if ext is None:
        raise RuntimeError(f"{op}: the native extension slimstack._C is not built")
    return ext


def _empty_like_output(x: Tensor, n: int) -> Tensor:
    return x.new_empty((x.shape[0], n))


def _aligned16(x: Tensor) -> Tensor:
    """x itself, or a copy when it is a view starting off a 16-byte boundary (the CUDA
    kernels load x in 16-byte vectors)."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


# ----------------------------------------------------------------------------- native


def _sparse24_mm_cpu(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    """y = x @ W^T for a sparse24-packed W, native kernels."""
    return _require_native("sparse24_mm").sparse24_mm_cpu(x, values, meta, N, K)


def _bitmap_mm_cpu(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    """y = x @ W^T for a bitmap-packed W, native kernels."""
    return _require_native("bitmap_mm").bitmap_mm_cpu(x, values, bitmask, row_offsets, N, K)


sparse24_mm = torch.library.custom_op(
    "slimstack::sparse24_mm", mutates_args=(), device_types="cpu"
)(_sparse24_mm_cpu)
bitmap_mm = torch.library.custom_op("slimstack::bitmap_mm", mutates_args=(), device_types="cpu")(
    _bitmap_mm_cpu
)


# The Hopper GEMM reads the metadata in CUTLASS's order: reorder once per weight and keep it
# while the weight's meta tensor lives and keeps its bytes.
_SM90_META: DerivedCache[Tensor] = DerivedCache()
# Devices whose kernel choice has run outside graph capture: the first choice probes the
# loaded sm_90a image with a synchronous copy, which would invalidate a capture.
_PROBED_DEVICES: set[int] = set()


def _refuse_first_use_in_capture(what: str) -> None:
    # nothing captures before CUDA is initialized (and CPU builds of torch cannot ask)
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"sparse24_mm: the first prefill (M > {GEMV_MAX_M}) of {what} ran inside CUDA-graph "
            "capture; it has one-time setup (a device probe, the metadata reordered for the "
            "Hopper GEMM) that cannot be captured. Run one eager call with the same weight "
            "before capturing."
        )


def _sm90_meta(ext: ModuleType, meta: Tensor, n: int, k: int) -> Tensor:
    reordered = _SM90_META.lookup(meta, (meta,))
    if reordered is None:
        _refuse_first_use_in_capture("this weight")
        reordered = _SM90_META.get(
            meta, (meta,), lambda: ext.sparse24_sm90_reorder_meta_cuda(meta, n, k)
        )
    return reordered


def cuda_sparse24_kernel(ext: ModuleType, M: int, N: int, device_index: int) -> str:
    """Which CUDA kernel runs a sparse24 product: "gemv" for decode, the Hopper GEMM
    "sm90" where it can run (its TMA store of y^T needs N % 8 == 0), else "sm80"."""
    if M <= GEMV_MAX_M:
        return "gemv"
    if N % 8 == 0 and ext.sparse24_gemm_sm90_available(device_index):
        return "sm90"
    return "sm80"


@sparse24_mm.register_kernel("cuda")
def _sparse24_mm_cuda(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    ext = _require_native("sparse24_mm")
    if not getattr(ext, "with_cuda", False):
        raise RuntimeError("sparse24_mm: slimstack._C was built without CUDA kernels")
    x = _aligned16(x)
    device = x.device.index or 0
    if x.shape[0] > GEMV_MAX_M and device not in _PROBED_DEVICES:
        _refuse_first_use_in_capture(f"cuda:{device}")
        _PROBED_DEVICES.add(device)
    kernel = cuda_sparse24_kernel(ext, x.shape[0], N, device)
    if kernel == "gemv":
        pdl = "auto" if pdl_enabled() else "off"
        return ext.sparse24_gemv_cuda(x, values, meta, N, K, 0, None, "auto", "auto", pdl)
    if kernel == "sm90":
        return ext.sparse24_gemm_sm90_cuda(x, values, _sm90_meta(ext, meta, N, K), N, K)
    return ext.sparse24_gemm_sm80_cuda(x, values, meta, N, K)


@bitmap_mm.register_kernel("cuda")
def _bitmap_mm_cuda(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    ext = _require_native("bitmap_mm")
    if not getattr(ext, "with_cuda", False):
        raise RuntimeError("bitmap_mm: slimstack._C was built without CUDA kernels")
    return ext.bitmap_gemv_cuda(_aligned16(x), values, bitmask, row_offsets, N, K)


# ----------------------------------------------------------------------------- triton


def _triton_kernel(module: str, name: str):
    # Imported on first use: importing triton is slow and fixes its interpreter mode.
    return getattr(importlib.import_module(f"slimstack.kernels.{module}"), name)


def _sparse24_mm_triton(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    """y = x @ W^T for a sparse24-packed W: Triton GEMV for decode, tiled GEMM otherwise."""
    if x.shape[0] <= GEMV_MAX_M:
        return _triton_kernel("sparse24_gemv", "sparse24_gemv")(x, values, meta, N, K)
    return _triton_kernel("sparse24_gemm", "sparse24_gemm")(x, values, meta, N, K)


def _bitmap_mm_triton(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    """y = x @ W^T for a bitmap-packed W: Triton GEMV for decode; past it, W unpacked by a
    Triton kernel and one dense matmul (prefill is compute-bound: the tensor cores win)."""
    if x.shape[0] <= GEMV_MAX_M:
        return _triton_kernel("bitmap_gemv", "bitmap_gemv")(x, values, bitmask, row_offsets, N, K)
    mm = _triton_kernel("bitmap_unpack", "bitmap_mm_unpacked")
    return mm(x, values, bitmask, row_offsets, N, K)


sparse24_mm_triton = torch.library.custom_op("slimstack::sparse24_mm_triton", mutates_args=())(
    _sparse24_mm_triton
)
bitmap_mm_triton = torch.library.custom_op("slimstack::bitmap_mm_triton", mutates_args=())(
    _bitmap_mm_triton
)


# ----------------------------------------------------------------------------- eager calls


def eager_direct(x: Tensor) -> bool:
    """Whether a call may skip the custom op and run its implementation directly: a plain
    tensor (no fake or functional subclass), nothing tracing, no gradient to record, no
    profiler (which names each op: bench/profile_decode.py counts them). The dispatch through
    torch.library costs ~20 us of host time per call (its autograd and backend-select
    layers), which eager prefill and CPU decode pay for every linear."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch._C._autograd._profiler_enabled()
    )


def run_sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    """slimstack::sparse24_mm, or its implementation for x's device where eager_direct."""
    if eager_direct(x):
        return (_sparse24_mm_cuda if x.is_cuda else _sparse24_mm_cpu)(x, values, meta, N, K)
    return sparse24_mm(x, values, meta, N, K)


def run_bitmap_mm(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    """slimstack::bitmap_mm, or its implementation for x's device where eager_direct."""
    if eager_direct(x):
        impl = _bitmap_mm_cuda if x.is_cuda else _bitmap_mm_cpu
        return impl(x, values, bitmask, row_offsets, N, K)
    return bitmap_mm(x, values, bitmask, row_offsets, N, K)


def run_sparse24_mm_triton(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    if eager_direct(x):
        return _sparse24_mm_triton(x, values, meta, N, K)
    return sparse24_mm_triton(x, values, meta, N, K)


def run_bitmap_mm_triton(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    if eager_direct(x):
        return _bitmap_mm_triton(x, values, bitmask, row_offsets, N, K)
    return bitmap_mm_triton(x, values, bitmask, row_offsets, N, K)


# ----------------------------------------------------------------------------- fake


@sparse24_mm.register_fake
@sparse24_mm_triton.register_fake
def _sparse24_mm_fake(x: Tensor, values: Tensor, meta: Tensor, N: int, K: int) -> Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: f"x must be [M, {K}]")
    return _empty_like_output(x, N)


@bitmap_mm.register_fake
@bitmap_mm_triton.register_fake
def _bitmap_mm_fake(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, N: int, K: int
) -> Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: f"x must be [M, {K}]")
    return _empty_like_output(x, N)


# ----------------------------------------------------------------------------- autograd
# Gradients flow to x only (dx = dy @ W, W unpacked on the fly): the packed weight is
# frozen. This keeps SparseLinear usable inside models that train other parameters, and
# lets torch.compile trace graphs whose inputs require grad.


def _save_sparse24(ctx, inputs, output) -> None:
    _, values, meta, n, k = inputs
    ctx.save_for_backward(values, meta)
    ctx.shape = (n, k)


def _grad_sparse24(ctx, grad: Tensor):
    from slimstack.formats import Sparse24Weight

    values, meta = ctx.saved_tensors
    dense = Sparse24Weight(values, meta, ctx.shape, values.dtype).unpack()
    return grad @ dense.to(grad.dtype), None, None, None, None


def _save_bitmap(ctx, inputs, output) -> None:
    _, values, bitmask, row_offsets, n, k = inputs
    ctx.save_for_backward(values, bitmask, row_offsets)
    ctx.shape = (n, k)


def _grad_bitmap(ctx, grad: Tensor):
    from slimstack.formats import BitmapWeight

    values, bitmask, row_offsets = ctx.saved_tensors
    dense = BitmapWeight(values, bitmask, row_offsets, ctx.shape, values.dtype).unpack()
    return grad @ dense.to(grad.dtype), None, None, None, None, None


for _op in (sparse24_mm, sparse24_mm_triton):
    _op.register_autograd(_grad_sparse24, setup_context=_save_sparse24)
for _op in (bitmap_mm, bitmap_mm_triton):
    _op.register_autograd(_grad_bitmap, setup_context=_save_bitmap)
