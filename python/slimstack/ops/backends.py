"""The backends ``sparse_linear`` can run on, what each needs, and how to call it.

A backend answers two questions: is it usable in this install (``unavailable``), and can it
take this call (``unsupported``: format, device, dtype, M); both return None for yes, else
the reason, so that a forced backend fails with a message a user can act on.

- ``cuda``: slimstack._C's CUDA kernels (fp16/bf16; bitmap only for decode, M <= 16)
- ``triton``: slimstack.kernels (CUDA tensors; CPU tensors only when forced under
  TRITON_INTERPRET=1; bitmap past M = 16 unpacks W for a dense matmul)
- ``torch``: PyTorch's semi-structured sparse matmul (to_sparse_semi_structured; sparse24
  on CUDA, fp16/bf16, N a multiple of 32, sm_80+)
- ``cpu``: slimstack._C's CPU kernels (fp32/fp16/bf16)
- ``reference``: pure PyTorch, unpack then dense matmul (always there, never fast)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from slimstack.formats import BitmapWeight, Sparse24Weight
from slimstack.ops.derived import DerivedCache
from slimstack.ops.library import (  # importing it registers the custom ops
    GEMV_MAX_M,
    native_extension,
    run_bitmap_mm,
    run_bitmap_mm_triton,
    run_sparse24_mm,
    run_sparse24_mm_triton,
)

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMATS = ("sparse24", "bitmap")


@dataclass(frozen=True)
class Backend:
    name: str
    unavailable: Callable[[], str | None]
    unsupported: Callable[[str, torch.device, torch.dtype, int, bool], str | None]
    sparse24: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]
    bitmap: Callable[[Tensor, Tensor, Tensor, Tensor, int, int], Tensor]


# ----------------------------------------------------------------------------- probes


@cache
def _cpu_extension_missing() -> str | None:
    ext = native_extension()
    if ext is None:
        return "the native extension slimstack._C is not built (python setup.py build_ext)"
    if not hasattr(ext, "sparse24_mm_cpu"):
        return "slimstack._C has no CPU sparse kernels (rebuild the extension)"
    return None


@cache
def _cuda_extension_missing() -> str | None:
    ext = native_extension()
    if ext is None:
        return "the native extension slimstack._C is not built"
    if not getattr(ext, "with_cuda", False):
        return "slimstack._C was built without CUDA kernels (needs nvcc and a CUDA torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


@cache
def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("slimstack.kernels.sparse24_gemv") is None:
        return "the Triton kernels (slimstack.kernels) are not installed"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _torch_semi_structured_missing() -> str | None:
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return "PyTorch's semi-structured sparse matmul needs a CUDA device"
    return None


def _never_missing() -> str | None:
    return None


_CUDA_CAPABILITY: dict[int, tuple[int, int]] = (
    {i: torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    if torch.cuda.is_available()
    else {}
)


# ----------------------------------------------------------------------------- support rules


def _device_is(device: torch.device, wanted: str, backend: str) -> str | None:
    if device.type != wanted:
        return f"the {backend} backend runs on {wanted} tensors, got {device}"
    return None


def _dtype_in(dtype: torch.dtype, allowed: tuple[torch.dtype, ...], backend: str) -> str | None:
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"the {backend} backend takes {names}, got {dtype}"
    return None


def _decode_only(fmt: str, m: int, backend: str) -> str | None:
    if fmt == "bitmap" and m > GEMV_MAX_M:
        return f"the {backend} backend has bitmap kernels for M <= {GEMV_MAX_M} only, got M={m}"
    return None


def _cuda_unsupported(fmt, device, dtype, m, forced) -> str | None:
    return (
        _device_is(device, "cuda", "cuda")
        or _dtype_in(dtype, HALF_DTYPES, "cuda")
        or _decode_only(fmt, m, "cuda")
    )


def _triton_unsupported(fmt, device, dtype, m, forced) -> str | None:
    # The interpreter runs on CPU tensors, but far too slowly to be picked automatically.
    if not (device.type == "cuda" or (forced and device.type == "cpu" and triton_interpreted())):
        return (
            f"the triton backend runs on CUDA tensors (CPU tensors only with "
            f"TRITON_INTERPRET=1 and SLIMSTACK_BACKEND=triton), got {device}"
        )
    return _dtype_in(dtype, ALL_DTYPES, "triton")


def _torch_unsupported(fmt, device, dtype, m, forced) -> str | None:
    if fmt != "sparse24":
        return "the torch backend (semi-structured sparse) takes sparse24 weights only"
    reason = _device_is(device, "cuda", "torch") or _dtype_in(dtype, HALF_DTYPES, "torch")
    if reason is None and _CUDA_CAPABILITY.get(device.index or 0, (0, 0)) < (8, 0):
        reason = "PyTorch's semi-structured sparse matmul needs compute capability >= 8.0"
    return reason


def _cpu_unsupported(fmt, device, dtype, m, forced) -> str | None:
    return _device_is(device, "cpu", "cpu") or _dtype_in(dtype, ALL_DTYPES, "cpu")


def _reference_unsupported(fmt, device, dtype, m, forced) -> str | None:
    return None


# ----------------------------------------------------------------------------- calls

# to_sparse_semi_structured copies of packed weights, kept while the packed tensors live and
# keep their bytes
_SEMI_STRUCTURED: DerivedCache = DerivedCache()
SEMI_STRUCTURED_ROW_MULTIPLE = 32  # CUTLASS's minimum for 16-bit types (cuSPARSELt: 16)


def _semi_structured_weight(values: Tensor, meta: Tensor, n: int, k: int):
    from torch.sparse import to_sparse_semi_structured

    def build():
        packed = Sparse24Weight(values, meta, (n, k), values.dtype)
        # zero rows up to a multiple of 32 and zero columns up to Kp (a multiple of 64)
        # meet the semi-structured shape constraints for any N and K
        n_padded = -(-n // SEMI_STRUCTURED_ROW_MULTIPLE) * SEMI_STRUCTURED_ROW_MULTIPLE
        dense = torch.nn.functional.pad(packed.unpack(), (0, packed.kp - k, 0, n_padded - n))
        return to_sparse_semi_structured(dense)

    return _SEMI_STRUCTURED.get(values, (values, meta), build)


def _torch_sparse24(x: Tensor, values: Tensor, meta: Tensor, n: int, k: int) -> Tensor:
    weight = _semi_structured_weight(values, meta, n, k)
    y = torch.nn.functional.linear(torch.nn.functional.pad(x, (0, weight.shape[1] - k)), weight)
    return y if y.shape[1] == n else y[:, :n].contiguous()


def _dense_matmul(x: Tensor, dense: Tensor) -> Tensor:
    if x.device.type == "cpu":  # fp32 accumulation, like every kernel
        return (x.float() @ dense.float().t()).to(x.dtype)
    return x @ dense.t()


def _reference_sparse24(x: Tensor, values: Tensor, meta: Tensor, n: int, k: int) -> Tensor:
    return _dense_matmul(x, Sparse24Weight(values, meta, (n, k), values.dtype).unpack())


def _reference_bitmap(
    x: Tensor, values: Tensor, bitmask: Tensor, row_offsets: Tensor, n: int, k: int
) -> Tensor:
    packed = BitmapWeight(values, bitmask, row_offsets, (n, k), values.dtype)
    return _dense_matmul(x, packed.unpack())


def _no_bitmap(*args) -> Tensor:
    raise RuntimeError("the torch backend has no bitmap kernel")


# The native and Triton backends run their custom ops (library.run_*: the op itself under
# torch.compile, fake tensors or autograd; its implementation directly otherwise).
BACKENDS: dict[str, Backend] = {
    "cuda": Backend(
        "cuda", _cuda_extension_missing, _cuda_unsupported, run_sparse24_mm, run_bitmap_mm
    ),
    "triton": Backend(
        "triton",
        _triton_missing,
        _triton_unsupported,
        run_sparse24_mm_triton,
        run_bitmap_mm_triton,
    ),  # fmt: skip
    "torch": Backend(
        "torch", _torch_semi_structured_missing, _torch_unsupported, _torch_sparse24, _no_bitmap
    ),
    "cpu": Backend("cpu", _cpu_extension_missing, _cpu_unsupported, run_sparse24_mm, run_bitmap_mm),
    "reference": Backend(
        "reference", _never_missing, _reference_unsupported, _reference_sparse24, _reference_bitmap
    ),
}


# Probed once at import, so that choosing a backend is plain dict lookups and comparisons,
# which torch.compile traces into guards instead of breaking the graph.
UNAVAILABLE: dict[str, str | None] = {name: b.unavailable() for name, b in BACKENDS.items()}


def available_backends() -> dict[str, bool | str]:
    """What this install can run: each backend, the CPU instruction set, the GPU."""
    report: dict[str, bool | str] = {}
    cpu_missing = _cpu_extension_missing()
    report["cpu_extension"] = cpu_missing is None
    if cpu_missing is None:
        report["cpu_isa"] = native_extension().cpu_isa()
    ext = native_extension()
    report["cuda_extension"] = bool(ext is not None and getattr(ext, "with_cuda", False))
    report["cuda_device"] = torch.cuda.is_available()
    if _triton_missing() is None:
        import triton

        report["triton"] = triton.__version__
    else:
        report["triton"] = False
    report["torch_semi_structured"] = _torch_semi_structured_missing() is None
    report["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else False
    report["forced_backend"] = os.environ.get("SLIMSTACK_BACKEND") or False
    return report
