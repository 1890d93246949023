"""bench/decoder_pieces.py: native decoder pieces against the torch references, one row per
op (attention once per context), written as one JSON."""

from __future__ import annotations

import json

import pytest
from bench_support import load_bench

decoder_pieces = load_bench("decoder_pieces")


def test_rows_per_op_and_context(tmp_path):
    from slimstack.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("slimstack._C not built")
    argv = ["--spec", "tiny", "--calls", "5", "--contexts", "16:4", "32:20", "--out", str(tmp_path)]
    assert decoder_pieces.main(argv) == 0
    [path] = tmp_path.glob("*-cpu-decoder-pieces.json")
    doc = json.loads(path.read_text())
    assert doc["suite"] == "decoder-pieces" and doc["commit"]
    ops = [(r["op"], r["cache"], r["visible"]) for r in doc["rows"]]
    assert ops == [
        ("add_rms_norm", 16, 4), ("rms_norm", 16, 4), ("swiglu", 16, 4),
        ("rotary_to_cache", 16, 4), ("decode_attention", 16, 4), ("decode_attention", 32, 20),
    ]  # fmt: skip
    for row in doc["rows"]:
        assert row["median_us"] > 0 and row["baseline_us"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_us"] / row["median_us"], rel=0.02)
        assert row["provider"] == "native" and row["baseline"] == "torch"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("bad", ["16", "16:0", "16:17", "a:b"])
def test_contexts_are_checked(bad, tmp_path, capsys):
    with pytest.raises(SystemExit):
        decoder_pieces.main(["--contexts", bad, "--out", str(tmp_path)])
    assert "want CACHE:VISIBLE" in capsys.readouterr().err
