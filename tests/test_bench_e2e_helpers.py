"""The e2e benchmark's pieces on CPU with tiny shapes, so a GPU session only measures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
