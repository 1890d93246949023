"""`slimstack slice`: drop, keep, reorder or repeat decoder layers, from one model or from
several of the same architecture and width, into a standard Hugging Face folder.

Every way of asking (--drop, --keep, a mergekit passthrough config, a criterion's pick)
becomes a plan: the source (model, layer) of each new layer. The plan is checked in full
(ranges, architectures, widths, tensor names and shapes) before anything is written, and
the folder is written atomically, so a bad request leaves nothing behind. Repeated layers
are written as full copies, so every tool loads the result; slimstack.json's layer_map
records where each came from so the engine can keep one copy in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slimstack.checkpoint import (
    LAYER_PREFIX,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointError,
    read_metadata,
    source_record,
)
from slimstack.checkpoint_writer import CheckpointWriter, check_target
from slimstack.depth.layer_ranges import drop_to_keep, format_layers, keep_layers
from slimstack.depth.mergekit_config import MergeConfig, load_config
from slimstack.devices import resolve_device
from slimstack.dtype_names import canonical_dtype

# config lists that are not per-layer even when their length happens to equal the depth
NOT_PER_LAYER = frozenset(
    {"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "suppress_tokens"}
)
# steps recorded in slimstack.json that leave the weights as they were
READ_ONLY_OPS = frozenset({"eval"})
# what must match for layers of two models to be stacked
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class SliceError(ValueError):
    """A slice request that cannot be carried out."""


@dataclass(frozen=True)
class LayerSource:
    model: Path
    layer: int


@dataclass
class SlicePlan:
    base: Path  # config, embeddings, final norm, lm_head
    layers: list[LayerSource]
    spec: dict[str, Any]  # how it was asked for, recorded in slimstack.json
    dtype: str | None = None
    tokenizer_from: Path | None = None


@dataclass
class SliceReport:
    output: Path
    num_layers: int
    source_layers: int
    layer_map: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    layers: str | None = None  # the source layers in order ("0:3,4"), when one model gave all

    def summary(self) -> str:
        which = f" (layers {self.layers})" if self.layers else ""
        return (
            f"sliced {self.source_layers} -> {self.num_layers} layers{which} in "
            f"{self.seconds:.1f} s -> {self.output}"
        )


# ----------------------------------------------------------------------------- plans
def layer_specs(value: Any) -> Any:
    """Integers (drop=3, YAML's reading of `drop: 3`) as the layer specs they stand for;
    anything else as given, for the range parser to accept or refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def plan_drop(model: str | os.PathLike, drop: str | int | Sequence[str | int]) -> SlicePlan:
    path = Path(model)
    depth = _depth(path)
    kept = drop_to_keep(layer_specs(drop), depth)
    dropped = [i for i in range(depth) if i not in set(kept)]
    spec = {"mode": "drop", "drop": format_layers(dropped), "keep": format_layers(kept)}
    return SlicePlan(path, [LayerSource(path, i) for i in kept], spec)


def plan_keep(model: str | os.PathLike, keep: str | int | Sequence[str | int]) -> SlicePlan:
    path = Path(model)
    kept = keep_layers(layer_specs(keep), _depth(path))
    spec = {"mode": "keep", "keep": format_layers(kept)}
    return SlicePlan(path, [LayerSource(path, i) for i in kept], spec)


def plan_config(
    config: str | os.PathLike | Mapping | MergeConfig, default_model: Path | None = None
) -> SlicePlan:
    merge = config if isinstance(config, MergeConfig) else load_config(config, default_model)
    layers = [LayerSource(s.model, i) for s in merge.slices for i in range(s.start, s.end)]
    spec = {
        "mode": "config",
        "merge_method": "passthrough",
        "slices": [
            {"model": str(s.model.resolve()), "layer_range": [s.start, s.end]} for s in merge.slices
        ],
    }
    if not isinstance(config, Mapping | MergeConfig):
        spec["config_file"] = str(Path(config).resolve())
    return SlicePlan(merge.base_model, layers, spec, merge.dtype, merge.tokenizer_source)


def plan_criterion(
    model: str | os.PathLike,
    criterion: str,
    n: int,
    scores: str | os.PathLike | Mapping | None = None,
    calib: str | os.PathLike | None = None,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SlicePlan:
    """Drop the `n` layers `criterion` picks: from an analysis' scores.json when given (it
    must be of this very model), else by scoring now on `calib`."""
    from slimstack.depth.selection import canonical_criterion, layers_to_drop

    path = Path(model)
    name = canonical_criterion(criterion)
    if scores is not None:
        result, origin = _scores_from_analysis(path, name, scores)
    else:
        result, origin = _score_now(path, name, calib, nsamples, seqlen, seed, device, progress)
    dropped = layers_to_drop(result, name, n)
    depth = _depth(path)
    if len(dropped) >= depth:
        raise SliceError(f"dropping {n} of {depth} layers leaves none")
    kept = [i for i in range(depth) if i not in set(dropped)]
    spec = {
        "mode": "criterion",
        "criterion": name,
        "n": n,
        "drop": format_layers(dropped),
        "keep": format_layers(kept),
        "scores": origin,
    }
    return SlicePlan(path, [LayerSource(path, i) for i in kept], spec)


def _depth(path: Path) -> int:
    with Checkpoint.open(path) as ckpt:
        return ckpt.num_layers


def _scores_from_analysis(
    path: Path, name: str, scores: str | os.PathLike | Mapping
) -> tuple[dict[str, Any], Any]:
    from slimstack.depth.analyze import SCORES_FILE

    origin: Any = "inline"
    if not isinstance(scores, Mapping):
        file = Path(scores)
        file = file / SCORES_FILE if file.is_dir() else file
        if not file.is_file():
            raise SliceError(f"scores file not found: {file} (run slimstack analyze first)")
        try:
            scores = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SliceError(f"{file}: not valid JSON ({exc})") from None
        origin = str(file.resolve())
    criteria = scores.get("criteria", {}) if isinstance(scores, Mapping) else {}
    if name not in criteria:
        have = ", ".join(criteria) or "none"
        raise SliceError(f"the analysis has no {name!r} scores (it has: {have}); re-run analyze")
    with Checkpoint.open(path) as ckpt:
        hashes = ckpt.weight_hashes()
    analysed = scores.get("model", {}).get("weights_sha256")
    if analysed != hashes:
        raise SliceError(
            f"the analysis was made for another model ({scores.get('model', {}).get('path')}), "
            f"not for {path}: its weights differ; analyse this model first"
        )
    return criteria[name], origin


def _score_now(
    path: Path,
    name: str,
    calib: str | os.PathLike | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    device: str | torch.device | None,
    progress: bool,
) -> tuple[dict[str, Any], Any]:
    from slimstack.calibration import load_calibration
    from slimstack.depth.analyze import check_settings, score_layers

    if calib is None and name != "snr":
        raise SliceError(
            f"--criterion {name} needs the analysis: give --scores REPORT/scores.json or "
            "--calib FILE to score the layers now"
        )
    device = resolve_device(device)
    with Checkpoint.open(path) as ckpt:
        if name != "snr":  # as analyze refuses them: windows past the context, seqlen < 2
            check_settings(ckpt, seqlen, "last", "float32")
        calibration = (
            load_calibration(path, calib, nsamples, seqlen, seed) if name != "snr" else None
        )
        results, _ = score_layers(
            ckpt,
            calibration.input_ids if calibration is not None else None,
            [name],
            device=device,
            progress=progress,
        )
    origin = {"calibration": calibration.record() if calibration is not None else None}
    return results[name], origin


# ----------------------------------------------------------------------------- checks
def _width(config: dict[str, Any]) -> dict[str, Any]:
    width = {k: config.get(k) for k in WIDTH_KEYS}
    if width["num_key_value_heads"] is None:
        width["num_key_value_heads"] = config["num_attention_heads"]
    width["head_dim"] = (
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    return width


def _check_compatible(base: Checkpoint, other: Checkpoint) -> None:
    if other.model_type != base.model_type:
        raise SliceError(
            f"cannot stack layers of different architectures: {base.path} is "
            f"{base.model_type!r}, {other.path} is {other.model_type!r}"
        )
    base_width, other_width = _width(base.config), _width(other.config)
    for key, value in base_width.items():
        if other_width[key] != value:
            raise SliceError(
                f"cannot stack layers of different widths: {key} is {value} in {base.path} "
                f"but {other_width[key]} in {other.path}"
            )
    # what a layer computes with beyond its tensors: the output's config is the base's, so
    # layers trained with another rope or norm epsilon would run as a model nobody trained;
    # another vocabulary means another model family, whose layers never saw these embeddings
    ours, theirs = base.engine_config(), other.engine_config()
    settings = {"vocab_size": (ours.vocab_size, theirs.vocab_size)}
    settings["rms_norm_eps"] = (ours.rms_norm_eps, theirs.rms_norm_eps)
    for rope_field in dataclasses.fields(ours.rope):  # name the rope setting that differs
        name = rope_field.name
        settings[f"rope {name}"] = (getattr(ours.rope, name), getattr(theirs.rope, name))
    for key, (value, other_value) in settings.items():
        if value != other_value:
            raise SliceError(
                f"cannot stack layers of models with different {key}: {value} in {base.path} "
                f"but {other_value} in {other.path} (the output takes its config and embeddings "
                f"from {base.path})"
            )
    base_shapes = _layer_shapes(base, 0)
    other_shapes = _layer_shapes(other, 0)
    if base_shapes != other_shapes:
        differ = sorted(set(base_shapes.items()) ^ set(other_shapes.items()))
        raise SliceError(
            f"layers of {base.path} and {other.path} hold different tensors "
            f"(first difference: {differ[0][0]}); they cannot be stacked"
        )


def _layer_shapes(ckpt: Checkpoint, index: int) -> dict[str, tuple[int, ...]]:
    prefix = f"{LAYER_PREFIX}{index}."
    return {n[len(prefix) :]: ckpt.tensor_shape(n) for n in ckpt.layer_names(index)}


def _open_sources(plan: SlicePlan) -> dict[Path, Checkpoint]:
    """Open and cross-check every model the plan reads (resolved paths as keys)."""
    if not plan.layers:
        raise SliceError("the slice plan has no layers; at least one must remain")
    ckpts: dict[Path, Checkpoint] = {}
    for path in [plan.base, *(s.model for s in plan.layers)]:
        key = path.resolve()
        if key not in ckpts:
            ckpts[key] = Checkpoint.open(path)
    base = ckpts[plan.base.resolve()]
    for ckpt in ckpts.values():
        if ckpt is not base:
            _check_compatible(base, ckpt)
    for position, source in enumerate(plan.layers):
        depth = ckpts[source.model.resolve()].num_layers
        if not 0 <= source.layer < depth:
            raise SliceError(
                f"new layer {position} asks for layer {source.layer} of {source.model}, which "
                f"has layers 0..{depth - 1} (a layer_range past the end?)"
            )
    return ckpts


# ----------------------------------------------------------------------------- writing
def sliced_config(plan: SlicePlan, ckpts: dict[Path, Checkpoint]) -> dict[str, Any]:
    """The base config at the new depth, with every per-layer list re-indexed by the plan."""
    from slimstack.hf_layers import hf_config

    base = ckpts[plan.base.resolve()]
    config = copy.deepcopy(base.config)
    per_layer = _per_layer_lists(base.config, base.num_layers)
    derived = getattr(hf_config(base.config), "layer_types", None)
    if "layer_types" not in per_layer and isinstance(derived, list):
        # e.g. qwen2 derives layer_types from max_window_layers: write it out, or the new
        # depth would re-derive different types for the moved layers
        per_layer.append("layer_types")
    for key in per_layer:
        config[key] = [_layer_entry(ckpts[s.model.resolve()], key, s.layer) for s in plan.layers]
    config["num_hidden_layers"] = len(plan.layers)
    if plan.dtype is not None:
        config["dtype"] = plan.dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = plan.dtype
    return config


def _check_windows(plan: SlicePlan, ckpts: dict[Path, Checkpoint], config: dict[str, Any]) -> None:
    """Every new layer must attend over the window it had in its source model. The output
    has one sliding_window (the base's), so a layer of another model with another window,
    or with one where the base has none, would run differently or not load at all."""
    from slimstack.engine.config import ConfigError, engine_config

    try:
        windows: list[int | None] | None = list(engine_config(config).sliding_windows)
        failure = None
    except ConfigError as exc:  # sliding layers where the base's config has no window
        windows, failure = None, exc
    for position, source in enumerate(plan.layers):
        own = ckpts[source.model.resolve()].engine_config().sliding_windows[source.layer]
        new = windows[position] if windows is not None else None
        if new != own:
            raise SliceError(
                f"new layer {position} (layer {source.layer} of {source.model}) attends over "
                f"{_window(own)} there but would attend over {_window(new)} with "
                f"{plan.base}'s config; models with different sliding windows cannot be stacked"
            )
    if failure is not None:
        raise SliceError(f"the sliced config would not load: {failure}")


def _check_tokenizer(folder: Path, base: Checkpoint) -> None:
    """A tokenizer_source must hold a tokenizer (the output would have none, silently) of
    the base's vocabulary (ids past the embeddings fail, others name other tokens)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SliceError(
            f"tokenizer_source {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        )
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            vocab = json.loads(config_file.read_text()).get("vocab_size")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            vocab = None  # not a model's config: nothing to compare
        if isinstance(vocab, int) and vocab != base.engine_config().vocab_size:
            raise SliceError(
                f"tokenizer_source {folder} is of a model with vocab_size {vocab}, but the "
                f"embeddings come from {base.path} (vocab_size "
                f"{base.engine_config().vocab_size}); slimstack does not resize embeddings"
            )


def _window(size: int | None) -> str:
    return f"a window of {size} tokens" if size else "all tokens"


def _per_layer_lists(config: dict[str, Any], depth: int) -> list[str]:
    return [
        key
        for key, value in config.items()
        if isinstance(value, list) and len(value) == depth and key not in NOT_PER_LAYER
    ]


def _layer_entry(ckpt: Checkpoint, key: str, layer: int) -> Any:
    values = ckpt.config.get(key)
    if not (isinstance(values, list) and len(values) == ckpt.num_layers):
        from slimstack.hf_layers import hf_config

        values = getattr(hf_config(ckpt.config), key, None)
    if not (isinstance(values, list) and len(values) == ckpt.num_layers):
        raise SliceError(f"{ckpt.path}: config has no per-layer {key!r} list to take from")
    return values[layer]


def _layer_map(plan: SlicePlan) -> list[dict[str, Any]]:
    """Where each new layer's tensors come from. When a source folder is itself an unmodified
    slice (its last step), its own map is followed, so layers repeated across slicings are
    still recognised as one."""
    maps: dict[Path, list | None] = {}
    entries = []
    for source in plan.layers:
        key = source.model.resolve()
        if key not in maps:
            meta = read_metadata(key) or {}
            changes = [s for s in meta.get("steps", []) if s.get("op") not in READ_ONLY_OPS]
            last = changes[-1].get("op") if changes else None
            maps[key] = meta.get("layer_map") if last == "slice" else None
        inherited = maps[key]
        if inherited and source.layer < len(inherited):
            entries.append(dict(inherited[source.layer]))
        else:
            entries.append({"model": str(key), "layer": source.layer})
    return entries


def _convert(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(getattr(torch, dtype))


def write_plan(
    plan: SlicePlan, out: str | os.PathLike, overwrite: bool = False, progress: bool = True
) -> SliceReport:
    start = time.perf_counter()
    out = Path(out)
    ckpts = _open_sources(plan)
    # not a source model (the tokenizer's too), nor a folder holding one
    inputs = [*ckpts, plan.tokenizer_from]
    try:
        check_target(out, overwrite, inputs)
        if plan.dtype is not None:
            plan = dataclasses.replace(plan, dtype=canonical_dtype(plan.dtype, SliceError))
        base = ckpts[plan.base.resolve()]
        if plan.tokenizer_from is not None:
            _check_tokenizer(plan.tokenizer_from, base)
        config = sliced_config(plan, ckpts)
        _check_windows(plan, ckpts, config)
        layer_map = _layer_map(plan)
        with CheckpointWriter(out, overwrite=overwrite, inputs=inputs) as writer:
            for name in base.non_layer_names():
                writer.add(name, _convert(base.get_tensor(name), plan.dtype))
            bar = tqdm(plan.layers, desc="slice", unit="layer", disable=not progress)
            for position, source in enumerate(bar):
                ckpt = ckpts[source.model.resolve()]
                for name, tensor in ckpt.layer_tensors(source.layer).items():
                    writer.add(f"{LAYER_PREFIX}{position}.{name}", _convert(tensor, plan.dtype))
            bar.close()
            seconds = time.perf_counter() - start
            step = {
                "op": "slice",
                **plan.spec,
                "dtype": plan.dtype,
                "source_layers": base.num_layers,
                "num_hidden_layers": len(plan.layers),
                "layer_map": layer_map,
                "seconds": round(seconds, 3),
            }
            writer.finish(
                config,
                _metadata(plan, ckpts, step, layer_map),
                tokenizer_from=plan.tokenizer_from or base.path,
            )
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    return SliceReport(
        output=out,
        num_layers=len(plan.layers),
        source_layers=base.num_layers,
        layer_map=layer_map,
        seconds=time.perf_counter() - start,
        layers=format_layers([s.layer for s in plan.layers])
        if len({s.model.resolve() for s in plan.layers}) == 1
        else None,
    )


def _metadata(
    plan: SlicePlan,
    ckpts: dict[Path, Checkpoint],
    step: dict[str, Any],
    layer_map: list[dict[str, Any]],
) -> dict[str, Any]:
    base = ckpts[plan.base.resolve()]
    previous = read_metadata(base.path) or {}
    meta: dict[str, Any] = {"source": source_record(base)}
    if len(ckpts) > 1:
        meta["sources"] = [source_record(c) for c in ckpts.values()]
    meta["layer_map"] = layer_map
    meta["steps"] = [*previous.get("steps", []), step]
    return meta


# ----------------------------------------------------------------------------- API
def make_plan(
    model: str | os.PathLike | None = None,
    *,
    drop: str | int | Sequence[str | int] | None = None,
    keep: str | int | Sequence[str | int] | None = None,
    config: str | os.PathLike | Mapping | None = None,
    criterion: str | None = None,
    n: int | None = None,
    scores: str | os.PathLike | Mapping | None = None,
    calib: str | os.PathLike | None = None,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SlicePlan:
    """Exactly one of drop / keep / config / criterion (with n) says what to keep."""
    given = [k for k, v in (("drop", drop), ("keep", keep), ("config", config)) if v is not None]
    if criterion is not None:
        given.append("criterion")
    if len(given) != 1:
        raise SliceError(
            "say what to slice with exactly one of --drop, --keep, --config or --criterion "
            f"(got {', '.join(given) or 'none'})"
        )
    if n is not None and criterion is None:
        raise SliceError("--n goes with --criterion (the number of layers it should drop)")
    for name, value in (("--scores", scores), ("--calib", calib)):
        if value is not None and criterion is None:
            raise SliceError(f"{name} goes with --criterion (it scores layers to drop)")
    if config is None and model is None:
        raise SliceError("a model folder is needed (only --config names its own models)")
    if config is not None:
        plan = plan_config(config, Path(model) if model is not None else None)
        used = {Path(source["model"]) for source in plan.spec["slices"]}
        if model is not None and Path(model).resolve() not in used:
            raise SliceError(
                f"model {model} is not used: every slice of the config names its own model "
                f"({', '.join(sorted(map(str, used)))}); leave MODEL out with --config"
            )
    elif drop is not None:
        plan = plan_drop(model, drop)
    elif keep is not None:
        plan = plan_keep(model, keep)
    else:
        if n is None:
            raise SliceError("--criterion needs --n, the number of layers to drop")
        plan = plan_criterion(
            model, criterion, n, scores, calib, nsamples, seqlen, seed, device, progress
        )
    if dtype is not None:
        plan.dtype = canonical_dtype(dtype, SliceError)
    return plan


def slice_model(
    model: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    drop: str | int | Sequence[str | int] | None = None,
    keep: str | int | Sequence[str | int] | None = None,
    config: str | os.PathLike | Mapping | None = None,
    criterion: str | None = None,
    n: int | None = None,
    scores: str | os.PathLike | Mapping | None = None,
    calib: str | os.PathLike | None = None,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SliceReport:
    """Write a copy of `model` with some layers dropped, kept, reordered or repeated.

    >>> slice_model("Mistral-7B", "m24", drop="20:28")
    >>> slice_model(out="solar", config="solar.yaml")          # mergekit passthrough
    >>> slice_model("Mistral-7B", "m24", criterion="angular", n=8, scores="report/")
    """
    if out is None:
        raise SliceError("an output folder is needed (--out DIR)")
    out_path = Path(out)
    if out_path.exists() and not overwrite:  # refuse before scoring or reading anything
        raise CheckpointError(f"output folder already exists: {out_path} (use --overwrite)")
    plan = make_plan(
        model,
        drop=drop,
        keep=keep,
        config=config,
        criterion=criterion,
        n=n,
        scores=scores,
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    return write_plan(plan, out_path, overwrite=overwrite, progress=progress)
