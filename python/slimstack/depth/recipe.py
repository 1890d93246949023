"""`slimstack apply recipe.yaml`: chain slice, prune and eval steps into one output folder.

    model: ./Mistral-7B-v0.1
    out: ./mistral-24L-wanda24
    steps:
      - slice:
          drop: "24:32"                 # or keep, config: FILE, inline slices:, criterion + n
      - prune:
          method: wanda
          sparsity: "2:4"
          calib: ./wikitext-2/valid.txt
      - eval:
          text: ./wikitext-2/test.txt   # perplexity, KL and top-1 agreement vs the source

Input paths are taken as given (relative to the working directory) or, failing that,
relative to the recipe's folder; `out` in the recipe is relative to the recipe's folder.
The whole recipe is checked before any work starts. Each step writes into a staging folder
beside the output; only when every step has succeeded is the last one renamed into place,
with a slimstack.json that records the source and every step, evaluations included.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from slimstack.checkpoint import (
    LAYER_LINEARS,
    LAYER_PREFIX,
    METADATA_FILE,
    Checkpoint,
    read_metadata,
    source_record,
)
from slimstack.checkpoint_writer import check_target, replace_folder
from slimstack.depth.layer_ranges import drop_to_keep, keep_layers
from slimstack.depth.mergekit_config import TOP_LEVEL_KEYS as MERGEKIT_KEYS
from slimstack.depth.mergekit_config import load_yaml, yaml_error
from slimstack.depth.selection import canonical_criterion
from slimstack.depth.slicing import layer_specs
from slimstack.dtype_names import canonical_dtype

RECIPE_KEYS = ("model", "out", "device", "steps")
STEP_KEYS = {
    "slice": (
        "drop", "keep", "config", "criterion", "n", "scores", "calib", "nsamples", "seqlen",
        "seed", *MERGEKIT_KEYS,  # dtype among them: a slice's and a mergekit config's
    ),
    "prune": ("method", "sparsity", "calib", "nsamples", "seqlen", "seed", "include", "exclude"),
    "eval": ("text", "seqlen", "batch_size", "max_windows", "reference"),
}  # fmt: skip
PATH_KEYS = {"config", "scores", "calib", "text", "reference"}
# a slice step's settings beside its mode key: anything else given with that mode would be
# silently ignored by the run (tokenizer_source beside drop:, n beside keep:), so it is refused
CRITERION_KEYS = ("n", "scores", "calib", "nsamples", "seqlen", "seed")
SLICE_MODE_KEYS = {
    "drop": ("dtype",),
    "keep": ("dtype",),
    "criterion": (*CRITERION_KEYS, "dtype"),
    "config": ("dtype",),  # tokenizer_source, base_model, ... belong in the config file
    "slices": tuple(k for k in MERGEKIT_KEYS if k != "slices"),
}


class RecipeError(ValueError):
    """A recipe that cannot be run as written."""


@dataclass
class Step:
    op: str
    params: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        return f"step {self.index + 1} ({self.op})"


@dataclass
class Recipe:
    model: Path
    steps: list[Step]
    out: Path | None = None
    device: str | None = None
    file: Path | None = None
    text: str = ""


@dataclass
class RecipeReport:
    output: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"applied {len(self.steps)} steps in {self.seconds:.1f} s -> {self.output}"]
        for number, step in enumerate(self.steps, 1):
            lines.append(f"  {number}. {_describe(step)}")
        return "\n".join(lines)


def _describe(step: dict[str, Any]) -> str:
    op = step.get("op")
    if op == "slice":
        return f"slice: {step['source_layers']} -> {step['num_hidden_layers']} layers"
    if op == "prune":
        return f"prune: {step['method']} {step['pattern']}"
    if op == "eval":
        text = f"eval: perplexity {step['perplexity']:.4f}"
        if step.get("reference_perplexity") is not None:
            text += (
                f" (source {step['reference_perplexity']:.4f}), KL {step['kl']:.5f}, "
                f"top-1 agreement {step['top1_agreement']:.4f}"
            )
        return text
    return str(op)


# ----------------------------------------------------------------------------- parsing
def _resolve_input(value: Any, where: str, base_dir: Path | None) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a path, got {value!r}")
    path = Path(os.path.expanduser(value))
    for candidate in [path] if path.is_absolute() or base_dir is None else [path, base_dir / path]:
        if candidate.exists():
            return candidate
    raise RecipeError(
        f"{where}: {value!r} not found (relative paths: working directory or recipe folder)"
    )


def _parse_step(index: int, item: Any, base_dir: Path | None) -> Step:
    where = f"step {index + 1}"  # counted from 1, as Step.label counts them
    if not isinstance(item, Mapping) or len(item) != 1:
        raise RecipeError(
            f"{where}: each step is one of 'slice:', 'prune:' or 'eval:' with its settings below it"
        )
    ((op, params),) = item.items()
    if op not in STEP_KEYS:
        raise RecipeError(f"{where}: unknown step {op!r}; steps are: {', '.join(STEP_KEYS)}")
    if params is not None and not isinstance(params, Mapping):
        raise RecipeError(
            f"{where} ({op}): its settings must be a mapping ('key: value' lines indented "
            f"under '{op}:'), got {params!r}"
        )
    params = dict(params or {})
    unknown = [k for k in params if k not in STEP_KEYS[op]]
    if unknown:
        raise RecipeError(
            f"{where} ({op}): unknown setting(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(STEP_KEYS[op])}"
        )
    for key in PATH_KEYS & set(params):
        if params[key] is not None and not (key == "reference" and params[key] == "none"):
            params[key] = _resolve_input(params[key], f"{where} ({op}) {key}", base_dir)
    for key in ("drop", "keep"):  # "drop: 3" / "keep: [0, 1]" read as YAML integers
        if key in params:
            params[key] = layer_specs(params[key])
    if "slices" in params:  # inline mergekit: its model paths resolve like the recipe's
        params["base_dir"] = base_dir
    return Step(op, params, index)


def parse_recipe(raw: Any, file: Path | None = None, text: str = "") -> Recipe:
    if not isinstance(raw, Mapping):
        raise RecipeError("a recipe is a mapping with 'model' and 'steps'")
    unknown = [k for k in raw if k not in RECIPE_KEYS]
    if unknown:
        raise RecipeError(
            f"recipe: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(RECIPE_KEYS)}"
        )
    base_dir = file.resolve().parent if file is not None else None
    if "model" not in raw:
        raise RecipeError("recipe: 'model' (the source model folder) is required")
    model = _resolve_input(raw["model"], "model", base_dir)
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        raise RecipeError("recipe: 'steps' must be a non-empty list")
    out = raw.get("out")
    if out is not None:
        out = Path(os.path.expanduser(str(out)))
        if base_dir is not None and not out.is_absolute():
            out = base_dir / out
    parsed = [_parse_step(i, item, base_dir) for i, item in enumerate(steps)]
    if all(step.op == "eval" for step in parsed):
        raise RecipeError("recipe: nothing to write: add a slice or prune step")
    return Recipe(model, parsed, out, raw.get("device"), file, text)


def load_recipe(recipe: str | os.PathLike | Mapping) -> Recipe:
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(yaml_error(path, exc)) from None
    return parse_recipe(raw, path, text)


# ----------------------------------------------------------------------------- checking
def check_recipe(recipe: Recipe) -> list[Path]:
    """Everything that can be checked before running: settings, patterns, and layer ranges
    against the depth each step will see. Returns the model folders that slice configs
    read besides the recipe's model (the output may not replace them)."""
    from slimstack.calibration import read_text
    from slimstack.evaluate import check_eval_settings
    from slimstack.prune.driver import (
        as_globs,
        check_calibration_length,
        check_globs,
        select_modules,
    )
    from slimstack.prune.methods import METHODS
    from slimstack.prune.patterns import parse_pattern

    with Checkpoint.open(recipe.model) as ckpt:
        depth = ckpt.num_layers
        context = ckpt.config.get("max_position_embeddings")
        # every layer of a family has the same linears: layer 0's shapes stand for all
        in_shapes = {
            n: tuple(ckpt.tensor_shape(f"{LAYER_PREFIX}0.{n}.weight"))
            for n in LAYER_LINEARS
            if f"{LAYER_PREFIX}0.{n}.weight" in ckpt
        }
    current: Path | None = recipe.model  # the folder a step reads; None: a staging folder
    read: list[Path] = []
    for step in recipe.steps:
        p = step.params
        try:
            if step.op == "slice":
                depth, models = _check_slice(p, depth, current)
                read.extend(models)
            elif step.op == "prune":
                method = p.get("method", "wanda")
                if method not in METHODS:
                    raise RecipeError(f"unknown method {method!r}; choose: {', '.join(METHODS)}")
                pattern = parse_pattern(p.get("sparsity", "2:4"))
                if method != "magnitude" and p.get("calib") is None:
                    raise RecipeError(f"{method} needs calib: a calibration text file")
                # the linears this step will see, at the depth the steps before leave
                linears = [f"{LAYER_PREFIX}{i}.{n}" for i in range(depth) for n in LAYER_LINEARS]
                include, exclude = as_globs(p.get("include")), as_globs(p.get("exclude"))
                check_globs(linears, include, exclude)
                for name in select_modules(linears, include, exclude):
                    short = name.split(".", 3)[-1]
                    if short in in_shapes:
                        pattern.check_shape(name, in_shapes[short])
                if p.get("seqlen") is not None and context:
                    check_calibration_length(method, p["seqlen"], context)
            elif p.get("text") is None:
                raise RecipeError("eval needs text: an evaluation text file")
            else:
                check_eval_settings(
                    p.get("seqlen"), p.get("batch_size", 8), p.get("max_windows"), context
                )
            for key in ("calib", "text"):  # missing, binary or empty text: before any step runs
                if p.get(key) is not None:
                    read_text(p[key])
        except ValueError as exc:
            raise RecipeError(f"{step.label}: {exc}") from None
        if step.op != "eval":
            current = None
    return read


