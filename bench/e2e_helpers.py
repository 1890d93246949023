"""End-to-end benchmark pieces: synthetic checkpoints, timed runs, the results file.

Quality is not measured here, so the checkpoints are random weights of the real shapes
(Mistral-7B by default, from bench/synthetic.py's table), written on the benchmark machine
through slimstack's own CheckpointWriter and pruned with slimstack's own magnitude pruning
to exact 2:4 or 50% per row. Unlike bench/synthetic.py (CPU, one generator) the weights are
drawn on the GPU, pruned, and each layer's come from a generator seeded by its index, so
the 24-layer variants hold exactly the first 24 layers of the 32-layer ones.

The same code runs on CPU with `TINY` shapes (tests/test_bench_e2e_helpers.py), so a GPU
session only spends its time measuring.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common  # bench/common.py: environment, peaks (shared with the kernel suite)
import synthetic  # bench/synthetic.py: the real models' shapes
import torch

from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.prune.methods import magnitude_prune
from slimstack.prune.patterns import parse_pattern

SUITE = "e2e"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def spec_from_shape(shape: str, layers: int | None = None) -> ModelSpec:
    """A ModelSpec from bench/synthetic.py's table of real model shapes (at the real depth
    unless `layers` says otherwise)."""
    if shape not in synthetic.SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(synthetic.SHAPES)}")
    real = synthetic.SHAPES[shape]
    return ModelSpec(
        name=f"{shape}-shaped",
        hidden=real["hidden_size"],
        intermediate=real["intermediate_size"],
        layers=layers or real["num_hidden_layers"],
        heads=real["num_attention_heads"],
        kv_heads=real["num_key_value_heads"],
        vocab=real["vocab_size"],
        max_positions=real["max_position_embeddings"],
        sliding_window=real.get("sliding_window"),
    )


MISTRAL_7B = spec_from_shape("mistral-7b")
LLAMA_1B = spec_from_shape("llama-1b")  # the suite's default on a CPU
TINY = ModelSpec(
    name="tiny", hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256,
    max_positions=512,
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    layers: int
    sparsity: str  # "dense", "2:4" or "50%"

    @property
    def name(self) -> str:
        return f"{self.sparsity}-{self.layers}L"

    @property
    def pattern(self) -> str | None:
        return {"dense": None, "2:4": "2:4", "50%": "0.5"}[self.sparsity]


def variants(spec: ModelSpec) -> list[Variant]:
    """Dense, 2:4 and 50% at full depth; dense and 2:4 at three quarters of it."""
    full, sliced = spec.layers, spec.layers * 3 // 4
    return [
        Variant(full, "dense"),
        Variant(full, "2:4"),
        Variant(full, "50%"),
        Variant(sliced, "dense"),
        Variant(sliced, "2:4"),
    ]


def hf_config(spec: ModelSpec, layers: int) -> dict[str, Any]:
    """config.json of a Mistral-family model. eos_token_id is null: random weights would
    otherwise stop at a random point, and every run must decode the same token count."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": spec.sliding_window,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "bfloat16",
    }


# ----------------------------------------------------------------------------- checkpoints
def _random(shape: tuple[int, ...], std: float, gen: torch.Generator, device, dtype):
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)


