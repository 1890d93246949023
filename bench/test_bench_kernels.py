"""Kernel benchmarks: each sparse kernel and provider against the dense matmul, same inputs.

    pytest bench/test_bench_kernels.py --benchmark-only            # all cases for this device
    SLIMSTACK_BENCH_RESULTS=bench/results pytest bench/ --benchmark-only -k "M1-"

On CUDA: the LLM shapes of the issue, M = 1..8192, bf16 and fp16; providers triton (and its
variants: triton_n8 / triton_n16, fewer rows per program at M = 1 / 16; triton_w8, the
M = 1 and 16 tiles on 8 warps; triton_split2x, twice the K split at M = 16; triton_s2,
num_stages=2 at M = 16; triton_tile_dot, the 2:4
GEMV's 2026-12-04 tensor-core step (one dot on the interleaved tile); triton_global_gather,
its M = 1 x gather from global memory; triton_no_prefetch, the bitmap GEMV's 2026-12-04 loop
without its software pipelining; triton_unpack, bitmap or 2:4 W unpacked then cuBLAS; triton_w_as_a, the GEMM's 2026-12-04 tiles), cuda (the extension, when
built; cuda_sm90 for the CUTLASS Hopper GEMM, cuda_sm90_swizzle1 in CUTLASS's default tile
order, cuda_sm90_256x128 / _128x256 with larger output tiles; cuda_reduce_kernel, the GEMV with split-K summed by a second kernel instead of a cluster
reduction; cuda_prefetch_off / _on, the GEMV with its weight prefetch forced off or on;
cuda_pdl, with programmatic dependent launch, which back to back overlaps calls: the other
GEMV rows run without; cuda_ring1, the bitmap GEMV at M = 1 with one sub-tile per row in
flight instead of two), torch (to_sparse_semi_structured) and auto (slimstack.ops.sparse_linear);
baseline cuBLAS dense.
The device time of each row comes from CUDA-graph replays timed with events (bench/common.py);
pytest-benchmark's own table shows synchronised host wall time of single calls.
On CPU: the extension's CPU kernels and auto at small sizes against torch's dense matmul, so
CI exercises the suite; the results JSON then goes to a temp folder unless
SLIMSTACK_BENCH_RESULTS names one.
"""

from __future__ import annotations

import pytest
import torch
from common import Case, cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", cases(DEVICE), ids=str)
def test_kernel_vs_dense(case: Case, benchmark, bench_session) -> None:
    row, one_call = bench_session.measure(case)
    benchmark.extra_info.update(row)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (one_call(), sync()), rounds=3, iterations=1, warmup_rounds=1)
    assert row["median_ms"] > 0 and row["baseline_ms"] > 0
