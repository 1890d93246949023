"""Perplexity criterion (Shortened LLaMA's PPL): the calibration-set perplexity of the model
with one layer removed, for every layer; the layer whose removal hurts least goes first.

All L variants are computed in the same pass as the full model, layer-major: when layer j
is loaded, it advances the stream of every variant that removed an earlier layer, and the
variant "without j" starts from the full model's state entering j. Each layer is loaded once
per chunk, and the shared prefixes are computed once: L(L+1)/2 layer evaluations instead of
L^2 for L separate forward passes. Memory: one hidden state per variant per window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimstack.calibration import LayerStream
from slimstack.depth.streaming import LMHead, run_layer


class LayerRemovalPerplexity:
    """Observer of the forward pass."""

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self.head: LMHead | None = None
        self.nll: torch.Tensor | None = None  # [L] summed NLL with layer l removed
        self.base_nll = 0.0
        self.tokens = 0
        self._stream: LayerStream | None = None
        self._ids: torch.Tensor | None = None
        self._variants: dict[int, torch.Tensor] = {}

    def bytes_per_sample(self, num_layers: int, seqlen: int, hidden: int) -> int:
        return num_layers * seqlen * hidden * 4

    def start_chunk(self, stream: LayerStream, input_ids: torch.Tensor) -> None:
        if self.head is None:
            self.head = LMHead(stream.ckpt, stream.dtype, stream.device, self.batch_size)
            self.nll = torch.zeros(stream.ckpt.num_layers, dtype=torch.float64)
        self._stream, self._ids = stream, input_ids
        self._variants = {}
        self.tokens += LMHead.predicted_tokens(input_ids)

    def before_layer(self, index: int, layer: nn.Module) -> None:
        for removed, hidden in self._variants.items():
            self._variants[removed] = run_layer(self._stream, layer, index, hidden)
        # without layer `index`, its input passes straight on to the next layer
        self._variants[index] = self._stream.hidden

    def after_layer(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        return None

    @torch.no_grad()
    def end_chunk(self, final_hidden: torch.Tensor) -> None:
        self.base_nll += float(self.head.nll_sum(final_hidden, self._ids))
        for removed, hidden in self._variants.items():
            self.nll[removed] += float(self.head.nll_sum(hidden, self._ids))
        self._variants = {}

    def result(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        scores = [math.exp(float(v) / tokens) for v in self.nll]
        return {
            "description": "calibration-set perplexity with layer l removed",
            "baseline": math.exp(self.base_nll / tokens),
            "scores": scores,
            "drop_order": sorted(range(len(scores)), key=scores.__getitem__),
        }
