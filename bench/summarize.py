"""Markdown summary of a kernel benchmark results JSON (DESIGN.md schema), for the README.

Three tables per dtype: the geometric-mean speedup over the dense baseline across weight
shapes, one row per (op, provider) and one column per M; at M = 1, each shape's time,
achieved bandwidth and its share of the HBM copy bandwidth measured in the same run; and the
A/B verdicts, each variant provider (bench/common.py: cuda_prefetch_off, triton_w8, ...)
against the default it varies, shape by shape. Then the cases the run skipped or failed,
with their reasons.

    python bench/summarize.py bench/results/<run>-kernels.json [--dtype bfloat16]
    python bench/summarize.py <day>-kernels.json <day>-kernels-2.json   # a lease's two calls

Several files (calls on one GPU) are summarized as one: their rows together, a case measured
twice taken from the later file. Speedups are ratios within each call, so the A/B ratios
(variant speedup / default speedup) compare across calls.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import geometric_mean
from typing import Any

from slimstack.ops.tuning import load_kernel_results, merge_results


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


# Providers that are kernels of their own, not variants of another (bench/common.py)
DEFAULT_PROVIDERS = frozenset({"cuda", "cuda_sm90", "triton", "torch", "auto", "cpu"})


def reference_provider(provider: str) -> str | None:
    """The default a variant provider varies (cuda_sm90_swizzle1 -> cuda_sm90,
    cuda_prefetch_off -> cuda, triton_w8 -> triton), None for a default itself."""
    if provider in DEFAULT_PROVIDERS:
        return None
    for default in ("cuda_sm90", "cuda", "triton"):
        if provider.startswith(default + "_"):
            return default
    return None


def ab_table(rows: list[dict[str, Any]]) -> str:
    """Each variant against its default on the same (op, shape, M): the geometric mean and
    range over the shapes of variant speedup / default speedup (> 1: the variant is faster).
    Empty when no variant row has its default measured."""
    speedup = {
        (r["op"], r["provider"], int(r["N"]), int(r["K"]), int(r["M"])): float(r["speedup"])
        for r in rows
    }
    ratios: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for (op, provider, n, k, m), value in speedup.items():
        default = reference_provider(provider)
        base = speedup.get((op, default, n, k, m)) if default else None
        if base:
            ratios[(op, provider, default, m)].append(value / base)
    if not ratios:
        return ""
    lines = [
        "| op | variant | against | M | variant / default (geomean) | range | shapes |",
        "|---|---|---|---|---|---|---|",
    ]
    for (op, provider, default, m), values in sorted(ratios.items()):
        lines.append(
            f"| {op} | {provider} | {default} | {m} | {geometric_mean(values):.2f}x | "
            f"{min(values):.2f}-{max(values):.2f} | {len(values)} |"
        )
    return "\n".join(lines)


WALL_PARTS = ("setup", "first_call", "timing", "baseline")


def wall_table(rows: list[dict[str, Any]], top: int = 5) -> str:
    """Where a run's host time went, from the rows' wall_s (bench/conftest.py): seconds per
    part and per op / provider, and the slowest first calls (JIT compiles). Empty for rows
    without wall_s (runs before 2026-12-07)."""
    timed = [r for r in rows if isinstance(r.get("wall_s"), dict)]
    if not timed:
        return ""
    totals = {part: sum(float(r["wall_s"].get(part, 0.0)) for r in timed) for part in WALL_PARTS}
    by_provider: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for r in timed:
        entry = by_provider[(r["op"], r["provider"])]
        entry[0] += sum(float(r["wall_s"].get(part, 0.0)) for part in WALL_PARTS)
        entry[1] += 1
    lines = [
        f"{len(timed)} cases, {sum(totals.values()):.0f} s: "
        + ", ".join(f"{part} {totals[part]:.0f} s" for part in WALL_PARTS),
        "",
        "| op / provider | cases | s | s per case |",
        "|---|---|---|---|",
    ]
    for (op, provider), (seconds, count) in sorted(by_provider.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {op} / {provider} | {count} | {seconds:.1f} | {seconds / count:.2f} |")
    slowest = sorted(timed, key=lambda r: -float(r["wall_s"].get("first_call", 0.0)))[:top]
    lines += ["", "slowest first calls: " + ", ".join(
        f"{r['op']}-{r['provider']}-{r['N']}x{r['K']}-M{r['M']} {r['wall_s']['first_call']:.1f} s"
        for r in slowest
    )]  # fmt: skip
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
        ab = ab_table(rows)
        if ab:
            out += [f"\n**{name}: each variant against its default (same shape and M)**\n", ab]
    wall = wall_table(doc["rows"])
    if wall:
        out += ["\n**Where the run's host time went**\n", wall]
    missing = doc.get("not_measured") or []
    if missing:
        out.append(f"\n**{len(missing)} cases not measured**\n")
        out += [f"- {item['case']}: {item['outcome']}, {item['reason']}" for item in missing]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="kernel benchmark results JSON (one GPU's calls)"
    )
    parser.add_argument("--dtype", help="one dtype only (bfloat16, float16, ...)")
    args = parser.parse_args(argv)
    try:
        print(summarize(merge_results(load_kernel_results(args.results)), args.dtype), end="")
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
