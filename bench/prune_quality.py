"""Pruning quality table: perplexity of magnitude / Wanda / SparseGPT at 50%, 2:4 and 4:8.

Prunes a model (default: ../shared/models/stories260K) calibrated on one text file and
evaluates every variant on another, then writes a JSON file and a markdown table.

    python bench/prune_quality.py --out bench/results/prune-quality-stories260K
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from synthetic import SHARED  # bench/ is on sys.path when this runs as a script

from slimstack.checkpoint import Checkpoint
from slimstack.evaluate import evaluate
from slimstack.prune.driver import prune

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("0.5", "2:4", "4:8")


def _exclude_for(model: str, pattern: str) -> list[str]:
    """Modules whose in_features the N:M group does not divide stay dense (say so)."""
    if ":" not in pattern:
        return []
    m = int(pattern.split(":")[1])
    with Checkpoint.open(model) as ckpt:
        shapes = {
            n: ckpt.tensor_shape(n) for n in ckpt.tensor_names() if n.endswith("_proj.weight")
        }
    names = {n.split(".", 3)[-1].rsplit(".", 1)[0] for n, s in shapes.items() if s[-1] % m}
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--calib", default=str(SHARED / "data" / "wikitext-2" / "valid.txt"))
    parser.add_argument("--text", default=str(SHARED / "data" / "wikitext-2" / "test.txt"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    args = parser.parse_args()

    rows = []
    dense = evaluate(args.model, args.text, max_windows=args.max_windows, progress=False)
    rows.append({"method": "dense", "pattern": "-", "perplexity": dense.perplexity, "dense": []})
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in PATTERNS:
            exclude = _exclude_for(args.model, pattern)
            for method in METHODS:
                folder = Path(tmp) / f"{method}-{pattern.replace(':', 'of')}"
                report = prune(
                    args.model,
                    folder,
                    method=method,
                    sparsity=pattern,
                    calib=args.calib,
                    nsamples=args.nsamples,
                    seqlen=args.seqlen,
                    exclude=exclude,
                    progress=False,
                )
                result = evaluate(
                    folder,
                    args.text,
                    reference=args.model,
                    max_windows=args.max_windows,
                    progress=False,
                )
                rows.append(
                    {
                        "method": method,
                        "pattern": pattern,
                        "perplexity": result.perplexity,
                        "kl": result.kl,
                        "top1_agreement": result.top1_agreement,
                        "mean_sparsity": report.overall_sparsity,
                        "dense": exclude,
                    }
                )
                print(f"{method:>9} {pattern:>4}: ppl {result.perplexity:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": Path(args.model).name,
        "calib": Path(args.calib).name,
        "text": Path(args.text).name,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": dense.tokens,
        "windows": dense.windows,
        "window": dense.seqlen,
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(rows, meta))


def markdown_table(rows: list[dict], meta: dict) -> str:
    by_key = {(r["method"], r["pattern"]): r for r in rows}
    lines = [
        f"Perplexity of {meta['model']} on {meta['text']} ({meta['tokens']} predicted tokens in "
        f"{meta['windows']} windows of {meta['window']}), calibrated "
        f"on {meta['calib']} ({meta['nsamples']} x {meta['seqlen']} tokens). Dense: "
        f"{by_key[('dense', '-')]['perplexity']:.2f}.",
        "",
        "| method | "
        + " | ".join(f"{p if ':' in p else str(int(float(p) * 100)) + '%'}" for p in PATTERNS)
        + " |",
        "|---|" + "---|" * len(PATTERNS),
    ]
    for method in METHODS:
        cells = [f"{by_key[(method, p)]['perplexity']:.2f}" for p in PATTERNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = {
        p: by_key[(METHODS[0], p)]["dense"] for p in PATTERNS if by_key[(METHODS[0], p)]["dense"]
    }
    for p, names in notes.items():
        lines += [
            "",
            f"At {p}, {', '.join(names)} kept dense (in_features not divisible by {p.split(':')[1]}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
