"""Kernel benchmark helpers: cases, weights, providers, timers, peaks and the results file.

Everything the suite (bench/test_bench_kernels.py) and its tests need that is not pytest
plumbing. The results document follows DESIGN.md ("Benchmark results"): one JSON per run,
``speedup`` = baseline time / this row's time, both measured in the same run on the same
inputs; ``validate_results`` checks a document against that schema.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_ENV = "SLIMSTACK_BENCH_RESULTS"  # a folder to write the results JSON into

# The linear layers of Mistral-7B / Llama-3-8B and Llama-2-13B, as (N, K).
LLM_SHAPES = [
    (4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
    (5120, 5120), (13824, 5120), (5120, 13824),
]  # fmt: skip
GPU_M = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
GPU_DTYPES = [torch.bfloat16, torch.float16]
# CPU: small enough that CI exercises the whole suite in seconds; SLIMSTACK_BENCH_CPU=llm
# times two 7B shapes at decode and prefill sizes instead (a few minutes on 2 cores).
CPU_SIZES_ENV = "SLIMSTACK_BENCH_CPU"
CPU_SHAPES = [(256, 512), (384, 256)]
CPU_M = [1, 8, 64]
CPU_LLM_SHAPES = [(4096, 4096), (14336, 4096)]
CPU_LLM_M = [1, 4, 16, 128]
CPU_DTYPES = [torch.float32, torch.bfloat16]
GEMV_MAX_M = 16


def cpu_sizes() -> tuple[list[tuple[int, int]], list[int]]:
    choice = os.environ.get(CPU_SIZES_ENV, "small")
    if choice == "small":
        return CPU_SHAPES, CPU_M
    if choice == "llm":
        return CPU_LLM_SHAPES, CPU_LLM_M
    raise ValueError(f"{CPU_SIZES_ENV}={choice!r}: choose small (the default) or llm")


ROW_KEYS = {
    "op": str, "provider": str, "baseline": str, "N": int, "K": int, "M": int, "dtype": str,
    "median_ms": float, "baseline_ms": float, "speedup": float, "gbps": float,
}  # fmt: skip
TOP_KEYS = {"suite": str, "commit": str, "gpu": str, "torch": str, "peak": dict, "rows": list}


class Unavailable(Exception):
    """This provider cannot run here (missing build, unsupported shape); the case skips."""


@dataclass(frozen=True)
class Case:
    op: str  # sparse24_gemv | sparse24_gemm | bitmap_gemv | sparse24_mm | bitmap_mm
    # triton(_n8|_w8|_n16|_split2x|_s2|_tile_dot|_global_gather|_no_prefetch|_unpack
    # |_w_as_a) | cuda(_reduce_kernel|_prefetch_off|_prefetch_on
    # |_pdl|_ring1)
    # | cuda_sm90(_swizzle1|_256x128|_128x256) | torch | cpu | auto
    provider: str
    N: int
    K: int
    M: int
    dtype: torch.dtype

    @property
    def weight_format(self) -> str:
        return "bitmap" if self.op.startswith("bitmap") else "sparse24"

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}-{self.provider}-{self.N}x{self.K}-M{self.M}-{dt}"


def cases(device_type: str) -> list[Case]:
    """Ordered by (dtype, shape) so consecutive cases reuse the cached weights."""
    if device_type == "cuda":
        plan = [
            ("sparse24_gemv", ("triton", "cuda"), lambda m: m <= GEMV_MAX_M),
            ("sparse24_gemv", ("triton_n8",), lambda m: m == 1),
            ("sparse24_gemv", ("triton_w8",), lambda m: m in (1, GEMV_MAX_M)),
            # the 2026-12-04 x gather (one global load per kept value) against the default
            # gather from the step's x slice in shared memory
            ("sparse24_gemv", ("triton_global_gather",), lambda m: m == 1),
            (
                "sparse24_gemv",
                ("triton_n16", "triton_split2x", "triton_s2"),
                lambda m: m == GEMV_MAX_M,
            ),
            # the tensor-core path's 2026-12-04 step (one dot on the interleaved decoded tile)
            # against the default four per-column dots
            ("sparse24_gemv", ("triton_tile_dot",), lambda m: m in (4, GEMV_MAX_M)),
            # the CUDA GEMV with its split-K partials summed by a second kernel, next to the
            # default (a cluster reduction on Hopper) at the two ends of the decode range
            ("sparse24_gemv", ("cuda_reduce_kernel",), lambda m: m in (1, GEMV_MAX_M)),
            # the weight prefetch (two quad iterations in flight per warp, the default) against
            # the 2026-12-04 kernel and plan (one)
            ("sparse24_gemv", ("cuda_prefetch_off",), lambda m: m in (1, 8, GEMV_MAX_M)),
            # with programmatic dependent launch: in this back-to-back timing each call's
            # first weight loads overlap the previous call's tail (the other cuda rows are
            # isolated kernels; in the engine the kernel before a GEMV is a norm or SwiGLU)
            ("sparse24_gemv", ("cuda_pdl",), lambda m: m in (1, GEMV_MAX_M)),
            ("bitmap_gemv", ("triton", "cuda"), lambda m: m <= GEMV_MAX_M),
            # one sub-tile of each row's values in flight (the 2026-12-04 kernel) against the
            # default two at M = 1
            ("bitmap_gemv", ("cuda_ring1",), lambda m: m == 1),
            ("bitmap_gemv", ("triton_n8", "triton_w8"), lambda m: m == 1),
            # the 2026-12-04 loop (each tile's mask words, gather and x waited on in turn)
            # against the default software-pipelined one
            ("bitmap_gemv", ("triton_no_prefetch",), lambda m: m in (1, GEMV_MAX_M)),
            ("sparse24_gemm", ("triton", "cuda", "cuda_sm90"), lambda m: m > GEMV_MAX_M),
            # the Hopper GEMM in CUTLASS's default tile order (the 2026-12-04 kernel) against
            # the default swizzled groups of 8 tiles
            ("sparse24_gemm", ("cuda_sm90_swizzle1",), lambda m: m >= 512),
            # larger CUTLASS tiles (weight rows x tokens), ~13% less shared-memory traffic per
            # FLOP than the default 128 x 128 (csrc/cuda/sparse24_gemm_sm90.cu)
            ("sparse24_gemm", ("cuda_sm90_256x128", "cuda_sm90_128x256"), lambda m: m >= 2048),
            # the Triton GEMM's 2026-12-04 tiles (W as A, one CTA per SM) against the default
            ("sparse24_gemm", ("triton_w_as_a",), lambda m: m >= 512),
            # W unpacked once by Triton, then cuBLAS: the floor the fused Triton GEMM must beat
            ("sparse24_gemm", ("triton_unpack",), lambda m: m >= 512),
            ("sparse24_mm", ("torch", "auto"), lambda m: True),
            ("bitmap_mm", ("auto",), lambda m: True),
            # W unpacked by Triton, then cuBLAS: the triton backend past decode, and at decode
            # the bound a bitmap GEMV must beat
            ("bitmap_mm", ("triton_unpack",), lambda m: True),
        ]
        shapes, ms, dtypes = LLM_SHAPES, GPU_M, GPU_DTYPES
    else:
        plan = [
            ("sparse24_mm", ("cpu", "auto"), lambda m: True),
            ("bitmap_mm", ("cpu", "auto"), lambda m: True),
            # slimstack's own dense kernel (bf16 decode; ATen's matmul elsewhere) on the same
            # weights: the dense baseline the engine decodes with on a CPU
            ("dense_mm", ("cpu",), lambda m: True),
        ]
        shapes, ms = cpu_sizes()
        dtypes = CPU_DTYPES
    return [
        Case(op, provider, N, K, M, dtype)
        for dtype in dtypes
        for N, K in shapes
        for op, providers, wanted in plan
        for provider in providers
        for M in ms
        if wanted(M)
    ]


# ------------------------------------------------------------------------- weights ----


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest |w| of every group of four along K (K % 4 == 0)."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def prune_rows_half(w: torch.Tensor) -> torch.Tensor:
    """Wanda-like: the larger half of |w| in every row survives (unstructured 50%)."""
    k = w.shape[1] // 2
    keep = w.abs().topk(k, dim=1).indices
    return torch.zeros_like(w).scatter_(1, keep, w.gather(1, keep))


@dataclass
class WeightSet:
    """One weight in every form the providers read, pruned once."""

    dense: torch.Tensor  # the masked weight, the cuBLAS / torch dense baseline's operand
    packed: Any  # Sparse24Weight or BitmapWeight (slimstack.formats)
    semi: Any = None  # torch SparseSemiStructuredTensor, built on first use
    extras: dict[str, Any] = field(default_factory=dict)  # provider-specific copies (sm90 meta)


def make_weight(N: int, K: int, dtype: torch.dtype, fmt: str, device: str, seed: int):
    from slimstack.formats import pack_bitmap, pack_sparse24

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=device, dtype=torch.float32) * K**-0.5
    if fmt == "sparse24":
        dense = prune_24(w).to(dtype)
        return WeightSet(dense, pack_sparse24(dense))
    dense = prune_rows_half(w).to(dtype)
    return WeightSet(dense, pack_bitmap(dense))


MAX_ROTATION_SETS = 32


def rotation_sets(call_bytes: int, l2_bytes: int) -> int:
    """Input sets to cycle so that the *smallest* timed call (the packed weight's) streams
    more than twice the L2 per cycle: sizing on dense bytes would leave a small packed
    weight L2-resident (4096x4096 bf16: 18 MiB packed) and flatter the sparse kernels."""
    return max(2, min(MAX_ROTATION_SETS, math.ceil(2 * l2_bytes / max(call_bytes, 1)) + 1))


CPU_CACHE_PATH = "/sys/devices/system/cpu/cpu0/cache/index3/size"


def cpu_last_level_cache_bytes(path: str = CPU_CACHE_PATH) -> int:
    """The CPU's L3 ("32768K" in sysfs), 32 MiB where sysfs does not say."""
    try:
        text = Path(path).read_text().strip().upper()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return 32 * 2**20


def rotation_count(call_bytes: int, device: str) -> int:
    """rotation_sets for this device's L2 (CUDA) or last-level cache (CPU: the L3; two
    sets of a 4096 x 4096 2:4 weight, 38 MB, left part of each call in a 32 MB L3 and put
    its row at 75 GB/s where the machine reads ~60 from memory)."""
    if device != "cuda":
        return rotation_sets(call_bytes, cpu_last_level_cache_bytes())
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return rotation_sets(call_bytes, getattr(props, "L2_cache_size", 50 * 2**20))


# ----------------------------------------------------------------------- providers ----


def _extension() -> Any:
    try:
        import slimstack._C as ext  # noqa: PLC0415
    except ImportError as err:
        raise Unavailable(f"slimstack._C is not built: {err}") from err
    return ext


def _ext_function(names: tuple[str, ...]) -> Callable:
    ext = _extension()
    for name in names:
        if hasattr(ext, name):
            return getattr(ext, name)
    raise Unavailable(f"slimstack._C has none of {names}")


def _packed_args(ws: WeightSet) -> tuple:
    p = ws.packed
    if hasattr(p, "meta"):
        return (p.values, p.meta)
    return (p.values, p.bitmask, p.row_offsets)


# The CUDA GEMV rows: provider -> (reduce, prefetch, pdl). Without PDL unless named, so that
# each row times the kernel on its own, as cuBLAS's rows do.
_GEMV_OPTIONS = {
    "cuda": ("auto", "auto", "off"),
    "cuda_reduce_kernel": ("kernel", "auto", "off"),
    "cuda_prefetch_off": ("auto", "off", "off"),
    "cuda_prefetch_on": ("auto", "on", "off"),
    "cuda_pdl": ("auto", "auto", "auto"),
}


# The CUTLASS Hopper GEMM rows: provider -> (swizzle, tile); 0 / "auto" are the defaults.
_SM90_OPTIONS = {
    "cuda_sm90": (0, "auto"),
    "cuda_sm90_swizzle1": (1, "auto"),
    "cuda_sm90_256x128": (0, "256x128"),
    "cuda_sm90_128x256": (0, "128x256"),
}


def _triton_kernel(name: str) -> Any:
    """slimstack.kernels.<name> (a Triton launcher module), or Unavailable."""
    try:
        return importlib.import_module(f"slimstack.kernels.{name}")
    except ImportError as err:
        raise Unavailable(f"triton kernels unavailable: {err}") from err


# The Triton rows that turn one launcher keyword off: provider -> (op's module, keyword).
_TRITON_FLAG_VARIANTS = {
    "triton_tile_dot": ("sparse24_gemv", "column_dots"),
    "triton_global_gather": ("sparse24_gemv", "smem_gather"),
    "triton_no_prefetch": ("bitmap_gemv", "prefetch"),
}


def provider_call(case: Case) -> Callable[[torch.Tensor, WeightSet], torch.Tensor]:
    """fn(x, weights) -> y for this case's provider, or Unavailable."""
    N, K = case.N, case.K
    if case.provider == "triton_w_as_a":
        sparse24_gemm = _triton_kernel("sparse24_gemm")
        gemm_cfg = previous_gemm_config(case.M, N, sparse24_gemm)
        return lambda x, ws: sparse24_gemm.sparse24_gemm(
            x, *_packed_args(ws), N, K, config=gemm_cfg
        )
    if case.provider in _TRITON_FLAG_VARIANTS:
        name, flag = _TRITON_FLAG_VARIANTS[case.provider]
        launcher = getattr(_triton_kernel(name), name)
        return lambda x, ws: launcher(x, *_packed_args(ws), N, K, **{flag: False})
    if case.provider in _TRITON_CONFIG_VARIANTS:
        sparse24_gemv, bitmap_gemv = _triton_kernel("sparse24_gemv"), _triton_kernel("bitmap_gemv")
        sparse24_gemm = _triton_kernel("sparse24_gemm")
        cfg = _triton_variant(case, sparse24_gemv, bitmap_gemv)
        if case.op == "sparse24_gemv":
            return lambda x, ws: sparse24_gemv.sparse24_gemv(x, *_packed_args(ws), N, K, config=cfg)
        if case.op == "bitmap_gemv":
            return lambda x, ws: bitmap_gemv.bitmap_gemv(x, *_packed_args(ws), N, K, config=cfg)
        return lambda x, ws: sparse24_gemm.sparse24_gemm(x, *_packed_args(ws), N, K)
    if case.provider == "triton_unpack":
        if case.weight_format == "sparse24":
            mm = _triton_kernel("sparse24_unpack").sparse24_mm_unpacked
        else:
            mm = _triton_kernel("bitmap_unpack").bitmap_mm_unpacked
        return lambda x, ws: mm(x, *_packed_args(ws), N, K)
    if case.provider in _SM90_OPTIONS:
        # CUTLASS sparse tensor cores: meta reordered once
        fn = _ext_function(("sparse24_gemm_sm90_cuda",))
        reorder = _ext_function(("sparse24_sm90_reorder_meta_cuda",))
        swizzle, tile = _SM90_OPTIONS[case.provider]

        def sm90(x: torch.Tensor, ws: WeightSet) -> torch.Tensor:
            if "sm90_meta" not in ws.extras:
                ws.extras["sm90_meta"] = reorder(ws.packed.meta, N, K)
            return fn(x, ws.packed.values, ws.extras["sm90_meta"], N, K, None, swizzle, tile)

        return sm90
    if case.op == "bitmap_gemv" and case.provider == "cuda_ring1":
        fn = _ext_function(("bitmap_gemv_cuda",))
        return lambda x, ws: fn(x, *_packed_args(ws), N, K, None, 1)
    if case.op == "sparse24_gemv" and case.provider in _GEMV_OPTIONS:
        fn = _ext_function(("sparse24_gemv_cuda",))
        reduce, prefetch, pdl = _GEMV_OPTIONS[case.provider]
        return lambda x, ws: fn(x, *_packed_args(ws), N, K, 0, None, reduce, prefetch, pdl)
    if case.op == "dense_mm":
        fn = _ext_function(("dense_mm_cpu",))
        return lambda x, ws: fn(x, ws.dense)
    if case.provider in ("cuda", "cpu"):
        names = {
            "sparse24_gemm": ("sparse24_gemm_sm80_cuda",),
            "sparse24_mm": ("sparse24_mm_cpu",),
            "bitmap_mm": ("bitmap_mm_cpu",),
        }.get(case.op, ())
        fn = _ext_function((f"{case.op}_{case.provider}", *names))
        return lambda x, ws: fn(x, *_packed_args(ws), N, K)
    if case.provider == "torch":
        return _torch_semi_structured_call()
    if case.provider == "auto":
        try:
            from slimstack.ops import sparse_linear
        except ImportError as err:
            raise Unavailable(f"slimstack.ops.sparse_linear unavailable: {err}") from err
        return lambda x, ws: sparse_linear(x, ws.packed, None)
    raise Unavailable(f"unknown provider {case.provider!r}")


# Providers that run a Triton launcher with another GemvConfig (_triton_variant).
_TRITON_CONFIG_VARIANTS = ("triton", "triton_n8", "triton_w8", "triton_n16", "triton_split2x",
                           "triton_s2")  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def previous_gemm_config(M: int, N: int, sparse24_gemm: Any) -> Any:
    """The Triton GEMM tile of the 2026-12-04 run for M > 64 (W as the A operand, one CTA per
    SM): 256 x 128 where those tiles fill the SMs, else 128 x 128."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = _cdiv(M, 256) * _cdiv(N, 128)
    if tiles >= sms:
        return sparse24_gemm.PREVIOUS_LARGE_M_CONFIG
    return sparse24_gemm.GemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


def _triton_variant(case: Case, sparse24_gemv: Any, bitmap_gemv: Any) -> Any:
    """The GemvConfig a Triton provider names (None: the launcher's default).

    - triton_n8 / triton_n16: the default's K step (and K split) with fewer rows per program.
      H200 2026-12-04: N = 4096 gave 256 programs of 4 warps at M = 1 (2 per SM, 8 warps:
      little to hide the mask -> value -> x gather chain behind) and 64 x 4 split-K programs
      at M = 16; half / a quarter of the rows doubles / quadruples the programs.
    - triton_w8 (M = 1, and 16 for 2:4): the default tile and split on 8 warps instead of 4.
      Triton 3.6 (the GPU image's) gives the default 2:4 tile 128 registers at 4 warps and 80
      at 8, the bitmap tile 123 and 95: twice the warps per SM on N = 4096 (2 programs per SM
      either way), and fewer waves on the large N. At M = 16 the 64 x 128 tile: 151
      registers at 4 warps, 73 at 8 (319 instructions per warp and K step).
    - triton_s2 (M = 16): the default tile with num_stages=2 (124 registers, 4 programs per
      SM instead of 3; half the bytes in flight per program).
    - triton_split2x (M = 16): the default tile with twice the default K split, the other way
      to double the programs (the decode of a 64 x 128 tile is ~700 instructions per warp,
      latency-bound at 8 warps per SM).
    """
    if case.provider == "triton":
        return None
    module = sparse24_gemv if case.op == "sparse24_gemv" else bitmap_gemv
    base = module.default_config(case.M)
    sms = sparse24_gemv.sm_count(torch.device("cuda"))
    k_tiles = _cdiv(_cdiv(case.K, 64) * 64, base.block_k)  # K tiles of the padded K
    default_split = sparse24_gemv.choose_split_k(_cdiv(case.N, base.block_n), k_tiles, sms)
    if case.provider == "triton_n8":
        return sparse24_gemv.GemvConfig(8, base.block_k, num_warps=base.num_warps)
    if case.provider == "triton_w8":
        return sparse24_gemv.GemvConfig(base.block_n, base.block_k, num_warps=8)
    if case.provider == "triton_s2":
        return sparse24_gemv.GemvConfig(base.block_n, base.block_k, base.num_warps, num_stages=2)
    if case.provider == "triton_split2x":
        split = min(2 * default_split, k_tiles)
        return sparse24_gemv.GemvConfig(base.block_n, base.block_k, base.num_warps, split_k=split)
    # triton_n16: a quarter of the rows at the default's split
    return sparse24_gemv.GemvConfig(
        16, base.block_k, num_warps=base.num_warps, split_k=default_split
    )


def _torch_semi_structured_call() -> Callable:
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as err:
        raise Unavailable("torch.sparse.to_sparse_semi_structured is missing") from err

    def call(x: torch.Tensor, ws: WeightSet) -> torch.Tensor:
        if ws.semi is None:
            ws.semi = to_sparse_semi_structured(ws.dense)
        return torch.nn.functional.linear(x, ws.semi)

    return call


def dense_call(x: torch.Tensor, ws: WeightSet) -> torch.Tensor:
    return torch.matmul(x, ws.dense.t())


# -------------------------------------------------------------------------- timers ----


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(
    call: Callable[[int], Any], n_sets: int, device: str, *, min_ms: float = 20.0
) -> tuple[float, str]:
    """Median time of one call, cycling over ``n_sets`` input sets, after warm-up.

    CUDA: the calls are captured into a CUDA graph (no launch overhead in the numbers) and
    each replay is timed with events; eager event timing if capture fails. CPU: perf_counter
    per call. Returns (milliseconds, method).
    """
    for i in range(max(3, n_sets)):  # warm-up: compile, autotune caches, allocator
        call(i % n_sets)
    _sync(device)
    if device != "cuda":
        return _cpu_median_ms(call, n_sets, min_ms), "perf_counter"
    try:
        return _graph_median_ms(call, n_sets, min_ms), "cuda_graph"
    except RuntimeError:
        return _eager_median_ms(call, n_sets, min_ms), "cuda_events"


MAX_CALLS = 1000  # calls per timed batch (graph capture costs host time per call)


def _calls_for(estimate_ms: float, min_ms: float, n_sets: int) -> int:
    """Calls per timed batch: about ``min_ms`` of work, a whole number of rotation cycles
    (each set read equally often, also at the cap), at least one cycle."""
    calls = max(n_sets, math.ceil(min_ms / max(estimate_ms, 1e-4)))
    cycles = min(math.ceil(calls / n_sets), max(1, MAX_CALLS // n_sets))
    return cycles * n_sets


# A shared 2-core CPU moves single calls by up to ~60% for a second at a time (a neighbour's
# load): the median of 20 ms of calls once put a 2:4 M = 4 row at 0.94 ms that reruns put at
# 0.51-0.58. At least this long a window per case.
CPU_MIN_MS = 150.0


def _cpu_median_ms(call, n_sets: int, min_ms: float) -> float:
    min_ms = max(min_ms, CPU_MIN_MS)
    times = []
    start_all = time.perf_counter()
    i = 0
    while i < 5 or (time.perf_counter() - start_all) * 1e3 < min_ms and i < 500:
        t0 = time.perf_counter()
        call(i % n_sets)
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return statistics.median(times)


def _event_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _graph_median_ms(call, n_sets: int, min_ms: float) -> float:
    estimate = _event_ms(lambda: call(0))
    calls = _calls_for(estimate, min_ms / 4, n_sets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs its warm-up on a side stream
        for i in range(n_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % n_sets)
    graph.replay()
    times = [_event_ms(graph.replay) / calls for _ in range(7)]
    return statistics.median(times)


def _eager_median_ms(call, n_sets: int, min_ms: float) -> float:
    estimate = _event_ms(lambda: call(0))
    calls = _calls_for(estimate, min_ms / 4, n_sets)

    def batch() -> None:
        for i in range(calls):
            call(i % n_sets)

    return statistics.median(_event_ms(batch) / calls for _ in range(7))


# --------------------------------------------------------------------------- peaks ----


def measure_peaks(device: str) -> dict[str, float]:
    """HBM (or DRAM) bandwidth and dense matmul TFLOP/s.

    ``hbm_gbps`` is the faster of a read-only stream (a sum over the buffer) and a copy
    (read + write bytes): decode kernels only read their weights, and on an H200 a copy
    reaches ~2.7 TB/s where reads alone pass 3.7 TB/s (cuBLAS's own GEMV on 14336 x 4096,
    2026-12-04), so a copy-only peak put dense decode at "107% of HBM". Both are kept."""
    if device == "cuda":
        nbytes, n, dtype = 2**30, 8192, torch.bfloat16
    else:
        nbytes, n, dtype = 2**26, 1024, torch.float32
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms, _ = median_ms(lambda i: dst.copy_(src), 1, device, min_ms=50)
    halves = src.view(torch.bfloat16 if device == "cuda" else torch.float32)
    read_ms, _ = median_ms(lambda i: halves.sum(dtype=torch.float32), 1, device, min_ms=50)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_ms, _ = median_ms(lambda i: a @ b, 1, device, min_ms=50)
    copy_gbps = _significant(2 * nbytes / copy_ms / 1e6)
    read_gbps = _significant(nbytes / read_ms / 1e6)
    return {
        "hbm_gbps": max(copy_gbps, read_gbps),
        "hbm_read_gbps": read_gbps,
        "hbm_copy_gbps": copy_gbps,
        "dense_tflops": _significant(2 * n**3 / mm_ms / 1e9),
    }


# ----------------------------------------------------------------- results file ----


COMMIT_ENV = "SLIMSTACK_COMMIT"  # the commit, where the checkout has no .git (a GPU machine)


def git_commit() -> str:
    """HEAD's sha (+ "-dirty" with uncommitted changes to tracked files); $SLIMSTACK_COMMIT
    when set: the GPU machine gets a copy of the working tree without .git."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH_DIR, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def environment(device: str) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "commit": git_commit(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def make_row(
    case: Case, median: float, baseline: float, baseline_name: str, moved_bytes: int
) -> dict[str, Any]:
    return {
        "op": case.op,
        "provider": case.provider,
        "baseline": baseline_name,
        "N": case.N,
        "K": case.K,
        "M": case.M,
        "dtype": str(case.dtype).removeprefix("torch."),
        "median_ms": _significant(median),
        "baseline_ms": _significant(baseline),
        "speedup": _significant(baseline / median),
        "gbps": _significant(moved_bytes / median / 1e6),
        "tflops": _significant(2 * case.M * case.N * case.K / median / 1e9),
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def results_document(env: dict[str, Any], peak: dict[str, float], rows: list[dict]) -> dict:
    return {"suite": "kernels", **env, "peak": peak, "rows": rows}


def validate_results(doc: dict[str, Any]) -> list[str]:
    """Problems with a results document against DESIGN.md's schema (empty list: valid)."""
    problems = []
    for key, kind in TOP_KEYS.items():
        if not isinstance(doc.get(key), kind):
            problems.append(f"top-level {key!r} missing or not {kind.__name__}")
    for key in ("triton", "cuda"):
        if key not in doc:
            problems.append(f"top-level {key!r} missing")
    if doc.get("suite") not in ("kernels", "e2e"):
        problems.append(f"suite must be 'kernels' or 'e2e', got {doc.get('suite')!r}")
    peak = doc.get("peak") or {}
    for key in ("hbm_gbps", "dense_tflops"):
        if not (isinstance(peak.get(key), (int, float)) and peak[key] > 0):
            problems.append(f"peak.{key} must be a positive number")
    for i, row in enumerate(doc.get("rows") or []):
        problems += _row_problems(i, row)
    return problems


def _row_problems(i: int, row: dict[str, Any]) -> list[str]:
    problems = []
    for key, kind in ROW_KEYS.items():
        value = row.get(key)
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            problems.append(f"rows[{i}].{key} missing or not {kind.__name__}")
    if problems:
        return problems
    if row["median_ms"] <= 0 or row["baseline_ms"] <= 0:
        return [f"rows[{i}]: times must be positive"]
    expected = row["baseline_ms"] / row["median_ms"]
    if abs(row["speedup"] - expected) > 0.01 * expected + 1e-3:
        problems.append(f"rows[{i}].speedup is not baseline_ms / median_ms")
    return problems


def gpu_slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown"


def results_path(gpu: str, device: str, date: _dt.date | None = None) -> Path:
    """bench/results/ on a GPU; on CPU a temp folder unless SLIMSTACK_BENCH_RESULTS names one."""
    date = date or _dt.date.today()
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        root = Path(folder)
    elif device == "cuda":
        root = BENCH_DIR / "results"
    else:
        root = Path(tempfile.gettempdir()) / "slimstack-bench"
    return unused_path(root / f"{date.isoformat()}-{gpu_slug(gpu)}-kernels.json")


def unused_path(path: Path) -> Path:
    """One file per run: a second run on the same day gets -2, -3, ... instead of
    overwriting the first."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_results(doc: dict[str, Any], path: Path) -> Path:
    import json

    problems = validate_results(doc)
    if problems:
        raise ValueError("results document does not match DESIGN.md: " + "; ".join(problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
