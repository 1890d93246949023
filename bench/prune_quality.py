"""Pruning quality table: perplexity of magnitude / Wanda / SparseGPT at 50%, 2:4 and 4:8.

Prunes a model (default: ../shared/models/stories260K) calibrated on one text file and
evaluates every variant on another, then writes a JSON file, a markdown table and a plot.

    python bench/prune_quality.py --out bench/results/prune-quality-stories260K
    python bench/prune_quality.py --from-json bench/results/prune-quality-stories260K.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from synthetic import SHARED  # noqa: E402  (bench/ is on sys.path when run as a script)

from slimstack.checkpoint import Checkpoint  # noqa: E402
from slimstack.evaluate import evaluate  # noqa: E402
from slimstack.prune.driver import prune  # noqa: E402

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
    parser.add_argument("--out", help="output path without suffix (.json, .md, .png)")
    parser.add_argument(
        "--from-json", type=Path, help="redraw the table and plot of an earlier run; no pruning"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        write_views(json.loads(args.from_json.read_text()), args.from_json.with_suffix(""))
        return
    if args.out is None:
        parser.error("--out is required (or --from-json to redraw an earlier run)")

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
    doc = {**meta, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    write_views(doc, out)


def write_views(doc: dict, out: Path) -> None:
    """The markdown table and the plot of a results document, beside `out`."""
    meta = {k: v for k, v in doc.items() if k != "rows"}
    out.with_suffix(".md").write_text(markdown_table(doc["rows"], meta))
    figure = plot_quality(doc)
    figure.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    plt.close(figure)


def pattern_label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern) * 100:g}%"


def plot_quality(doc: dict) -> plt.Figure:
    """Perplexity (log scale, dense as a dashed line) and top-1 agreement with the dense
    model, one group of bars per pattern, one bar per method."""
    by_key = {(r["method"], r["pattern"]): r for r in doc["rows"]}
    figure, (ppl_ax, agree_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(PATTERNS))]
        rows = [by_key[(method, p)] for p in PATTERNS]
        ppl_ax.bar(xs, [r["perplexity"] for r in rows], width, label=method)
        agree_ax.bar(xs, [r["top1_agreement"] for r in rows], width, label=method)
    ppl_ax.axhline(by_key[("dense", "-")]["perplexity"], color="black", ls="--", lw=1)
    ppl_ax.text(-0.45, by_key[("dense", "-")]["perplexity"] * 1.04, "dense", fontsize=8)
    ppl_ax.set_yscale("log")
    ppl_ax.set_ylim(bottom=by_key[("dense", "-")]["perplexity"] * 0.7)  # dense stands clear
    ppl_ax.set_ylabel(f"perplexity on {doc['text']} (log)")
    agree_ax.set_ylabel("top-1 agreement with dense")
    agree_ax.set_ylim(0, 1)
    for ax in (ppl_ax, agree_ax):
        ax.set_xticks(range(len(PATTERNS)), [pattern_label(p) for p in PATTERNS])
        ax.grid(axis="y", alpha=0.3)
    agree_ax.legend(fontsize=8)
    figure.suptitle(
        f"{doc['model']}: pruning quality (calibrated on {doc['calib']}, "
        f"{doc['nsamples']} x {doc['seqlen']} tokens)",
        fontsize=10,
    )
    return figure


def markdown_table(rows: list[dict], meta: dict) -> str:
    by_key = {(r["method"], r["pattern"]): r for r in rows}
    lines = [
        f"Perplexity of {meta['model']} on {meta['text']} ({meta['tokens']} predicted tokens in "
        f"{meta['windows']} windows of {meta['window']}), calibrated "
        f"on {meta['calib']} ({meta['nsamples']} x {meta['seqlen']} tokens). Dense: "
        f"{by_key[('dense', '-')]['perplexity']:.2f}.",
        "",
        "| method | " + " | ".join(pattern_label(p) for p in PATTERNS) + " |",
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
