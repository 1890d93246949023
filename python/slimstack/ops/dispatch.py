"""Which backend runs a sparse matmul: a small table of rules, first match wins.

A rule matches on device ("cpu", "cuda"), format ("sparse24", "bitmap"), dtype
("float32", "float16", "bfloat16") and an M range [m_min, m_max]; a missing key or "*"
matches anything, a missing m_max means no upper bound. Its ``order`` lists backends best
first; the first one that is available and takes the call runs it, and ``reference``
(pure PyTorch) is the last resort. The benchmarks refresh the table with
``save_dispatch_table``; ``SLIMSTACK_DISPATCH_TABLE=path`` points at another file.

``SLIMSTACK_BACKEND=cpu|triton|cuda|torch|reference`` skips the table: that backend runs
or the call fails, saying why (a forced backend never falls back silently). It is read when
a call is traced, so under torch.compile it must be set before compiling: the graph keeps
the backend it was traced with and does not guard on the variable.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimstack.formats.common import SUPPORTED_DTYPES
from slimstack.ops.backends import BACKENDS, FORMATS, UNAVAILABLE

TABLE_VERSION = 1
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
FORCE_ENV = "SLIMSTACK_BACKEND"
TABLE_ENV = "SLIMSTACK_DISPATCH_TABLE"

# Used when no table file exists: the preference order, except where an H200 run
# (bench/results/2026-12-04-nvidia-h200-kernels*.json) measured otherwise. PyTorch's
# semi-structured matmul, ahead of CUDA past M = 2048 on some shapes there, stays behind it:
# it keeps a second copy of every weight it touches.
DEFAULT_TABLE: dict[str, Any] = {
    "version": TABLE_VERSION,
    "rules": [
        {"device": "cuda", "format": "sparse24", "order": ["cuda", "triton", "torch", "reference"]},
        {
            "device": "cuda",
            "format": "bitmap",
            "m_min": 5,
            "order": ["triton", "cuda", "reference"],
            "note": "H200 bf16 geomean vs dense, M=8: triton 0.25x, cuda 0.15x; past M=16 "
            "only triton runs bitmap (W unpacked, then cuBLAS)",
        },
        {"device": "cuda", "format": "bitmap", "order": ["cuda", "triton", "reference"]},
        {"device": "cpu", "order": ["cpu", "reference"]},
        {"order": ["reference"]},
    ],
}

_RULE_KEYS = {"device", "format", "dtype", "m_min", "m_max", "order", "note"}
_decisions: dict[tuple, str] = {}


def validate_table(table: dict[str, Any]) -> dict[str, Any]:
    """Return ``table`` if it is a well-formed dispatch table, else raise ValueError."""
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise ValueError(f"a dispatch table is a dict with version {TABLE_VERSION} and rules")
    rules = table.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ValueError("a dispatch table needs a non-empty list of rules")
    allowed = {
        "device": {"cpu", "cuda", "*"},
        "format": {*FORMATS, "*"},
        "dtype": {*SUPPORTED_DTYPES, "*"},
    }
    for i, rule in enumerate(rules):
        unknown = set(rule) - _RULE_KEYS
        if unknown:
            raise ValueError(f"dispatch rule {i}: unknown keys {sorted(unknown)}")
        for key, values in allowed.items():
            if rule.get(key, "*") not in values:
                raise ValueError(f"dispatch rule {i}: {key} must be one of {sorted(values)}")
        m_min, m_max = rule.get("m_min", 0), rule.get("m_max")
        if not isinstance(m_min, int) or (m_max is not None and not isinstance(m_max, int)):
            raise ValueError(f"dispatch rule {i}: m_min and m_max must be ints (m_max or null)")
        order = rule.get("order")
        if not order or any(name not in BACKENDS for name in order):
            raise ValueError(f"dispatch rule {i}: order must list backends from {sorted(BACKENDS)}")
    return table


def load_dispatch_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a table: ``path``, else $SLIMSTACK_DISPATCH_TABLE, else the packaged file if
    the benchmarks wrote one, else DEFAULT_TABLE."""
    from_env = not path and bool(os.environ.get(TABLE_ENV))
    path = path or os.environ.get(TABLE_ENV) or (TABLE_PATH if TABLE_PATH.exists() else None)
    if path is None:
        return DEFAULT_TABLE
    # This runs when slimstack.ops is imported: name the file and where it came from, since
    # a stale $SLIMSTACK_DISPATCH_TABLE otherwise surfaces as a bare JSON or rule error.
    try:
        with open(path) as f:
            return validate_table(json.load(f))
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        origin = f" (named by {TABLE_ENV})" if from_env else ""
        raise ValueError(f"dispatch table {path}{origin} cannot be used: {error}") from None


