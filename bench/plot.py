"""Draw speedup vs M, one panel per weight shape and one line per (op, provider), from a
kernel benchmark results JSON (DESIGN.md schema). PNGs land next to the JSON, one per dtype:

    python bench/plot.py bench/results/2026-11-23-nvidia-h100-80gb-hbm3-kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _panels(rows: list[dict]) -> dict[tuple[int, int], dict[str, list[tuple[int, float]]]]:
    """(N, K) -> "op / provider" -> [(M, speedup)] sorted by M."""
    panels: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        panels[(row["N"], row["K"])][f"{row['op']} / {row['provider']}"].append(
            (row["M"], row["speedup"])
        )
    for lines in panels.values():
        for points in lines.values():
            points.sort()
    return panels


_OP_STYLE = {"gemv": "-", "gemm": "--", "mm": ":"}  # the op's kind: decode, prefill, any M
_MARKERS = "osD^v<>pPX*h"


def _style(label: str, index: int) -> dict:
    """One color and marker per line (tab20: the suite draws up to ~16 lines per panel), the
    line style by op kind, so neighbouring providers stay apart."""
    kind = label.split(" / ")[0].rsplit("_", 1)[-1]
    return {
        "color": plt.get_cmap("tab20")(index % 20),
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _OP_STYLE.get(kind, "-"),
    }


def plot_results(results_json: Path, *more: Path, out_stem: Path | None = None) -> list[Path]:
    """Writes <stem>-<dtype>.png beside the JSON for each dtype present; returns the paths.
    With more files (runs of one GPU, e.g. a lease's two calls), their rows share the
    figures, written as <out_stem>-<dtype>.png."""
    docs = [json.loads(Path(p).read_text()) for p in (results_json, *more)]
    doc = docs[0]
    gpus = {d["gpu"] for d in docs}
    if len(gpus) > 1:
        raise ValueError(f"results from different GPUs cannot share a plot: {sorted(gpus)}")
    commits = ", ".join(dict.fromkeys(d["commit"][:12] for d in docs))
    stem = out_stem or Path(results_json).with_name(Path(results_json).stem)
    by_dtype: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        for row in d["rows"]:
            by_dtype[row["dtype"]].append(row)
    labels_all = sorted({f"{r['op']} / {r['provider']}" for d in docs for r in d["rows"]})
    styles = {label: _style(label, i) for i, label in enumerate(labels_all)}
    written = []
    for dtype, rows in sorted(by_dtype.items()):
        panels = _panels(rows)
        cols = min(4, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(
            nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True
        )
        for ax, ((N, K), lines) in zip(axes.flat, sorted(panels.items())):
            for label, points in sorted(lines.items()):
                ms, speedups = zip(*points)
                ax.plot(ms, speedups, markersize=3, linewidth=1.1, label=label, **styles[label])
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"N={N}, K={K}", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.grid(True, which="major", alpha=0.3)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"speedup vs {rows[0]['baseline']}")
        legend = {}  # every panel's lines: the first panel may lack some providers
        for ax in axes.flat[: len(panels)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        labels = sorted(legend)
        fig.legend(
            [legend[k] for k in labels], labels, loc="lower center", ncol=min(4, len(labels)),
            fontsize=8,
        )  # fmt: skip
        fig.suptitle(f"{doc['gpu']}, {dtype}, commit {commits}", fontsize=10)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        out = stem.with_name(f"{stem.name}-{dtype}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s)")
    parser.add_argument(
        "--combine",
        type=Path,
        metavar="STEM",
        help="draw all files' rows together as STEM-<dtype>.png (runs of one GPU)",
    )
    args = parser.parse_args(argv)
    if args.combine:
        written = plot_results(*args.results, out_stem=args.combine)
    else:
        written = [png for path in args.results for png in plot_results(path)]
    for png in written:
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
