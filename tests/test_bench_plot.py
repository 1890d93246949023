"""The benchmark suite's results writer, its schema check, the plot script, and one CPU run
of the whole suite end to end (results into a temp folder, never into bench/results)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


common = load_bench("common")
plot = load_bench("plot")


def _rows(dtypes=("bfloat16", "float16")) -> list[dict]:
    rows = []
    for dtype in dtypes:
        torch_dtype = getattr(torch, dtype)
        for N, K in ((4096, 4096), (1024, 4096), (14336, 4096)):
            for provider, ms_scale in (("triton", 0.6), ("cuda", 0.55)):
                for M in (1, 2, 16, 2048):
                    case = common.Case("sparse24_gemv", provider, N, K, M, torch_dtype)
                    dense_ms = 1e-6 * N * K * (1 + M / 64)
                    rows.append(
                        common.make_row(case, dense_ms * ms_scale, dense_ms, "cublas_dense", N * K)
                    )
    return rows


def _document(rows: list[dict]) -> dict:
    env = {"commit": "0123456789abcdef", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
           "triton": "3.6.0", "cuda": "13.0"}  # fmt: skip
    return common.results_document(env, {"hbm_gbps": 3000.0, "dense_tflops": 790.0}, rows)


def test_writer_produces_the_design_schema(tmp_path):
    path = common.write_results(_document(_rows()), tmp_path / "run.json")
    doc = json.loads(path.read_text())
    assert common.validate_results(doc) == []
    assert doc["suite"] == "kernels" and doc["gpu"] == "NVIDIA H100 80GB HBM3"
    assert set(doc["peak"]) == {"hbm_gbps", "dense_tflops"}
    row = doc["rows"][0]
    for key in ("op", "provider", "baseline", "N", "K", "M", "dtype", "median_ms",
                "baseline_ms", "speedup", "gbps"):  # fmt: skip
        assert key in row
    assert row["dtype"] == "bfloat16"
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["median_ms"], rel=1e-3)
    assert row["speedup"] == pytest.approx(1 / 0.6, rel=1e-3)


@pytest.mark.parametrize(
    "breakage,expected",
    [
        (lambda d: d.pop("commit"), "'commit'"),
        (lambda d: d["peak"].update(hbm_gbps=0), "peak.hbm_gbps"),
        (lambda d: d["rows"][3].update(speedup=9.0), "rows[3].speedup"),
        (lambda d: d["rows"][1].pop("baseline_ms"), "rows[1].baseline_ms"),
        (lambda d: d["rows"][0].update(M="1"), "rows[0].M"),
    ],
)
def test_schema_check_names_the_problem_and_writer_refuses(tmp_path, breakage, expected):
    doc = _document(_rows(("bfloat16",)))
    breakage(doc)
    problems = common.validate_results(doc)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ValueError, match="does not match DESIGN.md"):
        common.write_results(doc, tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_results_path_per_device(monkeypatch, tmp_path):
    day = dt.date(2026, 11, 23)
    monkeypatch.delenv(common.RESULTS_ENV, raising=False)
    gpu = common.results_path("NVIDIA H100 80GB HBM3", "cuda", day)
    assert gpu == BENCH / "results" / "2026-11-23-nvidia-h100-80gb-hbm3-kernels.json"
    cpu = common.results_path("cpu", "cpu", day)
    assert cpu.name == "2026-11-23-cpu-kernels.json" and BENCH not in cpu.parents
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    assert common.results_path("cpu", "cpu", day) == tmp_path / "2026-11-23-cpu-kernels.json"


def test_a_second_run_on_the_same_day_gets_its_own_file(monkeypatch, tmp_path):
    day = dt.date(2026, 11, 24)
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    first = common.results_path("cpu", "cpu", day)
    first.write_text("{}")
    second = common.results_path("cpu", "cpu", day)
    assert second == tmp_path / "2026-11-24-cpu-kernels-2.json"
    second.write_text("{}")
    assert common.results_path("cpu", "cpu", day).name == "2026-11-24-cpu-kernels-3.json"


@pytest.mark.parametrize("l2_mib", [40, 50, 60])  # A100, H100/H200, more
def test_rotation_streams_more_than_twice_l2_for_the_packed_weight(l2_mib: int):
    """The sparse kernels read only the packed weight: cycling the sets must push even that
    out of L2, or a small shape's sparse timing is an L2 timing against a dense HBM one."""
    l2 = l2_mib * 2**20
    for N, K in common.LLM_SHAPES:
        sparse24 = N * K // 2 * 2 + N * K // 8  # bf16 values + meta
        bitmap = N * K // 2 * 2 + N * K // 8 + 8 * (N + 1)  # + row offsets
        for packed in (sparse24, bitmap):
            sets = common.rotation_sets(packed, l2)
            assert sets * packed > 2 * l2, (N, K, sets)
            assert sets * 3 * packed < 2**30, (N, K, sets)  # dense + packed sets stay < 1 GiB
    assert common.rotation_sets(10**9, l2) == 2


