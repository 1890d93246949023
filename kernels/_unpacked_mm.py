"""y = x @ W^T with W unpacked to dense first: the prefill path of the unpack kernels
(bitmap_unpack, sparse24_unpack), where cuBLAS on the dense weight beats a fused kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch


def unpacked_matmul(
    op: str, x: torch.Tensor, K: int, weight_dtype: torch.dtype, unpack: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """x [M, K] @ unpack()^T, after checking x against the packed weight (shape, dtype)."""
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{op}: x must have shape [M, K={K}], got {tuple(x.shape)}")
    if x.dtype != weight_dtype:
        raise TypeError(f"{op}: x is {x.dtype} but the weight is {weight_dtype}")
    dense = unpack()
    if x.device.type == "cpu":  # the interpreter's tensors: accumulate in fp32, as the GPU does
        return (x.float() @ dense.float().t()).to(x.dtype)
    return x @ dense.t()
