"""Plot an e2e results JSON (bench/results/*-e2e.json) and check the issue's targets.

    python bench/plot_e2e.py bench/results/2026-11-24-nvidia-h100-80gb-hbm3-e2e.json

Writes <json stem>.png beside the file: decode tokens/s per variant for every
(batch, prompt) setting, transformers' generate included, the share of the measured
HBM bandwidth the weight reads reach, and each sparse or sliced variant's decode speedup
over slimstack's dense model (on a CPU the dense model timed alongside it). Reads only the
JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = (
    # (description, row filter, field, minimum)
    ("dense decode >= 75% of HBM (batch 1)", {"variant": "dense-32L"}, "hbm_share", 0.75),
    ("dense faster than transformers (batch 1)", {"variant": "dense-32L"}, "speedup", 1.0),
    ("2:4 >= 1.4x dense (batch 1)", {"variant": "2:4-32L"}, "speedup", 1.4),
    ("24 layers + 2:4 >= 1.8x dense (batch 1)", {"variant": "2:4-24L"}, "speedup", 1.8),
)


def _settings(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted({(r["batch"], r["prompt_len"]) for r in rows})


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target and setting: value, minimum, met or not."""
    lines = []
    for text, where, field, minimum in TARGETS:
        for row in rows:
            if row["provider"] != "slimstack" or row["batch"] != 1:
                continue
            if any(row.get(k) != v for k, v in where.items()) or row.get(field) is None:
                continue
            ok = row[field] >= minimum
            lines.append(
                f"{'met ' if ok else 'MISS'} {text} at prompt {row['prompt_len']}: "
                f"{row[field]:.3f} (>= {minimum})"
            )
    for row in rows:  # prefill at 2048 with 2:4 weights no slower than dense
        if (
            row["provider"] == "slimstack"
            and row["sparsity"] == "2:4"
            and row["prompt_len"] >= 2048
        ):
            value = row.get("prefill_speedup")
            if value is not None:
                lines.append(
                    f"{'met ' if value >= 1.0 else 'MISS'} prefill {row['variant']} "
                    f"b={row['batch']} p={row['prompt_len']} vs dense: {value:.3f} (>= 1.0)"
                )
    return lines


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = data["rows"]
    settings = _settings(rows)
    labels = sorted(
        {(r["provider"], r["variant"]) for r in rows},
        key=lambda pv: (  # transformers, then deeper first, dense before 2:4 before 50%
            pv[0] != "transformers",
            -int(pv[1].split("-")[-1][:-1]),
            {"dense": 0, "2:4": 1, "50%": 2}.get(pv[1].split("-")[0], 3),
            pv[1],
        ),
    )
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 2.2 * len(settings)), 11))
    width = 0.8 / max(len(labels), 1)
    # one colour per variant in both panels (the lower one has no transformers bars)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (provider, variant) in enumerate(labels):
        color = palette[i % len(palette)]
        values, shares, speedups = [], [], []
        for batch, prompt in settings:
            row = next(
                (
                    r
                    for r in rows
                    if (r["provider"], r["variant"], r["batch"], r["prompt_len"])
                    == (provider, variant, batch, prompt)
                ),
                None,
            )
            values.append(row["tokens_per_s"] if row else 0)
            shares.append((row.get("hbm_share") or 0) if row else 0)
            against_dense = row and str(row.get("baseline")).startswith("slimstack_dense")
            speedups.append((row.get("speedup") or 0) if against_dense else 0)
        xs = [s + i * width for s in range(len(settings))]
        name = "transformers generate (dense)" if provider == "transformers" else variant
        axes[0].bar(xs, values, width, label=name, color=color)
        if provider == "slimstack":
            axes[1].bar(xs, shares, width, label=name, color=color)
            if any(speedups):
                axes[2].bar(xs, speedups, width, label=name, color=color)
    ticks = [s + 0.4 - width / 2 for s in range(len(settings))]
    for ax in axes:
        ax.set_xticks(ticks, [f"batch {b}\nprompt {p}" for b, p in settings])
        # the speedup bars start from 0 and the dashed 1.0 line: keep their tops clear
        ax.legend(fontsize=8, loc="lower right" if ax is axes[2] else "best")
    axes[0].set_ylabel("decode tokens/s (whole batch)")
    memory = "memory" if data.get("gpu") == "cpu" else "HBM"
    axes[1].set_ylabel(f"weight bytes/step / time / peak {memory}")
    if memory == "HBM":  # the GPU target: dense decode at >= 75% of HBM
        axes[1].axhline(0.75, color="gray", linestyle="--", linewidth=1)
    paired = any(r.get("baseline") == "slimstack_dense_paired" for r in rows)
    axes[2].set_ylabel(
        "decode speedup vs slimstack dense" + ("\n(timed alongside)" if paired else "")
    )
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    model = rows[0]["model"] if rows else "?"
    fig.suptitle(
        f"{model}: {data['gpu']}, peak {memory} {data.get('peak', {}).get('hbm_gbps', '?')} "
        f"GB/s, commit {str(data.get('commit'))[:8]}"
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="an e2e results JSON")
    args = parser.parse_args()
    print(f"wrote {plot(args.results)}")
    for line in check_targets(json.loads(args.results.read_text())["rows"]):
        print(line)


if __name__ == "__main__":
    main()
