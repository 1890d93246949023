"""pytest plumbing for the kernel benchmarks: one session that caches weights, inputs and
dense baselines, collects rows, and keeps the results JSON up to date.

The peaks are measured before the first kernel runs (a kernel that faults leaves the CUDA
context unusable, and a peak measured after it would fail and take the file with it), and
the file is rewritten after every case, so a run stopped hard (SIGKILL after a timeout, the
lent machine's limit) keeps every row it measured. Cases that skip or fail are listed under
``not_measured`` with their reason: the JSON comes back from a GPU call unpacked, the logs
only inside an archive."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from common import (
    Case,
    Unavailable,
    WeightSet,
    dense_call,
    environment,
    make_row,
    make_weight,
    measure_peaks,
    median_ms,
    provider_call,
    results_document,
    results_path,
    rotation_count,
    write_results,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASELINE = "cublas_dense" if DEVICE == "cuda" else "torch_dense"


class BenchSession:
    """Weights and inputs per shape, rotated across sets; dense baselines measured once."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.not_measured: list[dict[str, str]] = []
        self._weights: OrderedDict[tuple, list[WeightSet]] = OrderedDict()
        self._inputs: dict[tuple, list[torch.Tensor]] = {}
        self._baselines: dict[tuple, float] = {}
        self._peak: dict[str, float] | None = None
        self._env: dict[str, Any] | None = None
        self.path: Path | None = None  # chosen at the first write, kept for the session
        self.written: Path | None = None

    @property
    def peak(self) -> dict[str, float]:
        if self._peak is None:
            self._peak = measure_peaks(self.device)
        return self._peak

    def weights(self, case: Case) -> list[WeightSet]:
        key = (case.weight_format, case.N, case.K, case.dtype)
        if key not in self._weights:
            while len(self._weights) >= 2:  # the two formats of the current shape
                self._weights.popitem(last=False)
                self._inputs.clear()
            first = make_weight(case.N, case.K, case.dtype, key[0], self.device, seed=0)
            n_sets = rotation_count(first.packed.nbytes, self.device)
            others = [
                make_weight(case.N, case.K, case.dtype, key[0], self.device, seed=s)
                for s in range(1, n_sets)
            ]
            self._weights[key] = [first, *others]
        return self._weights[key]

    def inputs(self, case: Case, n_sets: int) -> list[torch.Tensor]:
        key = (case.M, case.K, case.dtype, n_sets)
        if key not in self._inputs:
            g = torch.Generator(device=self.device).manual_seed(case.M)
            self._inputs[key] = [
                torch.randn(case.M, case.K, generator=g, device=self.device).to(case.dtype)
                for _ in range(n_sets)
            ]
        return self._inputs[key]

    def baseline_ms(self, case: Case, xs: list[torch.Tensor], ws: list[WeightSet]) -> float:
        key = (case.weight_format, case.N, case.K, case.M, case.dtype)
        if key not in self._baselines:
            ms, _ = median_ms(lambda i: dense_call(xs[i], ws[i]), len(ws), self.device)
            self._baselines[key] = ms
        return self._baselines[key]

    def record_not_measured(self, case: Any, outcome: str, reason: str) -> None:
        line = (reason.strip().splitlines() or [""])[0]
        self.not_measured.append({"case": str(case), "outcome": outcome, "reason": line[:300]})

    def _skip(self, case: Case, reason: str) -> NoReturn:
        self.record_not_measured(case, "skipped", reason)
        pytest.skip(reason)

    def measure(self, case: Case):
        """Times the case's provider against the dense baseline; returns (row, one_call).

        The row's wall_s says where the case's host time went (a lease's kernel steps are
        capped): setup (weights and inputs made for a new shape), first_call (the provider's
        first call: Triton's JIT compile, the extension's first launch), timing (warm-up,
        capture and the timed replays) and baseline (the dense one, once per shape and M)."""
        clock = _Clock(self.device)
        try:
            call = provider_call(case)
        except Unavailable as why:
            self._skip(case, str(why))
        self.peak  # noqa: B018  (measured once, before any kernel of the run)
        clock.lap()
        ws = self.weights(case)
        xs = self.inputs(case, len(ws))
        setup_s = clock.lap()
        try:
            y = call(xs[0], ws[0])
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            if _device_fault(err):
                raise  # a kernel that faulted is a failure, not a refusal
            self._skip(case, f"{case.provider} refused {case}: {err}")
        first_call_s = clock.lap()
        _check_close(case, y, dense_call(xs[0], ws[0]))
        clock.lap()
        ms, method = median_ms(lambda i: call(xs[i], ws[i]), len(ws), self.device)
        timing_s = clock.lap()
        baseline = self.baseline_ms(case, xs, ws)
        baseline_s = clock.lap()
        weight_bytes = ws[0].dense.nbytes if case.op == "dense_mm" else ws[0].packed.nbytes
        moved = weight_bytes + xs[0].nbytes + y.nbytes
        row = make_row(case, ms, baseline, BASELINE, moved)
        row["timing"] = method
        row["wall_s"] = {
            "setup": round(setup_s, 3),
            "first_call": round(first_call_s, 3),
            "timing": round(timing_s, 3),
            "baseline": round(baseline_s, 3),
        }
        self.rows.append(row)
        self.save()
        return row, lambda: call(xs[0], ws[0])

    def save(self) -> Path | None:
        """(Re)write the results file with every row so far; the first write picks its name."""
        if not self.rows:
            return None
        if self._env is None:
            self._env = environment(self.device)
        if self.path is None:
            self.path = results_path(self._env["gpu"], self.device)
        doc = results_document(self._env, self.peak, self.rows)
        doc["not_measured"] = self.not_measured
        self.written = write_results(doc, self.path)
        return self.written

    def finish(self) -> None:
        self.save()


def _device_fault(err: BaseException) -> bool:
    """A CUDA error (illegal address, launch failure): the context is unusable after it."""
    fault = getattr(torch, "AcceleratorError", None)
    return (fault is not None and isinstance(err, fault)) or "CUDA error" in str(err)


def _check_close(case: Case, y: torch.Tensor, ref: torch.Tensor) -> None:
    """A fast kernel that is wrong is not a result: compare with the dense product first."""
    err = (y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    limit = 1e-5 if case.dtype == torch.float32 else 2e-2
    assert err < limit, f"{case}: relative error {err:.2e} against dense (limit {limit})"


_SESSION = BenchSession(DEVICE)


class _Clock:
    """Seconds between laps, the device drained at each (so work lands in its own lap)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


@pytest.fixture(scope="session")
def bench_session() -> BenchSession:
    return _SESSION


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A case that failed (wrong result, an error while timing) is named in the file too."""
    if report.failed and "test_kernel_vs_dense[" in report.nodeid:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = getattr(crash, "message", None) or str(report.longrepr)
        case = report.nodeid.split("[", 1)[1].rstrip("]")
        _SESSION.record_not_measured(case, f"failed ({report.when})", reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION.finish()


def pytest_terminal_summary(terminalreporter) -> None:
    if _SESSION.written is not None:
        terminalreporter.write_line(f"kernel benchmark results: {_SESSION.written}")
