"""swiglu: silu(gate) * up, the LLaMA MLP's gating, fused into one pass over memory.

Computed in fp32 and rounded once (HF rounds silu(gate) to the input dtype first; the
difference is within one rounding of the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_runnable, check_same_device
from slimstack.kernels._pdl import pdl_launch, pdl_prologue

_BLOCK = 1024


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr, n_elements, width, stride_row, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Rows of `width` elements, `stride_row` apart in gate and up (the two halves of a fused
    gate/up projection are 2 x width apart), contiguous in out."""
    pdl_prologue(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // width
    src = row * stride_row + (offs - row * width)
    gate = tl.load(gate_ptr + src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _validate(gate: torch.Tensor, up: torch.Tensor) -> None:
    op = "swiglu"
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate is {gate.dtype} but up is {up.dtype}")
    check_same_device(op, gate, first="gate", up=up)
    check_runnable(op, _swiglu_kernel, gate.device)


def _as_rows(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as [rows, width] views with one row stride (contiguous copies if not)."""
    width = gate.shape[-1] if gate.dim() else 1
    try:
        g, u = gate.view(-1, width), up.view(-1, width)
    except RuntimeError:  # leading dims that do not collapse into one stride
        g, u = gate.reshape(-1, width).contiguous(), up.reshape(-1, width).contiguous()
    if g.stride(-1) != 1 or u.stride(-1) != 1 or (g.shape[0] > 1 and g.stride(0) != u.stride(0)):
        g, u = g.contiguous(), u.contiguous()
    return g, u


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up elementwise; a new contiguous tensor of gate's shape and dtype. Rows
    of gate and up may be strided alike (the halves of one fused gate/up output): read in
    place, no copies."""
    _validate(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        g, u = _as_rows(gate, up)
        width = g.shape[1]
        stride = g.stride(0) if g.shape[0] > 1 else width
        pdl = pdl_launch(gate.device)
        _swiglu_kernel[(triton.cdiv(n, _BLOCK),)](
            g, u, out, n, width, stride, BLOCK=_BLOCK, num_warps=4,
            **pdl,
        )  # fmt: skip
    return out


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