def test_plot_combines_the_runs_of_one_gpu_and_refuses_two_gpus(tmp_path, monkeypatch):
    first = common.write_results(_document(_rows(("bfloat16",))), tmp_path / "a-kernels.json")
    bitmap = [dict(r, op="bitmap_mm", provider="triton_unpack") for r in _rows(("bfloat16",))]
    second = common.write_results(_document(bitmap), tmp_path / "a-kernels-2.json")
    drawn = []
    real_plot = plot.plt.Axes.plot
    monkeypatch.setattr(
        plot.plt.Axes,
        "plot",
        lambda ax, *a, **k: drawn.append(k["label"]) or real_plot(ax, *a, **k),
    )
    pngs = plot.plot_results(first, second, out_stem=tmp_path / "a-kernels-all")
    assert [p.name for p in pngs] == ["a-kernels-all-bfloat16.png"]
    assert pngs[0].read_bytes().startswith(PNG_MAGIC)
    # 3 shapes x (the first run's 2 providers + the second run's 1)
    assert sorted(set(drawn)) == [
        "bitmap_mm / triton_unpack", "sparse24_gemv / cuda", "sparse24_gemv / triton",
    ]  # fmt: skip
    assert len(drawn) == 3 * 3
    doc = json.loads(second.read_text())
    doc["gpu"] = "NVIDIA H200"
    other = common.write_results(doc, tmp_path / "b-kernels.json")
    with pytest.raises(ValueError, match="different GPUs"):
        plot.plot_results(first, other, out_stem=tmp_path / "mixed")
    assert not list(tmp_path.glob("mixed*"))


def test_plot_draws_one_png_per_dtype(tmp_path):
    path = common.write_results(_document(_rows()), tmp_path / "2026-11-23-h100-kernels.json")
    pngs = plot.plot_results(path)
    assert sorted(p.name for p in pngs) == [
        "2026-11-23-h100-kernels-bfloat16.png",
        "2026-11-23-h100-kernels-float16.png",
    ]
    for png in pngs:
        assert png.parent == tmp_path
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_cli(tmp_path):
    path = common.write_results(_document(_rows(("float16",))), tmp_path / "r.json")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r-float16.png").stat().st_size > 10_000


def test_prune_helpers_make_the_patterns_the_kernels_expect():
    from slimstack.formats import is_sparse24

    w = torch.randn(8, 64)
    assert is_sparse24(common.prune_24(w))
    half = common.prune_rows_half(w)
    assert ((half != 0).sum(1) == 32).all()
    kept = half != 0
    assert torch.equal(half[kept], w[kept])


@pytest.mark.slow
def test_cpu_suite_end_to_end(tmp_path):
    """pytest bench/ on CPU: rows for the CPU kernels, a valid JSON in the folder we name."""
    import slimstack._C as ext

    if not hasattr(ext, "sparse24_mm_cpu"):
        pytest.skip("slimstack._C has no CPU kernels in this build")
    env = dict(os.environ, **{common.RESULTS_ENV: str(tmp_path)})
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         "--benchmark-disable-gc", str(BENCH / "test_bench_kernels.py"), "-k", "float32"],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (path,) = tmp_path.glob("*-cpu-kernels.json")
    doc = json.loads(path.read_text())
    assert common.validate_results(doc) == []
    providers = {(r["op"], r["provider"]) for r in doc["rows"]}
    assert {("sparse24_mm", "cpu"), ("bitmap_mm", "cpu")} <= providers
    assert all(r["baseline"] == "torch_dense" for r in doc["rows"])
    # each row says where its host time went; a shape's first case made its weights
    parts = set(summarize.WALL_PARTS)
    assert all(set(r["wall_s"]) == parts for r in doc["rows"])
    assert all(v >= 0 for r in doc["rows"] for v in r["wall_s"].values())
    assert any(r["wall_s"]["setup"] > 0 for r in doc["rows"])
    assert plot.plot_results(path)


