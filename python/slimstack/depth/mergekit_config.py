"""mergekit passthrough configs, read as users write them:

    slices:
      - sources:
          - model: ./Mistral-7B-v0.1
            layer_range: [0, 24]
      - sources:
          - model: ./Mistral-7B-v0.1
            layer_range: [8, 32]
    merge_method: passthrough
    dtype: bfloat16

Each slice takes the half-open layer range [a, b) of one model; the new model is the
slices' layers in order (that example is SOLAR's 48-layer up-scaling). Non-layer tensors
(embeddings, final norm, lm_head) and the config come from `base_model`, or from the first
slice's model. Anything this cannot do exactly (another merge method, several sources in a
slice, per-source parameters) is refused with a message rather than approximated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimstack.dtype_names import canonical_dtype

TOP_LEVEL_KEYS = ("slices", "merge_method", "dtype", "base_model", "tokenizer_source")
SOURCE_KEYS = ("model", "layer_range")


class MergeConfigError(ValueError):
    """A mergekit config slimstack cannot slice exactly."""


@dataclass(frozen=True)
class LayerSlice:
    model: Path
    start: int
    end: int  # exclusive, as mergekit's layer_range


@dataclass
class MergeConfig:
    slices: list[LayerSlice]
    base_model: Path
    dtype: str | None = None
    tokenizer_source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def resolve_model(ref: Any, where: str, base_dir: Path | None) -> Path:
    """A local model folder: as given (relative to the working directory), else relative to
    the config file's folder. Hub names are not downloaded."""
    if not isinstance(ref, str | os.PathLike) or not str(ref).strip():
        raise MergeConfigError(f"{where}: 'model' must be a path to a model folder, got {ref!r}")
    path = Path(os.path.expanduser(str(ref)))
    candidates = [path] if path.is_absolute() or base_dir is None else [path, base_dir / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise MergeConfigError(
        f"{where}: model folder {str(ref)!r} not found (looked for {tried}); slimstack reads "
        "local folders only: download the model first (e.g. huggingface-cli download "
        "REPO --local-dir DIR) and give its path"
    )


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise MergeConfigError(
            f"{where}: layer_range must be two integers [start, end) (end exclusive, as in "
            f"mergekit), got {value!r}"
        )
    start, end = value
    if start < 0 or start >= end:
        raise MergeConfigError(
            f"{where}: layer_range {list(value)} is empty or negative; it is half-open "
            "[start, end) with 0 <= start < end"
        )
    return start, end


def _check_keys(mapping: Mapping, allowed: tuple[str, ...], where: str, hint: str = "") -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise MergeConfigError(
            f"{where}: unsupported key(s) {', '.join(map(repr, unknown))}; supported: "
            f"{', '.join(allowed)}{hint}"
        )


def _parse_slice(
    index: int, item: Any, default_model: Path | None, base_dir: Path | None
) -> LayerSlice:
    where = f"slices[{index}]"
    if not isinstance(item, Mapping) or "sources" not in item:
        raise MergeConfigError(f"{where}: each slice needs 'sources: [ {{model, layer_range}} ]'")
    _check_keys(item, ("sources",), where, " (per-slice parameters are not supported)")
    sources = item["sources"]
    if not isinstance(sources, list) or len(sources) != 1:
        count = len(sources) if isinstance(sources, list) else "no list of"
        raise MergeConfigError(
            f"{where}: passthrough takes exactly one source per slice, got {count} sources "
            "(blending several models' layers is another merge method)"
        )
    source = sources[0]
    where = f"{where}.sources[0]"
    if not isinstance(source, Mapping):
        raise MergeConfigError(f"{where}: expected a mapping with model and layer_range")
    _check_keys(
        source, SOURCE_KEYS, where, " (per-source parameters such as scale are not supported)"
    )
    if "layer_range" not in source:
        raise MergeConfigError(f"{where}: missing layer_range [start, end)")
    if "model" in source:
        model = resolve_model(source["model"], where, base_dir)
    elif default_model is not None:
        model = default_model
    else:
        raise MergeConfigError(f"{where}: missing 'model'")
    return LayerSlice(model, *_layer_range(source["layer_range"], where))


def parse_config(
    raw: Any, default_model: Path | None = None, base_dir: Path | None = None
) -> MergeConfig:
    """A parsed mergekit mapping -> MergeConfig (paths resolved; layer counts not yet checked
    against the models: slicing does that when it opens them)."""
    if not isinstance(raw, Mapping):
        raise MergeConfigError("a mergekit config is a mapping with 'slices' and 'merge_method'")
    _check_keys(raw, TOP_LEVEL_KEYS, "config")
    method = raw.get("merge_method")
    if method != "passthrough":
        raise MergeConfigError(
            f"merge_method {method!r} is not supported: slimstack slices with "
            "merge_method: passthrough only (layer stacking; no weight blending)"
        )
    slices = raw.get("slices")
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError("config: 'slices' must be a non-empty list")
    parsed = [_parse_slice(i, item, default_model, base_dir) for i, item in enumerate(slices)]
    base = parsed[0].model
    if raw.get("base_model") is not None:
        base = resolve_model(raw["base_model"], "base_model", base_dir)
    dtype = raw.get("dtype")
    if dtype is not None:
        dtype = canonical_dtype(dtype, MergeConfigError)
    tokenizer = raw.get("tokenizer_source")
    if tokenizer in (None, "base"):
        tokenizer = None
    elif tokenizer == "union":
        raise MergeConfigError(
            "tokenizer_source: union is not supported (it builds a new vocabulary); use "
            "'base' or a model folder"
        )
    else:
        tokenizer = resolve_model(tokenizer, "tokenizer_source", base_dir)
    return MergeConfig(parsed, base, dtype, tokenizer, dict(raw))


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last,
    so a slice or step written twice would silently lose one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads an unquoted 20:28 as the base-60 integer 1228 and 1:30.5 as 90.5;
# a layer range written that way ("drop: 20:28") must stay the string the user typed, or it
# names other layers. A str resolver for that form, tried before SafeLoader's int and float
# ones (the first match wins), leaves every other scalar as SafeLoader reads it (YAML 1.2
# has no base-60 numbers either).
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_AS_STRING = [("tag:yaml.org,2002:str", _SEXAGESIMAL)]
_StrictLoader.yaml_implicit_resolvers = {
    first: (_AS_STRING if first and first in "+-0123456789" else []) + resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (a yaml.YAMLError) and keeping 20:28 a string."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """The parser's message, plus the fix for the one mistake layer ranges invite."""
    hint = ""
    if "mapping values are not allowed" in str(exc):
        hint = "; a layer range ending in ':' (like -4: or 20:) must be quoted, as in drop: '-4:'"
    return f"{path}: not valid YAML ({exc}){hint}"


def load_config(
    config: str | os.PathLike | Mapping, default_model: Path | None = None
) -> MergeConfig:
    """From a YAML file (paths relative to the working directory or to the file) or from
    an already-parsed mapping."""
    if isinstance(config, Mapping):
        return parse_config(config, default_model, None)
    path = Path(config)
    if not path.is_file():
        raise MergeConfigError(f"slice config not found: {path}")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeConfigError(yaml_error(path, exc)) from None
    return parse_config(raw, default_model, path.resolve().parent)
