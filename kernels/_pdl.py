"""Programmatic dependent launch (PDL) for the small kernels of a decode step (sm_90 and later).

At batch 1 a decode layer runs a chain of tiny kernels (a norm of one row, RoPE of one token,
SwiGLU of one row, the attention merge) between its GEMVs; each costs a launch and ramp that
can be as long as its work. Launched with PDL, a kernel's programs may start as soon as every
program of the kernel before it has started (that kernel's `gdc_launch_dependents`) or
finished, and wait in `gdc_wait` until its writes are visible. Every kernel here waits first,
before any load or store, so it is right whatever ran before it; then it lets its own
dependent start (the CUDA 2:4 GEMV after a norm prefetches its weights into L2 meanwhile,
csrc/cuda/sparse24_gemv.cu).

`pdl_for(device)` decides per launch: CUDA compute capability 9.0 or later, not the
interpreter (it runs no inline PTX), and `SLIMSTACK_PDL` not "0" (slimstack.devices: the one
switch for these kernels and the CUDA GEMV, which the GPU benchmark compares). Kernels take a `PDL` constexpr (False: no wait, no launch attribute,
the kernel of before), and launchers pass `**pdl_launch(device)`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from slimstack.devices import PDL_ENV, pdl_enabled

try:  # triton >= 3.3; older releases launch every kernel without PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENV = PDL_ENV  # the switch's name, for callers and tests


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First thing in a kernel: wait for the kernel before it, then let the next one start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_for(device: torch.device) -> bool:
    """Whether a kernel launched on `device` now should be a programmatic dependent."""
    if not HAVE_GDC or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not pdl_enabled():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _supports_pdl(index)


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The keywords for a launch on `device`: the kernel's PDL constexpr, and the launch
    attribute when it is set (the interpreter takes no launch_pdl keyword)."""
    pdl = pdl_for(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
