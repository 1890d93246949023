"""`slimstack demo`: the main job on a built-in default, end to end.

Prunes a model (default: the stories260K LLaMA in ../shared) to 2:4 with Wanda, calibrated on
one text file, evaluates it against the dense model on another, and prints the table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from slimstack.evaluate import EvalResult, evaluate
from slimstack.prune.driver import prune


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
) -> tuple[EvalResult, EvalResult]:
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
            overwrite=out is not None,
        )
        print(report.summary())
        dense = evaluate(model, text, max_windows=max_windows)
        pruned = evaluate(target, text, reference=model, max_windows=max_windows)
    return dense, pruned


def format_table(dense: EvalResult, pruned: EvalResult, label: str) -> str:
    rows = [
        ("model", "perplexity", "KL vs dense", "top-1 agree"),
        ("dense", f"{dense.perplexity:.3f}", "-", "-"),
        (label, f"{pruned.perplexity:.3f}", f"{pruned.kl:.4f}", f"{pruned.top1_agreement:.4f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{pruned.tokens} tokens of {Path(pruned.text).name}\n" + "\n".join(lines)
