"""HF config -> engine config; rotary frequencies against transformers; attention masks."""

from __future__ import annotations

import json

import pytest
import torch

from slimstack.engine.config import ConfigError, engine_config, rope_config
from slimstack.engine.model import decode_mask, prefill_mask
from slimstack.engine.rotary import RotaryEmbedding

BASE = dict(
    model_type="llama",
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_llama_defaults_and_gqa() -> None:
    cfg = engine_config(BASE)
    assert (cfg.head_dim, cfg.kv_groups, cfg.context_length) == (8, 4, 64)
    assert cfg.rope.type == "default" and cfg.rope.theta == 10000.0
    assert cfg.sliding_windows == (None, None, None)
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.tie_word_embeddings)


def test_legacy_rope_scaling_layout_is_read() -> None:
    rope = rope_config({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2}})
    assert (rope.type, rope.theta, rope.factor) == ("linear", 5e5, 2.0)
    rope = rope_config(
        {
            **BASE,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
        }
    )
    assert rope.type == "llama3" and rope.original_max_position_embeddings == 64


def test_family_specific_fields() -> None:
    qwen = engine_config({**BASE, "model_type": "qwen2", "sliding_window": 16})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_windows == (None,) * 3
    qwen = engine_config(
        {
            **BASE,
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
        }
    )
    assert qwen.sliding_windows == (None, None, 16)
    mistral = engine_config({**BASE, "model_type": "mistral", "sliding_window": 16})
    assert mistral.sliding_windows == (16, 16, 16)
    assert (
        engine_config({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_windows
        == (None,) * 3
    )
    llama = engine_config({**BASE, "attention_bias": True, "mlp_bias": True, "sliding_window": 4})
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias and llama.sliding_windows[0] is None
    # transformers' Mistral has no biases whatever attention_bias / mlp_bias say
    biased_mistral = engine_config(
        {**BASE, "model_type": "mistral", "attention_bias": True, "mlp_bias": True}
    )
    assert not (biased_mistral.qkv_bias or biased_mistral.o_bias or biased_mistral.mlp_bias)
    typed = engine_config(
        {
            **BASE,
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        }
    )
    assert typed.sliding_windows == (4, None, 4)
    # as transformers 5 writes a qwen2 config without sliding: no window, every layer full
    saved = {
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * 3,
    }
    assert engine_config({**BASE, "model_type": "qwen2", **saved}).sliding_windows == (None,) * 3
    # llama reads neither key (transformers' Llama has no sliding attention)
    llama_typed = {**BASE, "sliding_window": 4, "layer_types": ["sliding_attention"] * 3}
    assert engine_config(llama_typed).sliding_windows == (None,) * 3
    assert engine_config({**BASE, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
        (dict(vocab_size=0), "'vocab_size' must be a positive integer"),
        (dict(rope_scaling={"type": "longrope"}), "'longrope' is not supported"),
        (dict(rope_scaling={"type": "linear"}), "needs a 'factor'"),
        (
            dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, layer_types=["x"]),
            "layer_types lists 1 layers",
        ),
        # transformers' Qwen2 looks each layer's mask up by its type: others are unknown there
        (
            dict(
                model_type="qwen2",
                use_sliding_window=True,
                sliding_window=4,
                layer_types=["full_attention", "chunked_attention", "sliding_attention"],
            ),
            "layer_types has 'chunked_attention'; supported: full_attention, sliding_attention",
        ),
        # layers marked sliding without a window: transformers fails on these, the engine
        # ran them with full attention
        (
            dict(
                model_type="qwen2",
                sliding_window=4,
                layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            ),
            "marks layers 'sliding_attention' but use_sliding_window is false",
        ),
        (
            dict(
                model_type="mistral",
                sliding_window=None,
                layer_types=["sliding_attention", "full_attention", "full_attention"],
            ),
            "marks layers 'sliding_attention' but sliding_window is null",
        ),
        # the engine rotates whole heads: a partial rotary config is refused, wherever it is
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
        (
            dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25}),
            "partial_rotary_factor 0.25 is not supported",
        ),
        # one rope dict per layer type (transformers 5 allows it for some families)
        (
            dict(
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            ),
            "'rope_parameters' is nested per layer type",
        ),
        (dict(rope_parameters=[1.0]), "'rope_parameters' must be a dict"),
        # transformers runs rope_scaling and ignores rope_parameters: refused when they differ
        (
            dict(
                rope_scaling={"type": "linear", "factor": 4.0},
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            ),
            "both 'rope_parameters'.*and 'rope_scaling'.*disagree",
        ),
        (
            dict(
                rope_scaling={"rope_type": "linear", "factor": 4.0},
                rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            ),
            "disagree",  # rope_scaling's theta is the top-level one (default 10000)
        ),
    ],
)
def test_bad_configs_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine_config({**BASE, **change})


