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
# A right kernel against the dense product of the same dtype: rounding-level differences.
# (The sweep's own gate, 2e-2 for 16-bit types, is only a sanity check: a config 1% off
# passes it, is timed and may be reported as the best.)
ACCURATE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}


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
        # every candidate was checked, is accurate, and was then timed (a rel_err bound on
        # the timed ones alone restates the sweep's gate: only those under it are timed)
        for c in case["candidates"]:
            assert "error" not in c and c["rel_err"] < ACCURATE[case["dtype"]], c
            assert c["median_ms"] > 0 and c["speedup"] > 0, c
        timed = case["candidates"]
        assert case["best"]["median_ms"] == min(c["median_ms"] for c in timed)
    assert "best" in proc.stdout


def test_bad_arguments_are_refused(tmp_path):
    proc = _run("--shapes", "4096by4096")
    assert proc.returncode == 2 and "a shape is NxK" in proc.stderr
    proc = _run("--kernels", "bitmap_gemv", "--m", "32", "--shapes", "8x64")
    assert proc.returncode == 2 and "takes M <= 16" in proc.stderr


def _run_patched(patch: str, *args: str) -> subprocess.CompletedProcess:
    """tune_triton.main(args) with `patch` (Python, `t` is the module) applied first."""
    driver = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})",
        "import tune_triton as t",
        patch,
        "sys.exit(t.main(sys.argv[1:]))",
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", driver, *args], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


def test_a_sweep_stopped_at_its_time_limit_keeps_the_cases_it_finished(tmp_path):
    """gpu_session.sh stops the sweep with SIGINT at the step's limit: what it measured
    must still be in the JSON that comes back."""
    patch = "\n".join([
        "calls = []",
        "def fake(kernel, n, k, m, dtype, device, limit):",
        "    calls.append(n)",
        "    if len(calls) == 2:",
        "        raise KeyboardInterrupt",
        "    return {'kernel': kernel, 'N': n, 'K': k, 'M': m, 'dtype': 'float16',",
        "            'dense_ms': 1.0, 'best': None, 'candidates': []}",
        "t.tune_case = fake",
    ])  # fmt: skip
    out = tmp_path / "tune.json"
    proc = _run_patched(patch, "--kernels", "sparse24_gemv", "--shapes", "8x64", "16x64",
                        "24x64", "--out", str(out))  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [c["N"] for c in report["cases"]] == [8] and report["interrupted"] is True


def _two_candidate_sweep(tmp_path, patch: str) -> dict:
    """The one case of a patched two-candidate GEMV sweep on 43x172."""
    out = tmp_path / "tune.json"
    proc = _run_patched(patch, "--kernels", "sparse24_gemv", "--limit", "2", "--shapes",
                        "43x172", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    return case


def test_a_candidate_that_fails_while_timed_is_recorded_and_the_sweep_goes_on(tmp_path):
    patch = "\n".join([
        "real, calls = t.median_ms, []",
        "def flaky(call, n_sets, device, **kwargs):",
        "    calls.append(1)",
        "    if len(calls) == 2:  # the first candidate (call 1 is the dense baseline)",
        "        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')",
        "    return real(call, n_sets, device, **kwargs)",
        "t.median_ms = flaky",
    ])  # fmt: skip
    case = _two_candidate_sweep(tmp_path, patch)
    first, second = case["candidates"]
    assert first["error"] == "timing: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "median_ms" not in first and second["median_ms"] > 0
    assert case["best"]["config"] == second["config"]


def test_a_candidate_with_wrong_results_is_refused_and_not_timed(tmp_path):
    """The check before timing: a config whose results are 10% off gets an error naming its
    relative error, is never timed, and cannot be the best."""
    patch = "\n".join([
        "real, made = t.kernel_call, []",
        "def first_is_wrong(kernel, n, k, config):",
        "    call = real(kernel, n, k, config)",
        "    made.append(config)",
        "    if len(made) > 1:",
        "        return call",
        "    return lambda x, ws: call(x, ws) * 1.1",
        "t.kernel_call = first_is_wrong",
    ])  # fmt: skip
    case = _two_candidate_sweep(tmp_path, patch)
    wrong, right = case["candidates"]
    assert wrong["rel_err"] == pytest.approx(0.1, rel=0.05)
    assert wrong["error"].startswith("relative error 1.0") and "median_ms" not in wrong
    assert right["rel_err"] < ACCURATE[case["dtype"]] and right["median_ms"] > 0
    assert case["best"]["config"] == right["config"]
