"""The checkout's top-level kernels/ folder must not shadow the Hugging Face ``kernels`` package.

transformers >= 5.25 requires ``kernels`` and imports it on start-up; with the repository root
on sys.path (``python -m ...`` run from the checkout) the folder kernels/ would be found first.
"""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_DIR


def _run_in_checkout(code: str, *flags: str, pythonpath: Path | None = None):
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_top_level_kernels_is_the_installed_package_not_the_folder(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("from .layer import MARK\n")
    (hub / "layer.py").write_text("MARK = 'the installed kernels package'\n")
    done = _run_in_checkout(
        "import kernels, kernels.layer, sys; print(kernels.MARK); print(kernels.__file__);"
        "print(sys.modules['kernels.layer'].__file__)",
        pythonpath=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    mark, package_file, submodule_file = done.stdout.splitlines()
    assert mark == "the installed kernels package"
    assert Path(package_file) == hub / "__init__.py"
    assert Path(submodule_file) == hub / "layer.py"


def test_top_level_kernels_without_an_installed_package_is_the_empty_folder_module():
    # transformers < 5.25 probes `kernels` by importing it: the probe must not raise
    done = _run_in_checkout("import kernels; print(kernels.__file__); print(dir(kernels))", "-S")
    assert done.returncode == 0, done.stderr
    package_file, names = done.stdout.splitlines()
    assert Path(package_file) == REPO_DIR / "kernels" / "__init__.py"
    assert [n for n in ast.literal_eval(names) if not n.startswith("_")] == []


def test_slimstack_kernels_still_imports_from_the_checkout():
    done = _run_in_checkout("import slimstack.kernels.splitk_sum as m; print(m.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO_DIR / "kernels" / "splitk_sum.py"