def test_swish_is_silu_and_agreeing_rope_dicts_are_read() -> None:
    """transformers' ACT2FN maps "swish" to SiLU too; a config whose rope_scaling and
    rope_parameters say the same thing (one written from the other) is read."""
    assert engine_config({**BASE, "hidden_act": "swish"}).hidden_size == 64
    both = {
        **BASE,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 5e5,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    rope = engine_config(both).rope
    assert (rope.type, rope.theta, rope.factor, rope.original_max_position_embeddings) == (
        "yarn",
        5e5,
        4.0,
        16,
    )


ROPE_CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
# every optional YaRN setting, each changing the tables of the plain "yarn" case (head_dim 64)
YARN_VARIANTS = {
    "yarn_attention_factor": {"attention_factor": 0.8},
    "yarn_mscale": {"mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn_mscale_alone": {"mscale": 2.0},  # without mscale_all_dim: ignored, as transformers does
    "yarn_betas": {"beta_fast": 8, "beta_slow": 2},
    "yarn_no_truncate": {"truncate": False},
}
ROPE_CASES.update({name: {**ROPE_CASES["yarn"], **extra} for name, extra in YARN_VARIANTS.items()})


@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rotary_tables_match_transformers(name: str, head_dim: int) -> None:
    """cos/sin for positions past the trained context (64), where scaling matters; head_dim
    8 (BASE's) and 64, where YaRN's ramp between its correction dims is more than a step."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": 1000.0, **ROPE_CASES[name]}
    base = {**BASE, "head_dim": head_dim}
    hf_config = LlamaConfig(**{**base, "rope_parameters": dict(params)})
    reference = LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(engine_config({**base, "rope_parameters": dict(params)}))
    positions = torch.stack([torch.arange(100), torch.arange(100) + 7])
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = reference(x, positions)
    cos, sin = ours(positions, torch.float32)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)
    if name != "default":  # the scaling really changed something
        plain = RotaryEmbedding(engine_config({**base, "rope_parameters": {"rope_theta": 1000.0}}))
        assert not torch.allclose(plain(positions, torch.float32)[0], cos, atol=1e-3)
    if name in YARN_VARIANTS and name != "yarn_mscale_alone" and head_dim == 64:
        yarn = {"rope_theta": 1000.0, **ROPE_CASES["yarn"]}
        plain_yarn = RotaryEmbedding(engine_config({**base, "rope_parameters": yarn}))
        assert not torch.allclose(plain_yarn(positions, torch.float32)[0], cos, atol=1e-3)


@pytest.mark.parametrize(
    ("params", "context"),
    [
        ({"rope_type": "default"}, 64),
        ({"rope_type": "linear", "factor": 4.0}, 64),  # max_position_embeddings is scaled
        ({"rope_type": "dynamic", "factor": 2.0}, 128),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8}, 64),
        # Qwen2.5's documented YaRN: trained 64, factor 4, max_position_embeddings left at 64
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
        ({"rope_type": "yarn", "factor": 4.0}, 256),  # original defaults to max_position
        ({"rope_type": "yarn", "original_max_position_embeddings": 16}, 64),  # factor 64/16
    ],
)
def test_context_length_by_rope_scaling(params: dict, context: int) -> None:
    cfg = engine_config({**BASE, "rope_parameters": {"rope_theta": 1000.0, **params}})
    assert cfg.context_length == context


def _brute_force_mask(pad: list[int], query: int, keys: int, window: int | None) -> torch.Tensor:
    out = torch.zeros(len(pad), keys, dtype=torch.bool)
    for b, p in enumerate(pad):
        for j in range(keys):
            ok = p <= j <= query and (window is None or query - j < window)
            out[b, j] = ok or (j == query and query < p)  # a padding query sees itself
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_masks_match_a_brute_force(window: int | None) -> None:
    pad = [0, 2, 5]
    seq, length = 6, 10
    mask = prefill_mask(torch.tensor(pad), seq, window)
    assert mask.shape == (3, 1, seq, seq)
    for i in range(seq):
        assert torch.equal(mask[:, 0, i], _brute_force_mask(pad, i, seq, window))
    slot_ids = torch.arange(length)
    for slot in range(seq, length):
        mask = decode_mask(torch.tensor(pad), torch.tensor([slot]), slot_ids, window)
        assert mask.shape == (3, 1, 1, length)
        assert torch.equal(mask[:, 0, 0], _brute_force_mask(pad, slot, length, window))


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_original_context_in_two_places_is_read_as_transformers_reads_it(rope_type: str) -> None:
    """A config with original_max_position_embeddings both at the top level and inside
    rope_parameters (Phi-3 style): transformers (5.x) copies the top-level one into the rope
    dict whenever it builds the frequencies, so the tables must use it too. head_dim 64:
    with BASE's 8 the two readings give the same tables (that once hid the difference)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = {
        **BASE,
        "head_dim": 64,
        "max_position_embeddings": 128,
        "original_max_position_embeddings": 32,
        "rope_parameters": {
            "rope_theta": 1000.0,
            "rope_type": rope_type,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            **({"low_freq_factor": 1.0, "high_freq_factor": 4.0} if rope_type == "llama3" else {}),
        },
    }
    reference = LlamaRotaryEmbedding(LlamaConfig(**json.loads(json.dumps(raw))))
    cfg = engine_config(json.loads(json.dumps(raw)))
    assert cfg.rope.original_max_position_embeddings == 32
    positions = torch.arange(200)[None]
    ref_cos, ref_sin = reference(torch.zeros(1), positions)
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)
    inner_only = json.loads(json.dumps(raw))
    del inner_only["original_max_position_embeddings"]
    other, _ = RotaryEmbedding(engine_config(inner_only))(positions, torch.float32)
    assert not torch.allclose(other, ref_cos, atol=1e-3)  # the two readings really differ
