"""Where a decode step's time goes, kernel by kernel: a profile of generate() on a synthetic
model, the kernels of a one-token run subtracted from those of an (S + 1)-token run so that
only the S decode steps remain (the prefill and warm-up cancel out).

    python bench/profile_decode.py --variant 2:4 --layers 8 --out $OUT        # on a GPU
    python bench/profile_decode.py --spec tiny --layers 2 --out /tmp/p        # CPU smoke run
    python bench/profile_decode.py --spec llama-1b --dtype bf16 --device cpu --out /tmp/p

On CUDA the rows are device kernels (CUPTI sees inside the replayed CUDA graph), on CPU the
top-level ops (aten and slimstack's custom ones). Writes <out>/<date>-<gpu>-decode-profile-<variant>-b<batch>-p<prompt>.json (rows: name, calls
per step, us per step, share of the step; prefill_rows: the one-token run, i.e. the prefill)
and .md (the tables, largest first), and prints them. (The H200 run of 2026-12-04 took 44 ms
to prefill 128 tokens on 32 layers, ~10x its FLOP and byte floors: the prefill table is there
to say where that goes.) Per-layer costs
do not depend on depth, so a few layers of the 7B shapes tell what 32 would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts

import common  # noqa: E402
import e2e_helpers  # noqa: E402

SPECS = {
    "mistral-7b": e2e_helpers.MISTRAL_7B,
    "llama-1b": e2e_helpers.LLAMA_1B,
    "tiny": e2e_helpers.TINY,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _kernel_totals(prof, device: torch.device) -> dict[str, tuple[int, float]]:
    """name -> (calls, microseconds): device kernels on CUDA, top-level ops on CPU."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            if not _is_op(event.name) or _has_op_parent(event):
                continue
            us = event.cpu_time_total
        totals[event.name][0] += 1
        totals[event.name][1] += us
    return {name: (calls, us) for name, (calls, us) in totals.items()}


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "slimstack::"))  # torch's ops and the custom ones


def _has_op_parent(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def _profile_generate(model, prompts, new_tokens: int, device: torch.device, mode: str):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        model.generate(prompts, max_new_tokens=new_tokens, mode=mode)
        e2e_helpers.synchronize(device)
    return _kernel_totals(prof, device)


def decode_rows(
    long: dict[str, tuple[int, float]], short: dict[str, tuple[int, float]], steps: int
) -> list[dict[str, Any]]:
    """Per-step rows from the totals of a run with `steps` more decode steps than `short`;
    kernels that only the prefill or warm-up ran (no extra calls) drop out."""
    rows = []
    for name, (calls, us) in long.items():
        base_calls, base_us = short.get(name, (0, 0.0))
        extra_calls = calls - base_calls
        if extra_calls <= 0:
            continue
        rows.append(
            {
                "name": name,
                "calls_per_step": extra_calls / steps,
                "us_per_step": max(us - base_us, 0.0) / steps,
            }
        )
    step_us = sum(r["us_per_step"] for r in rows) or 1.0
    for row in rows:
        row["share"] = row["us_per_step"] / step_us
    return sorted(rows, key=lambda r: r["us_per_step"], reverse=True)


def table(rows: list[dict[str, Any]], title: str, most: int = 40) -> str:
    total = sum(r["us_per_step"] for r in rows)
    lines = [
        f"**{title}**: {total:.1f} us of kernels per step",
        "",
        "| kernel | calls/step | us/step | share |",
        "|---|---|---|---|",
    ]
    for row in rows[:most]:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(
            f"| `{name}` | {row['calls_per_step']:.1f} | {row['us_per_step']:.1f} | "
            f"{100 * row['share']:.1f}% |"
        )
    if len(rows) > most:
        rest = sum(r["us_per_step"] for r in rows[most:])
        lines.append(f"| ({len(rows) - most} more) | | {rest:.1f} | {100 * rest / total:.1f}% |")
    return "\n".join(lines) + "\n"


def profile(args: argparse.Namespace) -> dict[str, Any]:
    from slimstack.engine.loader import load

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    spec = SPECS[args.spec]
    variant = e2e_helpers.Variant(args.layers, args.variant)
    work = Path(tempfile.mkdtemp(prefix="slimstack-profile-", dir=args.workdir))
    try:
        folder = e2e_helpers.write_synthetic_checkpoint(
            work / variant.name, spec, variant, device, dtype
        )
        model = load(folder, device=device, dtype=dtype)
        prompts = e2e_helpers.random_prompts(args.batch, args.prompt, spec.vocab)
        # warm-up: kernels compiled, the decode graph captured
        model.generate(prompts, max_new_tokens=args.steps + 1, mode=args.mode)
        short = _profile_generate(model, prompts, 1, device, args.mode)
        long = _profile_generate(model, prompts, args.steps + 1, device, args.mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = decode_rows(long, short, args.steps)
    # the one-token run is the prefill (and one sampled token): its kernels as they are
    prefill = decode_rows(short, {}, 1)
    env = e2e_helpers.environment(device)
    return {
        "suite": "decode-profile",
        **env,
        "model": spec.name,
        "variant": variant.name,
        "batch": args.batch,
        "prompt_len": args.prompt,
        "steps": args.steps,
        "mode": args.mode,
        "unit": "device kernels" if device.type == "cuda" else "top-level ops (CPU)",
        "rows": rows,
        "prefill_rows": prefill,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=sorted(SPECS), default="mistral-7b")
    parser.add_argument("--variant", choices=("dense", "2:4", "50%"), default="2:4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "graph", "eager"),
        default="auto",
        help="generate()'s decode mode (auto: a CUDA graph on CUDA); eager if a profiler "
        "cannot see the kernels inside graph replays",
    )
    parser.add_argument("--workdir", help="where the checkpoint goes (default: a temp folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .json and .md")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.batch < 1 or args.prompt < 1:
        parser.error("--layers, --steps, --batch and --prompt must be >= 1")
    doc = profile(args)
    stem = (
        f"{time.strftime('%Y-%m-%d')}-{common.gpu_slug(doc['gpu'])}-decode-profile-"
        f"{doc['variant'].replace(':', '')}-b{args.batch}-p{args.prompt}"
    )
    title = f"{doc['gpu']}, {doc['variant']}, batch {args.batch}, prompt {args.prompt}"
    text = (
        table(doc["rows"], f"{title}, decode ({doc['unit']})")
        + "\n"
        + table(doc["prefill_rows"], f"{title}, prefill + first token", most=25)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", text)):
        path = args.out / f"{stem}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)  # complete or absent
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