summarize = load_bench("summarize")


def test_summary_tables_geomean_over_shapes_and_decode_bandwidth():
    doc = _document(_rows(dtypes=("bfloat16",)))
    text = summarize.summarize(doc)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| op / provider | M="))
    assert header.split("|")[2:6] == [" M=1 ", " M=2 ", " M=16 ", " M=2048 "]
    # every row of provider cuda runs at 0.55x the dense time: 1/0.55 = 1.82x at each M
    cuda = next(line for line in lines if line.startswith("| sparse24_gemv / cuda | "))
    assert cuda.count("1.82x") == 4
    # M = 1 per shape: 3 shapes x 2 providers, share of the 3000 GB/s copy bandwidth
    decode = [line for line in lines if line.startswith("| sparse24_gemv / ") and "x4096 |" in line]
    assert len(decode) == 6
    row = next(r for r in doc["rows"] if r["M"] == 1 and r["provider"] == "triton")
    expected = f"{100 * row['gbps'] / 3000:.0f}%"
    assert any(expected in line for line in decode)


def test_summary_says_where_the_run_time_went():
    rows = _rows(dtypes=("bfloat16",))
    assert summarize.wall_table(rows) == ""  # runs before wall_s: no table
    for i, row in enumerate(rows):
        compile_s = 4.0 if (row["provider"], row["M"]) == ("triton", 16) else 0.1
        row["wall_s"] = {"setup": 0.5 if i == 0 else 0.0, "first_call": compile_s,
                         "timing": 0.2, "baseline": 0.1}  # fmt: skip
    text = summarize.summarize(_document(rows))
    assert "**Where the run's host time went**" in text
    table = summarize.wall_table(rows)
    first = table.splitlines()[0]
    total = sum(sum(r["wall_s"].values()) for r in rows)
    assert first.startswith(f"{len(rows)} cases, {total:.0f} s: setup 0 s, first_call")
    providers = [line for line in table.splitlines() if line.startswith("| sparse24_gemv / ")]
    assert providers[0].startswith("| sparse24_gemv / triton |")  # the most time first
    slowest = table.splitlines()[-1]
    assert (
        slowest.startswith("slowest first calls: sparse24_gemv-triton-") and "-M16 4.0 s" in slowest
    )


def test_summary_refuses_other_documents_and_unknown_dtypes(tmp_path, capsys):
    with pytest.raises(ValueError, match="not a kernel benchmark"):
        summarize.summarize({"suite": "e2e", "rows": []})
    with pytest.raises(ValueError, match="no rows of dtype 'float32'"):
        summarize.summarize(_document(_rows()), "float32")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_document(_rows())))
    assert summarize.main([str(path), "--dtype", "float16"]) == 0
    assert "float16: geometric-mean" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path / "missing.json")])


def _variant_rows(provider: str, op: str, ms_scale_by_shape: dict, M: int = 1) -> list[dict]:
    rows = []
    for (N, K), scale in ms_scale_by_shape.items():
        case = common.Case(op, provider, N, K, M, torch.bfloat16)
        dense_ms = 1e-6 * N * K * (1 + M / 64)
        rows.append(common.make_row(case, dense_ms * scale, dense_ms, "cublas_dense", N * K))
    return rows


