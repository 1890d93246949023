"""`slimstack info`: versions and which kernel backends this install can use."""

from __future__ import annotations

import platform
from typing import Any

import torch

import slimstack
from slimstack._callable_module import make_callable


def _backends() -> dict[str, Any]:
    try:
        from slimstack.ops.backends import available_backends
    except ImportError:  # ops not importable: report what we can see directly
        return {"cpu_extension": _has_extension(), "triton": _triton_version()}
    return available_backends()


def _has_extension() -> bool:
    try:
        from slimstack import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def info() -> dict[str, Any]:
    return {
        "slimstack": slimstack.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": _backends(),
    }


def format_info(facts: dict[str, Any]) -> str:
    lines = [
        f"slimstack {facts['slimstack']} (python {facts['python']}, torch {facts['torch']})",
        f"GPU: {facts['gpu'] or 'none (CPU only)'}",
        "backends:",
    ]
    backends = facts["backends"]
    for name, value in backends.items():
        shown = "yes" if value is True else "no" if value in (False, None) else value
        if name == "triton" and value and not backends.get("cuda_device"):
            shown = f"{value} (installed; its kernels need a CUDA device)"
        lines.append(f"  {name:<22} {shown}")
    return "\n".join(lines)


# slimstack.info(...) calls info() (see slimstack._callable_module)
make_callable(__name__, __name__, "info")
