"""One forward pass over the calibration windows that serves several criteria at once.

Layers are loaded one at a time, in order, once per chunk of windows; observers (angular
distance, Block Influence, perplexity with a layer removed) see each layer's input and
output and keep only what they need. A chunk is as many windows as the observers' state
fits in the memory budget, so a large model costs several passes over its layers rather
than more memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slimstack.calibration import LayerStream
from slimstack.checkpoint import Checkpoint
from slimstack.depth.streaming import DEFAULT_BUDGET_MB, chunks


class LayerObserver(Protocol):
    def bytes_per_sample(self, num_layers: int, seqlen: int, hidden: int) -> int:
        """Memory this observer keeps per calibration window during a chunk."""

    def start_chunk(self, stream: LayerStream, input_ids: torch.Tensor) -> None: ...

    def before_layer(self, index: int, layer: nn.Module) -> None: ...

    def after_layer(
        self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor
    ) -> None: ...

    def end_chunk(self, final_hidden: torch.Tensor) -> None: ...


@torch.no_grad()
def forward_pass(
    ckpt: Checkpoint,
    input_ids: torch.Tensor,
    observers: Sequence[LayerObserver],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    budget_mb: float = DEFAULT_BUDGET_MB,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "layers",
) -> None:
    num_layers, seqlen = ckpt.num_layers, input_ids.shape[1]
    element = torch.finfo(dtype).bits // 8
    per_sample = 2 * seqlen * ckpt.hidden_size * element  # the stream's input and output
    per_sample += sum(o.bytes_per_sample(num_layers, seqlen, ckpt.hidden_size) for o in observers)
    row_chunks = list(chunks(input_ids.shape[0], per_sample, budget_mb))
    bar = tqdm(total=num_layers * len(row_chunks), desc=desc, disable=not progress)
    for rows in row_chunks:
        ids = input_ids[rows]
        stream = LayerStream(ckpt, ids, dtype, device, batch_size)
        for observer in observers:
            observer.start_chunk(stream, ids)
        for index in range(num_layers):
            layer = stream.load_layer(index)
            for observer in observers:
                observer.before_layer(index, layer)
            out = stream.forward(layer, index)
            for observer in observers:
                observer.after_layer(index, stream.hidden, out)
            stream.hidden = out
            del layer
            bar.update()
        for observer in observers:
            observer.end_chunk(stream.hidden)
    bar.close()