def write_synthetic_checkpoint(
    out: str | os.PathLike,
    spec: ModelSpec,
    variant: Variant,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write a random checkpoint of `spec`'s shapes, `variant.layers` deep, its decoder
    linears magnitude-pruned to `variant.sparsity`. Returns the folder."""
    device = torch.device(device)
    pattern = parse_pattern(variant.pattern) if variant.pattern else None
    std = spec.hidden**-0.5

    def generator(index: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed * 100_003 + index)

    config = hf_config(spec, variant.layers)
    with CheckpointWriter(out, max_shard_bytes=4 * 1024**3) as writer:
        gen = generator(10_000)
        writer.add(
            "model.embed_tokens.weight", _random((spec.vocab, spec.hidden), 1.0, gen, device, dtype)
        )
        writer.add("lm_head.weight", _random((spec.vocab, spec.hidden), std, gen, device, dtype))
        writer.add("model.norm.weight", torch.ones(spec.hidden, dtype=dtype))
        for index in range(variant.layers):
            gen = generator(index)
            prefix = f"model.layers.{index}."
            for name, shape in synthetic.layer_shapes(config).items():
                if name.endswith("norm.weight"):
                    writer.add(prefix + name, torch.ones(shape, dtype=dtype))
                    continue
                weight = _random(shape, std, gen, device, dtype)
                if pattern is not None:
                    weight = magnitude_prune(weight, pattern)
                writer.add(prefix + name, weight)
        metadata = {
            "synthetic": {
                "spec": spec.name,
                "variant": variant.name,
                "seed": seed,
                "note": "random weights of the real shapes, magnitude-pruned; speed only",
            }
        }
        writer.finish(config, metadata)
    return Path(out)


# ----------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_weight_bytes(model) -> int:
    """Bytes one decode step reads from weights: every packed or dense linear, the norms
    and lm_head; the embedding table only contributes the looked-up rows (ignored)."""
    info = model.info()
    embed = model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return info.total_nbytes - (0 if tied else embed.nbytes)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def run_slimstack(
    model, batch: int, prompt_len: int, new_tokens: int, mode: str = "auto", repeats: int = 2
) -> dict[str, Any]:
    """Best of `repeats` timed generate() calls after one warm-up (which also captures the
    decode graph for this batch and cache length)."""
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    model.generate(prompts, max_new_tokens=new_tokens, mode=mode)
    best = None
    for _ in range(repeats):
        timings = model.generate(prompts, max_new_tokens=new_tokens, mode=mode).timings
        if best is None or timings.decode_ms < best.decode_ms:
            best = timings
    return _summary(best)


def run_slimstack_paired(
    model,
    reference,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    mode: str = "auto",
    repeats: int = 2,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """run_slimstack for `model` and for `reference` (the dense model) on the same prompts,
    their timed calls interleaved. A shared CPU's speed drifts over minutes: the same dense
    model decoded at 39 and at 53 ms per token in two runs of 2026-12-07, so a ratio of two
    variants measured minutes apart carried that drift; interleaved, both see it."""
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    pair = (model, reference)
    for m in pair:
        m.generate(prompts, max_new_tokens=new_tokens, mode=mode)
    best: list[Any] = [None, None]
    for _ in range(repeats):
        for i, m in enumerate(pair):
            timings = m.generate(prompts, max_new_tokens=new_tokens, mode=mode).timings
            if best[i] is None or timings.decode_ms < best[i].decode_ms:
                best[i] = timings
    return _summary(best[0]), _summary(best[1])


def _summary(best) -> dict[str, Any]:
    steps = best.decode_steps
    return {
        "tokens_per_s": best.throughput_tokens_per_s,
        "sequence_tokens_per_s": best.decode_tokens_per_s,
        "decode_ms_per_step": best.decode_ms / max(steps, 1),
        "prefill_ms": best.prefill_ms,
        "decode_steps": steps,
    }


def load_transformers(path: Path, device: torch.device):
    """transformers' model of a dense checkpoint folder, on `device`, ready to generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, local_files_only=True
    ).to(device)
    return model.eval()


def run_transformers(
    model, batch: int, prompt_len: int, new_tokens: int, device: torch.device, repeats: int = 1
) -> dict[str, Any]:
    """transformers' own generate (default cache and attention) on the same dense folder.
    Prefill is timed as one forward of the prompts; decode as the rest of generate.
    `model` is a loaded model (load_transformers: load it once for every setting) or a
    checkpoint folder (loaded and released here)."""
    if isinstance(model, (str, os.PathLike)):
        loaded = load_transformers(Path(model), device)
        try:
            return run_transformers(loaded, batch, prompt_len, new_tokens, device, repeats)
        finally:
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ids = torch.tensor(random_prompts(batch, prompt_len, model.config.vocab_size), device=device)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        synchronize(device)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)  # as generate's own prefill: the last column's logits
        synchronize(device)
        prefill_s = time.perf_counter() - start
        total_s = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            synchronize(device)
            total_s = min(total_s, time.perf_counter() - start)
    decode_s = max(total_s - prefill_s, 1e-9)
    steps = new_tokens - 1
    return {
        "tokens_per_s": batch * steps / decode_s,
        "sequence_tokens_per_s": steps / decode_s,
        "decode_ms_per_step": decode_s * 1e3 / steps,
        "prefill_ms": prefill_s * 1e3,
        "decode_steps": steps,
    }


def run_configs(
    run: Callable[[int, int], dict[str, Any]],
    configs: list[tuple[int, int]],
    device: torch.device,
    after: Callable[[], None] | None = None,
) -> list[tuple[int, int, dict[str, Any], float | None]]:
    """(batch, prompt_len, measured, peak GPU GB) for each setting, `run(batch, prompt_len)`
    measuring it. The peak is reset before every setting, so each row holds the memory of
    its own run (the resident weights plus that run's cache and activations), not the
    largest of the settings before it or the loader's transients. `after` runs after each
    setting (e.g. release the KV cache)."""
    results = []
    for batch, prompt_len in configs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        measured = run(batch, prompt_len)
        memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        results.append((batch, prompt_len, measured, memory))
        if after is not None:
            after()
    return results


def free_disk_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def checkpoint_gb(spec: ModelSpec, layers: int, itemsize: int = 2) -> float:
    shapes = synthetic.layer_shapes(hf_config(spec, layers)).values()
    per_layer = sum(math.prod(shape) for shape in shapes if len(shape) == 2)
    return (layers * per_layer + 2 * spec.vocab * spec.hidden) * itemsize / 1e9


# ----------------------------------------------------------------------------- results
def environment(device: torch.device) -> dict[str, Any]:
    """suite, commit, gpu, torch, triton, cuda: the kernel suite's header, suite "e2e"."""
    return {"suite": SUITE, **common.environment(device.type)}


