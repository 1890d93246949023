"""End-to-end decode benchmark on a GPU: slimstack dense / 2:4 / 50% / sliced vs dense and
vs transformers' generate, on synthetic Mistral-7B-shaped checkpoints.

    pip install --no-build-isolation --no-deps -e .          # on the GPU machine
    pytest bench/test_bench_e2e.py -s                        # all five variants
    pytest bench/test_bench_e2e.py -s -k "dense-32L"         # one at a time (10-minute calls)
    python bench/plot_e2e.py bench/results/<file>.json

Each variant writes its checkpoint (about 15 GB for 32 layers) under $SLIMSTACK_E2E_DIR
(default: a temporary folder), measures, merges its rows into
bench/results/<date>-<gpu>-e2e.json and deletes the checkpoint, so the disk holds one at a
time. The dense full-depth variant also runs transformers' generate on the same folder.

On a CPU (`SLIMSTACK_E2E_DEVICE=cpu`) the same suite runs TinyLlama-1.1B shapes (22 layers,
2.2 GB in bf16), eager decode, settings 1x128 and 4x128, 32 new tokens, and times every
sparse or sliced variant interleaved with the dense model (kept loaded: a second 2.2 GB
checkpoint on disk), whose speed drifts over minutes on a shared CPU:

    SLIMSTACK_E2E_DEVICE=cpu pytest bench/test_bench_e2e.py -s      # ~10 minutes on 2 cores

Environment knobs: SLIMSTACK_E2E_DEVICE=cuda|cpu, SLIMSTACK_E2E_SPEC=tiny|mistral-7b|llama-1b|...
(bench/synthetic.py's shapes at their real depth; tiny: a smoke run),
SLIMSTACK_E2E_CONFIGS="1x128,8x2048" (batch x prompt), SLIMSTACK_E2E_NEW_TOKENS=256,
SLIMSTACK_E2E_HF=0 (skip transformers), SLIMSTACK_E2E_MODE=graph|compile|eager,
SLIMSTACK_E2E_PAIRED=0 (CPU: compare variants with the dense rows instead of with the dense
model timed interleaved with each),
SLIMSTACK_PDL=0 (no programmatic dependent launch: rows as provider slimstack_no_pdl),
SLIMSTACK_BENCH_RESULTS=<folder> (write the JSON there instead of bench/results/, e.g. $OUT;
copy it into bench/results/ to commit it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from e2e_helpers import (
    LLAMA_1B,
    MISTRAL_7B,
    TINY,
    checkpoint_gb,
    decode_weight_bytes,
    environment,
    free_disk_gb,
    load_transformers,
    make_row,
    measure_peaks,
    results_path,
    run_configs,
    run_slimstack,
    run_slimstack_paired,
    run_transformers,
    spec_from_shape,
    variants,
    write_results,
    write_synthetic_checkpoint,
)

from slimstack.devices import pdl_enabled

DEVICE = os.environ.get("SLIMSTACK_E2E_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"SLIMSTACK_E2E_DEVICE must be cuda or cpu, got {DEVICE!r}")
ON_CPU = DEVICE == "cpu"
pytestmark = (
    []
    if ON_CPU
    else [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="the e2e benchmark needs CUDA"),
    ]
)


def _spec(name: str | None):
    if name is None:
        return LLAMA_1B if ON_CPU else MISTRAL_7B
    return TINY if name == "tiny" else spec_from_shape(name)


SPEC = _spec(os.environ.get("SLIMSTACK_E2E_SPEC"))
CONFIGS = [
    tuple(int(v) for v in item.split("x"))
    for item in os.environ.get(
        "SLIMSTACK_E2E_CONFIGS", "1x128,4x128" if ON_CPU else "1x128,1x2048,8x128,8x2048"
    ).split(",")
]
NEW_TOKENS = int(os.environ.get("SLIMSTACK_E2E_NEW_TOKENS", "32" if ON_CPU else "256"))
RUN_HF = os.environ.get("SLIMSTACK_E2E_HF", "1") != "0"
MODE = os.environ.get("SLIMSTACK_E2E_MODE", "eager" if ON_CPU else "graph")
# best of this many timed generate() calls (slimstack, transformers): a shared CPU machine is
# noisier than a GPU, and a GPU lease has no seconds to spare for transformers
REPEATS, HF_REPEATS = (4, 4) if ON_CPU else (2, 1)
# On a CPU each sparse or sliced variant is timed interleaved with the dense model, kept
# loaded for the session (SLIMSTACK_E2E_PAIRED=0: against the dense rows, measured apart)
PAIRED = ON_CPU and os.environ.get("SLIMSTACK_E2E_PAIRED", "1") != "0"
# SLIMSTACK_PDL=0 (no programmatic dependent launch) rows are kept apart from the default's
PROVIDER = "slimstack" if pdl_enabled() else "slimstack_no_pdl"
DTYPE = torch.bfloat16


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def workdir():
    root = os.environ.get("SLIMSTACK_E2E_DIR")
    folder = Path(tempfile.mkdtemp(prefix="slimstack-e2e-", dir=root))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def run_env(device: torch.device) -> dict:
    env = environment(device)
    # one file for the session, also when it runs past midnight
    return {"env": env, "peak": measure_peaks(device), "path": results_path(env)}


@pytest.fixture(scope="session")
def dense_reference(workdir: Path, device: torch.device):
    """Loaded on first use: the full-depth dense model the variants are timed against, one
    call each in turn (PAIRED); None where they are compared with the dense rows."""
    holder: dict = {}

    def get():
        if not PAIRED:
            return None
        if "model" not in holder:
            from slimstack.engine.loader import load

            dense = variants(SPEC)[0]
            folder = write_synthetic_checkpoint(workdir / "reference", SPEC, dense, device, DTYPE)
            holder["model"] = load(folder, device=device, dtype=DTYPE)
        return holder["model"]

    yield get
    holder.clear()


@pytest.mark.parametrize("variant", variants(SPEC), ids=lambda v: v.name)
def test_e2e_decode(
    variant, workdir: Path, run_env: dict, device: torch.device, dense_reference
) -> None:
    needed = checkpoint_gb(SPEC, variant.layers) * 1.1
    if free_disk_gb(workdir) < needed:
        pytest.fail(f"{workdir} has {free_disk_gb(workdir):.1f} GB free, {needed:.1f} GB needed")
    folder = write_synthetic_checkpoint(workdir / variant.name, SPEC, variant, device, DTYPE)
    peak = run_env["peak"]["hbm_gbps"]
    rows: list[dict] = []  # filled as settings finish: an interrupted run keeps them
    try:
        torch.cuda.empty_cache()
        full_dense = variant.sparsity == "dense" and variant.layers == SPEC.layers
        reference = None if full_dense else dense_reference()
        _measure_slimstack(folder, variant, device, peak, rows, reference)
        torch.cuda.empty_cache()
        if RUN_HF and variant.sparsity == "dense" and variant.layers == SPEC.layers:
            _measure_transformers(folder, variant, device, peak, rows)
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if rows:
            path = write_results(run_env["path"], run_env["env"], run_env["peak"], rows)
            print(f"rows merged into {path}")
    assert all(row["tokens_per_s"] > 0 for row in rows)


def _measure_slimstack(
    folder: Path, variant, device, peak: float, rows: list[dict], reference=None
) -> None:
    """The variant's rows; with a `reference` (the dense model) each setting times both,
    interleaved, and the row keeps the dense timings as `paired_dense`."""
    from slimstack.engine.loader import load

    model = load(folder, device=device, dtype=DTYPE)
    weight_bytes = decode_weight_bytes(model)
    print(f"\n{variant.name}: {weight_bytes / 1e9:.2f} GB read per decode step")
    print(model.info().table().split("\n\n")[0])
    paired: dict[tuple[int, int], dict] = {}

    def run(batch: int, prompt_len: int) -> dict:
        if reference is None:
            measured = run_slimstack(
                model, batch, prompt_len, NEW_TOKENS, mode=MODE, repeats=REPEATS
            )
        else:
            measured, paired[batch, prompt_len] = run_slimstack_paired(
                model, reference, batch, prompt_len, NEW_TOKENS, mode=MODE, repeats=REPEATS
            )
        assert measured["decode_steps"] == NEW_TOKENS - 1
        return measured

    def release() -> None:
        model.release_cache()
        if reference is not None:
            reference.release_cache()

    for batch, prompt_len, measured, memory in run_configs(run, CONFIGS, device, after=release):
        row = make_row(
            SPEC, variant, PROVIDER, batch, prompt_len, NEW_TOKENS, measured,
            weight_bytes, peak, memory, DTYPE, MODE,
        )  # fmt: skip
        if (batch, prompt_len) in paired:
            row["paired_dense"] = {
                k: round(v, 4) if isinstance(v, float) else v
                for k, v in paired[batch, prompt_len].items()
            }
        rows.append(row)
        print(_describe(row))


def _measure_transformers(folder: Path, variant, device, peak: float, rows: list[dict]) -> None:
    model = load_transformers(folder, device)  # once for every setting

    def run(batch: int, prompt_len: int) -> dict:
        return run_transformers(model, batch, prompt_len, NEW_TOKENS, device, repeats=HF_REPEATS)

    for batch, prompt_len, measured, memory in run_configs(run, CONFIGS, device):
        row = make_row(
            SPEC, variant, "transformers", batch, prompt_len, NEW_TOKENS, measured,
            None, peak, memory, DTYPE, "generate",
        )  # fmt: skip
        rows.append(row)
        print(_describe(row))


def _describe(row: dict) -> str:
    share = f", {row['hbm_share']:.0%} of HBM" if row.get("hbm_share") else ""
    if row.get("paired_dense"):
        share += f"; dense alongside {row['paired_dense']['decode_ms_per_step']:.2f} ms/step"
    memory = "" if row.get("gpu_mem_gb") is None else f", peak mem {row['gpu_mem_gb']:.1f} GB"
    return (
        f"  {row['provider']:>12} b={row['batch']} prompt={row['prompt_len']}: "
        f"{row['tokens_per_s']:.1f} tok/s ({row['decode_ms_per_step']:.2f} ms/step{share}), "
        f"prefill {row['prefill_ms']:.1f} ms{memory}"
    )
