"""bench/tune_triton.py: the config sweep runs (interpreter on CPU), checks every candidate
against the dense product, and reports the fastest in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_support import interpreter_problem

pytest.importorskip("triton")
if not torch.cuda.is_available() and interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "tune_triton.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip


def test_sweep_reports_checked_and_timed_candidates(tmp_path):
    out = tmp_path / "tune.json"
    proc = _run("--limit", "2", "--shapes", "43x172", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == "triton-tuning"
    assert [c["kernel"] for c in report["cases"]] == ["sparse24_gemv", "bitmap_gemv",
                                                      "sparse24_gemm"]  # fmt: skip
    for case in report["cases"]:
        assert (case["N"], case["K"]) == (43, 172) and case["dense_ms"] > 0
        assert len(case["candidates"]) == 2
        timed = [c for c in case["candidates"] if "median_ms" in c]
        assert timed, case["candidates"]
        assert all(c["rel_err"] < 2e-2 and c["speedup"] > 0 for c in timed)
        assert case["best"]["median_ms"] == min(c["median_ms"] for c in timed)
    assert "best" in proc.stdout


def test_bad_arguments_are_refused(tmp_path):
    proc = _run("--shapes", "4096by4096")
    assert proc.returncode == 2 and "a shape is NxK" in proc.stderr
    proc = _run("--kernels", "bitmap_gemv", "--m", "32", "--shapes", "8x64")
    assert proc.returncode == 2 and "takes M <= 16" in proc.stderr
