"""`slimstack demo`: the main job on a built-in default, end to end.

Prunes a model (default: the stories260K LLaMA in ../shared) to 2:4 with Wanda, calibrated on
one text file, evaluates it against the dense model on another, then serves both from
slimstack's engine (sparse linears packed) and prints what each generates: the whole path,
checkpoint -> prune -> packed weights -> engine -> tokens.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimstack.engine.generate import GenerationResult
from slimstack.engine.loader import load
from slimstack.engine.report import ModelInfo
from slimstack.evaluate import EvalResult, evaluate
from slimstack.prune.driver import prune

DEFAULT_PROMPT = "Once upon a time"


@dataclass
class ServedSample:
    """One model served by the engine: what it holds and what it generated."""

    label: str
    info: ModelInfo
    result: GenerationResult


@dataclass
class DemoResult:
    dense: EvalResult
    pruned: EvalResult
    samples: list[ServedSample]


def default_shared() -> Path:
    """`$SLIMSTACK_SHARED`, else ../shared beside the current directory (the repo layout)."""
    return Path(os.environ.get("SLIMSTACK_SHARED", Path.cwd().parent / "shared"))


def run_demo(
    model: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    method: str = "wanda",
    sparsity: str = "2:4",
    nsamples: int = 64,
    seqlen: int = 256,
    max_windows: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 40,
) -> DemoResult:
    shared = default_shared()
    model = Path(model or shared / "models" / "stories260K")
    calib = Path(calib or shared / "data" / "wikitext-2" / "valid.txt")
    text = Path(text or shared / "data" / "wikitext-2" / "test.txt")
    for path, what in ((model, "model folder"), (calib, "calibration text"), (text, "eval text")):
        if not path.exists():
            raise FileNotFoundError(
                f"{what} not found: {path} (pass it explicitly or set SLIMSTACK_SHARED)"
            )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out) if out is not None else Path(tmp) / "pruned"
        report = prune(
            model,
            target,
            method=method,
            sparsity=sparsity,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            overwrite=overwrite,
        )
        print(report.summary())
        dense = evaluate(model, text, max_windows=max_windows)
        pruned = evaluate(target, text, reference=model, max_windows=max_windows)
        samples = [
            serve(label, folder, prompt, max_new_tokens)
            for label, folder in (("dense", model), (f"{method} {sparsity}", target))
        ]
    return DemoResult(dense, pruned, samples)


def serve(label: str, folder: Path, prompt: str, max_new_tokens: int) -> ServedSample:
    """Load `folder` into the engine (sparse linears packed) and continue `prompt` greedily."""
    engine_model = load(folder)
    result = engine_model.generate(prompt, max_new_tokens=max_new_tokens, temperature=0)
    return ServedSample(label, engine_model.info(), result)


def format_samples(prompt: str, samples: list[ServedSample]) -> str:
    """Per served model: linear formats, bytes vs dense, decode speed, and the continuation."""
    lines = []
    for sample in samples:
        info, timings = sample.info, sample.result.timings
        lines += [
            f"[{sample.label}] engine on {info.device}: linears {info.formats_summary}; "
            f"{info.linear_ratio:.3f}x the dense linear bytes; "
            f"decode {timings.decode_tokens_per_s:.0f} tokens/s",
            f"  {prompt}{sample.result.text}".replace("\n", " "),
        ]
    return "\n".join(lines)


def format_table(dense: EvalResult, pruned: EvalResult, label: str) -> str:
    """Perplexity, KL and top-1 agreement of the pruned model next to the dense one."""
    rows = [
        ("model", "perplexity", "KL vs dense", "top-1 agree"),
        ("dense", f"{dense.perplexity:.3f}", "-", "-"),
        (label, f"{pruned.perplexity:.3f}", f"{pruned.kl:.4f}", f"{pruned.top1_agreement:.4f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{pruned.tokens} tokens of {Path(pruned.text).name}\n" + "\n".join(lines)
