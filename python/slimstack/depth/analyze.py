"""`slimstack analyze`: score every layer of a checkpoint by five criteria and write
scores.json, report.md and plots into one folder (atomically: all of it or nothing).

Angular distance, Block Influence and the perplexity criterion share one streamed forward
pass (one layer in memory at a time); Taylor+ streams a forward and a backward pass; the SNR
reads only the v_proj weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimstack.calibration import load_calibration
from slimstack.checkpoint import Checkpoint, source_record
from slimstack.checkpoint_writer import check_target, staging_folder
from slimstack.depth.angular import TOKEN_MODES, AngularDistance
from slimstack.depth.block_influence import BlockInfluence
from slimstack.depth.passes import forward_pass
from slimstack.depth.perplexity import LayerRemovalPerplexity
from slimstack.depth.selection import CRITERIA, agreement, canonical_criterion
from slimstack.depth.snr import DEFAULT_MODULE, snr_scores
from slimstack.depth.streaming import DEFAULT_BUDGET_MB
from slimstack.depth.taylor import taylor_scores
from slimstack.devices import resolve_device
from slimstack.dtype_names import canonical_dtype

SCORES_FILE = "scores.json"


@dataclass
class AnalysisResult:
    output: Path
    scores: dict[str, Any]
    plots: list[Path]

    def summary(self) -> str:
        lines = [f"wrote {self.output / SCORES_FILE}, report.md and {len(self.plots)} plots"]
        for name, result in self.scores["criteria"].items():
            lines.append(f"  {name:<16} drop first: {result['drop_order'][:8]}")
        return "\n".join(lines)


def parse_criteria(criteria: str | Sequence[str] | None) -> list[str]:
    if criteria is None:
        return list(CRITERIA)
    items = criteria.split(",") if isinstance(criteria, str) else list(criteria)
    chosen = []
    for item in items:
        name = canonical_criterion(item)
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no criterion given; choose from: {', '.join(CRITERIA)}")
    return [c for c in CRITERIA if c in chosen]  # a stable order for reports


def check_settings(ckpt: Checkpoint, seqlen: int, token: str, dtype: str) -> None:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int):
        raise ValueError(f"seqlen must be an integer, got {seqlen!r}")
    context = ckpt.config.get("max_position_embeddings")
    if context and seqlen > context:
        raise ValueError(
            f"seqlen {seqlen} exceeds the model's context ({context} tokens); lower --seqlen"
        )
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one token predicts the next), got {seqlen}")
    if token not in TOKEN_MODES:
        raise ValueError(f"--token must be one of {', '.join(TOKEN_MODES)}, got {token!r}")
    canonical_dtype(dtype)


def score_layers(
    ckpt: Checkpoint,
    input_ids: torch.Tensor | None,
    criteria: Sequence[str],
    token: str = "last",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    budget_mb: float = DEFAULT_BUDGET_MB,
    taylor_keep: tuple[int | None, int | None] = (None, None),
    snr_module: str = DEFAULT_MODULE,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Each requested criterion's entry for scores.json, and the seconds each took."""
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    observers = {}
    if "angular" in criteria:
        observers["angular"] = AngularDistance(token)
    if "block_influence" in criteria:
        observers["block_influence"] = BlockInfluence()
    if "perplexity" in criteria:
        observers["perplexity"] = LayerRemovalPerplexity(batch_size)
    if observers:
        start = time.perf_counter()
        forward_pass(
            ckpt, input_ids, list(observers.values()), dtype, device, budget_mb, batch_size,
            progress, desc="forward (" + ", ".join(observers) + ")",
        )  # fmt: skip
        shared = (time.perf_counter() - start) / len(observers)
        for name, observer in observers.items():
            results[name] = observer.result()
            seconds[name] = round(shared, 3)
    if "taylor" in criteria:
        start = time.perf_counter()
        results["taylor"] = taylor_scores(
            ckpt, input_ids, dtype, device, batch_size, *taylor_keep, progress=progress
        )
        seconds["taylor"] = round(time.perf_counter() - start, 3)
    if "snr" in criteria:
        start = time.perf_counter()
        results["snr"] = snr_scores(ckpt, snr_module)
        seconds["snr"] = round(time.perf_counter() - start, 3)
    return {c: results[c] for c in criteria}, seconds


def analyze(
    model: str | os.PathLike,
    calib: str | os.PathLike | None,
    out: str | os.PathLike,
    criteria: str | Sequence[str] | None = None,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 0,
    token: str = "last",
    dtype: str = "float32",
    device: str | torch.device | None = None,
    batch_size: int = 8,
    budget_mb: float = DEFAULT_BUDGET_MB,
    taylor_keep_first: int | None = None,
    taylor_keep_last: int | None = None,
    snr_module: str = DEFAULT_MODULE,
    overwrite: bool = False,
    progress: bool = True,
) -> AnalysisResult:
    """Score the layers of `model` and write `out`/scores.json, report.md and plots/.

    `calib` (text or JSONL) is needed by every criterion but the SNR; `nsamples` windows of
    `seqlen` tokens are drawn from it with `seed`. `token` is where angular distance is
    measured: "last" (PruneMe) or "mean" (every token).
    """
    chosen = parse_criteria(criteria)
    out = Path(out)
    ckpt = Checkpoint.open(model)
    check_settings(ckpt, seqlen, token, dtype)
    dtype = canonical_dtype(dtype)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(budget_mb, int | float) and math.isfinite(budget_mb) and budget_mb > 0):
        raise ValueError(
            f"the memory budget (--memory-mb) must be a positive number, got {budget_mb!r}"
        )
    needs_data = any(c != "snr" for c in chosen)
    if needs_data and calib is None:
        raise ValueError("these criteria need calibration text (--calib FILE); only snr does not")
    check_target(out, overwrite, (model, calib))  # refuse before the long work, not after it
    device = resolve_device(device)
    calibration = load_calibration(model, calib, nsamples, seqlen, seed) if needs_data else None
    results, seconds = score_layers(
        ckpt,
        calibration.input_ids if calibration is not None else None,
        chosen,
        token,
        getattr(torch, dtype),
        device,
        batch_size,
        budget_mb,
        (taylor_keep_first, taylor_keep_last),
        snr_module,
        progress,
    )
    scores = {
        "model": source_record(ckpt),
        "settings": {
            "criteria": chosen,
            "calibration": calibration.record() if calibration is not None else None,
            "angular_token": token,
            "dtype": dtype,
            "device": str(device),
            "batch_size": batch_size,
        },
        "criteria": results,
        "agreement": agreement(results, ckpt.num_layers),
        "seconds": seconds,
    }
    ckpt.close()
    from slimstack.depth.report import write_report  # matplotlib only when writing

    with staging_folder(out, overwrite, inputs=(model, calib)) as tmp:
        (tmp / SCORES_FILE).write_text(json.dumps(scores, indent=2, allow_nan=False) + "\n")
        plots = write_report(scores, tmp)
    return AnalysisResult(out, scores, [out / p.relative_to(tmp) for p in plots])