def _check_slice(p: dict[str, Any], depth: int, current: Path | None) -> tuple[int, list[Path]]:
    """The depth after this slice step, and the model folders it reads besides `current`."""
    modes = [k for k in ("drop", "keep", "config", "criterion", "slices") if k in p]
    if len(modes) != 1:
        raise RecipeError(
            "a slice step takes exactly one of drop, keep, config, slices (inline mergekit) "
            f"or criterion; got {', '.join(modes) or 'none'}"
        )
    mode = modes[0]
    extra = [k for k in p if k not in (mode, *SLICE_MODE_KEYS[mode], "base_dir")]
    if extra:
        raise RecipeError(
            f"{', '.join(map(repr, extra))} cannot go with {mode} (it would be ignored); with "
            f"{mode} a slice step takes: {', '.join(SLICE_MODE_KEYS[mode]) or 'nothing else'}"
        )
    dtype = p.get("dtype")
    if dtype is not None:
        canonical_dtype(dtype, RecipeError)  # refused here, before any step has run
    if mode == "drop":
        return len(drop_to_keep(p["drop"], depth)), []
    if mode == "keep":
        return len(keep_layers(p["keep"], depth)), []
    if mode in ("config", "slices"):
        return _check_config(p, depth, current)
    if mode == "criterion":
        canonical_criterion(p["criterion"])
        n = p.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < depth:
            raise RecipeError(f"criterion needs n, the number of layers to drop (1..{depth - 1})")
        needs_data = canonical_criterion(p["criterion"]) != "snr"
        if needs_data and p.get("scores") is None and p.get("calib") is None:
            raise RecipeError("criterion needs scores (an analysis) or calib (to score now)")
        return depth - n, []
    raise AssertionError(mode)


