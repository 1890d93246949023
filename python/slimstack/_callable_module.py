"""Modules callable as the function they are named after.

DESIGN.md's public API has ``slimstack.prune``, ``slimstack.evaluate`` and ``slimstack.info``,
and its layout has submodules of the same names. Importing a submodule binds it to the
package attribute of its name, so a plain function there would be replaced by the module as
soon as anyone imported ``slimstack.prune.patterns`` (and ``slimstack.prune(...)`` would fail
with "module is not callable"). Making those modules callable gives one object under each
name, whatever was imported first.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is its namesake function's (``_slimstack_call`` names it)."""

    def _function(self) -> Callable[..., Any]:
        module, attr = self.__dict__["_slimstack_call"]
        return getattr(importlib.import_module(module), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # help() and IDEs show the function's
        return inspect.signature(self._function())


def make_callable(module_name: str, function_module: str, function: str) -> None:
    """Make the (already imported) module ``module_name`` call ``function_module.function``."""
    module = sys.modules[module_name]
    module._slimstack_call = (function_module, function)
    module.__class__ = CallableModule
