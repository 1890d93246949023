"""bench/profile_decode.py: per-step kernel rows from two profiled generate() calls."""

from __future__ import annotations

import json

import pytest
from bench_support import load_bench

profile_decode = load_bench("profile_decode")


def test_decode_rows_keep_only_what_the_extra_steps_ran():
    long = {"gemv": (4 + 40, 2.0 + 400.0), "prefill_gemm": (4, 900.0), "norm": (2 + 20, 1 + 100.0)}
    short = {"gemv": (4, 2.0), "prefill_gemm": (4, 900.0), "norm": (2, 1.0)}
    rows = profile_decode.decode_rows(long, short, steps=10)
    assert [r["name"] for r in rows] == ["gemv", "norm"]  # the prefill-only kernel drops out
    assert rows[0]["calls_per_step"] == 4 and rows[0]["us_per_step"] == pytest.approx(40.0)
    assert rows[1]["calls_per_step"] == 2 and rows[1]["us_per_step"] == pytest.approx(10.0)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert "50.0 us of kernels per step" in profile_decode.table(rows, "t")


def test_cpu_profile_of_a_packed_model_counts_its_linears(tmp_path):
    layers = 2
    assert profile_decode.main(
        ["--spec", "tiny", "--variant", "2:4", "--layers", str(layers), "--steps", "3",
         "--prompt", "8", "--device", "cpu", "--out", str(tmp_path)]
    ) == 0  # fmt: skip
    [json_path] = tmp_path.glob("*-decode-profile-24-2L-b1-p8.json")
    doc = json.loads(json_path.read_text())
    calls = {r["name"]: r["calls_per_step"] for r in doc["rows"]}
    # fused q/k/v and gate/up: 4 packed linears per layer, then the dense lm_head
    assert calls["slimstack::sparse24_mm"] == 4 * layers
    assert calls["aten::linear"] == 1
    # the native CPU bundle: rotary into the cache and attention once per layer, every
    # residual add inside a norm (2 per layer, less the first layer's input, plus the final)
    assert calls["slimstack::rotary_to_cache_cpu"] == layers
    assert calls["slimstack::decode_attention_cpu"] == layers
    assert calls["slimstack::add_rms_norm_cpu"] == 2 * layers
    assert calls["slimstack::rms_norm_cpu"] == 1
    assert "aten::index_copy_" not in calls  # the torch bundle's cache writes
    assert sum(r["share"] for r in doc["rows"]) == pytest.approx(1.0)
    assert doc["variant"] == "2:4-2L" and doc["steps"] == 3
    prefill = {r["name"]: r["calls_per_step"] for r in doc["prefill_rows"]}
    assert prefill["slimstack::sparse24_mm"] >= 4 * layers  # the prompt's pass over every layer
    assert json_path.with_suffix(".md").read_text().startswith("**cpu, 2:4-2L")
    assert not list(tmp_path.glob("*.tmp"))
