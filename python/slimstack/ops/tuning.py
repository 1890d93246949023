"""Refresh the dispatch table from a kernel benchmark run (bench/, DESIGN.md results JSON).

For every (device, format, dtype) the run measured, each M gets the backends ranked by the
geometric mean of their speedup over the dense baseline across the weight shapes (those every
ranked backend was measured on, so one that skipped a shape is not flattered); neighbouring
M values with the same ranking merge into one rule covering an M range. What a row measured
maps to a backend as the backend would run it: ``cuda`` is the extension's GEMV for M <= 16
and, above, its CUTLASS Hopper GEMM where the run has one (``cuda_sm90``), else the mma.sp
GEMM; ``triton`` is sparse24_gemv / sparse24_gemm / bitmap_gemv; ``torch`` is PyTorch's
semi-structured matmul; ``cpu`` the C++ kernels.

    python -m slimstack.ops.tuning bench/results/<run>-kernels.json            # print the rules
    python -m slimstack.ops.tuning bench/results/<run>-kernels.json --write    # and install them
    python -m slimstack.ops.tuning <day>-kernels.json <day>-kernels-2.json     # a lease's two calls

Several files (runs on one GPU, e.g. the lease and lease-rest calls, which split the M values
between them) are ranked as one: their rows together, a case measured twice taken from the
later file. Each row's speedup is a ratio within its own run, so runs combine.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import geometric_mean
from typing import Any

from slimstack.ops.backends import GEMV_MAX_M
from slimstack.ops.dispatch import (
    DEFAULT_TABLE,
    TABLE_PATH,
    TABLE_VERSION,
    save_dispatch_table,
    validate_table,
)

# (op, provider) of a results row -> (format, backend, M range it speaks for)
_ROW_BACKEND: dict[tuple[str, str], tuple[str, str, str]] = {
    ("sparse24_gemv", "cuda"): ("sparse24", "cuda", "gemv"),
    ("sparse24_gemm", "cuda_sm90"): ("sparse24", "cuda", "gemm"),
    ("sparse24_gemm", "cuda"): ("sparse24", "cuda_sm80", "gemm"),
    ("sparse24_gemv", "triton"): ("sparse24", "triton", "gemv"),
    ("sparse24_gemm", "triton"): ("sparse24", "triton", "gemm"),
    ("sparse24_mm", "torch"): ("sparse24", "torch", "any"),
    ("sparse24_mm", "cpu"): ("sparse24", "cpu", "any"),
    ("bitmap_gemv", "cuda"): ("bitmap", "cuda", "gemv"),
    ("bitmap_gemv", "triton"): ("bitmap", "triton", "gemv"),
    ("bitmap_mm", "triton_unpack"): ("bitmap", "triton", "gemm"),  # W unpacked, then cuBLAS
    ("bitmap_mm", "cpu"): ("bitmap", "cpu", "any"),
}


def _device_of(doc: dict[str, Any]) -> str:
    return "cpu" if str(doc.get("gpu", "cpu")).lower() == "cpu" else "cuda"


def _speedups(doc: dict[str, Any]) -> dict[tuple, dict[str, dict[tuple[int, int], float]]]:
    """(format, dtype, M) -> backend -> {(N, K): speedup} over the shapes measured."""
    found: dict[tuple, dict[str, dict[tuple[int, int], float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for row in doc["rows"]:
        mapped = _ROW_BACKEND.get((row["op"], row["provider"]))
        if mapped is None:
            continue
        fmt, backend, scope = mapped
        m = int(row["M"])
        if (scope == "gemv" and m > GEMV_MAX_M) or (scope == "gemm" and m <= GEMV_MAX_M):
            continue
        found[(fmt, row["dtype"], m)][backend][(int(row["N"]), int(row["K"]))] = float(
            row["speedup"]
        )
    # The CUDA backend runs the Hopper GEMM where it exists; the sm80 rows speak for it only
    # on cards without one.
    for per_backend in found.values():
        sm80 = per_backend.pop("cuda_sm80", None)
        if sm80 and "cuda" not in per_backend:
            per_backend["cuda"] = sm80
    return found


def _means(per_backend: dict[str, dict[tuple[int, int], float]]) -> dict[str, float]:
    """Geometric-mean speedup of each backend over the shapes every backend was measured on:
    a backend that skipped the hard shapes (refused, failed) must not look better for it.
    Without a shape in common, each over its own."""
    common = set.intersection(*(set(shapes) for shapes in per_backend.values()))
    return {
        name: geometric_mean([v for shape, v in shapes.items() if not common or shape in common])
        for name, shapes in per_backend.items()
    }


def _default_order(device: str, fmt: str) -> list[str]:
    for rule in DEFAULT_TABLE["rules"]:
        if rule.get("device", "*") in ("*", device) and rule.get("format", "*") in ("*", fmt):
            return list(rule["order"])
    return ["reference"]


def rules_from_results(doc: dict[str, Any], *, source: str = "") -> dict[str, Any]:
    """A dispatch table ranking the backends the run measured, M range by M range.

    Backends the run did not measure follow in the default order, and the default rules
    close the table, so every call still finds a backend.
    """
    device = _device_of(doc)
    by_key = _speedups(doc)
    if not by_key:
        raise ValueError(
            "the results have no rows a backend speaks for (ops sparse24_gemv / sparse24_gemm "
            "/ sparse24_mm / bitmap_gemv / bitmap_mm with providers cuda, cuda_sm90, triton, "
            "torch, cpu)"
        )
    groups: dict[tuple[str, str], list[tuple[int, list[str], dict[str, float]]]] = defaultdict(list)
    for (fmt, dtype, m), per_backend in sorted(by_key.items()):
        means = _means(per_backend)
        ranked = sorted(means, key=lambda name: -means[name])
        groups[(fmt, dtype)].append((m, ranked, means))

    rules = []
    tag = f" ({source})" if source else ""
    for (fmt, dtype), points in sorted(groups.items()):
        fallback = _default_order(device, fmt)
        start = 0
        for i, (m, ranked, means) in enumerate(points):
            last = i == len(points) - 1
            if not last and points[i + 1][1] == ranked:
                continue  # same ranking at the next M: extend the range
            order = ranked + [name for name in fallback if name not in ranked]
            if "reference" not in order:
                order.append("reference")
            speedups = ", ".join(f"{name} {means[name]:.2f}x" for name in ranked)
            rules.append(
                {
                    "device": device,
                    "format": fmt,
                    "dtype": dtype,
                    "m_min": start,
                    "m_max": None if last else m,
                    "order": order,
                    "note": f"geomean speedup vs dense at M={m}: {speedups}{tag}",
                }
            )
            start = m + 1
    table = {"version": TABLE_VERSION, "rules": rules + list(DEFAULT_TABLE["rules"])}
    return validate_table(table)


def describe(table: dict[str, Any]) -> str:
    lines = []
    for rule in table["rules"]:
        where = "/".join(rule.get(key, "*") for key in ("device", "format", "dtype"))
        m_max = rule.get("m_max")
        span = f"M {rule.get('m_min', 0)}..{'' if m_max is None else m_max}"
        lines.append(f"{where:28s} {span:12s} {' > '.join(rule['order'])}")
    return "\n".join(lines)


def load_kernel_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The kernel benchmark results documents at `paths`; ValueError naming the file that is
    unreadable or not one."""
    docs = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        if doc.get("suite") != "kernels" or not isinstance(doc.get("rows"), list):
            raise ValueError(f"{path} is not a kernel benchmark results file (suite 'kernels')")
        docs.append(doc)
    return docs


