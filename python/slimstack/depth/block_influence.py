"""Block Influence (ShortGPT, Men et al. 2024): BI_l = 1 - E[cos(x_l, x_(l+1))], the
expected cosine between the hidden states entering and leaving layer l, over every token of
every calibration window. A layer that barely turns the residual stream has BI near 0 and is
removed first. Needs no memory beyond the running sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimstack.calibration import LayerStream
from slimstack.depth.angular import unit


def one_minus_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 - cos between unit rows as |u - v|^2 / 2: exactly 0 for identical rows."""
    return 0.5 * (u - v).pow(2).sum(-1)


class BlockInfluence:
    """Observer of the forward pass."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.count = 0

    def bytes_per_sample(self, num_layers: int, seqlen: int, hidden: int) -> int:
        return 2 * seqlen * hidden * 4  # the unit vectors of one layer's input and output

    def start_chunk(self, stream: LayerStream, input_ids: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = torch.zeros(stream.ckpt.num_layers, dtype=torch.float64)
        self.count += input_ids.numel()

    def before_layer(self, index: int, layer: nn.Module) -> None:
        return None

    def after_layer(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        self.sums[index] += float(
            one_minus_cosine(unit(hidden_in), unit(hidden_out)).double().sum()
        )

    def end_chunk(self, final_hidden: torch.Tensor) -> None:
        return None

    def scores(self) -> list[float]:
        return (self.sums / max(self.count, 1)).tolist()

    def result(self) -> dict[str, Any]:
        scores = self.scores()
        return {
            "description": "1 - mean cosine between each layer's input and output hidden "
            "states, over every token",
            "scores": scores,
            "drop_order": sorted(range(len(scores)), key=scores.__getitem__),
        }
