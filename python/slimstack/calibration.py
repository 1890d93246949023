"""Calibration data: text -> token windows, and layer-by-layer activation streaming.

Streaming follows the Wanda / SparseGPT recipe: embed the calibration windows, run one
decoder layer at a time, let the caller collect what it needs from that layer's linear
inputs and modify the layer, then feed the *modified* layer's outputs to the next one.
Only one layer's weights are in memory at a time.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimstack.checkpoint import Checkpoint, sha256_file
from slimstack.hf_layers import (
    build_layer,
    build_rotary,
    causal_mask,
    hf_config,
    layer_sliding_window,
)


class CalibrationError(ValueError):
    """Calibration text that cannot serve the request."""


def read_text(path: str | os.PathLike) -> str:
    """Plain text, or JSONL whose records have a `text` field (joined by blank lines).

    The file must be UTF-8 text: a binary file (a checkpoint, an archive) passed by mistake
    is refused, not decoded into replacement characters and tokenized as if it were text.
    """
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"calibration file not found: {file}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    if b"\0" in data:
        raise CalibrationError(
            f"{file}: not a text file (NUL byte at offset {data.index(0)}); give a UTF-8 text "
            "file, or JSONL with a 'text' field"
        )
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{file}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); give a UTF-8 text file, or JSONL with a 'text' field"
        ) from None
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        raw = _jsonl_text(file, raw)
    if not raw.strip():
        raise CalibrationError(f"{file}: holds no text (empty or only whitespace)")
    return raw


def _jsonl_text(file: Path, raw: str) -> str:
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{file}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{file}:{lineno}: JSONL records need a string 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def load_tokenizer(model_path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{model_path}: cannot load its tokenizer ({exc})") from None


def tokenize(model_path: str | os.PathLike, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 token stream (BOS once at the start, as the model's
    tokenizer adds it)."""
    tokenizer = load_tokenizer(model_path)
    tokenizer.model_max_length = 1 << 62  # a long corpus, windowed later: no length warning
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_file(model_path: str | os.PathLike, text_file: str | os.PathLike) -> torch.Tensor:
    """Token stream of a text file (cached per model, file and file version: pruning several
    variants or evaluating several models on one corpus tokenizes it once)."""
    model, text = Path(model_path).resolve(), Path(text_file).resolve()
    if not text.is_file():
        raise CalibrationError(f"text file not found: {text_file}")
    stat = text.stat()
    return _tokenize_cached(str(model), str(text), stat.st_mtime_ns, stat.st_size).clone()


@functools.lru_cache(maxsize=4)
def _tokenize_cached(model: str, text: str, mtime_ns: int, size: int) -> torch.Tensor:
    return tokenize(model, read_text(text))


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, reproducible by `seed`."""
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CalibrationError(f"{name} must be an integer, got {value!r}")
    if nsamples <= 0 or seqlen <= 0:
        raise CalibrationError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    if tokens.numel() <= seqlen:
        raise CalibrationError(
            f"calibration text has {tokens.numel()} tokens; a window of seqlen={seqlen} needs "
            f"more than that (lower --seqlen or give more text)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [nsamples, seqlen]
    file: str
    sha256: str
    seed: int

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def record(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
        }


def load_calibration(
    model_path: str | os.PathLike,
    text_file: str | os.PathLike,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> CalibrationSet:
    tokens = tokenize_file(model_path, text_file)
    windows = sample_windows(tokens, nsamples, seqlen, seed)
    return CalibrationSet(windows, str(Path(text_file).resolve()), sha256_file(text_file), seed)


class LayerStream:
    """Hidden states of the calibration windows, advanced through the decoder one layer at a
    time.

    >>> stream = LayerStream(ckpt, calib.input_ids)
    >>> for index in range(ckpt.num_layers):
    ...     layer = stream.load_layer(index)
    ...     stream.forward(layer, index)        # collect statistics via hooks
    ...     modify(layer)
    ...     stream.advance(layer, index)        # outputs of the modified layer
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        input_ids: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.ckpt = ckpt
        self.cfg = hf_config(ckpt.config)
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = batch_size
        embed = ckpt.get_tensor("model.embed_tokens.weight")
        self.hidden = embed[input_ids].to(device=self.device, dtype=dtype)
        del embed
        seqlen = input_ids.shape[1]
        positions = torch.arange(seqlen, device=self.device)[None]
        rotary = build_rotary(self.cfg, self.device)
        with torch.no_grad():
            cos, sin = rotary(self.hidden[:1], positions)
        self.position_embeddings = (cos.to(dtype), sin.to(dtype))
        self.position_ids = positions
        self._masks: dict[int | None, torch.Tensor] = {}

    def load_layer(self, index: int) -> nn.Module:
        return build_layer(self.ckpt, self.cfg, index, self.dtype, self.device)

    def _mask(self, index: int) -> torch.Tensor:
        window = layer_sliding_window(self.cfg, index)
        if window not in self._masks:
            self._masks[window] = causal_mask(self.hidden.shape[1], self.dtype, self.device, window)
        return self._masks[window]

    def batches(self) -> Iterator[slice]:
        for start in range(0, self.hidden.shape[0], self.batch_size):
            yield slice(start, start + self.batch_size)

    def run_batch(self, layer: nn.Module, index: int, rows: slice) -> torch.Tensor:
        hidden = self.hidden[rows]
        cos, sin = self.position_embeddings
        batch = hidden.shape[0]
        return layer(
            hidden,
            attention_mask=self._mask(index),
            position_ids=self.position_ids.expand(batch, -1),
            position_embeddings=(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
        )

    @torch.no_grad()
    def forward(self, layer: nn.Module, index: int) -> torch.Tensor:
        """Outputs of `layer` for every calibration window (hooks on it see every batch)."""
        return torch.cat([self.run_batch(layer, index, rows) for rows in self.batches()])

    @torch.no_grad()
    def advance(self, layer: nn.Module, index: int) -> None:
        self.hidden = self.forward(layer, index)
