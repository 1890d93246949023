"""The sequential pruning driver: checkpoint -> calibrate layer by layer -> pruned HF folder."""

from __future__ import annotations

import fnmatch
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slimstack.calibration import LayerStream, load_calibration
from slimstack.checkpoint import LAYER_PREFIX, Checkpoint, read_metadata, source_record
from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.devices import resolve_device
from slimstack.hf_layers import linear_names
from slimstack.prune.methods import METHODS, LayerInputs, prune_weight
from slimstack.prune.patterns import Pattern, parse_pattern


@dataclass
class PruneReport:
    output: Path
    method: str
    pattern: str
    sparsity: dict[str, float]  # module name -> fraction of zeros actually reached
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        return sum(self.sparsity.values()) / max(len(self.sparsity), 1)

    def summary(self) -> str:
        gpu = f", peak GPU {self.peak_gpu_mb:.0f} MB" if self.peak_gpu_mb is not None else ""
        return (
            f"pruned {len(self.sparsity)} modules with {self.method} to {self.pattern} "
            f"(mean sparsity {self.overall_sparsity:.3f}) in {self.seconds:.1f} s; "
            f"peak RSS {self.peak_rss_mb:.0f} MB{gpu} -> {self.output}"
        )


def select_modules(
    names: Sequence[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    """Glob patterns matched against full names ("model.layers.3.mlp.down_proj") and against
    the name inside the layer ("mlp.down_proj")."""

    def matches(name: str, patterns: Sequence[str]) -> bool:
        short = name.split(".", 3)[-1] if name.startswith(LAYER_PREFIX) else name
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns)

    chosen = [n for n in names if not include or matches(n, include)]
    return [n for n in chosen if not exclude or not matches(n, exclude)]


def check_calibration_length(method: str, seqlen: int, context: int) -> None:
    """Calibrated methods stream windows of `seqlen` tokens: they must fit the context."""
    if method != "magnitude" and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context ({context} tokens)")


def as_globs(value: str | Sequence[str] | None) -> Sequence[str] | None:
    """One glob as a plain string (a recipe's `include: mlp.*`), not its characters as globs."""
    return [value] if isinstance(value, str) else value


def check_globs(
    names: Sequence[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """Every --include / --exclude glob must match some linear: a typo in an --exclude would
    otherwise prune the very module it meant to keep, without a word."""
    examples = sorted({n.split(".", 3)[-1] for n in names})
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns or []:
            if not select_modules(names, [pattern], None):
                raise ValueError(
                    f"no linear layer matches {option} {pattern!r}; globs match full names "
                    f"({names[0] if names else 'model.layers.0.mlp.down_proj'}) or names inside "
                    f"a layer ({', '.join(examples)})"
                )


def _check_shapes(ckpt: Checkpoint, modules: list[str], pattern: Pattern) -> None:
    """Refuse before any work (and before writing anything) when a weight cannot take the
    pattern."""
    for name in modules:
        shape = tuple(ckpt.tensor_shape(f"{name}.weight"))
        pattern.check_shape(name, shape)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prune(
    model: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "wanda",
    sparsity: str | float = "2:4",
    calib: str | os.PathLike | None = None,
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune every linear layer of the decoder blocks of `model` and write an HF folder.

    Embeddings and lm_head stay dense. `method` is magnitude, wanda or sparsegpt; `sparsity`
    an N:M pattern ("2:4") or a ratio ("0.5"). Wanda and SparseGPT stream `nsamples` windows
    of `seqlen` tokens (default: 2048 or the model's context if shorter) from `calib` through the model one layer at a time, each layer seeing
    the outputs of the already-pruned layers before it.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}")
    pattern = parse_pattern(sparsity)
    if method != "magnitude" and calib is None:
        raise ValueError(f"{method} needs calibration text (--calib FILE)")
    include, exclude = as_globs(include), as_globs(exclude)
    ckpt = Checkpoint.open(model)
    context = int(ckpt.config.get("max_position_embeddings") or 2048)
    if seqlen is None:
        seqlen = min(2048, context)
    check_calibration_length(method, seqlen, context)
    all_modules = [
        name[: -len(".weight")]
        for name in ckpt.tensor_names()
        if name.startswith(LAYER_PREFIX)
        and name.endswith("_proj.weight")
        and len(ckpt.tensor_shape(name)) == 2
    ]
    check_globs(all_modules, include, exclude)
    modules = select_modules(all_modules, include, exclude)
    if not modules:
        raise ValueError("no linear layer matches --include/--exclude; nothing to prune")
    _check_shapes(ckpt, modules, pattern)
    # refuses an existing target, or one that would replace the inputs, up front
    writer = CheckpointWriter(out, overwrite=overwrite, inputs=(model, calib))
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    calibration = None
    if method != "magnitude":
        calibration = load_calibration(model, calib, nsamples, seqlen, seed)
    chosen = set(modules)
    reached: dict[str, float] = {}

    with writer:
        for name in ckpt.non_layer_names():
            writer.add(name, ckpt.get_tensor(name))
        stream = (
            LayerStream(ckpt, calibration.input_ids, torch.float32, device)
            if calibration is not None
            else None
        )
        bar = tqdm(range(ckpt.num_layers), desc=f"{method} {pattern}", disable=not progress)
        for index in bar:
            pruned = _prune_layer(ckpt, stream, index, method, pattern, chosen)
            for name in ckpt.layer_names(index):
                module = name.removesuffix(".weight")
                if module in pruned:  # already in the checkpoint's dtype
                    tensor = pruned.pop(module)
                    reached[module] = float((tensor == 0).sum() / tensor.numel())
                else:
                    tensor = ckpt.get_tensor(name)
                writer.add(name, tensor)
        bar.close()
        seconds = time.perf_counter() - start
        step: dict[str, Any] = {
            "op": "prune",
            "method": method,
            "pattern": str(pattern),
            "include": list(include or []),
            "exclude": list(exclude or []),
            "calibration": calibration.record() if calibration is not None else None,
            "sparsity": reached,
            "seconds": round(seconds, 3),
        }
        writer.finish(ckpt.config, _metadata(ckpt, step), tokenizer_from=ckpt.path)
    ckpt.close()
    return PruneReport(
        output=Path(out),
        method=method,
        pattern=str(pattern),
        sparsity=reached,
        seconds=time.perf_counter() - start,
        peak_rss_mb=_peak_rss_mb(),
        peak_gpu_mb=(
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
        skipped=sorted(set(all_modules) - chosen),
    )


def _metadata(ckpt: Checkpoint, step: dict[str, Any]) -> dict[str, Any]:
    """slimstack.json for the output: the source's history (if any) plus this step."""
    previous = read_metadata(ckpt.path) or {}
    return {
        "source": source_record(ckpt),
        "steps": [*previous.get("steps", []), step],
    }


def _prune_layer(
    ckpt: Checkpoint,
    stream: LayerStream | None,
    index: int,
    method: str,
    pattern: Pattern,
    chosen: set[str],
) -> dict[str, torch.Tensor]:
    """Prune the chosen linears of layer `index`; advance the stream past the pruned layer.

    Returns full module name -> pruned weight in the checkpoint's dtype.
    """
    prefix = f"{LAYER_PREFIX}{index}."
    if stream is None:  # magnitude: no activations needed
        modules = [n.removesuffix(".weight") for n in ckpt.layer_names(index)]
        return {
            module: prune_weight(
                method, ckpt.get_tensor(f"{module}.weight").float(), None, pattern
            ).to(ckpt.tensor_dtype(f"{module}.weight"))
            for module in modules
            if module in chosen
        }
    layer = stream.load_layer(index)
    targets = {n: m for n, m in layer.named_modules() if prefix + n in chosen}
    assert set(targets) <= set(linear_names(layer))
    inputs = LayerInputs(want_hessian=method == "sparsegpt")
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, n=n: inputs.observe(n, args[0]))
        for n, module in targets.items()
    ]
    try:
        if targets:  # a layer with nothing to prune needs no statistics, only `advance`
            stream.forward(layer, index)
    finally:
        for hook in hooks:
            hook.remove()
        inputs.release()
    stats = inputs.by_module
    pruned = {}
    for name, module in targets.items():
        weight = prune_weight(method, module.weight.data.float(), stats.pop(name), pattern)
        # the next layers calibrate on what will be written (checkpoint dtype), not fp32
        weight = weight.to(ckpt.tensor_dtype(f"{prefix}{name}.weight"))
        module.weight.data = weight.to(module.weight.dtype)
        pruned[prefix + name] = weight
    stream.advance(layer, index)
    del layer
    return pruned
