"""Calibration text, windows, and layer-by-layer streaming against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimstack.calibration import (
    CalibrationError,
    LayerStream,
    load_calibration,
    read_text,
    sample_windows,
    tokenize_file,
)
from slimstack.checkpoint import Checkpoint


def test_read_text_plain_and_jsonl(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("one\ntwo\n")
    assert read_text(plain) == "one\ntwo\n"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert read_text(jsonl) == "first\n\nsecond"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CalibrationError, match=r"b\.jsonl:2: JSONL records need a string 'text'"):
        read_text(bad)
    with pytest.raises(CalibrationError, match="not found"):
        read_text(tmp_path / "missing.txt")


def test_windows_reproducible_and_contiguous() -> None:
    tokens = torch.arange(1000)
    a = sample_windows(tokens, 16, 32, seed=3)
    assert a.shape == (16, 32)
    assert torch.equal(a, sample_windows(tokens, 16, 32, seed=3))
    assert not torch.equal(a, sample_windows(tokens, 16, 32, seed=4))
    # each window is a contiguous slice of the stream
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, -1))
    with pytest.raises(CalibrationError, match="has 1000 tokens; a window of seqlen=1000"):
        sample_windows(tokens, 1, 1000, seed=0)


def test_calibration_uses_models_tokenizer(stories260k_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. " * 20)
    tokens = tokenize_file(stories260k_dir, text)
    assert tokens[0] == 1  # BOS from tokenizer_config (add_bos_token)
    calib = load_calibration(stories260k_dir, text, nsamples=4, seqlen=16, seed=0)
    assert calib.input_ids.shape == (4, 16)
    assert calib.record()["sha256"] and calib.record()["nsamples"] == 4
    # windows come from that token stream
    stream = tokens.tolist()
    for row in calib.input_ids.tolist():
        assert any(stream[i : i + 16] == row for i in range(len(stream) - 15))


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("mistral", {"sliding_window": 8}), ("qwen2", {})],
)
def test_layer_stream_matches_transformers(
    tiny_checkpoint, model_type: str, overrides: dict
) -> None:
    folder = tiny_checkpoint(model_type, layers=3, **overrides)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with Checkpoint.open(folder) as ckpt:
        stream = LayerStream(ckpt, ids, batch_size=2)
        for index in range(ckpt.num_layers):
            stream.advance(stream.load_layer(index), index)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.norm(stream.hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01\x02text", r"not a text file \(NUL byte at offset 0\)"),
        (b"plain start \xff\xfe then junk", r"not UTF-8 text \(invalid byte 0xff at offset 12\)"),
        (b"", r"holds no text \(empty or only whitespace\)"),
        (b" \n\t\n", r"holds no text"),
    ],
)
def test_binary_or_empty_text_is_refused_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """Before: decoded with errors="replace", so any file (a checkpoint, random bytes) became
    text full of U+FFFD and was calibrated or evaluated on."""
    file = tmp_path / "calib.txt"
    file.write_bytes(content)
    with pytest.raises(CalibrationError, match=rf"{file}: {message}"):
        read_text(file)


def test_a_checkpoint_given_as_text_is_refused(stories260k_dir: Path) -> None:
    with pytest.raises(CalibrationError, match=r"model\.safetensors: not a text file"):
        tokenize_file(stories260k_dir, stories260k_dir / "model.safetensors")


def test_jsonl_without_text_and_a_byte_order_mark(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n")
    with pytest.raises(CalibrationError, match="holds no text"):
        read_text(empty)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffOnce upon a time".encode())
    assert read_text(bom) == "Once upon a time"  # the mark is not text to tokenize


def test_window_settings_must_be_integers() -> None:
    with pytest.raises(CalibrationError, match="seqlen must be an integer, got '64'"):
        sample_windows(torch.arange(1000), 4, "64", seed=0)
    with pytest.raises(CalibrationError, match="nsamples must be an integer, got 2.5"):
        sample_windows(torch.arange(1000), 2.5, 64, seed=0)
