"""One transformers decoder layer at a time, built from a checkpoint's tensors.

Offline tools (calibration streaming, pruning, layer analysis) run the reference
transformers implementation of each layer, so what they measure is what any HF tool will
run; only one layer's weights are materialised at once.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from slimstack.checkpoint import Checkpoint

_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def hf_config(config: dict[str, Any]) -> PretrainedConfig:
    cfg = AutoConfig.for_model(**config)
    # Explicit masks are passed below, so plain SDPA with that mask is exact for every family.
    cfg._attn_implementation = "sdpa"
    return cfg


def _modeling(model_type: str) -> Any:
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def build_rotary(cfg: PretrainedConfig, device: torch.device | str = "cpu") -> nn.Module:
    cls = getattr(_modeling(cfg.model_type), f"{_CLASS_PREFIX[cfg.model_type]}RotaryEmbedding")
    return cls(config=cfg).to(device)


def build_layer(
    ckpt: Checkpoint,
    cfg: PretrainedConfig,
    index: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Decoder layer `index` of `ckpt` with its weights loaded (strictly: no tensor missing)."""
    cls = getattr(_modeling(cfg.model_type), f"{_CLASS_PREFIX[cfg.model_type]}DecoderLayer")
    with torch.device("meta"):
        layer = cls(cfg, layer_idx=index)
    prefix = f"model.layers.{index}."
    # one tensor at a time: never the layer twice (checkpoint dtype + compute dtype) in memory
    tensors = {
        name.removeprefix(prefix): ckpt.get_tensor(name).to(device=device, dtype=dtype)
        for name in ckpt.layer_names(index)
    }
    layer.load_state_dict(tensors, strict=True, assign=True)
    return layer.eval()


def causal_mask(
    seqlen: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive [1, 1, S, S] mask: causal, optionally limited to a sliding window."""
    pos = torch.arange(seqlen, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    mask = torch.zeros(seqlen, seqlen, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def layer_sliding_window(cfg: PretrainedConfig, index: int) -> int | None:
    """The sliding window that applies to layer `index`, or None for full attention."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return None
    return window


def linear_names(layer: nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside a decoder layer, in execution order."""
    return [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