def merge_results(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document of several runs' rows (the same GPU); a later run's row replaces an
    earlier one of the same case; the cases any run did not measure, all listed."""
    gpus = {str(doc.get("gpu")) for doc in docs}
    if len(gpus) != 1:
        raise ValueError(f"the results come from different GPUs: {sorted(gpus)}")
    rows: dict[tuple, dict[str, Any]] = {}
    for doc in docs:
        for row in doc["rows"]:
            key = tuple(row.get(k) for k in ("op", "provider", "N", "K", "M", "dtype"))
            rows.pop(key, None)
            rows[key] = row
    missing = [item for doc in docs for item in doc.get("not_measured") or []]
    return {**docs[-1], "rows": list(rows.values()), "not_measured": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="kernel benchmark results JSON (one or more runs)"
    )
    parser.add_argument(
        "--write",
        nargs="?",
        const=TABLE_PATH,
        type=Path,
        metavar="PATH",
        help=f"install the table (default {TABLE_PATH})",
    )
    args = parser.parse_args(argv)
    try:
        docs = load_kernel_results(args.results)
    except ValueError as err:
        parser.error(str(err))
    commits = sorted({str(doc.get("commit", "?"))[:12] for doc in docs})
    source = f"{', '.join(path.name for path in args.results)}, commit {', '.join(commits)}"
    try:
        table = rules_from_results(merge_results(docs), source=source)
    except ValueError as err:
        parser.error(str(err))
    print(describe(table))
    if args.write is not None:
        save_dispatch_table(table, args.write)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
