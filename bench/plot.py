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


def plot_results(results_json: Path) -> list[Path]:
    """Writes <stem>-<dtype>.png beside the JSON for each dtype present; returns the paths."""
    doc = json.loads(Path(results_json).read_text())
    by_dtype: dict[str, list[dict]] = defaultdict(list)
    for row in doc["rows"]:
        by_dtype[row["dtype"]].append(row)
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
                ax.plot(ms, speedups, marker="o", markersize=3, label=label)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"N={N}, K={K}", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.grid(True, which="major", alpha=0.3)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"speedup vs {rows[0]['baseline']}")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.suptitle(f"{doc['gpu']}, {dtype}, commit {doc['commit'][:12]}", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        out = Path(results_json).with_name(f"{Path(results_json).stem}-{dtype}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON file(s)")
    for path in parser.parse_args(argv).results:
        for png in plot_results(path):
            print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
