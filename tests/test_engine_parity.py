"""The engine against transformers on CPU fp32: same greedy tokens, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_support import (  # noqa: F401  (single_thread is an autouse fixture)
    EXPECTED_CONTINUATION,
    PROMPT,
    hf_greedy,
    hf_model,
    random_prompts,
    single_thread,
    write_tiny_model,
)

from slimstack.engine.loader import load

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path):
    return load(stories260k_dir, device="cpu"), hf_model(stories260k_dir)


def test_stories_greedy_50_tokens_match_transformers(stories) -> None:
    engine, reference = stories
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    result = engine.generate(PROMPT, max_new_tokens=50)
    assert result.tokens == hf_greedy(reference, [prompt], 50)[0]
    assert len(result.tokens) == 50 and result.finish_reasons == ["length"]
    assert result.text.startswith(" " + EXPECTED_CONTINUATION)  # reads on from the prompt


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _check_logits_with_padding(engine, reference, prompts: list[list[int]], steps: int) -> None:
    """Prefill logits at every real position, then `steps` decode steps fed with the
    tokens transformers chose, all within LOGIT_TOL of transformers' logits."""
    ids, mask = _padded(prompts)
    with torch.no_grad():
        ref_prefill = reference(input_ids=ids, attention_mask=mask).logits
        ref = reference.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ours = engine.logits(ids, mask)
    real = mask.bool()
    assert (ours[real] - ref_prefill[real]).abs().max() < LOGIT_TOL

    pads = (mask == 0).sum(1).tolist()
    engine.setup_cache(len(prompts), ids.shape[1] + steps)
    step_logits = engine.prefill(ids, pads)
    slot = torch.tensor([ids.shape[1]])
    for step in range(steps):
        assert (step_logits - ref.logits[step]).abs().max() < LOGIT_TOL, f"step {step}"
        chosen = ref.sequences[:, ids.shape[1] + step]
        step_logits = engine.decode(chosen[:, None], slot)
        slot += 1


def test_stories_logits_match_on_left_padded_batch(stories) -> None:
    engine, reference = stories
    tok = engine.tokenizer
    prompts = [tok(t)["input_ids"] for t in (PROMPT, "Tom had a", "The sun")]
    _check_logits_with_padding(engine, reference, prompts, steps=6)


def test_stories_batch_greedy_matches_transformers_per_row(stories) -> None:
    engine, reference = stories
    tok = engine.tokenizer
    prompts = [tok(t)["input_ids"] for t in (PROMPT, "Tom had a red", "Hi")]
    result = engine.generate(prompts, max_new_tokens=24)
    assert result.token_ids == hf_greedy(reference, prompts, 24)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "llama"])
def test_tiny_random_family_matches_transformers(model_type: str, tmp_path: Path) -> None:
    """mistral: sliding window 8 (crossed by prompt and generation); qwen2: q/k/v bias, a
    full and a sliding layer, tied embeddings; llama: llama3 rope scaling, attention and
    MLP biases, untied lm_head."""
    folder = write_tiny_model(tmp_path / model_type, model_type)
    engine, reference = load(folder, device="cpu"), hf_model(folder)
    prompts = random_prompts(engine.config.vocab_size, [13, 5, 9], seed=1)
    _check_logits_with_padding(engine, reference, prompts, steps=12)
    result = engine.generate(prompts, max_new_tokens=20)
    assert result.token_ids == hf_greedy(reference, prompts, 20)
    assert max(len(t) for t in result.token_ids) > 5  # not an immediate EOS everywhere


def test_dynamic_rope_past_trained_context_matches_transformers(tmp_path: Path) -> None:
    """Dynamic NTK only acts beyond max_position_embeddings (16 here): the frequencies
    change every decode step from there, computed on the device."""
    folder = write_tiny_model(
        tmp_path / "dyn",
        "llama",
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    )
    engine, reference = load(folder, device="cpu"), hf_model(folder)
    assert engine.config.context_length == 64
    prompt = random_prompts(engine.config.vocab_size, [12], seed=2)
    _check_logits_with_padding(engine, reference, prompt, steps=14)