def save_dispatch_table(table: dict[str, Any], path: str | os.PathLike = TABLE_PATH) -> None:
    """Validate and write ``table`` atomically, then use it from now on."""
    validate_table(table)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    set_dispatch_table(table)


def set_dispatch_table(table: dict[str, Any] | None) -> None:
    """Use ``table`` in this process (None: read it again from file or default)."""
    global _table
    _table = load_dispatch_table() if table is None else validate_table(table)
    _decisions.clear()


def dispatch_table() -> dict[str, Any]:
    return _table


# Loaded at import (not on first use): torch.compile cannot trace file reads.
_table: dict[str, Any] = load_dispatch_table()


class BackendUnavailable(RuntimeError):
    """The backend $SLIMSTACK_BACKEND forces cannot run a call (a user's setting, not a bug)."""


def forced_backend() -> str | None:
    """The backend named by $SLIMSTACK_BACKEND, or None when unset/"auto"."""
    name = os.environ.get(FORCE_ENV, "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(
            f"{FORCE_ENV}={name!r} is not a backend; use one of {sorted(BACKENDS)} or auto"
        )
    return name


def _matches(rule: dict[str, Any], fmt: str, device: str, dtype: str, m: int) -> bool:
    m_max = rule.get("m_max")
    return (
        rule.get("device", "*") in ("*", device)
        and rule.get("format", "*") in ("*", fmt)
        and rule.get("dtype", "*") in ("*", dtype)
        and rule.get("m_min", 0) <= m
        and (m_max is None or m <= m_max)
    )


def why_not(
    name: str, fmt: str, device: torch.device, dtype: torch.dtype, m: int, forced: bool = True
) -> str | None:
    """Why backend ``name`` cannot run this call (None: it can)."""
    return UNAVAILABLE[name] or BACKENDS[name].unsupported(fmt, device, dtype, m, forced)


def choose_backend(fmt: str, device: torch.device, dtype: torch.dtype, m: int) -> str:
    """Name of the backend that runs y = x @ W^T for x [m, K] of ``dtype`` on ``device``."""
    forced = forced_backend()
    # Memoized in eager mode only: under torch.compile m may be symbolic (unhashable), and
    # the comparisons below become guards that pick the kernel per M range.
    compiling = torch.compiler.is_compiling()
    key = (fmt, device, dtype, m, forced)
    decision = None if compiling else _decisions.get(key)
    if decision is not None:
        return decision
    if forced is not None:
        reason = why_not(forced, fmt, device, dtype, m, True)
        if reason is not None:
            raise BackendUnavailable(f"{FORCE_ENV}={forced} cannot run this {fmt} matmul: {reason}")
        decision = forced
    else:
        decision = _first_usable(fmt, device, dtype, m)
    if not compiling:
        _decisions[key] = decision
    return decision


def _first_usable(fmt: str, device: torch.device, dtype: torch.dtype, m: int) -> str:
    dtype_key = str(dtype).removeprefix("torch.")
    for rule in dispatch_table()["rules"]:
        if _matches(rule, fmt, device.type, dtype_key, m):
            for name in rule["order"]:
                if why_not(name, fmt, device, dtype, m, False) is None:
                    return name
    return "reference"
