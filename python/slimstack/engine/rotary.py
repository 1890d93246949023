"""Rotary position embedding: inverse frequencies for each scaling type, cos/sin per position.

The frequencies follow the formulas transformers uses for llama/mistral/qwen2 (default,
linear, dynamic NTK, llama3, yarn). Everything after construction is tensor arithmetic on
the model's device, so a captured decode step recomputes cos/sin (and, for dynamic NTK,
the frequencies) from the position tensor without a host round trip.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimstack.engine.config import EngineConfig, RopeConfig


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; and the
    attention factor that scales cos/sin."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
        else:
            attention = mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a nonzero width
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return inv_freq, float(attention)


def static_inv_freq(config: EngineConfig) -> tuple[torch.Tensor, float]:
    """Frequencies that do not depend on the sequence length, and the cos/sin scale."""
    rope, dim = config.rope, config.head_dim
    if rope.type == "yarn":
        return yarn_inv_freq(dim, rope)
    inv_freq = base_inv_freq(dim, rope.theta)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, rope)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly from integer positions [B, S]."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        inv_freq, scale = static_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer(
            "exponents",
            torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim,
            persistent=False,
        )
        self.scale = scale
        self.dynamic = config.rope.type == "dynamic"
        self.theta = config.rope.theta
        self.factor = config.rope.factor
        self.max_positions = config.max_position_embeddings
        self.dim = config.head_dim

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return self.inv_freq
        # dynamic NTK: the base grows with the longest sequence in this step, once past the
        # trained context (transformers: seq_len = max(position_ids) + 1)
        seq_len = (positions.max() + 1).clamp(min=self.max_positions).float()
        base = self.theta * (self.factor * seq_len / self.max_positions - (self.factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        return 1.0 / base**self.exponents

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, head_dim] in `dtype` for integer positions [B, S]."""
        angles = positions[..., None].float() * self.frequencies(positions)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by cos/sin [B, S, D] (the half-split layout HF checkpoints use)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin
