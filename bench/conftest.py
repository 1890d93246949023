"""pytest plumbing for the kernel benchmarks: one session that caches weights, inputs and
dense baselines, collects rows, and writes the results JSON when the session ends."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

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
        self._weights: OrderedDict[tuple, list[WeightSet]] = OrderedDict()
        self._inputs: dict[tuple, list[torch.Tensor]] = {}
        self._baselines: dict[tuple, float] = {}
        self._peak: dict[str, float] | None = None
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

    def measure(self, case: Case):
        """Times the case's provider against the dense baseline; returns (row, one_call)."""
        try:
            call = provider_call(case)
        except Unavailable as why:
            pytest.skip(str(why))
        ws = self.weights(case)
        xs = self.inputs(case, len(ws))
        try:
            y = call(xs[0], ws[0])
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            pytest.skip(f"{case.provider} refused {case}: {err}")
        _check_close(case, y, dense_call(xs[0], ws[0]))
        ms, method = median_ms(lambda i: call(xs[i], ws[i]), len(ws), self.device)
        baseline = self.baseline_ms(case, xs, ws)
        moved = ws[0].packed.nbytes + xs[0].nbytes + y.nbytes
        row = make_row(case, ms, baseline, BASELINE, moved)
        row["timing"] = method
        self.rows.append(row)
        return row, lambda: call(xs[0], ws[0])

    def finish(self) -> None:
        if not self.rows:
            return
        env = environment(self.device)
        doc = results_document(env, self.peak, self.rows)
        self.written = write_results(doc, results_path(env["gpu"], self.device))


def _check_close(case: Case, y: torch.Tensor, ref: torch.Tensor) -> None:
    """A fast kernel that is wrong is not a result: compare with the dense product first."""
    err = (y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    limit = 1e-5 if case.dtype == torch.float32 else 2e-2
    assert err < limit, f"{case}: relative error {err:.2e} against dense (limit {limit})"


_SESSION = BenchSession(DEVICE)


@pytest.fixture(scope="session")
def bench_session() -> BenchSession:
    return _SESSION


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION.finish()


def pytest_terminal_summary(terminalreporter) -> None:
    if _SESSION.written is not None:
        terminalreporter.write_line(f"kernel benchmark results: {_SESSION.written}")
