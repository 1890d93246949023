"""Hugging Face checkpoint folders, read: validated, lazy, and what slimstack.json says.

Reading never loads the whole model: tensors come one at a time from safetensors files
(positional reads of the byte range the header gives), so pruning or slicing a 7B
checkpoint needs about one decoder layer of memory. Writing is checkpoint_writer.py's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# one list of families and one config parser for every tool: the offline tools' outputs are
# meant for the engine, so they refuse, up front and in the same words, what it cannot run
from slimstack.engine.config import SUPPORTED_MODEL_TYPES, ConfigError, EngineConfig, engine_config

# Buffers older transformers releases saved inside a layer and every reader recomputes from
# config.json: read past, never loaded or written out.
RECOMPUTED_LAYER_BUFFERS = ("self_attn.rotary_emb.inv_freq",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
METADATA_FILE = "slimstack.json"
INDEX_FILE = "model.safetensors.index.json"
LAYER_PREFIX = "model.layers."
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Tensors every decoder layer of the supported families has (biases are optional: qwen2).
REQUIRED_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read, or a target that cannot be written."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header and length without reading tensor data.

    A truncated download or a corrupt header raises CheckpointError naming the file,
    instead of failing later inside a kernel.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {header_len} "
                f"bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + header_len
    entries = {}
    for name, entry in header.items():
        stored = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(stored, str) and stored not in _SAFETENSORS_DTYPES:
            # a valid file in a format we do not read (FP8, quantized): say so, not "corrupt"
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {stored}, which slimstack does not "
                f"read; supported: {', '.join(_SAFETENSORS_DTYPES)} (dequantize first)"
            )
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt offsets for tensor {name!r}")
        entries[name] = TensorEntry(path.name, dtype, shape, base + begin, base + end)
    expected = max((e.end for e in entries.values()), default=base)
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {size} bytes, its header needs {expected} "
            "(an interrupted download or copy?)"
        )
    return entries


def _read_tensor(path: Path, entry: TensorEntry) -> torch.Tensor:
    """Plain positional reads, no mmap: the pages of a 7B checkpoint never pile up in this
    process's RSS, and a tensor's memory is freed as soon as the caller drops it."""
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(entry.start)
        view = memoryview(buffer.numpy()).cast("B")
        filled = 0
        while filled < len(view):
            got = f.readinto(view[filled:])
            if not got:
                raise CheckpointError(f"{path}: unexpected end of file reading a tensor")
            filled += got
    return buffer.view(entry.dtype).reshape(entry.shape)


@dataclass
class Checkpoint:
    """A validated Hugging Face model folder, read lazily tensor by tensor."""

    path: Path
    config: dict[str, Any]
    entries: dict[str, TensorEntry]  # tensor name -> file, dtype, shape, byte range
    _resolved: EngineConfig | None = field(default=None, init=False, repr=False, compare=False)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, check_layers: bool = True) -> Checkpoint:
        folder = Path(path)
        if not folder.exists():
            raise CheckpointError(f"model folder not found: {folder}")
        if not folder.is_dir():
            raise CheckpointError(f"expected a model folder, got a file: {folder}")
        config = read_config(folder)
        ckpt = cls(path=folder, config=config, entries=_read_entries(folder))
        resolved = ckpt.engine_config()
        if check_layers:
            ckpt.check_layers()
            check_shapes(ckpt, resolved)
        return ckpt

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can use `with`."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- facts
    def engine_config(self) -> EngineConfig:
        """The config resolved as the engine runs it. Refused here, for every tool in the same
        words: what the engine cannot run, and what transformers refuses. transformers' config
        is what the offline tools build their layers from and what the engine's tokenizer
        loads, and since 5.x it wants every rope parameter written out (yarn's `factor`,
        llama3's `low_freq_factor` / `high_freq_factor`) where the engine would derive them.
        Resolved once (open() runs it): the loader asks again and gets the same object."""
        if self._resolved is not None:
            return self._resolved
        where = self.path / "config.json"
        try:
            resolved = engine_config(self.config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        from slimstack.hf_layers import hf_config  # transformers (and hf_layers imports this)

        try:
            hf_config(self.config)
        except (KeyError, ValueError, TypeError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ConfigError(f"{where}: transformers refuses this config: {reason}") from None
        self._resolved = resolved
        return resolved

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        return getattr(torch, name) if isinstance(name, str) else torch.float32

    def weight_files(self) -> list[Path]:
        return [self.path / name for name in sorted({e.file for e in self.entries.values()})]

    def weight_hashes(self) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in self.weight_files()}

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def tensor_names(self) -> list[str]:
        return list(self.entries)

    def layer_names(self, index: int) -> list[str]:
        """Full tensor names of decoder layer `index`."""
        self._check_layer_index(index)
        prefix = f"{LAYER_PREFIX}{index}."
        return [
            n
            for n in self.entries
            if n.startswith(prefix) and n[len(prefix) :] not in RECOMPUTED_LAYER_BUFFERS
        ]

    def non_layer_names(self) -> list[str]:
        return [n for n in self.entries if not n.startswith(LAYER_PREFIX)]

    # ---------------------------------------------------------------- reading
    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        return _read_tensor(self.path / entry.file, entry)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        return self._entry(name).shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of one decoder layer, keyed by their name inside the layer."""
        prefix = f"{LAYER_PREFIX}{index}."
        return {n[len(prefix) :]: self.get_tensor(n) for n in self.layer_names(index)}

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get_tensor(name)

    # ---------------------------------------------------------------- checks
    def _check_layer_index(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise CheckpointError(
                f"layer index {index} out of range: {self.path.name} has layers "
                f"0..{self.num_layers - 1}"
            )

    def check_layers(self) -> None:
        """Every decoder layer has every tensor its family needs; no stray layers."""
        present: dict[int, set[str]] = {}
        for name in self.entries:
            match = _LAYER_RE.match(name)
            if match:
                present.setdefault(int(match.group(1)), set()).add(match.group(2))
        extra = sorted(i for i in present if i >= self.num_layers)
        if extra:
            raise CheckpointError(
                f"{self.path}: weights for layer {extra[0]} but config.json says "
                f"num_hidden_layers={self.num_layers}"
            )
        for index in range(self.num_layers):
            missing = [t for t in REQUIRED_LAYER_TENSORS if t not in present.get(index, set())]
            if missing:
                raise CheckpointError(
                    f"{self.path}: layer {index} is missing tensors: "
                    + ", ".join(f"{LAYER_PREFIX}{index}.{t}" for t in missing)
                )
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.config.get("tie_word_embeddings", False):
            needed.append("lm_head.weight")  # untied: transformers would initialise it at random
        missing = [name for name in needed if name not in self.entries]
        if missing:
            raise CheckpointError(
                f"{self.path}: missing {', '.join(missing)}"
                + (
                    " (config.json says tie_word_embeddings=false)"
                    if "lm_head.weight" in missing
                    else ""
                )
            )


# the projections of a decoder layer's attention and MLP, in the order the families hold them
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# the linears of a decoder layer, by their names inside it (every supported family)
LAYER_LINEARS = tuple(f"self_attn.{n}" for n in ATTENTION_PROJ) + tuple(
    f"mlp.{n}" for n in MLP_PROJ
)


def expected_shapes(
    config: EngineConfig,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(top-level name -> shape, name within a decoder layer -> shape) of every tensor the
    decoder stack reads, from the config alone (biases included where a family has them)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    top = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "lm_head.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": hidden,
            "gate_proj": inter, "up_proj": inter, "down_proj": hidden}  # fmt: skip
    cols = {"o_proj": q_rows, "down_proj": inter}
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    for module, names in (("self_attn", ATTENTION_PROJ), ("mlp", MLP_PROJ)):
        for name in names:
            layer[f"{module}.{name}.weight"] = (rows[name], cols.get(name, hidden))
            layer[f"{module}.{name}.bias"] = (rows[name],)
    return top, layer


def implied_biases(config: EngineConfig) -> dict[str, bool]:
    """Projection (name within a layer, e.g. "self_attn.q_proj") -> whether it has a bias."""
    has = {f"self_attn.{name}": config.qkv_bias for name in ATTENTION_PROJ[:3]}
    has["self_attn.o_proj"] = config.o_bias
    return {**has, **{f"mlp.{name}": config.mlp_bias for name in MLP_PROJ}}


def check_shapes(ckpt: Checkpoint, config: EngineConfig) -> None:
    """Refuse a folder whose tensors do not have the shapes its config.json implies (an
    edited config, or weights from another model), or that lacks a bias the config implies
    or holds one it does not, before anything is read: otherwise the first sign would be a
    size mismatch deep inside a pruning pass or generate(), or a silently ignored bias.
    Every tool runs this (Checkpoint.open), so they all refuse the same folders."""
    top, layer = expected_shapes(config)
    wanted = dict(top)
    for index in range(config.num_layers):
        wanted.update({f"{LAYER_PREFIX}{index}.{name}": shape for name, shape in layer.items()})
    for name, shape in wanted.items():
        if name in ckpt and ckpt.tensor_shape(name) != shape:
            raise CheckpointError(
                f"{ckpt.path}: {name} has shape {list(ckpt.tensor_shape(name))}, but config.json "
                f"implies {list(shape)} (hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
                f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, "
                f"head_dim={config.head_dim})"
            )
    for index in range(config.num_layers):
        prefix = f"{LAYER_PREFIX}{index}."
        unknown = [n for n in ckpt.layer_names(index) if n[len(prefix) :] not in layer]
        if unknown:
            raise CheckpointError(
                f"{ckpt.path}: {unknown[0]} is not a tensor of a {config.model_type} decoder "
                f"layer (a layer holds: {', '.join(sorted(layer))})"
            )
    biases = implied_biases(config)
    for index in range(config.num_layers):
        for module, implied in biases.items():
            name = f"{LAYER_PREFIX}{index}.{module}.bias"
            if implied != (name in ckpt):
                raise CheckpointError(
                    f"{ckpt.path}: "
                    + (
                        f"config.json implies {name}, but the weights lack it"
                        if implied
                        else f"the weights hold {name}, but config.json implies no bias there"
                    )
                    + f" (model_type={config.model_type!r}, "
                    f"attention_bias={ckpt.config.get('attention_bias', False)}, "
                    f"mlp_bias={ckpt.config.get('mlp_bias', False)})"
                )


def read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{folder}: unsupported model_type {model_type!r}; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{config_path}: missing or invalid {key!r}")
    return config


def _read_entries(folder: Path) -> dict[str, TensorEntry]:
    index_path = folder / INDEX_FILE
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards and not index_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle checkpoints found ({', '.join(pickles)}); slimstack "
                "loads safetensors only, because unpickling can run arbitrary code. Convert "
                "with transformers: model.save_pretrained(out, safe_serialization=True)"
            )
        raise CheckpointError(f"{folder}: no *.safetensors weight files")
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: corrupt index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: index names missing shard(s): {', '.join(missing)}")
        headers = {file: _read_safetensors_header(folder / file) for file in files}
        entries = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(
                    f"{folder / file}: index lists {name!r} but the shard does not hold it"
                )
            entries[name] = headers[file][name]
        return entries
    entries = {}
    for file in shards:
        for name, entry in _read_safetensors_header(folder / file).items():
            if name in entries:
                raise CheckpointError(f"{folder}: tensor {name!r} appears in two shards")
            entries[name] = entry
    return entries


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    return Checkpoint.open(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's slimstack.json, or None when it was not written by slimstack."""
    meta_path = Path(path) / METADATA_FILE
    if not meta_path.is_file():
        return None
    try:
        return json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None


def source_record(ckpt: Checkpoint) -> dict[str, Any]:
    """What slimstack.json says about a source model: where, what, and its weights' hashes."""
    return {
        "path": str(ckpt.path.resolve()),
        "model_type": ckpt.model_type,
        "num_hidden_layers": ckpt.num_layers,
        "weights_sha256": ckpt.weight_hashes(),
    }
