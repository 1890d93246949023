"""The one place a user's device argument becomes a torch.device, with errors that say what
is allowed instead of torch's tracebacks from deep inside the first CUDA call."""

from __future__ import annotations

import os

import torch

ALLOWED = "'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else the CPU. Otherwise a CPU or an available CUDA device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be {ALLOWED}, got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {ALLOWED}, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(
                f"device {device!r} asked for, but this torch ({torch.__version__}) has "
                f"{build}; use device='cpu' (--device cpu)"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: there are {count} CUDA device(s), 0..{count - 1}")
    return resolved


PDL_ENV = "SLIMSTACK_PDL"


def pdl_enabled() -> bool:
    """Whether kernels may launch as programmatic dependents (sm_90+, where they support it):
    the CUDA 2:4 GEMV and the small Triton decode kernels. SLIMSTACK_PDL=0 turns it off for
    all of them (the benchmark's comparison); read at each launch."""
    return os.environ.get(PDL_ENV, "1") != "0"