def _check_config(p: dict[str, Any], depth: int, current: Path | None) -> tuple[int, list[Path]]:
    """A config / inline slices step: its new depth and layer ranges, from the depth the
    steps before leave (slices without a model take the current one). Widths and tensors
    are compared when the step opens the models."""
    from slimstack.depth.mergekit_config import load_config, parse_config

    here = Path("<the model this step slices>")  # stands for `current`, never a folder
    if "slices" in p:
        inline = {k: v for k, v in p.items() if k in MERGEKIT_KEYS}
        inline.setdefault("merge_method", "passthrough")
        merge = parse_config(inline, here, p.get("base_dir"))
    else:
        merge = load_config(p["config"], here)

    def is_current(model: Path) -> bool:
        return model == here or (current is not None and model.resolve() == current.resolve())

    if "config" in p and not any(is_current(s.model) for s in merge.slices):
        # the run refuses it (make_plan's "is not used"), after the steps before it
        raise RecipeError(
            "the config takes no layers from the model this step slices (the recipe's model "
            "or the previous step's output); leave 'model' out of its slices to use it"
        )
    others = [merge.base_model, *(s.model for s in merge.slices), merge.tokenizer_source]
    read = list(dict.fromkeys(m for m in others if m is not None and not is_current(m)))
    depths: dict[Path, int] = {}
    for index, layer_slice in enumerate(merge.slices):
        model = layer_slice.model
        if is_current(model):
            have, name = depth, "the model this step slices"
        else:
            if model not in depths:
                with Checkpoint.open(model) as ckpt:
                    depths[model] = ckpt.num_layers
            have, name = depths[model], str(model)
        if layer_slice.end > have:
            raise RecipeError(
                f"slices[{index}]: layer_range [{layer_slice.start}, {layer_slice.end}] asks "
                f"for layers of {name}, which has layers 0..{have - 1} here (a layer_range "
                "past the end?)"
            )
    return sum(s.end - s.start for s in merge.slices), read