def measure_peaks(device: torch.device) -> dict[str, float]:
    """HBM copy bandwidth (read + write) and dense matmul TFLOP/s, measured now."""
    return common.measure_peaks(device.type)


def results_path(env: dict[str, Any], directory: Path | None = None) -> Path:
    """bench/results/<date>-<gpu>-e2e.json, or under $SLIMSTACK_BENCH_RESULTS when set (as
    for the kernel suite), e.g. a folder that comes back from the GPU machine."""
    folder = directory or Path(os.environ.get(common.RESULTS_ENV) or RESULTS_DIR)
    return folder / f"{time.strftime('%Y-%m-%d')}-{common.gpu_slug(env['gpu'])}-{SUITE}.json"


ROW_KEY = ("model", "provider", "layers", "sparsity", "batch", "prompt_len", "new_tokens")


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill baseline/speedup fields from the rows present (speedup = baseline time over
    this row's time, both from this file's runs).

    Sparse / sliced slimstack rows: baseline slimstack's dense full-depth model (of the same
    provider: slimstack, or slimstack_no_pdl for a run with SLIMSTACK_PDL=0); a row that
    carries `paired_dense` (the dense model timed interleaved with it, on a CPU) is
    compared with that instead (baseline "slimstack_dense_paired"). Dense
    full-depth slimstack rows: baseline transformers. Every slimstack row also gets
    speedup_vs_transformers; prefill_speedup compares prefill against the same baseline.
    """

    def key(row: dict[str, Any], provider: str, dense_full: bool) -> tuple:
        layers = max((r["layers"] for r in rows if r["model"] == row["model"]), default=0)
        return (
            row["model"],
            provider,
            layers if dense_full else row["layers"],
            "dense" if dense_full else row["sparsity"],
            row["batch"],
            row["prompt_len"],
            row["new_tokens"],
        )

    index = {tuple(r[k] for k in ROW_KEY): r for r in rows}
    for row in rows:
        if not row["provider"].startswith("slimstack"):
            row.update(baseline=None, speedup=None)
            continue
        # slimstack_no_pdl rows (SLIMSTACK_PDL=0) against the dense model measured the same way
        dense = index.get(key(row, row["provider"], dense_full=True))
        hf = index.get(key(row, "transformers", dense_full=True))
        is_dense_full = dense is row
        base = hf if is_dense_full else dense
        row["baseline"] = (
            None if base is None else ("transformers" if is_dense_full else "slimstack_dense")
        )
        row["speedup"] = _ratio(base, row, "decode_ms_per_step")
        row["prefill_speedup"] = _ratio(base, row, "prefill_ms")
        if row.get("paired_dense") and not is_dense_full:
            # the dense model measured interleaved with this one (run_slimstack_paired)
            paired = row["paired_dense"]
            row["baseline"] = "slimstack_dense_paired"
            row["speedup"] = _ratio(paired, row, "decode_ms_per_step")
            row["prefill_speedup"] = _ratio(paired, row, "prefill_ms")
        row["speedup_vs_transformers"] = _ratio(hf, row, "decode_ms_per_step")
    return rows


def _ratio(base: dict[str, Any] | None, row: dict[str, Any], field: str) -> float | None:
    if base is None or not row.get(field):
        return None
    return round(base[field] / row[field], 4)


def write_results(
    path: Path, env: dict[str, Any], peak: dict[str, Any], new_rows: list[dict[str, Any]]
) -> Path:
    """Merge rows into the run's JSON (a later row with the same key replaces an earlier
    one, so a suite split over several commands accumulates one file), then recompute
    the speedups. Written atomically."""
    rows: list[dict[str, Any]] = []
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("suite") == SUITE and previous.get("gpu") == env["gpu"]:
            rows = previous.get("rows", [])
            peak = {**previous.get("peak", {}), **{k: v for k, v in peak.items() if v}}
    replaced = {tuple(r[k] for k in ROW_KEY) for r in new_rows}
    rows = [r for r in rows if tuple(r[k] for k in ROW_KEY) not in replaced] + new_rows
    payload = {**env, "peak": peak, "rows": add_speedups(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def make_row(
    spec: ModelSpec,
    variant: Variant,
    provider: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    measured: dict[str, Any],
    weight_bytes: int | None,
    peak_gbps: float | None,
    gpu_mem_gb: float | None,
    dtype: torch.dtype = torch.bfloat16,
    mode: str | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": spec.name,
        "variant": variant.name,
        "provider": provider,
        "layers": variant.layers,
        "sparsity": variant.sparsity,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()},
        "weight_gb": None if weight_bytes is None else round(weight_bytes / 1e9, 4),
        "gpu_mem_gb": None if gpu_mem_gb is None else round(gpu_mem_gb, 3),
    }
    if weight_bytes is not None and measured.get("decode_ms_per_step"):
        achieved = weight_bytes / (measured["decode_ms_per_step"] / 1e3) / 1e9
        row["weight_gbps"] = round(achieved, 2)
        row["hbm_share"] = round(achieved / peak_gbps, 4) if peak_gbps else None
    return row
