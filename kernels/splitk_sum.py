"""splitk_sum: add the fp32 split-K partials of a GEMV and round once to the output dtype.

The GEMV launchers split K across programs when N alone cannot fill the GPU; each split
writes fp32 partials [split, M, N]. ``partial.sum(0).to(dtype)`` costs two launches and an
fp32 intermediate; at decode sizes (a few microseconds of weight traffic) each extra launch
is a visible share of the call. This is one launch, one read of the partials, one write of
the output, and it adds the splits in slice order, so the result does not depend on timing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimstack.kernels._checks import FLOAT_DTYPES, check_runnable
from slimstack.kernels._pdl import pdl_launch, pdl_prologue

_BLOCK = 1024


@triton.jit
def _splitk_sum_kernel(
    partial_ptr, out_ptr, numel, split, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    pdl_prologue(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(split):  # slice order: deterministic
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial: fp32 [split, M, N], contiguous -> [M, N] of ``dtype``, summed over split."""
    if not isinstance(partial, torch.Tensor) or partial.dtype != torch.float32:
        raise TypeError("splitk_sum: partial must be a float32 tensor")
    if partial.dim() != 3 or not partial.is_contiguous():
        raise ValueError(
            f"splitk_sum: partial must be a contiguous [split, M, N] tensor, got "
            f"{list(partial.shape)}{'' if partial.is_contiguous() else ' (not contiguous)'}"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"splitk_sum: dtype must be float16, bfloat16 or float32, got {dtype}")
    check_runnable("splitk_sum", _splitk_sum_kernel, partial.device)
    split, M, N = partial.shape
    out = torch.empty((M, N), dtype=dtype, device=partial.device)
    numel = M * N
    if numel == 0:
        return out
    if split * numel >= 2**31:
        raise ValueError("splitk_sum: partials past 2**31 elements are not supported")
    grid = (triton.cdiv(numel, _BLOCK),)
    pdl = pdl_launch(partial.device)
    _splitk_sum_kernel[grid](partial, out, numel, split, BLOCK=_BLOCK, num_warps=4, **pdl)
    return out


def splitk_sum_reference(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return partial.double().sum(dim=0).to(dtype)
