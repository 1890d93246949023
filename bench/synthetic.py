"""Synthetic checkpoints of real model shapes (random weights) for speed and memory runs.

Quality is not measured on these, so the weights are random; the shapes, dtype and file
layout are those of the real models. Written layer by layer (never the whole model in
memory) through slimstack's atomic CheckpointWriter. The tokenizer is borrowed from a small
real model so calibration runs; its ids fit any larger vocabulary.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from slimstack.checkpoint import expected_shapes
from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.engine.config import engine_config

SHAPES = {
    # depth, hidden, intermediate, heads, kv heads, vocab, context
    "mistral-7b": dict(
        num_hidden_layers=32,  # the real depth
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        model_type="mistral",
        rope_theta=1000000.0,
        sliding_window=None,
    ),
    "llama-3-8b": dict(
        num_hidden_layers=32,  # the real depth
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        model_type="llama",
        rope_theta=500000.0,
    ),
    "llama-1b": dict(  # TinyLlama-1.1B: the end-to-end suite's shape on a CPU
        num_hidden_layers=22,  # the real depth
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        model_type="llama",
        rope_theta=10000.0,
    ),
    "llama-2-13b": dict(
        num_hidden_layers=40,  # the real depth
        hidden_size=5120,
        intermediate_size=13824,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        model_type="llama",
        rope_theta=10000.0,
    ),
}
# the shared models/data: beside the checkout, or where $SLIMSTACK_SHARED says (a GPU
# machine, which gets a copy inside the checkout: tools/gpu_session.sh sets it)
SHARED = Path(
    os.environ.get("SLIMSTACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
)


def synthetic_config(shape: str, layers: int, dtype: torch.dtype) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    config = dict(SHAPES[shape])
    config.update(
        num_hidden_layers=layers,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype=str(dtype).removeprefix("torch."),
        architectures=[f"{config['model_type'].capitalize()}ForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
    )
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Weights of one decoder layer (no biases), as the engine's loader expects them."""
    _, layer = expected_shapes(engine_config(config))
    return {name: shape for name, shape in layer.items() if not name.endswith(".bias")}


def write_synthetic(
    folder: str | Path,
    shape: str = "mistral-7b",
    layers: int = 4,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer_from: str | Path | None = SHARED / "models" / "stories260K",
    overwrite: bool = False,
) -> Path:
    config = synthetic_config(shape, layers, dtype)
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(dtype)

    h, vocab = config["hidden_size"], config["vocab_size"]
    with CheckpointWriter(folder, overwrite=overwrite) as writer:
        writer.add("model.embed_tokens.weight", rand(vocab, h, scale=0.02))
        writer.add("model.norm.weight", torch.ones(h, dtype=dtype))
        writer.add("lm_head.weight", rand(vocab, h, scale=0.02))
        for index in range(layers):
            for name, size in layer_shapes(config).items():
                tensor = (
                    torch.ones(size, dtype=dtype)
                    if name.endswith("norm.weight")
                    else rand(*size, scale=size[1] ** -0.5)
                )
                writer.add(f"model.layers.{index}.{name}", tensor)
        has_tokenizer = tokenizer_from is not None and Path(tokenizer_from).is_dir()
        writer.finish(
            config,
            {"synthetic": {"shape": shape, "seed": seed}},
            tokenizer_from=tokenizer_from if has_tokenizer else None,
        )
    return Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    write_synthetic(
        args.out, args.shape, args.layers, getattr(torch, args.dtype), overwrite=args.overwrite
    )


if __name__ == "__main__":
    main()
