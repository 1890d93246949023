"""A Hugging Face config.json (llama, mistral, qwen2) -> the engine's own, flat config.

Only what the decoder stack needs survives, already resolved: head_dim, per-layer sliding
windows, which projections carry a bias, the rotary scaling. Both the transformers 5
layout (`rope_parameters` holding `rope_theta`) and the older one (top-level `rope_theta`
plus `rope_scaling`) are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# transformers' ACT2FN maps both names to SiLU
SILU_ACTIVATIONS = ("silu", "swish")
LAYER_TYPES = ("full_attention", "sliding_attention")
_DEFAULT_THETA = 10000.0


class ConfigError(ValueError):
    """A config the engine cannot run (unknown family, activation or rope scaling)."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and the scaling the config asks for."""

    theta: float = _DEFAULT_THETA
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 / yarn: the context the model was pre-trained with
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class EngineConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # per layer: attention window in tokens, or None for full causal attention
    sliding_windows: tuple[int | None, ...] = field(default=())
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + generated) the engine accepts.

        Dynamic NTK scaling exists to run past `max_position_embeddings` (HF recomputes the
        frequencies beyond it), up to `factor` times. YaRN stretches the trained
        `original_max_position_embeddings` by `factor`, and some configs (Qwen2.5's
        documented 4x YaRN) keep `max_position_embeddings` at the trained length. Every other
        family's `max_position_embeddings` already is the usable context.
        """
        if self.rope.type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        original = self.rope.original_max_position_embeddings
        if self.rope.type == "yarn" and original:
            return max(self.max_position_embeddings, int(original * self.rope.factor))
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> EngineConfig:
        return engine_config(config)


def engine_config(config: dict[str, Any]) -> EngineConfig:
    """Resolve an HF config dict (as read from config.json) into an EngineConfig."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = config.get("hidden_act", "silu")
    if act not in SILU_ACTIVATIONS:
        raise ConfigError(
            f"hidden_act {act!r} is not supported; the engine's MLP is SwiGLU: "
            f"{' or '.join(map(repr, SILU_ACTIVATIONS))}"
        )
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = int(config.get("head_dim") or hidden // heads)
    num_layers = _positive_int(config, "num_hidden_layers")
    attention_bias = bool(config.get("attention_bias", False))
    qwen2 = model_type == "qwen2"
    return EngineConfig(
        model_type=model_type,
        vocab_size=_positive_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_positive_int(config, "max_position_embeddings"),
        rope=rope_config(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # qwen2 always has q/k/v biases and no o_proj bias; llama's attention_bias covers all
        # four; mistral has none (its transformers class ignores attention_bias)
        qkv_bias=qwen2 or (attention_bias and model_type == "llama"),
        o_bias=attention_bias and model_type == "llama",
        mlp_bias=bool(config.get("mlp_bias", False)) and model_type == "llama",
        sliding_windows=sliding_windows(config, num_layers),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_token_ids(config.get("eos_token_id")),
    )


def rope_config(config: dict[str, Any]) -> RopeConfig:
    """The rotary settings, from `rope_parameters` (transformers 5) or `rope_scaling` (older).

    A config holding both is read only if they describe the same rotary embedding:
    transformers takes `rope_scaling` and drops `rope_parameters` (its rope_theta
    included), so a config that gained a `rope_scaling` by hand next to a saved
    `rope_parameters` would run one model there and another here.
    """
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    _check_rope_dict(params, "rope_parameters")
    _check_rope_dict(legacy, "rope_scaling")
    if params and legacy:
        ours, theirs = _rope_from(config, params), _rope_from(config, legacy)
        if ours != theirs:
            raise ConfigError(
                f"config has both 'rope_parameters' ({params}) and 'rope_scaling' ({legacy}) "
                "and they disagree; transformers reads only rope_scaling (with the top-level "
                "rope_theta): keep one of them"
            )
        return ours
    return _rope_from(config, params or legacy)


def _check_rope_dict(params: Any, key: str) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"config {key!r} must be a dict, got {params!r}")
    # transformers 5 lets some families give each layer type its own rope dict
    # ({"full_attention": {...}, "sliding_attention": {...}}); llama / mistral / qwen2 read
    # one flat dict (their transformers classes fail on a nested one)
    nested = [name for name, value in params.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(
            f"config {key!r} is nested per layer type ({', '.join(map(repr, nested))}); the "
            "engine reads one flat rope dict (rope_type, rope_theta, factor, ...)"
        )


def _rope_from(config: dict[str, Any], params: dict[str, Any]) -> RopeConfig:
    """The RopeConfig of one rope dict, with the top-level keys it may fall back on."""
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        # llama / mistral / qwen2 rotate whole heads (transformers' classes fail on shorter
        # tables); rotating all of a head trained on a part would give other numbers
        raise ConfigError(
            f"partial_rotary_factor {partial!r} is not supported; the engine rotates whole "
            "heads (allowed: 1.0 or absent)"
        )
    theta = params.get("rope_theta") or config.get("rope_theta") or _DEFAULT_THETA
    # A top-level original_max_position_embeddings wins over the rope dict's own: transformers
    # copies it in (its Phi-3 rule) each time it builds the frequencies
    original = config.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    if rope_type in ("llama3", "yarn") and original is None:
        original = config.get("max_position_embeddings")  # as transformers defaults it
    factor = params.get("factor")
    # Derived / defaulted below as transformers 4.x did. transformers 5 refuses such configs
    # (it wants `factor`, and llama3's low/high_freq_factor, written out), and its config is
    # what the tokenizer and the offline tools load: Checkpoint.open refuses those folders
    # for every tool alike, so these resolve only configs given as dicts.
    if rope_type != "default" and factor is None:
        if rope_type == "yarn" and original:
            factor = config["max_position_embeddings"] / original
        else:
            raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    # Only the settings the type reads are kept (the rest stay at their defaults), so two
    # dicts that describe the same embedding compare equal.
    settings: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type != "default":
        settings["factor"] = float(factor)
    if rope_type in ("llama3", "yarn"):
        settings["original_max_position_embeddings"] = int(original) if original else None
    if rope_type == "llama3":
        settings["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        settings["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
    if rope_type == "yarn":
        settings.update(
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=_optional_float(params.get("attention_factor")),
            mscale=_optional_float(params.get("mscale")),
            mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
            truncate=bool(params.get("truncate", True)),
        )
    return RopeConfig(**settings)


def sliding_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """The attention window of every layer, as transformers resolves it per family.

    mistral: every layer uses `sliding_window` (null: none). qwen2: only with
    `use_sliding_window`, and then the layers from `max_window_layers` on. Either family's
    explicit `layer_types` names the sliding layers instead (transformers loads a mistral
    config that has them as Ministral, which reads them). llama: never (its transformers
    class reads neither key).
    """
    model_type = config["model_type"]
    if model_type == "llama":
        return (None,) * num_layers
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window"):
        window = None
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"config layer_types lists {len(layer_types)} layers, num_hidden_layers is "
                f"{num_layers}"
            )
        unknown = sorted({str(t) for t in layer_types} - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(
                f"config layer_types has {', '.join(map(repr, unknown))}; supported: "
                f"{', '.join(LAYER_TYPES)}"
            )
        if "sliding_attention" in layer_types and not window:
            # transformers fails on these (its cache and masks want the window); running
            # the marked layers with full attention would be a model nobody trained
            off = (
                "use_sliding_window is false"
                if model_type == "qwen2" and config.get("sliding_window")
                else "sliding_window is null"
            )
            raise ConfigError(
                f"config layer_types marks layers 'sliding_attention' but {off}: give the "
                "window, or mark them 'full_attention'"
            )
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if not window:
        return (None,) * num_layers
    if model_type == "qwen2":
        first = int(config.get("max_window_layers", 28))
        return tuple(window if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config {key!r} must be a positive integer, got {value!r}")
    return value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
