"""The decoder layer's elementwise pieces on CPU, native (engine/cpu_kernels.py) against the
torch references, at one decode step's shapes: each call as the engine makes it (outputs
allocated, strided inputs), median of many calls after warm-up, on the calling thread's
torch settings. Writes <out>/<date>-cpu-decoder-pieces.json (suite "decoder-pieces"; rows:
op, provider "native", baseline "torch", shape, dtype, median_us, baseline_us, speedup).

    python bench/decoder_pieces.py --spec llama-1b --out bench/results
    python bench/decoder_pieces.py --spec tiny --calls 50 --out /tmp/p    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts

import common  # noqa: E402
import e2e_helpers  # noqa: E402

SPECS = {"mistral-7b": e2e_helpers.MISTRAL_7B, "llama-1b": e2e_helpers.LLAMA_1B,
         "tiny": e2e_helpers.TINY}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(max(calls // 10, 3)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def decode_inputs(spec: e2e_helpers.ModelSpec, dtype: torch.dtype, cache: int, visible: int):
    """One token's tensors, as views the engine passes (q/k/v split from one projection,
    gate/up halves of one), batch 1; `visible` of the `cache` slots unmasked."""
    gen = torch.Generator().manual_seed(0)
    D, H, Hkv = spec.head_dim, spec.heads, spec.kv_heads

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    qkv = randn(1, 1, (H + 2 * Hkv) * D)
    q, k, v = (t.view(1, 1, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    return {
        "x": randn(1, 1, spec.hidden), "delta": randn(1, 1, spec.hidden),
        "weight": randn(spec.hidden), "gate_up": randn(1, 1, 2 * spec.intermediate),
        "q": q, "k": k, "v": v, "cos": randn(1, 1, D), "sin": randn(1, 1, D),
        "k_cache": randn(1, Hkv, cache, D), "v_cache": randn(1, Hkv, cache, D),
        "slot": torch.tensor([visible - 1]),
        "q_grouped": randn(1, Hkv, H // Hkv, D),
        "mask": (torch.arange(cache) < visible)[None, None, None],
    }  # fmt: skip


def pieces(kernels, t: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    return {
        "add_rms_norm": lambda: kernels.add_rms_norm(t["x"], t["delta"], t["weight"], 1e-5),
        "rms_norm": lambda: kernels.rms_norm(t["x"], t["weight"], 1e-5),
        "swiglu": lambda: kernels.swiglu(*t["gate_up"].chunk(2, dim=-1)),
        "rotary_to_cache": lambda: kernels.rotary_to_cache(
            t["q"], t["k"], t["v"], t["cos"], t["sin"], t["k_cache"], t["v_cache"], t["slot"]
        ),
        "decode_attention": lambda: kernels.decode_attention(
            t["q_grouped"], t["k_cache"], t["v_cache"], t["mask"]
        ),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from slimstack.engine import cpu_kernels
    from slimstack.engine.model import REFERENCE_KERNELS

    if not cpu_kernels.available():
        raise SystemExit("the native decoder ops need the extension slimstack._C")
    spec, dtype = SPECS[args.spec], DTYPES[args.dtype]
    rows = []
    for cache, visible in args.contexts:
        tensors = decode_inputs(spec, dtype, cache, visible)
        # every native op, SwiGLU included where the engine's bundle keeps torch's
        ops = dataclasses.replace(cpu_kernels.native_kernels(), swiglu=cpu_kernels.swiglu)
        native, torch_ref = pieces(ops, tensors), pieces(REFERENCE_KERNELS, tensors)
        for op in native:
            if op != "decode_attention" and cache != args.contexts[0][0]:
                continue  # only attention depends on the context
            ours, theirs = median_us(native[op], args.calls), median_us(torch_ref[op], args.calls)
            rows.append({
                "op": op, "provider": "native", "baseline": "torch", "model": spec.name,
                "hidden": spec.hidden, "intermediate": spec.intermediate, "heads": spec.heads,
                "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "cache": cache,
                "visible": visible, "batch": 1, "dtype": str(dtype).removeprefix("torch."),
                "median_us": round(ours, 2), "baseline_us": round(theirs, 2),
                "speedup": round(theirs / ours, 3),
            })  # fmt: skip
    return {
        "suite": "decoder-pieces",
        **common.environment("cpu"),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _context(text: str) -> tuple[int, int]:
    cache, _, visible = text.partition(":")
    if not (cache.isdigit() and visible.isdigit()) or not 0 < int(visible) <= int(cache):
        raise argparse.ArgumentTypeError(
            f"want CACHE:VISIBLE with 0 < VISIBLE <= CACHE, got {text!r}"
        )
    return int(cache), int(visible)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=sorted(SPECS), default="llama-1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--contexts", type=_context, nargs="+", default=[(256, 131), (2048, 1501)],
        help="KV cache slots and how many are unmasked, e.g. 256:131 (the first also sets "
        "the other pieces' row)",
    )  # fmt: skip
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be >= 1")
    doc = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y-%m-%d')}-cpu-decoder-pieces.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    for row in doc["rows"]:
        print(
            f"{row['op']:>17} cache {row['cache']:>5} ({row['visible']} visible): native "
            f"{row['median_us']:8.1f} us, torch {row['baseline_us']:8.1f} us, {row['speedup']:.2f}x"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
