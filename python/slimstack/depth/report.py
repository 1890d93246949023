"""The human side of an analysis: report.md (rankings, agreement) and PNG plots.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global
backend switch), so they render on headless machines and inside other programs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from slimstack.depth.layer_ranges import format_layers

TITLES = {
    "angular": "Angular distance (single layer, n = 1)",
    "block_influence": "Block Influence (ShortGPT)",
    "taylor": "Taylor+ importance",
    "perplexity": "Calibration perplexity with the layer removed",
    "snr": "v_proj SNR ratio (laserRMT, Marchenko-Pastur edge)",
}
PLOTS_DIR = "plots"


# ------------------------------------------------------------------------------ plots
def plot_angular_heatmap(angular: dict[str, Any], path: Path) -> Path:
    """Angular distance d(l, n): start layer l across, block size n down; the best block
    of each size is outlined."""
    distances = {int(n): row for n, row in angular["distances"].items()}
    layers = len(distances[1])
    grid = [
        [row[start] if start < len(row) else math.nan for start in range(layers)]
        for _, row in sorted(distances.items())
    ]
    fig = Figure(figsize=(max(5.0, 0.35 * layers + 2.5), max(3.5, 0.3 * layers + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="upper", interpolation="none")
    for n, best in angular["best_block"].items():
        ax.add_patch(_outline(best["start"], int(n) - 1))
    ax.set_xlabel("first layer of the block (l)")
    ax.set_ylabel("block size (n)")
    ax.set_yticks(range(layers), [str(n) for n in range(1, layers + 1)])
    step = max(1, layers // 16)
    ax.set_xticks(range(0, layers, step))
    token = "last token" if angular.get("token") == "last" else "all tokens"
    ax.set_title(f"Angular distance d(l, n), {token}; outlined: best block per n", fontsize=10)
    fig.colorbar(image, ax=ax, label="arccos(cos) / pi")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _outline(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)


def plot_bars(name: str, result: dict[str, Any], path: Path) -> Path:
    """One bar per layer; the layers the criterion drops first are red."""
    if name == "snr":
        return plot_snr(result, path)
    scores = result["scores"]
    fig = Figure(figsize=(max(5.0, 0.3 * len(scores) + 2.0), 3.5))
    ax = fig.add_subplot()
    bars = _bars(ax, scores, result["drop_order"])
    if name == "perplexity":
        ax.axhline(result["baseline"], color="black", linestyle="--", label="no layer removed")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    if name == "taylor":
        for index in result.get("plus_kept", []):
            bars[index].set_alpha(0.35)
    ax.set_title(TITLES[name], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _bars(ax: Any, scores: list[float | None], drop_order: list[int]) -> Any:
    layers = len(scores)
    finite = [s for s in scores if s is not None]
    top = max(finite, default=0.0) or 1.0
    values = [top if s is None else s for s in scores]  # infinite: a full-height bar
    first = set(drop_order[: max(1, math.ceil(layers / 4))])
    colors = ["tab:red" if i in first else "tab:blue" for i in range(layers)]
    bars = ax.bar(range(layers), values, color=colors)
    for index, score in enumerate(scores):
        if score is None:
            bars[index].set_hatch("//")
            ax.annotate("inf", (index, top), ha="center", va="bottom", fontsize=8)
    if not any(values):  # e.g. no v_proj with any signal: say so instead of a blank axis
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "0 for every layer", transform=ax.transAxes, ha="center")
    ax.set_xlabel("layer (red: dropped first)")
    return bars


def plot_snr(result: dict[str, Any], path: Path) -> Path:
    """The SNR ratio, and beside it how far each layer's largest singular value stands above
    the noise edge (below 1: the whole spectrum looks like noise)."""
    layers = result["layers"]
    fig = Figure(figsize=(max(8.0, 0.5 * len(layers) + 3.0), 3.5))
    left, right = fig.subplots(1, 2)
    _bars(left, result["scores"], result["drop_order"])
    left.set_title("v_proj SNR / largest singular value", fontsize=10)
    _bars(right, [r["top_over_threshold"] for r in layers], result["drop_order"])
    right.axhline(1.0, color="black", linestyle="--", label="noise edge")
    right.legend(loc="lower right", fontsize=8)
    right.set_title("largest singular value / Marchenko-Pastur cut", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_plots(scores: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    criteria = scores["criteria"]
    paths = []
    if "angular" in criteria:
        paths.append(plot_angular_heatmap(criteria["angular"], folder / "angular_heatmap.png"))
    for name, result in criteria.items():
        paths.append(plot_bars(name, result, folder / f"{name}.png"))
    return paths


# ------------------------------------------------------------------------------ markdown
def _fmt(value: float | None) -> str:
    if value is None:
        return "inf"
    return f"{value:.4g}"


def _ranking_table(name: str, result: dict[str, Any]) -> list[str]:
    if name == "snr":
        return _snr_table(result)
    lines = ["| rank | layer | score |", "|---:|---:|---:|"]
    order = list(result["drop_order"])
    order += [i for i in range(len(result["scores"])) if i not in order]  # Taylor+ kept last
    for rank, layer in enumerate(order, 1):
        note = " (kept by +)" if layer in result.get("plus_kept", []) else ""
        lines.append(f"| {rank} | {layer}{note} | {_fmt(result['scores'][layer])} |")
    return lines


def _snr_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| rank | layer | SNR ratio | SNR | signal singular values | largest / cut |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, layer in enumerate(result["drop_order"], 1):
        r = result["layers"][layer]
        signal = f"{r['signal_count']} of {r['signal_count'] + r['noise_count']}"
        lines.append(
            f"| {rank} | {layer} | {_fmt(r['snr_ratio'])} | {_fmt(r['snr'])} | {signal} | "
            f"{_fmt(r['top_over_threshold'])} |"
        )
    return lines


def _criterion_section(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"## {TITLES[name]}", "", result["description"] + ".", ""]
    if name == "angular":
        lines += [
            f"Averaged over: {result['token_description']}.",
            "",
            "Best block to drop for each size n:",
            "",
            "| n | layers | distance |",
            "|---:|---|---:|",
        ]
        for n, best in result["best_block"].items():
            layers = format_layers(range(best["start"], best["end"]))
            lines.append(f"| {n} | {layers} | {best['distance']:.4f} |")
        lines += ["", "Single layers (n = 1), dropped first at the top:", ""]
    if name == "perplexity":
        lines += [f"Perplexity with no layer removed: {result['baseline']:.4f}.", ""]
    if name == "taylor":
        kept = format_layers(result["plus_kept"]) or "none"
        mb = result["memory_bytes_estimate"] / 2**20
        lines += [f"Layers Taylor+ keeps: {kept}. Memory of the pass: about {mb:.0f} MiB.", ""]
    if name == "snr":
        flagged = format_layers(result["infinite_layers"]) or "none"
        lines += [f"Layers with infinite SNR (no singular value below the edge): {flagged}.", ""]
    return lines + _ranking_table(name, result) + [""]


def render_markdown(scores: dict[str, Any], plots: list[Path]) -> str:
    settings = scores["settings"]
    calib = settings["calibration"]
    lines = [
        f"# Layer importance: {Path(scores['model']['path']).name}",
        "",
        f"- model: `{scores['model']['path']}` ({scores['model']['num_hidden_layers']} layers)",
        f"- calibration: `{calib['file']}`, {calib['nsamples']} windows of {calib['seqlen']} "
        f"tokens (seed {calib['seed']})"
        if calib
        else "- calibration: none (weights only)",
        f"- compute dtype {settings['dtype']} on {settings['device']}",
        "",
    ]
    if scores.get("agreement"):
        names = list(scores["criteria"])
        lines += [
            "## Where the criteria agree",
            "",
            "Layers each criterion would drop first (angular: best contiguous block), and the "
            "layers all of them / a majority pick.",
            "",
            "| n | " + " | ".join(names) + " | all agree | majority |",
            "|---:|" + "---|" * (len(names) + 2),
        ]
        for row in scores["agreement"]:
            picks = [format_layers(row["picks"][c]) if c in row["picks"] else "-" for c in names]
            agreed = format_layers(row["all"]) or "none"
            majority = format_layers(row["majority"]) or "none"
            lines.append(f"| {row['n']} | " + " | ".join(picks) + f" | {agreed} | {majority} |")
        lines.append("")
    for name, result in scores["criteria"].items():
        lines += _criterion_section(name, result)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(scores: dict[str, Any], folder: Path) -> list[Path]:
    """report.md and the plots, into `folder` (scores.json is the caller's)."""
    plots = write_plots(scores, folder / PLOTS_DIR)
    (folder / "report.md").write_text(render_markdown(scores, plots))
    return plots