# ----------------------------------------------------------------------------- running
def _run_slice(step: Step, current: Path, target: Path, device: Any, progress: bool) -> None:
    from slimstack.depth.slicing import slice_model

    p = dict(step.params)
    config = p.pop("config", None)
    if "slices" in p:
        base_dir = p.pop("base_dir", None)
        from slimstack.depth.mergekit_config import parse_config
        from slimstack.depth.slicing import plan_config, write_plan

        inline = {k: p.pop(k) for k in list(p) if k in MERGEKIT_KEYS}
        inline.setdefault("merge_method", "passthrough")  # a recipe's slices only stack
        plan = plan_config(parse_config(inline, current, base_dir))
        write_plan(plan, target, progress=progress)
        return
    slice_model(
        current,
        target,
        drop=p.get("drop"),
        keep=p.get("keep"),
        config=config,
        criterion=p.get("criterion"),
        n=p.get("n"),
        scores=p.get("scores"),
        calib=p.get("calib"),
        nsamples=p.get("nsamples", 32),
        seqlen=p.get("seqlen", 256),
        seed=p.get("seed", 0),
        dtype=p.get("dtype"),
        device=device,
        progress=progress,
    )


def _run_prune(step: Step, current: Path, target: Path, device: Any, progress: bool) -> None:
    from slimstack.prune.driver import prune

    p = step.params
    prune(
        current,
        target,
        method=p.get("method", "wanda"),
        sparsity=p.get("sparsity", "2:4"),
        calib=p.get("calib"),
        nsamples=p.get("nsamples", 128),
        seqlen=p.get("seqlen"),  # None: prune's default, min(2048, the model's context)
        seed=p.get("seed", 0),
        include=p.get("include"),
        exclude=p.get("exclude"),
        device=device,
        progress=progress,
    )


def _run_eval(step: Step, current: Path, source: Path, device: Any, progress: bool) -> dict:
    from slimstack.evaluate import evaluate

    p = step.params
    reference = p.get("reference", source)
    result = evaluate(
        current,
        p["text"],
        reference=None if reference == "none" else reference,
        seqlen=p.get("seqlen"),
        batch_size=p.get("batch_size", 8),
        max_windows=p.get("max_windows"),
        device=device,
        progress=progress,
    )
    return {"op": "eval", **result.to_dict()}


def _rename_paths(obj: Any, names: dict[str, str]) -> Any:
    """Staging folders vanish: name them by their step in the final record."""
    if isinstance(obj, str):
        for path, name in names.items():
            if obj == path or obj.startswith(path + os.sep):
                return name + obj[len(path) :]
        return obj
    if isinstance(obj, list):
        return [_rename_paths(v, names) for v in obj]
    if isinstance(obj, dict):
        return {k: _rename_paths(v, names) for k, v in obj.items()}
    return obj


def apply_recipe(
    recipe: str | os.PathLike | Mapping | Recipe,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> RecipeReport:
    """Run every step of `recipe` and write the result to `out` (or the recipe's `out`)."""
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    target = Path(out) if out is not None else recipe.out
    if target is None:
        raise RecipeError("no output folder: give --out DIR or 'out:' in the recipe")
    inputs = [recipe.model] + [step.params.get(key) for step in recipe.steps for key in PATH_KEYS]
    check_target(target, overwrite, inputs)
    # nor a model a slice config reads (replacing it would delete the source)
    check_target(target, overwrite, check_recipe(recipe))
    device = device or recipe.device
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.recipe-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        records, current, names = _run_steps(recipe, staging, device, progress)
        meta = read_metadata(current) or {}
        with Checkpoint.open(recipe.model) as source:
            meta["source"] = source_record(source)
        meta["steps"] = records
        names.update({str(current): str(target), str(current.resolve()): str(target.resolve())})
        meta["recipe"] = {
            "file": str(recipe.file.resolve()) if recipe.file is not None else None,
            "text": recipe.text or None,
        }
        meta = _rename_paths(meta, names)
        (current / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_folder(current, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RecipeReport(target, meta["steps"], time.perf_counter() - start)


def _run_steps(
    recipe: Recipe, staging: Path, device: Any, progress: bool
) -> tuple[list[dict[str, Any]], Path, dict[str, str]]:
    current = recipe.model
    records: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    total = len(recipe.steps)
    for step in recipe.steps:
        if progress:
            tqdm.write(f"[{step.index + 1}/{total}] {step.op}")
        if step.op == "eval":
            records.append(_run_eval(step, current, recipe.model, device, progress))
            continue
        folder = staging / f"step{step.index + 1}-{step.op}"
        runner = _run_slice if step.op == "slice" else _run_prune
        try:
            runner(step, current, folder, device, progress)
        except ValueError as exc:
            raise RecipeError(f"{step.label}: {exc}") from exc
        records.append((read_metadata(folder) or {}).get("steps", [{}])[-1])
        names[str(folder.resolve())] = f"<{step.label}>"
        names[str(folder)] = f"<{step.label}>"
        current = folder
    return records, current, names
