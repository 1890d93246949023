"""What the analysis passes share: the model's head (final norm + lm_head) as a loss, running
a layer on hidden states other than the stream's own, and splitting the calibration windows
into chunks whose per-layer state fits a memory budget.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimstack.calibration import LayerStream
from slimstack.checkpoint import Checkpoint

DEFAULT_BUDGET_MB = 4096


class LMHead:
    """Final RMSNorm and output projection of a checkpoint, as a next-token loss."""

    def __init__(
        self,
        ckpt: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.norm_weight = ckpt.get_tensor("model.norm.weight").to(device=device, dtype=dtype)
        self.eps = float(ckpt.config.get("rms_norm_eps", 1e-6))
        # tied checkpoints (tie_word_embeddings) carry no lm_head.weight: the embedding serves
        name = "lm_head.weight" if "lm_head.weight" in ckpt else None
        name = name or "model.embed_tokens.weight"
        self.weight = ckpt.get_tensor(name).to(device=device, dtype=dtype)
        self.batch_size = batch_size

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # the transformers RMSNorm of the supported families: statistics in fp32
        h32 = hidden.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm_weight * h32.to(hidden.dtype)

    def nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of every token but the first of each window
        (differentiable; logits are formed for at most `batch_size` windows at a time)."""
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            logits = self.norm(hidden[rows, :-1]) @ self.weight.t()
            targets = input_ids[rows, 1:].to(logits.device)
            total = total + F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
            )
        return total

    @staticmethod
    def predicted_tokens(input_ids: torch.Tensor) -> int:
        return input_ids.shape[0] * (input_ids.shape[1] - 1)


@torch.no_grad()
def run_layer(
    stream: LayerStream, layer: nn.Module, index: int, hidden: torch.Tensor
) -> torch.Tensor:
    """`layer` (decoder index `index`) applied to `hidden` with the stream's positions and
    masks, leaving the stream's own hidden state untouched."""
    saved = stream.hidden
    stream.hidden = hidden
    try:
        return stream.forward(layer, index)
    finally:
        stream.hidden = saved


def chunks(nsamples: int, bytes_per_sample: int, budget_mb: float) -> Iterator[slice]:
    """Row slices of the calibration set, each as large as the budget allows (at least 1)."""
    per_chunk = max(1, int(budget_mb * 2**20 // max(bytes_per_sample, 1)))
    for start in range(0, nsamples, per_chunk):
        yield slice(start, min(start + per_chunk, nsamples))
