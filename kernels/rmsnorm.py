"""rmsnorm: y = weight * normalize(x) over the last dim, LLaMA / HF LlamaRMSNorm semantics.

HF computes the statistics in fp32, rounds the normalised activations back to x's dtype and
only then multiplies by the weight; the kernel does the same so that swapping it into a
model changes no rounding step. One program normalises one row held whole in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_runnable, check_same_device

_MAX_HIDDEN = 65536  # one row in registers


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_out, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
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


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over x's last dim; returns a new tensor of x's shape and dtype."""
    _validate(x, weight, eps)
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.shape[0] and rows.stride(1) != 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.reshape(x.shape)
    block, num_warps = launch_shape(hidden)
    _rmsnorm_kernel[(rows.shape[0],)](
        rows, weight, out, hidden, rows.stride(0), out.stride(0), float(eps),
        BLOCK_H=block, num_warps=num_warps,
    )  # fmt: skip
    return out.reshape(x.shape)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF LlamaRMSNorm.forward, written out."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * normed.to(x.dtype).to(torch.float32)).to(x.dtype)
