"""slimstack's Triton kernels, installed as the package ``slimstack.kernels``.

Run from a checkout (``python -m ...``, ``python -m pytest``), the repository root is on
``sys.path`` and this folder is also importable as a top-level ``kernels``: the name of the
Hugging Face kernel-hub package that transformers (>= 5.25 requires it) imports on start-up.
Under that name this module steps aside and loads the installed ``kernels`` in its place, so
transformers never sees slimstack's folder.
"""


def _load_the_installed_kernels() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return  # none installed: stay an empty module (transformers' probe must not fail)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _load_the_installed_kernels()
