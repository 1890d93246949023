"""slimstack's Triton kernels, installed as the package ``slimstack.kernels``.

Run from a checkout (``python -m ...``, ``python -m pytest``), the repository root is on
``sys.path`` and this folder is also importable as a top-level ``kernels``: the name of the
Hugging Face kernel-hub package that transformers (>= 5.25 requires it) imports on start-up.
Under that name this module steps aside and loads the installed ``kernels`` in its place, so
transformers never sees slimstack's folder.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "no package 'kernels' is installed; the folder kernels/ of this checkout is "
            "slimstack's Triton kernels, imported as slimstack.kernels",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
