"""Argument checks shared by the Triton launchers: fail early, name what is wrong and what is allowed.

Every check runs before anything is allocated or launched, so a bad call leaves nothing behind.
"""

from __future__ import annotations

import torch

from slimstack.formats.common import K_TILE, padded_k

__all__ = ["FLOAT_DTYPES", "K_TILE", "padded_k"]  # re-exported for the launchers

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_size(op: str, name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def check_activation(
    op: str,
    x: torch.Tensor,
    K: int,
    max_m: int | None = None,
    larger: str = "use the GEMM for larger M",
) -> int:
    """x must be a float [M, K] tensor; returns M. ``larger``: what to do past ``max_m``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{op}: x must have shape [M, K={K}], got {tuple(x.shape)}")
    rows = x.shape[0]
    if max_m is not None and rows > max_m:
        raise ValueError(f"{op}: M = {rows} rows is outside 0..{max_m}; {larger}")
    return rows


def check_packed(
    op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (packed tensors are)")


def check_flags(op: str, **flags: object) -> None:
    """Each keyword a launcher takes as an on / off switch is a bool."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def check_float_values(op: str, values: object) -> None:
    """A packed weight's values tensor, whose dtype (a float type) the dense weight takes."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(
            f"{op}: values must be a float tensor, got {getattr(values, 'dtype', values)}"
        )


def check_bitmap_packed(
    op: str,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    N: int,
    K: int,
    dtype: torch.dtype,
) -> None:
    """The three tensors of a bitmap-packed [N, K] weight (slimstack/formats/bitmap.py)."""
    Kp = padded_k(K)
    check_packed(op, "bitmask", bitmask, (N, Kp // 8), torch.uint8)
    check_packed(op, "row_offsets", row_offsets, (N + 1,), torch.int64)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: values must be a torch.Tensor, got {type(values).__name__}")
    check_packed(op, "values", values, (values.numel(),), dtype)  # 1-D
    if row_offsets.device.type == "cpu":  # free to check here; on CUDA it would cost a sync
        end = int(row_offsets[-1])
        if int(row_offsets[0]) != 0 or end > values.numel():
            raise ValueError(
                f"{op}: row_offsets must start at 0 and end within values "
                f"(ends at {end}, values holds {values.numel()})"
            )


def check_int32_offsets(op: str, *numels: int) -> None:
    """The kernels index with int32: every tensor they address stays below 2**31 elements."""
    if max(numels) >= 2**31:
        raise ValueError(f"{op}: tensors past 2**31 elements are not supported (int32 offsets)")


def addressed_elements(x: torch.Tensor) -> int:
    """Elements a kernel may address from x's pointer: its numel when contiguous, more for
    a narrow view of a wide buffer (row stride past K). A view whose columns are strided is
    made contiguous by the launchers, so only its numel counts."""
    if x.numel() == 0 or x.dim() != 2 or x.stride(1) != 1:
        return x.numel()
    return (x.shape[0] - 1) * x.stride(0) + x.shape[1]


def check_block_k(op: str, block_k: int) -> None:
    """A K step covers whole packed K tiles."""
    if block_k % K_TILE or block_k < K_TILE:
        raise ValueError(f"{op}: config.block_k must be a multiple of {K_TILE}, got {block_k}")


def _is_power_of_two(value: object) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
        and not (value & (value - 1))
    )


def _is_register_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 24 <= value <= 255


def check_config(op: str, config: object) -> None:
    """A launch config Triton can compile: block sizes are powers of two (tl.arange needs
    them), block_k covers whole packed K tiles, num_warps is 1..32 (a power of two),
    num_stages and group_n are >= 1, split_k is None (planned) or >= 1, maxnreg is None or a
    register count ptxas accepts."""
    check_block_k(op, config.block_k)
    for field, value in vars(config).items():
        if field.startswith("block_") or field == "num_warps":
            if not _is_power_of_two(value):
                raise ValueError(f"{op}: config.{field} must be a power of two, got {value!r}")
        elif field in ("num_stages", "group_n") or (field == "split_k" and value is not None):
            check_size(op, f"config.{field}", value)
        elif field == "maxnreg" and value is not None and not _is_register_count(value):
            raise ValueError(
                f"{op}: config.maxnreg must be None or an int in 24..255 (registers per "
                f"thread), got {value!r}"
            )
    if config.num_warps > 32:
        raise ValueError(f"{op}: config.num_warps must be at most 32, got {config.num_warps}")


def check_same_device(
    op: str, x: torch.Tensor, *, first: str = "x", **others: torch.Tensor
) -> None:
    """Every tensor of `others` on x's device; `first` is x's name in the message."""
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {x.device}")


def check_runnable(op: str, kernel: object, device: torch.device) -> None:
    """A compiled Triton kernel needs CUDA tensors; the interpreter runs on CPU tensors."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if not interpreted and device.type != "cuda":
        raise ValueError(
            f"{op}: tensors are on {device}, but compiled Triton kernels need CUDA tensors "
            "(to run them on CPU, set TRITON_INTERPRET=1 before triton is first imported)"
        )


def as_int32_words(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """View a contiguous uint8 [rows, bytes] tensor (bytes % 4 == 0) as int32 words."""
    if t.shape[-1] % 4 != 0:
        raise ValueError(f"{op}: {name} rows must hold a multiple of 4 bytes, got {t.shape[-1]}")
    if t.numel() == 0:
        return t.new_empty((*t.shape[:-1], t.shape[-1] // 4), dtype=torch.int32)
    if t.data_ptr() % 4 != 0:  # a sliced view; the kernels read 4-byte words
        t = t.clone()
    return t.view(torch.int32)