def test_summary_ab_table_sets_each_variant_against_its_default(tmp_path, capsys):
    """Variants read against the default they vary (triton_w8 -> triton, cuda_prefetch_off ->
    cuda, cuda_sm90_swizzle1 -> cuda_sm90), shape by shape, across a lease's two files; a
    default (cuda_sm90) is never a variant of another, and a variant without its default
    measured has no row."""
    assert summarize.reference_provider("cuda_sm90_swizzle1") == "cuda_sm90"
    assert summarize.reference_provider("cuda_prefetch_off") == "cuda"
    assert summarize.reference_provider("triton_w8") == "triton"
    assert summarize.reference_provider("cuda_sm90") is None
    assert summarize.reference_provider("triton") is None
    shapes = {(4096, 4096): 0.3, (1024, 4096): 1.2, (14336, 4096): 0.6}
    first = _document(_rows(dtypes=("bfloat16",)))  # triton at 0.6x, cuda at 0.55x dense time
    second = _document(
        _variant_rows("triton_w8", "sparse24_gemv", shapes)
        + _variant_rows("cuda_prefetch_off", "sparse24_gemv", {(4096, 4096): 1.1})
        + _variant_rows("triton_w_as_a", "sparse24_gemm", {(4096, 4096): 0.5}, M=4096)
    )
    paths = []
    for i, doc in enumerate((first, second)):
        paths.append(tmp_path / f"run-{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert summarize.main([str(p) for p in paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    w8 = next(line for line in lines if line.startswith("| sparse24_gemv | triton_w8 |"))
    ratios = [0.6 / scale for scale in shapes.values()]  # variant speedup / default speedup
    geo = (ratios[0] * ratios[1] * ratios[2]) ** (1 / 3)
    assert w8 == (
        f"| sparse24_gemv | triton_w8 | triton | 1 | {geo:.2f}x | "
        f"{min(ratios):.2f}-{max(ratios):.2f} | 3 |"
    )
    off = next(line for line in lines if "| cuda_prefetch_off |" in line)
    assert f"| {0.55 / 1.1:.2f}x |" in off and off.endswith("| 1 |")
    assert not any(
        "triton_w_as_a" in line and line.startswith("| sparse24_gemm |") for line in lines
    )
    assert summarize.ab_table(first["rows"]) == ""  # defaults only: no A/B table
    bad = tmp_path / "e2e.json"
    bad.write_text(json.dumps({"suite": "e2e", "rows": []}))
    with pytest.raises(SystemExit):
        summarize.main([str(paths[0]), str(bad)])


def test_summary_lists_the_cases_the_run_did_not_measure():
    doc = _document(_rows(("bfloat16",)))
    assert "not measured" not in summarize.summarize(doc)
    doc["not_measured"] = [
        {"case": "sparse24_gemm-cuda_sm90-5120x5120-M2048-bfloat16", "outcome": "skipped",
         "reason": "slimstack._C has none of ('sparse24_gemm_sm90_cuda',)"},
        {"case": "bitmap_gemv-cuda-1024x4096-M1-bfloat16", "outcome": "failed (call)",
         "reason": "AssertionError: relative error 3.1e-01"},
    ]  # fmt: skip
    text = summarize.summarize(doc)
    assert "**2 cases not measured**" in text
    assert "- bitmap_gemv-cuda-1024x4096-M1-bfloat16: failed (call), AssertionError" in text


def test_prune_quality_redraws_table_and_plot_from_its_json(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # it imports its sibling, as a script does
    quality = load_bench("prune_quality")
    rows = [{"method": "dense", "pattern": "-", "perplexity": 100.0, "dense": []}]
    for i, method in enumerate(quality.METHODS):
        for j, pattern in enumerate(quality.PATTERNS):
            rows.append({"method": method, "pattern": pattern, "perplexity": 150.0 + 10 * i + j,
                         "kl": 0.1, "top1_agreement": 0.5 + 0.01 * j, "dense": []})  # fmt: skip
    doc = {"model": "tiny", "calib": "valid.txt", "text": "test.txt", "nsamples": 2,
           "seqlen": 32, "tokens": 62, "windows": 2, "window": 32, "rows": rows}  # fmt: skip
    figure = quality.plot_quality(doc)
    ppl_ax, agree_ax = figure.axes
    heights = sorted(round(bar.get_height(), 6) for bar in ppl_ax.patches)
    assert heights == sorted(r["perplexity"] for r in rows[1:])
    assert sorted(round(b.get_height(), 6) for b in agree_ax.patches) == sorted(
        r["top1_agreement"] for r in rows[1:]
    )
    assert [t.get_text() for t in ppl_ax.get_xticklabels()] == ["50%", "2:4", "4:8"]

    source = tmp_path / "quality.json"
    source.write_text(json.dumps(doc))
    subprocess.run([sys.executable, str(BENCH / "prune_quality.py"), "--from-json", str(source)],
                   check=True, capture_output=True)  # fmt: skip
    assert (tmp_path / "quality.png").read_bytes().startswith(PNG_MAGIC)
    table = (tmp_path / "quality.md").read_text()
    assert "| sparsegpt | 170.00 | 171.00 | 172.00 |" in table and "Dense: 100.00" in table
