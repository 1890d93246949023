"""The GPU-session plumbing that runs on CPU: tools/gpu_session.sh packs $OUT into what the
device tool brings back (8 files at most), and tools/gpu_results.py files that into
bench/results without overwriting an earlier call's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tools"))
import common  # noqa: E402
import e2e_helpers as e2e  # noqa: E402
import gpu_results  # noqa: E402

DAY = "2026-12-03-nvidia-h200"


def _kernel_doc(speedup: float) -> dict:
    case = common.Case("sparse24_gemv", "cuda", 4096, 4096, 1, torch.bfloat16)
    row = common.make_row(case, 0.01 / speedup, 0.01, "cublas_dense", 18_900_000)
    env = {"commit": "abc", "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13"}
    return common.results_document(env, {"hbm_gbps": 4300.0, "dense_tflops": 790.0}, [row])


def _e2e_doc(variant: e2e.Variant, ms_per_step: float) -> dict:
    measured = {
        "tokens_per_s": 1000 / ms_per_step, "sequence_tokens_per_s": 1000 / ms_per_step,
        "decode_ms_per_step": ms_per_step, "prefill_ms": 20.0, "decode_steps": 127,
    }  # fmt: skip
    row = e2e.make_row(e2e.MISTRAL_7B, variant, "slimstack", 1, 128, 128, measured, 14 * 10**9,
                       4300.0, 20.0)  # fmt: skip
    env = {"suite": "e2e", "commit": "abc", "gpu": "NVIDIA H200", "torch": "2.11",
           "triton": "3.6", "cuda": "13"}  # fmt: skip
    return {**env, "peak": {"hbm_gbps": 4300.0, "dense_tflops": 790.0}, "rows": [row]}


def _call_output(out: Path, kernels_speedup: float, e2e_variant: e2e.Variant) -> None:
    """What a gpu_session.sh call leaves in $OUT: results, logs, plots, a dispatch table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{DAY}-kernels.json").write_text(json.dumps(_kernel_doc(kernels_speedup)))
    (out / f"{DAY}-e2e.json").write_text(json.dumps(_e2e_doc(e2e_variant, 7.0)))
    (out / "session.log").write_text("[gpu_session 1s] done\n")
    (out / "summary.md").write_text("| op / provider | M=1 |\n")
    for name in (
        "build.log",
        "gpu-tests.log",
        "sanitizer.log",
        "e2e.log",
        "dispatch_table.json",
        f"{DAY}-kernels-bfloat16.png",
        f"{DAY}-kernels-float16.png",
        f"{DAY}-e2e.png",
    ):
        (out / name).write_text(f"contents of {name}\n")  # fmt: skip


def _pack(out: Path) -> None:
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_session.sh"), "pack"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pack_leaves_what_the_device_tool_brings_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _call_output(out, 1.6, e2e.Variant(32, "dense"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _pack(out)
    kept = {p.name for p in out.iterdir()}
    assert len(kept) <= 8, f"the device tool brings back 8 files at most: {sorted(kept)}"
    assert kept == {f"{DAY}-kernels.json", f"{DAY}-e2e.json", "session.log", "summary.md",
                    "rest.tar.gz"}  # fmt: skip
    with tarfile.open(out / "rest.tar.gz") as tar:
        packed = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(packed) | (kept - {"rest.tar.gz"}) == set(before)
    assert all(packed[name] == before[name] for name in packed), "packing changed a file"


def test_results_are_filed_without_overwriting_an_earlier_call(tmp_path: Path) -> None:
    results, logs = tmp_path / "results", tmp_path / "logs"
    for call, (speedup, variant) in enumerate(
        [(1.6, e2e.Variant(32, "dense")), (1.7, e2e.Variant(32, "2:4"))]
    ):
        out = tmp_path / f"call{call}"
        _call_output(out, speedup, variant)
        _pack(out)
        assert gpu_results.main([str(out), "--results", str(results), "--logs", str(logs)]) == 0
    first = json.loads((results / f"{DAY}-kernels.json").read_text())
    second = json.loads((results / f"{DAY}-kernels-2.json").read_text())
    assert first["rows"][0]["speedup"] == 1.6 and second["rows"][0]["speedup"] == 1.7
    for stem in (f"{DAY}-kernels", f"{DAY}-kernels-2"):  # plotted from the filed JSON
        assert (results / f"{stem}-bfloat16.png").read_bytes()[:4] == b"\x89PNG"
    merged = json.loads((results / f"{DAY}-e2e.json").read_text())
    assert sorted(r["variant"] for r in merged["rows"]) == ["2:4-32L", "dense-32L"]
    sparse = next(r for r in merged["rows"] if r["variant"] == "2:4-32L")
    assert sparse["baseline"] == "slimstack_dense"  # speedups recomputed across both calls
    assert (results / f"{DAY}-e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert (logs / "gpu-tests.log").read_text() == "contents of gpu-tests.log\n"
    assert not (results / "gpu-tests.log").exists(), "logs are not results"


def test_invalid_results_are_refused_and_nothing_is_filed(tmp_path: Path) -> None:
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    doc = _kernel_doc(1.5)
    doc["rows"][0]["speedup"] = 9.0  # not baseline_ms / median_ms
    (out / f"{DAY}-kernels.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="speedup"):
        gpu_results.main([str(out), "--results", str(results), "--logs", str(tmp_path / "l")])
    assert not list(results.glob("*.json"))
