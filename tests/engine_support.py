"""Helpers for the engine tests: tiny random HF checkpoints and transformers references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

PROMPT = "Once upon a time, there was a little"
EXPECTED_CONTINUATION = (
    "girl named Lily. She loved to play outside in the park. One day, she saw a big,"
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: a second OpenMP thread only adds spin-wait on a busy 2-core
    box (a 64x64 matmul went from 30 us to 18 ms under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_FAMILIES: dict[str, dict[str, Any]] = {
    # GQA everywhere; windows small enough that prompts + generation cross them
    "mistral": dict(sliding_window=8, head_dim=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "llama": dict(
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def write_tiny_model(
    folder: Path,
    model_type: str,
    seed: int = 0,
    config_edits: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """A random 2-layer model of `model_type`, saved as safetensors. Weights are drawn wider
    than HF's init so the next-token distribution is peaked: greedy comparisons then test
    the arithmetic, not fp32 tie-breaking. `config_edits` are written into config.json after
    saving, for keys transformers would rewrite on the way (a config edited by hand)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    settings.update(TINY_FAMILIES.get(model_type, {}))
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
    model.save_pretrained(folder, safe_serialization=True)
    if config_edits:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_edits}, indent=2))
    return folder


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32
    ).eval()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate on left-padded prompts; each row cut at its first EOS."""
    width = max(len(p) for p in prompts)
    # on the model's device: some transformers releases (5.17, the GPU image's) do not move
    # generate()'s inputs to a CUDA model themselves
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in lengths]
