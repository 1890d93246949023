"""The e2e benchmark's pieces on CPU with tiny shapes, so a GPU session only measures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_support import single_thread  # noqa: F401  (autouse fixture)

from slimstack.checkpoint import Checkpoint
from slimstack.engine.loader import load
from slimstack.formats import is_sparse24

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import e2e_helpers as e2e  # noqa: E402
import plot_e2e  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    return {
        v.name: e2e.write_synthetic_checkpoint(root / v.name, e2e.TINY, v, "cpu", torch.float32)
        for v in e2e.variants(e2e.TINY)
    }


def test_variants_cover_the_issue_list() -> None:
    names = [v.name for v in e2e.variants(e2e.MISTRAL_7B)]
    assert names == ["dense-32L", "2:4-32L", "50%-32L", "dense-24L", "2:4-24L"]
    assert e2e.checkpoint_gb(e2e.MISTRAL_7B, 32) == pytest.approx(14.48, abs=0.01)


def test_synthetic_checkpoints_have_the_promised_sparsity(checkpoints) -> None:
    with Checkpoint.open(checkpoints["2:4-4L"]) as ckpt:
        for name in ckpt.tensor_names():
            tensor = ckpt.get_tensor(name)
            if name.endswith("_proj.weight"):
                assert is_sparse24(tensor) and float((tensor == 0).float().mean()) == 0.5
        assert ckpt.config["model_type"] == "mistral" and ckpt.config["eos_token_id"] is None
    with Checkpoint.open(checkpoints["50%-4L"]) as ckpt:
        weight = ckpt.get_tensor("model.layers.1.mlp.down_proj.weight")
        assert bool(((weight == 0).sum(1) == weight.shape[1] // 2).all())
        assert not is_sparse24(weight)
    with (
        Checkpoint.open(checkpoints["dense-4L"]) as full,
        Checkpoint.open(checkpoints["dense-3L"]) as sliced,
    ):
        assert sliced.num_layers == 3
        for name in sliced.tensor_names():  # the sliced variant is the full one's first layers
            assert torch.equal(sliced.get_tensor(name), full.get_tensor(name))
        assert (full.get_tensor("model.layers.0.mlp.up_proj.weight") != 0).all()


def test_run_and_results_file(checkpoints, tmp_path: Path) -> None:
    spec, device = e2e.TINY, torch.device("cpu")
    env = e2e.environment(device)
    path = e2e.results_path(env, tmp_path)
    assert path.name.endswith("-e2e.json") and env["suite"] == "e2e"
    rows = []
    for variant in (e2e.variants(spec)[0], e2e.variants(spec)[3]):
        model = load(checkpoints[variant.name], device="cpu", dtype=torch.float32, pack=False)
        measured = e2e.run_slimstack(model, batch=2, prompt_len=8, new_tokens=6, repeats=1)
        assert measured["decode_steps"] == 5 and measured["tokens_per_s"] > 0
        weight_bytes = e2e.decode_weight_bytes(model)
        assert weight_bytes < model.info().total_nbytes  # the embedding table is not read
        rows.append(
            e2e.make_row(spec, variant, "slimstack", 2, 8, 6, measured, weight_bytes, 100.0, None)
        )
    hf = e2e.run_transformers(checkpoints["dense-4L"], 2, 8, 6, device)
    rows.append(
        e2e.make_row(spec, e2e.variants(spec)[0], "transformers", 2, 8, 6, hf, None, None, None)
    )
    peak = e2e.measure_peaks(device)
    assert peak["hbm_gbps"] > 0 and peak["dense_tflops"] > 0
    # decode kernels only read: the peak is the faster of a read stream and a copy
    assert peak["hbm_gbps"] == max(peak["hbm_read_gbps"], peak["hbm_copy_gbps"]) > 0
    assert min(peak["hbm_read_gbps"], peak["hbm_copy_gbps"]) > 0
    e2e.write_results(path, env, {"hbm_gbps": 100.0, "dense_tflops": 1.0}, rows[:1])
    e2e.write_results(path, env, {"hbm_gbps": 0.0}, rows[1:])  # a second command merges
    data = json.loads(path.read_text())
    assert data["peak"] == {"hbm_gbps": 100.0, "dense_tflops": 1.0} and len(data["rows"]) == 3
    assert {"suite", "commit", "gpu", "torch", "triton", "cuda"} <= set(data)
    by_variant = {(r["provider"], r["variant"]): r for r in data["rows"]}
    dense, sliced = by_variant["slimstack", "dense-4L"], by_variant["slimstack", "dense-3L"]
    assert dense["baseline"] == "transformers" and sliced["baseline"] == "slimstack_dense"
    expected = dense["decode_ms_per_step"] / sliced["decode_ms_per_step"]
    assert sliced["speedup"] == pytest.approx(expected, rel=1e-3)
    assert 0 < dense["hbm_share"] == pytest.approx(dense["weight_gbps"] / 100.0, rel=1e-3)
    png = plot_e2e.plot(path)
    assert png.is_file() and png.stat().st_size > 1000
    lines = plot_e2e.check_targets(data["rows"])
    assert all(line.startswith(("met ", "MISS")) for line in lines)


def test_rows_without_pdl_keep_their_own_dense_baseline() -> None:
    """A SLIMSTACK_PDL=0 run (provider slimstack_no_pdl) merges beside the default rows and is
    compared with the dense model measured the same way, never with the PDL rows."""
    spec = e2e.TINY
    dense_v, sliced_v = e2e.variants(spec)[0], e2e.variants(spec)[3]

    def row(variant, provider, ms):
        measured = {
            "tokens_per_s": 1e3 / ms,
            "sequence_tokens_per_s": 1e3 / ms,
            "decode_ms_per_step": ms,
            "prefill_ms": 2 * ms,
            "decode_steps": 5,
        }
        return e2e.make_row(spec, variant, provider, 1, 8, 6, measured, 10**6, 100.0, None)

    rows = e2e.add_speedups([
        row(dense_v, "slimstack", 4.0), row(sliced_v, "slimstack", 2.0),
        row(dense_v, "slimstack_no_pdl", 5.0), row(sliced_v, "slimstack_no_pdl", 4.0),
    ])  # fmt: skip
    by = {(r["provider"], r["variant"]): r for r in rows}
    assert by["slimstack", sliced_v.name]["speedup"] == pytest.approx(2.0)
    assert by["slimstack_no_pdl", sliced_v.name]["speedup"] == pytest.approx(1.25)
    assert by["slimstack_no_pdl", sliced_v.name]["baseline"] == "slimstack_dense"
    assert len({tuple(r[k] for k in e2e.ROW_KEY) for r in rows}) == 4, "rows must not collide"


def _load_e2e_suite():
    """bench/test_bench_e2e.py as a module (its test needs CUDA; its helpers do not)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "test_bench_e2e.py"
    spec = importlib.util.spec_from_file_location("slimstack_bench_e2e_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_setting_reports_its_own_peak_memory(monkeypatch) -> None:
    """The peak is reset per setting: a row must not carry the loader's transients or the
    largest earlier setting (1x2048's cache in the 8x128 row)."""
    gb = 10**9
    memory = {"current": 15 * gb, "peak": 40 * gb}  # the loader peaked at 40 GB

    def reset(device=None) -> None:
        memory["peak"] = memory["current"]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    transient = {(1, 2048): 4 * gb, (8, 128): 1 * gb, (1, 128): gb // 2}

    def run(batch: int, prompt_len: int) -> dict:
        memory["peak"] = max(memory["peak"], memory["current"] + transient[batch, prompt_len])
        return {"tokens_per_s": 1.0}

    released = []
    results = e2e.run_configs(
        run, list(transient), torch.device("cuda"), after=lambda: released.append(1)
    )
    assert [(b, p, mem) for b, p, _, mem in results] == [(1, 2048, 19.0), (8, 128, 16.0),
                                                         (1, 128, 15.5)]  # fmt: skip
    assert len(released) == 3
    cpu = e2e.run_configs(run, [(1, 128)], torch.device("cpu"))
    assert cpu[0][3] is None  # no CUDA allocator to ask


def test_suite_measures_every_setting_and_loads_transformers_once(checkpoints, monkeypatch) -> None:
    """The GPU suite's own glue on CPU: rows per setting, and transformers' 15 GB checkpoint
    read once per variant, not once per setting (each load costs GPU-lease seconds)."""
    import transformers

    suite = _load_e2e_suite()
    configs = [(1, 8), (2, 8)]
    for name, value in {"SPEC": e2e.TINY, "CONFIGS": configs, "NEW_TOKENS": 5,
                        "MODE": "auto", "DTYPE": torch.float32}.items():  # fmt: skip
        monkeypatch.setattr(suite, name, value)
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    device, rows = torch.device("cpu"), []
    variant = e2e.variants(e2e.TINY)[0]
    suite._measure_slimstack(checkpoints[variant.name], variant, device, 100.0, rows)
    suite._measure_transformers(checkpoints[variant.name], variant, device, 100.0, rows)
    assert len(loads) == 1
    assert [(r["provider"], r["batch"], r["prompt_len"]) for r in rows] == [
        ("slimstack", 1, 8), ("slimstack", 2, 8), ("transformers", 1, 8), ("transformers", 2, 8)
    ]  # fmt: skip
    assert all(r["decode_steps"] == 4 and r["tokens_per_s"] > 0 for r in rows)


def test_transformers_prefill_is_timed_as_generate_runs_it(checkpoints) -> None:
    """generate's own prefill computes the last column's logits only; timing a full-vocab
    forward instead would bill transformers for work generate never does (and its decode
    time, total minus prefill, would come out too small)."""
    model = e2e.load_transformers(checkpoints["dense-4L"], torch.device("cpu"))
    forward, generate = model.forward, model.generate
    in_generate = [False]
    timed: list[dict] = []

    def spy_forward(*args, **kwargs):
        if not in_generate[0]:
            timed.append(kwargs)
        return forward(*args, **kwargs)

    def spy_generate(*args, **kwargs):
        in_generate[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            in_generate[0] = False

    model.forward, model.generate = spy_forward, spy_generate
    e2e.run_transformers(model, 2, 8, 6, torch.device("cpu"))
    assert len(timed) == 1 and timed[0].get("logits_to_keep") == 1, timed


class _TimedModel:
    """generate() stand-in with scripted decode times; logs which model ran, in order."""

    def __init__(self, name: str, decode_ms: list[float], log: list[str]) -> None:
        self.name, self.decode_ms, self.log = name, list(decode_ms), log
        self.config = SimpleNamespace(vocab_size=100)

    def generate(self, prompts, max_new_tokens: int, mode: str):
        self.log.append(self.name)
        ms = self.decode_ms.pop(0)
        timings = SimpleNamespace(
            decode_ms=ms, decode_steps=max_new_tokens - 1, prefill_ms=ms / 2,
            throughput_tokens_per_s=1e3 / ms, decode_tokens_per_s=1e3 / ms,
        )  # fmt: skip
        return SimpleNamespace(timings=timings)


def test_paired_runs_interleave_and_keep_each_models_best() -> None:
    log: list[str] = []
    variant = _TimedModel("variant", [99.0, 30.0, 20.0, 25.0], log)  # warm-up, then 3 timed
    dense = _TimedModel("dense", [99.0, 50.0, 60.0, 40.0], log)
    measured, reference = e2e.run_slimstack_paired(variant, dense, 1, 8, 6, repeats=3)
    assert log == ["variant", "dense"] + ["variant", "dense"] * 3
    assert measured["decode_ms_per_step"] == pytest.approx(20.0 / 5)
    assert reference["decode_ms_per_step"] == pytest.approx(40.0 / 5)


def test_paired_rows_are_compared_with_their_own_dense_timing() -> None:
    spec = e2e.TINY
    dense_v, sparse_v = e2e.variants(spec)[0], e2e.variants(spec)[1]

    def measured(ms: float) -> dict:
        return {"tokens_per_s": 1e3 / ms, "sequence_tokens_per_s": 1e3 / ms,
                "decode_ms_per_step": ms, "prefill_ms": 2 * ms, "decode_steps": 5}  # fmt: skip

    dense = e2e.make_row(spec, dense_v, "slimstack", 1, 8, 6, measured(10.0), 10**6, 1.0, None)
    paired = e2e.make_row(spec, sparse_v, "slimstack", 1, 8, 6, measured(4.0), 10**6, 1.0, None)
    paired["paired_dense"] = measured(6.0)  # the machine was faster while this pair ran
    apart = e2e.make_row(spec, sparse_v, "slimstack", 4, 8, 6, measured(4.0), 10**6, 1.0, None)
    dense4 = e2e.make_row(spec, dense_v, "slimstack", 4, 8, 6, measured(8.0), 10**6, 1.0, None)
    rows = {(r["variant"], r["batch"]): r for r in e2e.add_speedups([dense, paired, apart, dense4])}
    row = rows[sparse_v.name, 1]
    assert row["baseline"] == "slimstack_dense_paired"
    assert row["speedup"] == pytest.approx(1.5) and row["prefill_speedup"] == pytest.approx(1.5)
    unpaired = rows[sparse_v.name, 4]
    assert unpaired["baseline"] == "slimstack_dense" and unpaired["speedup"] == pytest.approx(2.0)


def test_suite_pairs_a_variant_with_the_dense_reference(checkpoints, monkeypatch) -> None:
    suite = _load_e2e_suite()
    for name, value in {"SPEC": e2e.TINY, "CONFIGS": [(1, 8)], "NEW_TOKENS": 5,
                        "MODE": "auto", "DTYPE": torch.float32, "REPEATS": 1}.items():  # fmt: skip
        monkeypatch.setattr(suite, name, value)
    reference = load(checkpoints["dense-4L"], device="cpu", dtype=torch.float32)
    calls: list[str] = []
    original = reference.generate

    def counted(*args, **kwargs):
        calls.append("dense")
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "generate", counted)
    rows: list[dict] = []
    variant = e2e.variants(e2e.TINY)[1]
    suite._measure_slimstack(
        checkpoints[variant.name], variant, torch.device("cpu"), 100.0, rows, reference
    )
    assert len(calls) == 2  # warm-up and one timed call, alongside the variant's
    (row,) = rows
    assert row["paired_dense"]["decode_steps"] == 4 and row["paired_dense"]["tokens_per_s"] > 0
