"""A static KV cache: fixed-size key/value buffers per decoder layer position.

Buffers are allocated once per (batch, length) and written in place, so their addresses
never change: a captured CUDA graph (or torch.compile's cudagraph trees, which treat module
buffers as static) replays against the same memory every step.

Slots are shared by the whole batch: prompts are left-padded to a common length, slot s of
every row holds the token at column s, and `pad[b]` (the number of padding columns of row
b) both masks those columns and shifts the row's rotary positions so that its first real
token sits at position 0, as transformers does with an attention mask.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerCache(nn.Module):
    def __init__(
        self, batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prefill's keys/values [B, Hkv, S, D] in slots 0..S-1."""
        length = k.shape[2]
        self.k[:, :, :length].copy_(k)
        self.v[:, :, :length].copy_(v)


class KVCache(nn.Module):
    """One LayerCache per layer position (shared layer weights still get their own cache)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.batch, self.length = batch, length
        self.layers = nn.ModuleList(
            LayerCache(batch, kv_heads, length, head_dim, dtype, device) for _ in range(num_layers)
        )
        self.register_buffer(
            "pad", torch.zeros(batch, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "slot_ids", torch.arange(length, dtype=torch.long, device=device), persistent=False
        )

    def matches(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        k = self.layers[0].k
        return (
            self.batch == batch
            and self.length == length
            and k.dtype == dtype
            and k.device == torch.device(device)
        )

    @property
    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)

    def set_padding(self, pad: torch.Tensor) -> None:
        """Per-row count of left-padding columns for the sequences about to be prefilled."""
        self.pad.copy_(pad)
