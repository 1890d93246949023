"""Taylor+ (Shortened LLaMA, Kim et al. 2024): first-order importance of each layer.

score_l = sum over the weights w of layer l of |w * dL/dw|, with L the mean next-token loss
on the calibration windows and the gradient summed over them before the product (as the
Shortened LLaMA code does); norms included, embeddings excluded. Lowest score goes first.
"+" is their heuristic of never removing the first and last few layers (they keep 4 and 2
of 32); here the counts scale with depth: ceil(L/8) first and ceil(L/16) last by default.
Each layer also reports -sum(w * dL/dw), the first-order estimate of the loss change
L(layer zeroed) - L (positive: removing it costs loss), from L(w + d) ~ L(w) + d . dL/dw
at d = -w.

The backward pass is streamed like the forward one: a forward pass stores the hidden state
at every layer boundary, then layers are loaded again from last to first, re-run with
autograd on their stored inputs and back-propagated one at a time. Memory: the boundary
states, (L + 1) x windows x seqlen x hidden x 4 bytes, plus one layer's weights and their
gradients, plus one batch of logits (batch x seqlen x vocab x 4 bytes) and one batch of
a layer's activations; never the whole model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimstack.calibration import LayerStream
from slimstack.checkpoint import Checkpoint
from slimstack.depth.streaming import LMHead


def plus_keep(num_layers: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers the "+" heuristic never removes."""
    first = math.ceil(num_layers / 8) if first is None else first
    last = math.ceil(num_layers / 16) if last is None else last
    if first < 0 or last < 0:
        raise ValueError(f"taylor keep counts must be >= 0, got first={first}, last={last}")
    kept = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    return sorted(kept)


def memory_estimate(ckpt: Checkpoint, nsamples: int, seqlen: int, batch_size: int) -> int:
    """Bytes the streamed Taylor pass needs at its peak (fp32), roughly."""
    hidden, layers = ckpt.hidden_size, ckpt.num_layers
    vocab = int(ckpt.config["vocab_size"])
    layer_params = sum(math.prod(ckpt.tensor_shape(n)) for n in ckpt.layer_names(0))
    boundaries = (layers + 2) * nsamples * seqlen * hidden * 4  # + the running gradient
    inter = int(ckpt.config.get("intermediate_size", 4 * hidden))
    activations = 6 * min(batch_size, nsamples) * seqlen * (hidden + inter) * 4
    logits = 2 * min(batch_size, nsamples) * seqlen * vocab * 4
    return boundaries + 2 * layer_params * 4 + activations + logits


def _run_with_grad(stream: LayerStream, layer: nn.Module, index: int, x: torch.Tensor):
    saved = stream.hidden
    stream.hidden = x
    try:
        return stream.run_batch(layer, index, slice(None))
    finally:
        stream.hidden = saved


def taylor_scores(
    ckpt: Checkpoint,
    input_ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    keep_first: int | None = None,
    keep_last: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    num_layers = ckpt.num_layers
    stream = LayerStream(ckpt, input_ids, dtype, device, batch_size)
    head = LMHead(ckpt, dtype, stream.device, batch_size)
    tokens = LMHead.predicted_tokens(input_ids)
    bar = tqdm(total=2 * num_layers + 1, desc="taylor", disable=not progress)

    boundaries = [stream.hidden]
    for index in range(num_layers):
        stream.advance(stream.load_layer(index), index)
        boundaries.append(stream.hidden)
        bar.update()

    # dL/dh_L through the final norm and lm_head, batch by batch
    grads = []
    for rows in stream.batches():
        h = boundaries[-1][rows].detach().requires_grad_(True)
        (head.nll_sum(h, input_ids[rows]) / tokens).backward()
        grads.append(h.grad)
    grad = torch.cat(grads)
    bar.update()

    scores = [0.0] * num_layers
    signed = [0.0] * num_layers
    for index in reversed(range(num_layers)):
        layer = stream.load_layer(index)
        params = dict(layer.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        grad_in = []
        for rows in stream.batches():
            x = boundaries[index][rows].detach().requires_grad_(True)
            _run_with_grad(stream, layer, index, x).backward(grad[rows])
            grad_in.append(x.grad)
        grad = torch.cat(grad_in)
        products = [p.detach().float() * p.grad.float() for p in params.values()]
        scores[index] = float(sum(prod.abs().double().sum() for prod in products))
        signed[index] = -float(sum(prod.double().sum() for prod in products))
        boundaries[index + 1] = None  # no longer needed: free as we go
        del layer, params, products
        bar.update()
    bar.close()

    kept = plus_keep(num_layers, keep_first, keep_last)
    candidates = [i for i in range(num_layers) if i not in kept]
    return {
        "description": "sum over the layer's weights of |w * dL/dw| (gradient of the mean "
        "calibration loss, summed over all windows); Taylor+ never removes the kept layers",
        "scores": scores,
        "first_order_delta": signed,
        "plus_kept": kept,
        "ranking": sorted(range(num_layers), key=scores.__getitem__),
        "drop_order": sorted(candidates, key=scores.__getitem__),
        "memory_bytes_estimate": memory_estimate(ckpt, *input_ids.shape, batch_size),
    }
