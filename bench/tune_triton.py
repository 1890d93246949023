"""Sweep the Triton kernels' tile configs on the GPU at hand and report the fastest per case.

The launchers' default_config() picks tiles from SASS reading on a machine without a GPU;
this measures instead. Each candidate is checked against the dense product first, then
timed like the kernel suite (CUDA-graph replays, median, inputs rotated past L2), next to
cuBLAS dense on the same inputs. Candidates that do not compile or launch (shared memory,
registers) are reported as such and skipped.

    python bench/tune_triton.py --out $OUT/tune.json                  # the default cases
    python bench/tune_triton.py --kernels sparse24_gemv --m 1 --shapes 4096x4096

On CPU (TRITON_INTERPRET=1) the same sweep runs at toy sizes, so CI checks the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before anything imports triton: interpret on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Case,
    dense_call,
    environment,
    make_weight,
    median_ms,
    rotation_count,
)

KERNELS = ("sparse24_gemv", "bitmap_gemv", "sparse24_gemm")
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GPU_M = {"sparse24_gemv": [1, 16], "bitmap_gemv": [1, 16], "sparse24_gemm": [2048, 8192]}


def gemv_candidates(m: int) -> list[Any]:
    from slimstack.kernels.sparse24_gemv import GemvConfig

    if m == 1:
        # block_k 128 narrows a warp's x gather to 2 cache lines (gpu_notes, "x gathers")
        grid = itertools.product((8, 16, 32, 64), (128, 256, 512, 1024), (2, 4, 8))
        return [GemvConfig(n, k, num_warps=w) for n, k, w in grid]
    # H200 2026-12-04: the default (64 x 128) ran 0.5-0.75x dense at every M = 2..16, with
    # N = 4096 giving only 64 row blocks (2 programs per SM after split-K): block_n 16 and 32
    # (mma.sync instead of wgmma) quadruple / double the programs; split_k 8 puts ~4 programs
    # on each SM where the planned split aims at 2
    grid = itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 3), (None, 8))
    return [
        GemvConfig(n, k, num_warps=w, num_stages=s, split_k=split) for n, k, w, s, split in grid
    ]


def gemm_candidates(m: int) -> list[Any]:
    from slimstack.kernels.sparse24_gemm import GemmConfig

    tiles = [(128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 128, 128), (64, 128, 64),
             (128, 64, 64), (256, 64, 64)]  # fmt: skip
    return [
        GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
        for (bm, bn, bk), w, s in itertools.product(tiles, (4, 8), (3, 4))
        if not (bm * bn >= 256 * 128 and w == 4)  # 128 fp32 accumulators per thread or more
    ]


def candidates(kernel: str, m: int) -> list[Any]:
    return gemm_candidates(m) if kernel == "sparse24_gemm" else gemv_candidates(m)


def kernel_call(kernel: str, n: int, k: int, config: Any):
    from slimstack.kernels import bitmap_gemv, sparse24_gemm, sparse24_gemv

    if kernel == "sparse24_gemv":
        return lambda x, ws: sparse24_gemv.sparse24_gemv(
            x, ws.packed.values, ws.packed.meta, n, k, config=config
        )
    if kernel == "sparse24_gemm":
        return lambda x, ws: sparse24_gemm.sparse24_gemm(
            x, ws.packed.values, ws.packed.meta, n, k, config=config
        )
    return lambda x, ws: bitmap_gemv.bitmap_gemv(
        x, ws.packed.values, ws.packed.bitmask, ws.packed.row_offsets, n, k, config=config
    )


def _describe(failure: BaseException) -> str:
    first = (str(failure).splitlines() or [""])[0]
    return f"{type(failure).__name__}: {first[:200]}"


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def tune_case(
    kernel: str, n: int, k: int, m: int, dtype: torch.dtype, device: str, limit: int | None
) -> dict[str, Any]:
    fmt = "bitmap" if kernel.startswith("bitmap") else "sparse24"
    first = make_weight(n, k, dtype, fmt, device, seed=0)
    sets = rotation_count(first.packed.nbytes, device)
    weights = [first] + [make_weight(n, k, dtype, fmt, device, seed=s) for s in range(1, sets)]
    g = torch.Generator(device=device).manual_seed(m)
    xs = [torch.randn(m, k, generator=g, device=device).to(dtype) for _ in weights]
    dense_ms, _ = median_ms(lambda i: dense_call(xs[i], weights[i]), len(weights), device)
    reference = dense_call(xs[0], first)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    results = []
    for config in candidates(kernel, m)[:limit]:
        call = kernel_call(kernel, n, k, config)
        entry: dict[str, Any] = {"config": dataclasses.asdict(config)}
        started = time.perf_counter()
        try:
            err = _relative_error(call(xs[0], first), reference)
        except Exception as failure:  # noqa: BLE001 - out of resources, refused tile, ...
            entry["error"] = _describe(failure)
            results.append(entry)
            continue
        entry["compile_s"] = round(time.perf_counter() - started, 2)
        entry["rel_err"] = err
        if err > tolerance:
            entry["error"] = f"relative error {err:.2e} > {tolerance}"
        else:
            try:
                ms, method = median_ms(
                    lambda i, call=call: call(xs[i], weights[i]), len(weights), device
                )
            except Exception as failure:  # noqa: BLE001 - e.g. out of memory while timing
                entry["error"] = f"timing: {_describe(failure)}"
            else:
                entry.update(median_ms=ms, speedup=dense_ms / ms, timing=method)
        results.append(entry)
    timed = [r for r in results if "median_ms" in r]
    best = min(timed, key=lambda r: r["median_ms"]) if timed else None
    return {
        "kernel": kernel, "N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch."),
        "dense_ms": dense_ms, "best": best, "candidates": results,
    }  # fmt: skip


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a shape is NxK, e.g. 4096x14336, got {text!r}") from err
    return n, k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--shapes", nargs="+", type=_shape, help="NxK (default: 7B shapes)")
    parser.add_argument("--m", nargs="+", type=int, help="rows of x (default per kernel)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default bfloat16 on a GPU, float16 on CPU (the interpreter's bf16 is broken)",
    )
    parser.add_argument("--limit", type=int, help="at most this many candidates per case")
    parser.add_argument("--out", type=Path, help="write the sweep as JSON here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the interpreter: toy sizes
        shapes, default_m = args.shapes or [(48, 192)], {"sparse24_gemm": [32]}
    else:
        shapes, default_m = args.shapes or GPU_SHAPES, GPU_M
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float16"))
    report = {"suite": "triton-tuning", **environment(device), "cases": []}
    try:
        for kernel in args.kernels:
            for m in args.m or default_m.get(kernel, [1]):
                if kernel != "sparse24_gemm" and m > 16:
                    parser.error(f"{kernel} takes M <= 16, got {m}")
                for n, k in shapes:
                    case = tune_case(kernel, n, k, m, dtype, device, args.limit)
                    report["cases"].append(case)
                    _write(report, args.out)  # after every case: a stopped sweep keeps them
                    _print_case(case, dtype)
    except KeyboardInterrupt:  # gpu_session.sh stops a step with SIGINT at its time limit
        report["interrupted"] = True
        _write(report, args.out)
        print(f"interrupted after {len(report['cases'])} cases", file=sys.stderr)
        return 130
    _write(report, args.out)
    return 0


def _print_case(case: dict[str, Any], dtype: torch.dtype) -> None:
    best = case["best"]
    label = Case(case["kernel"], "triton", case["N"], case["K"], case["M"], dtype)
    if best is None:
        print(f"{label}: no candidate ran")
        return
    print(
        f"{label}: best {best['config']} {best['median_ms'] * 1e3:.1f} us, "
        f"{best['speedup']:.2f}x dense ({case['dense_ms'] * 1e3:.1f} us)"
    )


def _write(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
