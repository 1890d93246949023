"""rmsnorm: y = weight * normalize(x) over the last dim, LLaMA / HF LlamaRMSNorm semantics.

HF computes the statistics in fp32, rounds the normalised activations back to x's dtype and
only then multiplies by the weight; the kernel does the same so that swapping it into a
model changes no rounding step. One program normalises one row held whole in registers.
`add_rmsnorm` first adds a residual delta (a decoder layer's `h + attn`), rounds the sum as
torch would, stores it and normalises it: one launch where the unfused stack runs two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_runnable, check_same_device
from slimstack.kernels._pdl import pdl_launch, pdl_prologue

_MAX_HIDDEN = 65536  # one row in registers


@triton.jit
def _rmsnorm_kernel(
    x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, H,
    stride_x, stride_delta, stride_sum, stride_out, eps,
    BLOCK_H: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        # the residual add, rounded to x's dtype as torch's `x + delta` would round it:
        # the norm then sees exactly what an unfused add would have stored
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask
    )


def launch_shape(hidden: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): about 16 elements per thread, 1..16 warps."""
    block = triton.next_power_of_2(hidden)
    return block, min(16, max(1, block // 512))


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    op = "rmsnorm"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must be 1-D with x's last dim; got x {list(x.shape)}, "
            f"weight {list(weight.shape)}"
        )
    if not 0 < x.shape[-1] <= _MAX_HIDDEN:
        raise ValueError(f"{op}: last dim must be in 1..{_MAX_HIDDEN}, got {x.shape[-1]}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")
    check_same_device(op, x, weight=weight)
    check_runnable(op, _rmsnorm_kernel, x.device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows.contiguous() if rows.shape[0] and rows.stride(1) != 1 else rows


def _launch(
    rows: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    hidden = rows.shape[1]
    out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    total = None if delta is None else torch.empty_like(out)
    if rows.shape[0] == 0:
        return total, out
    block, num_warps = launch_shape(hidden)
    # without a delta its pointer and stride are placeholders the kernel never reads
    delta_rows, sums = (rows, out) if delta is None else (delta, total)
    pdl = pdl_launch(rows.device)
    _rmsnorm_kernel[(rows.shape[0],)](
        rows, delta_rows, weight.contiguous(), sums, out, hidden,
        rows.stride(0), delta_rows.stride(0), sums.stride(0), out.stride(0), float(eps),
        BLOCK_H=block, HAS_DELTA=delta is not None, num_warps=num_warps,
        **pdl,
    )  # fmt: skip
    return total, out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over x's last dim; returns a new tensor of x's shape and dtype."""
    _validate(x, weight, eps)
    return _launch(_rows(x), None, weight, eps)[1].reshape(x.shape)


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rmsnorm(x + delta)) in one pass: the residual add of a decoder layer fused
    with the norm that follows it (one launch and one read of the sum instead of three)."""
    _validate(x, weight, eps)
    if not isinstance(delta, torch.Tensor) or delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(
            "add_rmsnorm: delta must be a tensor of x's shape and dtype; got "
            + (
                f"{list(delta.shape)} {delta.dtype}"
                if isinstance(delta, torch.Tensor)
                else repr(delta)
            )
            + f" for x {list(x.shape)} {x.dtype}"
        )
    check_same_device("add_rmsnorm", x, delta=delta)
    total, out = _launch(_rows(x), _rows(delta), weight, eps)
    return total.reshape(x.shape), out.reshape(x.shape)


def add_rmsnorm_reference(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    return total, rmsnorm_reference(total, weight, eps)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF LlamaRMSNorm.forward, written out."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * normed.to(x.dtype).to(torch.float32)).to(x.dtype)
