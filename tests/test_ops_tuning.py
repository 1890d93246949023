"""ops.tuning: a dispatch table built from kernel benchmark results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimstack.ops import dispatch
from slimstack.ops.tuning import main, rules_from_results

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def _row(op: str, provider: str, m: int, speedup: float, shape=(4096, 4096), dtype="bfloat16"):
    baseline = 1.0
    return {
        "op": op, "provider": provider, "baseline": "cublas_dense", "N": shape[0],
        "K": shape[1], "M": m, "dtype": dtype, "median_ms": baseline / speedup,
        "baseline_ms": baseline, "speedup": speedup, "gbps": 1000.0,
    }  # fmt: skip


def _doc(rows: list[dict], gpu: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "suite": "kernels", "commit": "abc123", "gpu": gpu, "torch": "2.11.0",
        "triton": "3.6.0", "cuda": "13.0", "peak": {"hbm_gbps": 3000.0, "dense_tflops": 700.0},
        "rows": rows,
    }  # fmt: skip


def _order_for(table: dict, device: str, fmt: str, dtype: str, m: int) -> list[str]:
    for rule in table["rules"]:
        if dispatch._matches(rule, fmt, device, dtype, m):
            return rule["order"]
    raise AssertionError("no rule matched")


@pytest.fixture
def gpu_doc() -> dict:
    rows = []
    for shape in SHAPES:
        for m in (1, 2, 4, 8, 16):
            # CUDA wins the GEMV up to M = 8, Triton at 16 (one shape disagrees: geomean decides)
            cuda, triton = (1.6, 1.4) if m <= 8 else (1.1, 1.3)
            if shape == (4096, 14336) and m == 16:
                cuda = 1.35
            rows += [_row("sparse24_gemv", "cuda", m, cuda, shape),
                     _row("sparse24_gemv", "triton", m, triton, shape),
                     _row("sparse24_mm", "torch", m, 0.2, shape),
                     _row("sparse24_mm", "auto", m, 9.9, shape),  # not a backend: ignored
                     _row("bitmap_gemv", "cuda", m, 1.2, shape),
                     _row("bitmap_gemv", "triton", m, 1.3, shape)]  # fmt: skip
        for m in (32, 2048, 8192):
            rows += [_row("sparse24_gemm", "cuda", m, 0.5, shape),  # sm80 kernel
                     _row("sparse24_gemm", "cuda_sm90", m, 1.25 if m > 32 else 0.8, shape),
                     _row("sparse24_gemm", "triton", m, 0.9, shape),
                     _row("sparse24_mm", "torch", m, 1.1, shape)]  # fmt: skip
    return _doc(rows)


def test_backends_ranked_by_geomean_speedup_per_m(gpu_doc):
    table = rules_from_results(gpu_doc)
    order = lambda fmt, m: _order_for(table, "cuda", fmt, "bfloat16", m)  # noqa: E731
    assert order("sparse24", 1)[:3] == ["cuda", "triton", "torch"]
    assert order("sparse24", 8)[:2] == ["cuda", "triton"]
    # M = 16: triton 1.3 everywhere beats cuda's geomean of (1.1, 1.1, 1.35)
    assert order("sparse24", 16)[:2] == ["triton", "cuda"]
    # M = 32: the sm90 GEMM (0.8) loses to torch (1.1) and triton (0.9); the sm80 rows do not
    # stand in for cuda when the Hopper GEMM was measured
    assert order("sparse24", 32)[:3] == ["torch", "triton", "cuda"]
    assert order("sparse24", 2048)[:3] == ["cuda", "torch", "triton"]
    assert order("sparse24", 100_000)[:3] == ["cuda", "torch", "triton"]
    assert order("bitmap", 1)[:2] == ["triton", "cuda"]
    for m in (1, 16, 32, 9000):
        assert order("sparse24", m)[-1] == "reference"


def test_equal_rankings_merge_into_ranges(gpu_doc):
    table = rules_from_results(gpu_doc)
    rules = [r for r in table["rules"] if r.get("format") == "sparse24" and "dtype" in r]
    spans = [(r["m_min"], r["m_max"]) for r in rules]
    # M 1..8 cuda first, 16 triton first, 32 torch first, 2048.. cuda first: four ranges
    assert spans == [(0, 8), (9, 16), (17, 32), (33, None)]
    assert "M=2048" in rules[-1]["note"] or "M=8192" in rules[-1]["note"]


def test_unmeasured_dtypes_and_devices_fall_through_to_defaults(gpu_doc):
    table = rules_from_results(gpu_doc)
    assert _order_for(table, "cuda", "sparse24", "float16", 1) == ["cuda", "triton", "torch",
                                                                   "reference"]  # fmt: skip
    assert _order_for(table, "cpu", "sparse24", "float32", 1) == ["cpu", "reference"]


def test_sm80_rows_speak_for_cuda_without_a_hopper_gemm():
    rows = [_row("sparse24_gemm", "cuda", 2048, 1.3), _row("sparse24_gemm", "triton", 2048, 0.9)]
    table = rules_from_results(_doc(rows, gpu="NVIDIA A100"))
    assert _order_for(table, "cuda", "sparse24", "bfloat16", 2048)[:2] == ["cuda", "triton"]


def test_gemv_rows_do_not_leak_into_gemm_ranges():
    # a GEMV row at M = 32 (not something the suite runs) must not rank the GEMM range
    rows = [_row("sparse24_gemv", "cuda", 32, 5.0), _row("sparse24_gemm", "triton", 32, 0.9)]
    table = rules_from_results(_doc(rows))
    rule = next(r for r in table["rules"] if r.get("dtype") == "bfloat16")
    assert rule["order"][0] == "triton" and "cuda 5.00x" not in rule["note"]


def test_bitmap_unpack_rows_rank_triton_past_decode_only():
    # W unpacked + cuBLAS is the triton backend past M = 16; at decode the GEMV speaks for it
    rows = [_row("bitmap_gemv", "cuda", 1, 1.1), _row("bitmap_gemv", "triton", 1, 0.4),
            _row("bitmap_mm", "triton_unpack", 1, 0.45),
            _row("bitmap_mm", "triton_unpack", 2048, 0.85)]  # fmt: skip
    table = rules_from_results(_doc(rows))
    assert _order_for(table, "cuda", "bitmap", "bfloat16", 1)[:2] == ["cuda", "triton"]
    assert _order_for(table, "cuda", "bitmap", "bfloat16", 2048)[0] == "triton"
    rule = next(r for r in table["rules"] if r.get("format") == "bitmap" and r.get("m_min", 0) > 1)
    assert "0.45" not in rule["note"]


def test_results_without_backend_rows_are_refused():
    with pytest.raises(ValueError, match="no rows a backend speaks for"):
        rules_from_results(_doc([_row("sparse24_mm", "auto", 1, 1.5)]))


def test_cpu_results_make_cpu_rules():
    rows = [_row("sparse24_mm", "cpu", 1, 1.2, dtype="float32"),
            _row("bitmap_mm", "cpu", 1, 0.7, dtype="float32")]  # fmt: skip
    table = rules_from_results(_doc(rows, gpu="cpu"))
    assert table["rules"][0]["device"] == "cpu"
    assert _order_for(table, "cpu", "bitmap", "float32", 1) == ["cpu", "reference"]


def test_cli_prints_and_writes_a_table_dispatch_can_load(gpu_doc, tmp_path, capsys):
    results = tmp_path / "run-kernels.json"
    results.write_text(json.dumps(gpu_doc))
    target = tmp_path / "table.json"
    try:
        assert main([str(results), "--write", str(target)]) == 0
        written = dispatch.load_dispatch_table(target)
        assert written == dispatch.dispatch_table()  # save_dispatch_table installs it too
    finally:
        dispatch.set_dispatch_table(None)
    out = capsys.readouterr().out
    assert "cuda/sparse24/bfloat16" in out and "triton > cuda" in out
    assert "run-kernels.json, commit abc123" in written["rules"][0]["note"]


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "cannot read"), (json.dumps({"suite": "e2e", "rows": []}), "not a kernel")],
)
def test_cli_rejects_bad_files(tmp_path: Path, content: str, message: str, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])


def test_a_backend_that_skipped_the_hard_shapes_is_not_flattered():
    """Ranks compare backends on the shapes all of them were measured on. Here torch ran
    only the easy 4096x4096 (1.5x) and refused the 14336x4096 that every backend finds
    hard; cuda beats it where both ran (2.0x), so cuda leads, although the geomean over
    each backend's own rows would put torch first (1.5x against sqrt(2.0 * 1.0) = 1.41x)."""
    rows = [_row("sparse24_gemv", "cuda", 1, 2.0, (4096, 4096)),
            _row("sparse24_gemv", "cuda", 1, 1.0, (14336, 4096)),
            _row("sparse24_mm", "torch", 1, 1.5, (4096, 4096))]  # fmt: skip
    table = rules_from_results(_doc(rows))
    assert _order_for(table, "cuda", "sparse24", "bfloat16", 1)[:2] == ["cuda", "torch"]
    note = next(r["note"] for r in table["rules"] if r.get("dtype") == "bfloat16")
    assert "cuda 2.00x" in note and "torch 1.50x" in note
    # with no shape in common, each backend's own shapes are all there is
    rows = [_row("sparse24_gemv", "cuda", 1, 1.2, (4096, 4096)),
            _row("sparse24_mm", "torch", 1, 1.5, (14336, 4096))]  # fmt: skip
    table = rules_from_results(_doc(rows))
    assert _order_for(table, "cuda", "sparse24", "bfloat16", 1)[:2] == ["torch", "cuda"]


