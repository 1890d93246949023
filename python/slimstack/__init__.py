"""slimstack: from a pruned checkpoint to a measured speedup.

The public API is imported lazily so that ``import slimstack`` stays cheap and works
whether or not the native extension or Triton is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself, for the three that
# share their name with a submodule and are callable modules (slimstack._callable_module)
_API = {
    "prune": ("slimstack.prune", None),
    "evaluate": ("slimstack.evaluate", None),
    "analyze": ("slimstack.depth.analyze", "analyze"),
    "slice": ("slimstack.depth.slicing", "slice_model"),
    "load": ("slimstack.engine.loader", "load"),
    "sparsify_model": ("slimstack.ops.sparsify", "sparsify_model"),
    "SparseLinear": ("slimstack.ops.sparse_linear", "SparseLinear"),
    "info": ("slimstack.info", None),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = importlib.import_module(module)
        if attr is not None:
            value = getattr(value, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimstack' has no attribute {name!r}")
