"""Angular distance between the hidden states entering and leaving a block of layers.

Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (as PruneMe runs
it): for a block of n layers starting at l, d(l, n) = arccos(cos(h_l, h_{l+n})) / pi, where
h_l is the residual stream entering layer l (h_0 the embeddings, h_L the last layer's
output, before the final norm: PruneMe's last transformers hidden state is after it, so
blocks that end at the last layer differ from PruneMe's by the norm). The block with the
smallest distance changes the stream the least and is the one to drop. Averaged over the
calibration windows at the last token (PruneMe, the paper), or over every token of every
window (`token="mean"`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimstack.calibration import LayerStream

TOKEN_MODES = ("last", "mean")


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` scaled to unit length (fp32; zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle between unit rows, in [0, pi].

    2 atan2(|u - v|, |u + v|) rather than arccos(u . v): accurate for nearly parallel
    vectors (arccos of a dot product a rounding error below 1 is already ~3e-4 rad) and
    exactly 0 for identical ones, which is what a layer that does nothing must score.
    """
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))


def best_blocks(distances: dict[int, list[float]]) -> dict[int, dict[str, Any]]:
    """For each block size n, the block [start, start + n) with the smallest distance."""
    best = {}
    for n, row in distances.items():
        start = min(range(len(row)), key=row.__getitem__)
        best[n] = {"start": start, "end": start + n, "distance": row[start]}
    return best


class AngularDistance:
    """Observer of the forward pass: d(l, n) for every start l and block size n."""

    def __init__(self, token: str = "last") -> None:
        if token not in TOKEN_MODES:
            raise ValueError(f"angular token mode must be one of {TOKEN_MODES}, got {token!r}")
        self.token = token
        self.num_layers = 0
        self.sums: torch.Tensor | None = None  # [start, end] summed angles, float64
        self.count = 0
        self._boundaries: list[torch.Tensor] = []

    def bytes_per_sample(self, num_layers: int, seqlen: int, hidden: int) -> int:
        positions = seqlen if self.token == "mean" else 1
        return (num_layers + 1) * positions * hidden * 4

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return unit(hidden[:, -1] if self.token == "last" else hidden)

    def start_chunk(self, stream: LayerStream, input_ids: torch.Tensor) -> None:
        self.num_layers = stream.ckpt.num_layers
        if self.sums is None:
            size = self.num_layers + 1
            self.sums = torch.zeros(size, size, dtype=torch.float64)
        self._boundaries = [self._select(stream.hidden)]
        self.count += self._boundaries[0].shape[:-1].numel()

    def before_layer(self, index: int, layer: nn.Module) -> None:
        return None

    def after_layer(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        current = self._select(hidden_out)
        end = index + 1
        for start, earlier in enumerate(self._boundaries):
            self.sums[start, end] += float(angle(earlier, current).double().sum())
        self._boundaries.append(current)

    def end_chunk(self, final_hidden: torch.Tensor) -> None:
        self._boundaries = []

    def distances(self) -> dict[int, list[float]]:
        """Block size n -> [d(l, n) for l in 0..L-n], normalised to [0, 1] by pi."""
        scale = 1.0 / (math.pi * max(self.count, 1))
        return {
            n: [
                float(self.sums[start, start + n]) * scale
                for start in range(self.num_layers - n + 1)
            ]
            for n in range(1, self.num_layers + 1)
        }

    def result(self) -> dict[str, Any]:
        distances = self.distances()
        single = distances[1]
        return {
            "description": "arccos(cos(h_l, h_(l+n))) / pi between the residual stream "
            "entering layer l and the one leaving layer l+n-1 (before the final norm)",
            "token": self.token,
            "token_description": "last token of each window"
            if self.token == "last"
            else "every token of every window",
            "distances": {str(n): row for n, row in distances.items()},
            "best_block": {str(n): b for n, b in best_blocks(distances).items()},
            "scores": single,
            "drop_order": sorted(range(len(single)), key=single.__getitem__),
        }