def test_a_lease_split_over_two_calls_makes_one_table(tmp_path, capsys):
    """lease measures M = 1 and 16, lease-rest M = 2, 4, 8: one table from both files.
    A case both files measured is taken from the later one."""
    first = _doc(
        [
            _row("sparse24_gemv", "cuda", 1, 1.6),
            _row("sparse24_gemv", "triton", 1, 1.4),
            _row("sparse24_gemv", "cuda", 16, 1.1),
            _row("sparse24_gemv", "triton", 16, 1.3),
        ]
    )
    second = _doc([_row("sparse24_gemv", "cuda", 4, 1.2), _row("sparse24_gemv", "triton", 4, 1.5),
                   _row("sparse24_gemv", "cuda", 16, 1.4)])  # fmt: skip
    paths = []
    for i, doc in enumerate((first, second)):
        paths.append(tmp_path / f"2026-12-03-nvidia-h200-kernels{'-2' * i}.json")
        paths[-1].write_text(json.dumps(doc))
    target = tmp_path / "table.json"
    try:
        assert main([*map(str, paths), "--write", str(target)]) == 0
        table = dispatch.load_dispatch_table(target)
    finally:
        dispatch.set_dispatch_table(None)
    order = lambda m: _order_for(table, "cuda", "sparse24", "bfloat16", m)  # noqa: E731
    assert order(1)[0] == "cuda" and order(4)[0] == "triton"  # M = 4 from the second call
    assert order(16)[0] == "cuda"  # measured in both: the later 1.4x beats triton's 1.3x
    assert "kernels.json, 2026-12-03-nvidia-h200-kernels-2.json" in table["rules"][0]["note"]
    other = _doc([_row("sparse24_gemv", "cuda", 1, 1.6)], gpu="NVIDIA A100")
    (tmp_path / "a100.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        main([str(paths[0]), str(tmp_path / "a100.json")])
    assert "different GPUs" in capsys.readouterr().err