# Each a variation on a tiny family model, checked like the families above (prefill and
# decode logits on a left-padded batch, then greedy generation).
VARIANTS: dict[str, tuple[str, dict]] = {
    "mqa_one_kv_head": ("llama", dict(num_key_value_heads=1)),
    "no_gqa": ("llama", dict(num_key_value_heads=4)),
    "head_dim_not_hidden_over_heads": ("llama", dict(head_dim=32)),
    "qwen2_head_dim": ("qwen2", dict(head_dim=8)),
    "large_rms_eps": ("mistral", dict(rms_norm_eps=0.3)),
    # transformers' ACT2FN: "swish" is SiLU (the engine refused it before)
    "swish": ("llama", dict(hidden_act="swish")),
    # explicit per-layer types: qwen2 reads them; a mistral config with them loads as
    # Ministral in transformers, which does too
    "qwen2_layer_types": ("qwen2", dict(layer_types=["sliding_attention", "full_attention"])),
    "mistral_layer_types": ("mistral", dict(layer_types=["full_attention", "sliding_attention"])),
    "qwen2_all_sliding": ("qwen2", dict(max_window_layers=0, sliding_window=4)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_variants_match_transformers(name: str, tmp_path: Path) -> None:
    model_type, overrides = VARIANTS[name]
    folder = write_tiny_model(tmp_path / name, model_type, **overrides)
    engine, reference = load(folder, device="cpu"), hf_model(folder)
    prompts = random_prompts(engine.config.vocab_size, [13, 5, 9], seed=3)
    _check_logits_with_padding(engine, reference, prompts, steps=8)
    assert engine.generate(prompts, max_new_tokens=12).token_ids == hf_greedy(
        reference, prompts, 12
    )


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_top_level_original_context_wins_as_in_transformers(rope_type: str, tmp_path: Path) -> None:
    """config.json with original_max_position_embeddings at the top level (64) and inside
    rope_parameters (16): transformers runs the top-level one. Before, the engine took the
    inner one and its logits were up to ~21 off on a 48-token prompt (head_dim 64)."""
    params = {
        "rope_type": rope_type,
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        **({"low_freq_factor": 1.0, "high_freq_factor": 4.0} if rope_type == "llama3" else {}),
    }
    folder = write_tiny_model(
        tmp_path / rope_type,
        "llama",
        hidden_size=256,
        rope_parameters=params,
        config_edits={"original_max_position_embeddings": 64},
    )
    engine, reference = load(folder, device="cpu"), hf_model(folder)
    assert engine.config.rope.original_max_position_embeddings == 64
    prompts = random_prompts(engine.config.vocab_size, [48, 30], seed=4)
    _check_logits_with_padding(engine, reference, prompts, steps=4)


def test_eos_list_of_generation_config_stops_rows_as_in_transformers(tmp_path: Path) -> None:
    """generation_config.json's eos_token_id list (what transformers' generate stops on,
    over config.json's single id): a row stops at any of them, others run on."""
    folder = write_tiny_model(tmp_path / "eos", "llama")
    prompts = random_prompts(256, [13, 5, 9], seed=3)
    free = hf_greedy(hf_model(folder), prompts, 16)
    # a token row 0 emits first at step 3 or later becomes the second EOS
    stop = next(t for i, t in enumerate(free[0]) if i >= 3 and t not in free[0][:i])
    generation = folder / "generation_config.json"
    settings = json.loads(generation.read_text()) if generation.is_file() else {}
    generation.write_text(json.dumps({**settings, "eos_token_id": [2, stop]}))
    engine, reference = load(folder, device="cpu"), hf_model(folder)
    assert engine.eos_token_ids == (2, stop)
    assert reference.generation_config.eos_token_id == [2, stop]
    result = engine.generate(prompts, max_new_tokens=16)
    assert result.token_ids == hf_greedy(reference, prompts, 16)
    assert result.finish_reasons[0] == "eos" and len(result.token_ids[0]) < len(free[0])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_batch_greedy_equals_each_prompt_alone(model_type: str, tmp_path: Path) -> None:
    """Left padding shifts a row's positions and masks, windows included (mistral's 8 and
    qwen2's sliding layer are crossed by the prompts and the generation): a prompt
    continues the same in a batch of longer and shorter ones as on its own."""
    engine = load(write_tiny_model(tmp_path / model_type, model_type), device="cpu")
    prompts = random_prompts(engine.config.vocab_size, [21, 5, 13, 9], seed=5)
    batch = engine.generate(prompts, max_new_tokens=20).token_ids
    assert batch == [engine.generate(p, max_new_tokens=20).tokens for p in prompts]
