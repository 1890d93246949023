"""The kernel suite's session (bench/conftest.py) and the timers' CUDA paths, on CPU.

The CUDA timers (graph capture, event timing, the L2 rotation) never run where CI runs, so
they are driven here by a fake device clock: each call costs a known time when it runs (eager
or replayed) and is recorded when captured, so the tests see what the real timer would
measure, which input sets the graph cycles through, and what happens when capture fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # bench/conftest.py imports its helpers as `common`
import common  # noqa: E402


def _load_bench_conftest() -> ModuleType:
    """bench/conftest.py under a private name (tests/conftest.py is the `conftest` here)."""
    spec = importlib.util.spec_from_file_location("slimstack_bench_conftest", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench_conftest = _load_bench_conftest()


# ------------------------------------------------------------------ a fake CUDA clock ----


class FakeCuda:
    """Device time in ms: eager calls and graph replays advance it, capture records."""

    def __init__(self, cost_ms: float, fail_capture: bool = False) -> None:
        self.cost_ms, self.fail_capture = cost_ms, fail_capture
        self.now = 0.0
        self.capturing: list[int] | None = None
        self.graphs: list[list[int]] = []
        self.eager: Counter = Counter()

    def call(self, i: int) -> None:
        if self.capturing is not None:
            self.capturing.append(i)
        else:
            self.now += self.cost_ms
            self.eager[i] += 1

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing, "timing events need enable_timing=True"
                self.t: float | None = None

            def record(self) -> None:
                self.t = fake.now

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: Event) -> float:
                assert self.t is not None and end.t is not None, "an event was not recorded"
                return end.t - self.t

        class CUDAGraph:
            def __init__(self) -> None:
                self.calls: list[int] = []
                fake.graphs.append(self.calls)

            def replay(self) -> None:
                fake.now += fake.cost_ms * len(self.calls)

        @contextlib.contextmanager
        def graph(g: CUDAGraph):
            if fake.fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            fake.capturing = g.calls
            try:
                yield
            finally:
                fake.capturing = None

        stream = SimpleNamespace(wait_stream=lambda other: None)
        for name, value in {
            "Event": Event,
            "CUDAGraph": CUDAGraph,
            "graph": graph,
            "Stream": lambda: stream,
            "stream": lambda s: contextlib.nullcontext(),
            "current_stream": lambda: stream,
            "synchronize": lambda *a: None,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("n_sets", [2, 3, 28, 32])
@pytest.mark.parametrize("cost_ms", [0.002, 0.05, 3.0])
def test_graph_timer_measures_one_call_and_cycles_every_set_equally(
    monkeypatch, n_sets: int, cost_ms: float
):
    fake = FakeCuda(cost_ms)
    fake.install(monkeypatch)
    ms, method = common.median_ms(fake.call, n_sets, "cuda")
    assert method == "cuda_graph"
    assert ms == pytest.approx(cost_ms, rel=1e-9)  # milliseconds per call, not per replay
    (captured,) = fake.graphs
    assert len(captured) <= 1000  # capture costs host time per call
    # every set as often as every other: otherwise part of the rotation stays in L2
    counts = Counter(captured)
    assert set(counts) == set(range(n_sets)) and len(set(counts.values())) == 1, counts
    for a, b in zip(captured, captured[1:]):  # consecutive calls read different sets
        assert b == (a + 1) % n_sets
    assert set(fake.eager) == set(range(n_sets))  # warm-up ran every set eagerly


def test_failed_capture_falls_back_to_eager_event_timing(monkeypatch):
    fake = FakeCuda(0.01, fail_capture=True)
    fake.install(monkeypatch)
    ms, method = common.median_ms(fake.call, 4, "cuda")
    assert method == "cuda_events" and ms == pytest.approx(0.01)
    assert len(set(fake.eager.values())) <= 2  # eager batches cycle the sets too


def test_calls_per_batch_are_whole_rotation_cycles():
    for n_sets in range(2, common.MAX_ROTATION_SETS + 1):
        for estimate in (1e-5, 1e-3, 0.02, 1.0, 50.0):
            calls = common._calls_for(estimate, 5.0, n_sets)
            assert calls % n_sets == 0 and n_sets <= calls <= max(n_sets, 1000)


def test_rotation_on_cuda_reads_the_device_l2(monkeypatch):
    props = SimpleNamespace(L2_cache_size=60 * 2**20)  # an H200
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    packed = 4096 * 4096 + 4096 * 4096 // 8  # 4096x4096 bf16 2:4: values + meta
    sets = common.rotation_count(packed, "cuda")
    assert sets * packed > 2 * props.L2_cache_size
    l3 = common.cpu_last_level_cache_bytes()
    assert common.rotation_count(packed, "cpu") * packed > 2 * l3


def test_cpu_cache_size_from_sysfs(tmp_path):
    for text, expected in (("32768K\n", 32 * 2**20), ("1M", 2**20), ("4096", 4096)):
        (tmp_path / "size").write_text(text)
        assert common.cpu_last_level_cache_bytes(str(tmp_path / "size")) == expected
    assert common.cpu_last_level_cache_bytes(str(tmp_path / "missing")) == 32 * 2**20
    (tmp_path / "size").write_text("lots")
    assert common.cpu_last_level_cache_bytes(str(tmp_path / "size")) == 32 * 2**20


def test_commit_can_be_named_where_the_tree_has_no_git(monkeypatch):
    monkeypatch.setenv(common.COMMIT_ENV, "0123abcd")
    assert common.git_commit() == "0123abcd"
    assert common.environment("cpu")["commit"] == "0123abcd"


# ---------------------------------------------------------------------- the session ----

CASE = common.Case("sparse24_mm", "cpu", 64, 128, 1, torch.float32)


@pytest.fixture
def session(monkeypatch, tmp_path):
    """A CPU session whose provider is torch's dense product and whose timer is instant;
    `events` logs the order in which peaks, kernels and writes happen."""
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    events: list[str] = []

    def peaks(device: str) -> dict[str, float]:
        events.append("peaks")
        return {"hbm_gbps": 100.0, "dense_tflops": 1.0}

    def provider(case):
        if case.provider == "missing":
            raise bench_conftest.Unavailable("not built here")

        def call(x, ws):
            events.append("kernel")
            return common.dense_call(x, ws)

        return call

    real_write = bench_conftest.write_results

    def write(doc, path):
        events.append("write")
        return real_write(doc, path)

    monkeypatch.setattr(bench_conftest, "measure_peaks", peaks)
    monkeypatch.setattr(bench_conftest, "provider_call", provider)
    monkeypatch.setattr(bench_conftest, "write_results", write)
    monkeypatch.setattr(bench_conftest, "median_ms", lambda call, n, device: (0.5, "fake"))
    s = bench_conftest.BenchSession("cpu")
    s.events = events
    return s


def test_peaks_come_before_the_first_kernel_and_each_row_is_saved_at_once(session, tmp_path):
    """A kernel that faults poisons the CUDA context: peaks measured at the end would fail
    and lose the file. A run killed hard (SIGKILL after the timeout) never reaches the end."""
    row, _ = session.measure(CASE)
    assert session.events.index("peaks") < session.events.index("kernel")
    (path,) = tmp_path.glob("*-cpu-kernels.json")  # written before the session finishes
    doc = json.loads(path.read_text())
    assert common.validate_results(doc) == [] and doc["rows"] == [row]
    second = common.Case("sparse24_mm", "cpu", 64, 128, 8, torch.float32)
    session.measure(second)
    assert list(tmp_path.glob("*.json")) == [path]  # the same file, rewritten
    assert [r["M"] for r in json.loads(path.read_text())["rows"]] == [1, 8]
    assert session.events.count("peaks") == 1


def test_skipped_and_failed_cases_are_named_in_the_results(session, tmp_path):
    session.measure(CASE)
    missing = common.Case("sparse24_mm", "missing", 64, 128, 1, torch.float32)
    with pytest.raises(pytest.skip.Exception, match="not built here"):
        session.measure(missing)
    report = SimpleNamespace(
        failed=True,
        when="call",
        nodeid="bench/test_bench_kernels.py::test_kernel_vs_dense[sparse24_gemm-cuda-1x2-M8-bf16]",
        longrepr=SimpleNamespace(reprcrash=SimpleNamespace(message="AssertionError: wrong")),
    )
    original = bench_conftest._SESSION
    bench_conftest._SESSION = session
    try:
        bench_conftest.pytest_runtest_logreport(report)
    finally:
        bench_conftest._SESSION = original
    session.finish()
    doc = json.loads(session.written.read_text())
    assert doc["not_measured"] == [
        {"case": str(missing), "outcome": "skipped", "reason": "not built here"},
        {"case": "sparse24_gemm-cuda-1x2-M8-bf16", "outcome": "failed (call)",
         "reason": "AssertionError: wrong"},
    ]  # fmt: skip
    assert common.validate_results(doc) == []


def test_a_session_without_rows_writes_nothing(session, tmp_path):
    session.finish()
    assert session.written is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: unspecified launch failure"),
    ],  # fmt: skip
    ids=["AcceleratorError", "RuntimeError"],
)
def test_a_kernel_that_faults_fails_instead_of_skipping_as_refused(session, monkeypatch, error):
    """A refusal (a shape the provider does not take) skips; a CUDA fault is a failure."""
    raised: list[BaseException] = [error]

    def provider(case):
        def call(x, ws):
            raise raised[0]

        return call

    monkeypatch.setattr(bench_conftest, "provider_call", provider)
    with pytest.raises(type(error), match="CUDA error"):
        session.measure(CASE)
    raised[0] = RuntimeError("sparse24_gemm_sm90: N must be a multiple of 8")
    with pytest.raises(pytest.skip.Exception, match="refused"):
        session.measure(CASE)


def test_cpu_sizes_are_chosen_by_the_environment(monkeypatch):
    monkeypatch.delenv(common.CPU_SIZES_ENV, raising=False)
    assert {(c.N, c.K) for c in common.cases("cpu")} == set(common.CPU_SHAPES)
    monkeypatch.setenv(common.CPU_SIZES_ENV, "llm")
    llm = common.cases("cpu")
    assert {(c.N, c.K) for c in llm} == set(common.CPU_LLM_SHAPES)
    assert {c.M for c in llm} == set(common.CPU_LLM_M)
    monkeypatch.setenv(common.CPU_SIZES_ENV, "huge")
    with pytest.raises(ValueError, match="SLIMSTACK_BENCH_CPU='huge': choose small"):
        common.cases("cpu")
