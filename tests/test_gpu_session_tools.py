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
    for stem in (f"{DAY}-kernels", f"{DAY}-kernels-2", f"{DAY}-kernels-all"):
        # each filed JSON plotted, and the day's two drawn together
        assert (results / f"{stem}-bfloat16.png").read_bytes()[:4] == b"\x89PNG"
    merged = json.loads((results / f"{DAY}-e2e.json").read_text())
    assert sorted(r["variant"] for r in merged["rows"]) == ["2:4-32L", "dense-32L"]
    sparse = next(r for r in merged["rows"] if r["variant"] == "2:4-32L")
    assert sparse["baseline"] == "slimstack_dense"  # speedups recomputed across both calls
    assert (results / f"{DAY}-e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert (logs / "gpu-tests.log").read_text() == "contents of gpu-tests.log\n"
    assert not (results / "gpu-tests.log").exists(), "logs are not results"
    # the day's summary covers both calls' rows, the later call winning the case both measured
    summary = (results / f"{DAY}-kernels-summary.md").read_text()
    assert "| sparse24_gemv / cuda | 1.70x |" in summary
    assert not list(results.glob("*.tmp"))


def test_decode_profiles_come_back_and_are_filed_with_their_table(tmp_path: Path) -> None:
    out, results = tmp_path / "out", tmp_path / "results"
    _call_output(out, 1.6, e2e.Variant(32, "2:4"))
    stem = f"{DAY}-decode-profile-24-8L-b1-p128"
    profile = {"suite": "decode-profile", "gpu": "NVIDIA H200", "rows": []}
    (out / f"{stem}.json").write_text(json.dumps(profile))
    (out / f"{stem}.md").write_text("| kernel | calls/step |\n")
    _pack(out)
    kept = {p.name for p in out.iterdir()}
    assert f"{stem}.md" in kept and f"{stem}.json" not in kept and len(kept) <= 8
    assert (
        gpu_results.main([str(out), "--results", str(results), "--logs", str(tmp_path / "l")]) == 0
    )
    assert json.loads((results / f"{stem}.json").read_text())["suite"] == "decode-profile"
    assert (results / f"{stem}.md").read_text() == "| kernel | calls/step |\n"


def test_invalid_results_are_refused_and_nothing_is_filed(tmp_path: Path) -> None:
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    doc = _kernel_doc(1.5)
    doc["rows"][0]["speedup"] = 9.0  # not baseline_ms / median_ms
    (out / f"{DAY}-kernels.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="speedup"):
        gpu_results.main([str(out), "--results", str(results), "--logs", str(tmp_path / "l")])
    assert not list(results.glob("*.json"))


def test_results_without_a_commit_get_this_checkouts(tmp_path: Path) -> None:
    """The GPU machine's copy of the tree has no .git: its results say "unknown"."""
    sha = common.git_commit()
    if sha == "unknown":
        pytest.skip("this checkout has no git history either")
    out, results = tmp_path / "out", tmp_path / "results"
    _call_output(out, 1.6, e2e.Variant(32, "dense"))
    for name in (f"{DAY}-kernels.json", f"{DAY}-e2e.json"):
        doc = json.loads((out / name).read_text())
        doc["commit"] = "unknown"
        (out / name).write_text(json.dumps(doc))
    assert gpu_results.main([str(out), "--results", str(results), "--logs", str(tmp_path)]) == 0
    for name in (f"{DAY}-kernels.json", f"{DAY}-e2e.json"):
        filed = json.loads((results / name).read_text())
        assert filed["commit"] == sha and "commit_filled_from" in filed
    named = json.loads((out / f"{DAY}-kernels.json").read_text())  # a named commit stays
    named["commit"] = "abc"
    (out / f"{DAY}-kernels.json").write_text(json.dumps(named))
    gpu_results.main([str(out), "--results", str(results), "--logs", str(tmp_path)])
    again = json.loads((results / f"{DAY}-kernels-2.json").read_text())
    assert again["commit"] == "abc" and "commit_filled_from" not in again


# ------------------------------------------- what a phase runs, read through stubs ----

STUBS = {
    # every python3 call is logged (shell-quoted) with the e2e settings it got, and succeeds
    "python3": """#!/usr/bin/env bash
{ printf 'CALL'; printf ' %q' "$@"; printf ' CONFIGS=%q\\n' "${SLIMSTACK_E2E_CONFIGS-}"; } >>"$STUB_LOG"
echo "stub python3 $*"
""",
    # timeout -s INT -k 20 LIMIT CMD...: log the limit, run CMD
    "timeout": """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do shift 2; done
echo "LIMIT $1" >>"$STUB_LOG"
shift
exec "$@"
""",
    "compute-sanitizer": """#!/usr/bin/env bash
echo "CALL compute-sanitizer" >>"$STUB_LOG"
""",
}


def _run_phase(tmp_path: Path, phase: str, **env: str) -> tuple[list[int], list[list[str]], Path]:
    """Run a gpu_session.sh phase with instant stubs: (step time limits, python3 calls, OUT)."""
    import shlex

    bin_dir, out, log = tmp_path / f"bin-{phase}", tmp_path / f"out-{phase}", tmp_path / "log"
    bin_dir.mkdir()
    out.mkdir()
    log.write_text("")
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
               "STUB_LOG": str(log), "GPU_SESSION_EXT": "installed", **env}  # fmt: skip
    if "GPU_SESSION_BUDGET" not in env:
        run_env.pop("GPU_SESSION_BUDGET", None)
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_session.sh"), phase], env=run_env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = log.read_text().splitlines()
    limits = [int(line.split()[1]) for line in lines if line.startswith("LIMIT ")]
    calls = [shlex.split(line)[1:] for line in lines if line.startswith("CALL ")]
    return limits, calls, out


LEASE_S = 15 * 60  # device time of a whole lease: both calls, the start, idle and transfers
START_S = 60  # a fresh machine's start ("a minute or more")


def _budget(out: Path) -> int:
    line = next(x for x in (out / "session.log").read_text().splitlines() if ": budget " in x)
    return int(line.split(": budget ")[1].split()[0])


def test_the_two_calls_of_a_lease_fit_its_15_minutes(tmp_path: Path) -> None:
    """lease-rest's default budget must fit what a lease leaves after the machine's start
    and a full lease call, or the device tool kills it before it packs $OUT; no step of a
    phase may be given more than the phase's budget."""
    lease, _, lease_out = _run_phase(tmp_path, "lease")
    rest, _, rest_out = _run_phase(tmp_path, "lease-rest")
    lease_budget, rest_budget = _budget(lease_out), _budget(rest_out)
    assert lease_budget <= 600 - 20  # one call's limit, less a margin for packing
    assert START_S + lease_budget + rest_budget <= LEASE_S, (lease_budget, rest_budget)
    assert max(lease) <= lease_budget and max(rest) <= rest_budget
    (tmp_path / "small").mkdir()  # an explicit budget (from status's budget_left_s) wins
    small, _, small_out = _run_phase(tmp_path / "small", "lease-rest", GPU_SESSION_BUDGET="120")
    assert _budget(small_out) == 120 and max(small) <= 120


def test_the_kernel_log_comes_back_in_the_archive(tmp_path: Path) -> None:
    _, calls, out = _run_phase(tmp_path, "lease-rest")
    assert any("bench/test_bench_kernels.py" in call for call in calls)
    with tarfile.open(out / "rest.tar.gz") as tar:
        log = tar.extractfile("kernels.log").read().decode()
    assert "stub python3 -m pytest -q bench/test_bench_kernels.py" in log


def _e2e_runs(calls: list[list[str]]) -> set[tuple[str, str]]:
    """(variant, batch x prompt) pairs the e2e calls select, by pytest's own -k matching."""
    from _pytest.mark.expression import Expression

    names = [v.name for v in e2e.variants(e2e.MISTRAL_7B)]
    runs = set()
    for call in calls:
        if "bench/test_bench_e2e.py" not in call:
            continue
        configs = call[-1].removeprefix("CONFIGS=").split(",")
        expr = Expression.compile(call[call.index("-k") + 1]) if "-k" in call else None
        for name in names:
            item = f"test_e2e_decode[{name}]".lower()
            if expr is None or expr.evaluate(lambda word, item=item: word.lower() in item):
                runs |= {(name, config) for config in configs}
    return runs


def test_every_e2e_row_of_a_lease_has_its_dense_baseline(tmp_path: Path) -> None:
    """Speedups come from the merged e2e file: a sparse or sliced row measured at a batch
    and prompt where dense-32L never ran has none (lease-rest's batch-8 rows)."""
    _, lease, _ = _run_phase(tmp_path, "lease")
    _, rest, _ = _run_phase(tmp_path, "lease-rest")
    runs = _e2e_runs(lease + rest)
    assert {name for name, _ in runs} == {v.name for v in e2e.variants(e2e.MISTRAL_7B)}
    missing = sorted((n, c) for n, c in runs if n != "dense-32L" and ("dense-32L", c) not in runs)
    assert not missing, f"no dense-32L baseline for {missing}"
    assert {config.split("x")[0] for _, config in runs} == {"1", "8"}  # batch 1 and 8


@pytest.mark.parametrize("phase", ["lease", "lease-rest", "check", "bench-kernels", "bench-e2e",
                                   "tune"])  # fmt: skip
def test_no_step_is_given_more_than_the_phase_budget(tmp_path: Path, phase: str) -> None:
    limits, calls, out = _run_phase(tmp_path, phase, GPU_SESSION_BUDGET="100")
    assert _budget(out) == 100 and limits, calls
    assert max(limits) <= 100, limits


def _kernel_selections(calls: list[list[str]]) -> list[set[str]]:
    """Per kernel-bench call of a phase, the CUDA case ids its -k expression selects."""
    from _pytest.mark.expression import Expression

    ids = [str(case) for case in common.cases("cuda")]
    selected = []
    for call in calls:
        if "bench/test_bench_kernels.py" not in call:
            continue
        expr = Expression.compile(call[call.index("-k") + 1])
        selected.append(
            {
                i
                for i in ids
                if expr.evaluate(lambda w, i=i: w.lower() in f"test_kernel_vs_dense[{i}]".lower())
            }
        )
    return selected


def test_the_lease_measures_the_targets_rows_first_and_lease_rest_their_variants(
    tmp_path: Path,
) -> None:
    """lease's kernel step runs the targets' providers only (a cut loses whole shapes, so
    the A/B variant rows must not crowd them out); lease-rest's first step runs the variant
    rows at the same M; together they are every bf16 case at M = 1, 16, 2048."""
    _, lease, _ = _run_phase(tmp_path, "lease")
    _, rest, _ = _run_phase(tmp_path, "lease-rest")
    (headline,) = _kernel_selections(lease)
    variants = _kernel_selections(rest)[0]
    wanted = {
        str(c)
        for c in common.cases("cuda")
        if c.dtype == torch.bfloat16 and c.M in (1, common.GEMV_MAX_M, 2048)
    }
    assert headline | variants == wanted and not headline & variants
    core = {"triton", "cuda", "cuda_sm90", "torch", "auto"}
    assert {i.split("-")[1] for i in headline} == core
    assert not {i.split("-")[1] for i in variants} & core
    assert len(headline) <= 161  # the 2026-12-04 lease measured 161 cases in its 200 s
