"""Print a stamp of what slimstack._C is built from: Python ABI, torch version, CUDA arch
list and a hash of the native sources and setup.py. tools/prebuild_ext.sh writes it beside a
prebuilt extension; tools/gpu_session.sh uses that extension only if the stamp it computes
on the GPU machine is the same."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sources_digest() -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.is_file()) + [REPO / "setup.py"]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stamp() -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    return (
        f"{sysconfig.get_config_var('EXT_SUFFIX')} torch={torch.__version__} "
        f"arch={arch} sources={sources_digest()}"
    )


if __name__ == "__main__":
    print(stamp())
