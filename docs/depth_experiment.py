"""Reproduce the README's depth-pruning table and heatmap on stories260K.

    python docs/depth_experiment.py [--windows 400]

Analyses stories260K with all five criteria (calibration: wikitext-2 valid), then slices
out every possible set of n = 1 and n = 2 layers and measures each sliced model's
perplexity on wikitext-2 test with `slimstack.evaluate`. Every criterion's pick is one of
those sets; "random" is the mean over all of them (the expected result of a random pick).
Writes docs/images/stories260K_angular_heatmap.png, docs/depth_stories260K.json and prints
the markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from slimstack.depth.analyze import analyze
from slimstack.depth.layer_ranges import format_layers
from slimstack.depth.selection import CRITERIA, layers_to_drop
from slimstack.depth.slicing import slice_model
from slimstack.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2" / "test.txt"
LABELS = {
    "angular": "Angular distance (PruneMe)",
    "block_influence": "Block Influence (ShortGPT)",
    "taylor": "Taylor+ (Shortened LLaMA)",
    "perplexity": "Perplexity (Shortened LLaMA)",
    "snr": "v_proj SNR (laserRMT)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=400, help="test windows of --seqlen")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=256)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="depth-experiment-"))
    try:
        report = analyze(
            MODEL, VALID, work / "report", nsamples=args.nsamples, seqlen=args.calib_seqlen
        )
        images = REPO / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        heatmap = images / "stories260K_angular_heatmap.png"
        shutil.copyfile(report.output / "plots" / "angular_heatmap.png", heatmap)

        def ppl(folder: Path) -> float:
            result = evaluate(folder, TEST, seqlen=args.seqlen, max_windows=args.windows)
            return result.perplexity

        dense = ppl(MODEL)
        measured: dict[str, float] = {}
        for n in (1, 2):
            for dropped in itertools.combinations(range(5), n):
                key = format_layers(dropped)
                out = work / f"drop-{key.replace(':', '_').replace(',', '-')}"
                slice_model(MODEL, out, drop=[str(i) for i in dropped], progress=False)
                measured[key] = ppl(out)
                shutil.rmtree(out)
        rows = []
        for n in (1, 2):
            options = [format_layers(c) for c in itertools.combinations(range(5), n)]
            values = [measured[o] for o in options]
            row = {
                "n": n,
                "random_mean": statistics.fmean(values),
                "random_best": min(values),
                "random_worst": max(values),
                "picks": {},
            }
            for name in CRITERIA:
                dropped = layers_to_drop(report.scores["criteria"][name], name, n)
                key = format_layers(dropped)
                row["picks"][name] = {"drop": key, "perplexity": measured[key]}
            rows.append(row)
        results = {
            "model": str(MODEL.name),
            "calibration": report.scores["settings"]["calibration"],
            "evaluation": {"text": TEST.name, "seqlen": args.seqlen, "windows": args.windows},
            "dense_perplexity": dense,
            "per_drop": measured,
            "rows": rows,
        }
        (REPO / "docs" / "depth_stories260K.json").write_text(json.dumps(results, indent=2) + "\n")
        print(render_table(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render_table(results: dict) -> str:
    lines = [
        f"Dense stories260K: perplexity {results['dense_perplexity']:.1f}.",
        "",
        "| criterion | drop 1 layer | perplexity | drop 2 layers | perplexity |",
        "|---|---|---:|---|---:|",
    ]
    one, two = results["rows"]
    for name in CRITERIA:
        a, b = one["picks"][name], two["picks"][name]
        lines.append(
            f"| {LABELS[name]} | {a['drop']} | {a['perplexity']:.1f} | {b['drop']} | "
            f"{b['perplexity']:.1f} |"
        )
    for label, key in (("random (mean of all choices)", "random_mean"),):
        lines.append(f"| {label} | any | {one[key]:.1f} | any 2 | {two[key]:.1f} |")
    lines.append(
        f"| best / worst possible | | {one['random_best']:.1f} / {one['random_worst']:.1f} "
        f"| | {two['random_best']:.1f} / {two['random_worst']:.1f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
