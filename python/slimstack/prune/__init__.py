"""Scores, masks and the sequential pruning driver. ``slimstack.prune(...)`` calls
``slimstack.prune.driver.prune`` (this package is callable: see slimstack._callable_module)."""

from slimstack._callable_module import make_callable

make_callable(__name__, "slimstack.prune.driver", "prune")
