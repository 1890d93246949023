"""Markdown summary of a kernel benchmark results JSON (DESIGN.md schema), for the README.

Two tables per dtype: the geometric-mean speedup over the dense baseline across weight
shapes, one row per (op, provider) and one column per M; and, at M = 1, each shape's time,
achieved bandwidth and its share of the HBM copy bandwidth measured in the same run. Then
the cases the run skipped or failed, with their reasons.

    python bench/summarize.py bench/results/<run>-kernels.json [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import geometric_mean
from typing import Any


def speedup_table(rows: list[dict[str, Any]]) -> str:
    """Rows (op / provider) x columns (M): geomean speedup over the shapes measured."""
    cells: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[(row["op"], row["provider"])][int(row["M"])].append(float(row["speedup"]))
    ms = sorted({int(row["M"]) for row in rows})
    lines = [
        "| op / provider | " + " | ".join(f"M={m}" for m in ms) + " |",
        "|---|" + "---|" * len(ms),
    ]
    for (op, provider), by_m in sorted(cells.items()):
        values = [f"{geometric_mean(by_m[m]):.2f}x" if m in by_m else "" for m in ms]
        lines.append(f"| {op} / {provider} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def decode_table(rows: list[dict[str, Any]], hbm_gbps: float) -> str:
    """M = 1 rows per shape: time, GB/s, share of the measured HBM bandwidth, speedup."""
    lines = [
        "| op / provider | N x K | time (us) | GB/s | % of HBM | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["op"], r["provider"], r["N"], r["K"])):
        if int(row["M"]) != 1:
            continue
        share = 100.0 * row["gbps"] / hbm_gbps if hbm_gbps > 0 else float("nan")
        lines.append(
            f"| {row['op']} / {row['provider']} | {row['N']}x{row['K']} | "
            f"{1000 * row['median_ms']:.1f} | {row['gbps']:.0f} | {share:.0f}% | "
            f"{row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def summarize(doc: dict[str, Any], dtype: str | None = None) -> str:
    if doc.get("suite") != "kernels" or not isinstance(doc.get("rows"), list):
        raise ValueError("not a kernel benchmark results document (suite 'kernels' with rows)")
    by_dtype: dict[str, list[dict]] = defaultdict(list)
    for row in doc["rows"]:
        by_dtype[row["dtype"]].append(row)
    if dtype is not None and dtype not in by_dtype:
        raise ValueError(f"no rows of dtype {dtype!r}; the run has {sorted(by_dtype)}")
    peak = doc.get("peak", {})
    out = [
        f"{doc.get('gpu')}, torch {doc.get('torch')}, triton {doc.get('triton')}, "
        f"commit {str(doc.get('commit'))[:12]}; measured HBM copy bandwidth "
        f"{peak.get('hbm_gbps', float('nan')):.4g} GB/s, dense matmul "
        f"{peak.get('dense_tflops', float('nan')):.3g} TFLOP/s. Speedups are against "
        f"{doc['rows'][0]['baseline'] if doc['rows'] else 'the dense baseline'} in the same run."
    ]
    for name in [dtype] if dtype else sorted(by_dtype):
        rows = by_dtype[name]
        out += [
            f"\n**{name}: geometric-mean speedup over {len({(r['N'], r['K']) for r in rows})} "
            "shapes**\n",
            speedup_table(rows),
            f"\n**{name}, M = 1, per shape**\n",
            decode_table(rows, float(peak.get("hbm_gbps", 0.0))),
        ]
    missing = doc.get("not_measured") or []
    if missing:
        out.append(f"\n**{len(missing)} cases not measured**\n")
        out += [f"- {item['case']}: {item['outcome']}, {item['reason']}" for item in missing]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="kernel benchmark results JSON")
    parser.add_argument("--dtype", help="one dtype only (bfloat16, float16, ...)")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
        print(summarize(doc, args.dtype), end="")
    except (OSError, json.JSONDecodeError, ValueError) as err:
        parser.error(f"{args.results}: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
