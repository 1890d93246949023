"""Whether this machine's Triton interpreter can run the kernels (tests import this)."""

from __future__ import annotations

import importlib.metadata


def _version(package: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def interpreter_problem() -> str | None:
    """Why TRITON_INTERPRET=1 cannot run slimstack's kernels here (None: it can).

    Triton 3.6's interpreter turns program ids into 1-element arrays and a loop bound built
    from them into an int with int(array), which NumPy >= 2.4 refuses; the kernels loop over
    per-program K ranges, so every one fails. Seen with triton 3.6.0 + NumPy 2.4.6; triton
    3.9 runs them. Compiled (GPU) runs are not affected.
    """
    triton, numpy = _version("triton"), _version("numpy")
    if triton is None:
        return "triton is not installed"
    if triton < (3, 9) and numpy is not None and numpy >= (2, 4):
        return (
            f"triton {'.'.join(map(str, triton))}'s interpreter calls int() on 1-element "
            f"arrays, which NumPy {'.'.join(map(str, numpy))} refuses; interpreter runs need "
            "triton >= 3.9 (or NumPy < 2.4)"
        )
    return None
