"""``dense_linear`` (y = x @ W^T + b for a dense W) and ``DenseLinear``, the nn.Linear the
engine builds for its dense projections and lm_head.

On a CPU with AVX512-BF16, bf16 decode (up to ``cpu_dense_rows_max_m()`` rows) runs the
native ``slimstack::dense_mm`` kernel: ATen's bf16 GEMV reads 20-30 GB/s on the 2-core Zen 4
this was measured on, the kernel 49-78 GB/s (its ``dense_mm`` rows in
bench/results/2026-12-07-cpu-kernels-2.json). Everything else is ``F.linear``, so results elsewhere are nn.Linear's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimstack.ops.library import _require_native, eager_direct, native_extension


def _dense_mm_cpu(x: Tensor, weight: Tensor) -> Tensor:
    """y = x @ W^T for a dense W, native kernel (ATen's matmul past its rows limit)."""
    return _require_native("dense_mm").dense_mm_cpu(x, weight)


dense_mm = torch.library.custom_op("slimstack::dense_mm", mutates_args=(), device_types="cpu")(
    _dense_mm_cpu
)


@dense_mm.register_fake
def _dense_mm_fake(x: Tensor, weight: Tensor) -> Tensor:
    torch._check(
        x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
        lambda: "x must be [M, K] and weight [N, K]",
    )
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.compiler.assume_constant_result  # a graph is traced for the instruction set of then
def native_rows_max_m() -> int:
    """Most rows of bf16 x the native dense kernel takes here (0: none: no extension, or no
    AVX512-BF16, or the tests chose another instruction set)."""
    ext = native_extension()
    if ext is None or not hasattr(ext, "cpu_dense_rows_max_m"):
        return 0
    return int(ext.cpu_dense_rows_max_m())


def _takes_native(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return False  # F.linear names the mismatch
    if not weight.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the op has no backward: autograd goes through F.linear
    m = x.numel() // weight.shape[1]
    return 0 < m <= native_rows_max_m()


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through the native CPU kernel where it is faster."""
    if not _takes_native(x, weight):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    y = _dense_mm_cpu(rows, weight) if eager_direct(rows) else dense_mm(rows, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


class DenseLinear(nn.Linear):
    """An nn.Linear whose forward is ``dense_linear``: same parameters, same state dict."""

    def forward(self, x: Tensor) -> Tensor:
        return dense_linear(x, self.weight, self.bias)
