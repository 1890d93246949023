"""GPU tests of the CUDA kernels (csrc/cuda) through slimstack._C's *_cuda entry points.

Each kernel is compared with a float64 reference (dense matmul of the already-masked weight)
on fresh random inputs, writing into a NaN-poisoned output, over a shape x dtype x M grid that
includes the odd shapes (N=43, K=172; K=64; N=1) and the 7B shapes (4096x4096, 14336x4096).
Skips cleanly without a CUDA device or without the CUDA build of the extension.

A memcheck run on the small cases:
    compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_kernels.py -k small -x
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from slimstack.formats import pack_bitmap, pack_sparse24, padded_k
from slimstack.formats.cutlass_sm90 import reorder_meta_sm90, sm90_meta_offsets


def _load_extension():
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        from slimstack import _C
    except ImportError as err:  # built without the extension
        return None, f"slimstack._C is not importable: {err}"
    if not getattr(_C, "with_cuda", False) or not hasattr(_C, "sparse24_gemv_cuda"):
        return None, "slimstack._C was built without the CUDA kernels"
    return _C, ""


_C, _SKIP_REASON = _load_extension()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.cuda_ext,
    pytest.mark.skipif(_C is None, reason=_SKIP_REASON),
]

DTYPES = [torch.float16, torch.bfloat16]
# (N, K): odd N and K not a multiple of 8 or 64, a single K tile, a single row, a K that is
# not a multiple of 64 with N % 8 == 0 (sm90 path with padding), a padded K that is not a
# multiple of the sm90 tile's 128 (64, 172 -> Kp 192: TMA zero-fill and padded metadata), and
# the 7B MLP/attention shapes.
SHAPES = [(43, 172), (64, 64), (1, 64), (128, 200), (64, 172), (4096, 4096), (14336, 4096)]
SMALL = {(43, 172), (64, 64), (1, 64), (128, 200), (64, 172), (72, 1000)}  # (72, 1000): 4 slices
# Inputs are exact in the dtype and the kernels accumulate in fp32, so the error is the final
# rounding (half an ulp, relative) plus fp32 accumulation noise (absolute, ~sqrt(K)).
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _shape_id(shape: tuple[int, int]) -> str:
    n, k = shape
    return f"{'small-' if shape in SMALL else ''}N{n}-K{k}"


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_WEIGHTS: dict[tuple, tuple[torch.Tensor, object]] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_weights():
    """The cached GPU weights (about 1 GB with the 14336x4096 ones) go with this module, not
    with the worker process that runs the next test file."""
    yield
    _WEIGHTS.clear()
    torch.cuda.empty_cache()


def _weight(kind: str, n: int, k: int, dtype: torch.dtype, make) -> tuple[torch.Tensor, object]:
    """Dense masked weight on the GPU and its packed form (cached: packing 14336x4096 is slow)."""
    key = (kind, n, k, dtype)
    if key not in _WEIGHTS:
        gen = torch.Generator().manual_seed(n * 7919 + k)
        dense = make(n, k, dtype, generator=gen)
        packed = pack_sparse24(dense) if kind == "sparse24" else pack_bitmap(dense)
        _WEIGHTS[key] = (dense.cuda(), packed.to("cuda"))
    return _WEIGHTS[key]


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, generator=gen, device="cuda").to(dtype)


def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _check(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    ref = x.double() @ dense.double().T
    assert not torch.isnan(y).any(), "output has NaN: some element was never written"
    k = x.shape[1]
    torch.testing.assert_close(y.double(), ref, rtol=RTOL[x.dtype], atol=1e-3 * math.sqrt(k))


# ------------------------------------------------------------------------------------------
# sparse24_gemv


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_sparse24_gemv_matches_reference(dtype, shape, m, make_sparse24) -> None:
    n, k = shape
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    x = _x(m, k, dtype, seed=m)
    out = _poisoned(m, n, dtype)
    y = _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, dense)
    # the default allocation path agrees bit for bit
    assert torch.equal(_C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k), y)


def _x_budget(plan: dict, m: int) -> int:
    """Shared memory for the x slice: 96 KB for the 8-warp prefetch kernel (M > 8), else 48."""
    return (96 if plan["prefetch"] and m > 8 else 48) * 1024


def _cluster_reduce_runs_here() -> bool:
    plan = _C.sparse24_gemv_plan_cuda(1, 4096, 4096, torch.cuda.current_device(), 2)
    return plan["reduce"] == "cluster"


@pytest.mark.parametrize("split_k", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("shape", [(43, 172), (72, 1000), (4096, 4096)], ids=_shape_id)
def test_sparse24_gemv_forced_split_k(shape, split_k, make_sparse24) -> None:
    """Every split, with both reductions of the partials: right, deterministic, and the same
    bits either way (both add the slices in order)."""
    n, k = shape
    dtype = torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    cluster = _cluster_reduce_runs_here()
    for m in (1, 9, 16):
        x = _x(m, k, dtype, seed=100 + m)
        results = {}
        for reduce in ("auto", "kernel", "cluster"):
            plan = _C.sparse24_gemv_plan_cuda(m, n, k, torch.cuda.current_device(), split_k)
            if reduce == "cluster" and plan["split_k"] > 1 and (not cluster or plan["split_k"] > 8):
                with pytest.raises(RuntimeError, match="reduce='cluster' needs"):
                    _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, split_k,
                                          reduce=reduce)  # fmt: skip
                continue
            y = _C.sparse24_gemv_cuda(
                x, packed.values, packed.meta, n, k, split_k, _poisoned(m, n, dtype), reduce
            )
            _check(y, x, dense)
            again = _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, split_k,
                                          reduce=reduce)  # fmt: skip
            assert torch.equal(y, again), f"split-K reduction ({reduce}) must be deterministic"
            results[reduce] = y
        for reduce, y in results.items():
            assert torch.equal(y, results["kernel"]), f"reduce={reduce} differs from 'kernel'"


@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize(
    ("n", "k"), [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (43, 172)]
)
def test_sparse24_gemv_plan_is_consistent(n, k, m) -> None:
    device = torch.cuda.current_device()
    plan = _C.sparse24_gemv_plan_cuda(m, n, k, device, 0)
    kp = padded_k(k)
    chunks = kp // 16
    assert plan["slice_chunks"] % 16 == 0
    assert plan["split_k"] == -(-chunks // plan["slice_chunks"])
    assert m * (plan["slice_chunks"] * 32 + 64) <= _x_budget(plan, m), "x slice must fit smem"
    if plan["split_k"] == 1:
        assert plan["reduce"] == "none"
    elif plan["split_k"] <= 8 and _cluster_reduce_runs_here():
        assert plan["reduce"] == "cluster", "Hopper sums up to 8 slices in a cluster"
    else:
        assert plan["reduce"] == "kernel"
    expected_ws = plan["split_k"] * m * n * 4 if plan["reduce"] == "kernel" else 0
    assert plan["workspace_bytes"] == expected_ws
    forced = _C.sparse24_gemv_plan_cuda(m, n, k, device, 0, "kernel")
    # the Hopper plan keeps a split within one cluster where x fits; 'kernel' need not
    assert forced["split_k"] >= plan["split_k"]
    assert forced["reduce"] == ("none" if forced["split_k"] == 1 else "kernel")
    if torch.cuda.get_device_capability()[0] == 9 and plan["split_k"] <= 8:
        assert _cluster_reduce_runs_here(), "sm_90 with an sm_90a build must use clusters"
    if _cluster_reduce_runs_here() and (n, k, m) == (1024, 4096, 1):
        assert plan["split_k"] == 8 and plan["reduce"] == "cluster"
        assert forced["split_k"] == 16, "the SM heuristic alone asks 16 slices of 64 rows"


@pytest.mark.parametrize("n,k", [(13824, 5120), (28672, 4096), (14336, 4096)])
def test_sparse24_gemv_plan_of_two_row_tiles_fits_one_wave(n, k) -> None:
    """Without prefetch, N >= 8192 runs two 16-row tiles per warp (4 blocks per SM): the grid
    stays within 4 x SMs (the H200's 13824x5120 plan made 540 blocks for 528 slots)."""
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    plan = _C.sparse24_gemv_plan_cuda(1, n, k, device, 0, "auto", "off")
    assert plan["row_tiles_per_warp"] == 2
    row_blocks = -(-n // 128)
    assert plan["split_k"] >= 1 and row_blocks * plan["split_k"] <= max(4 * sms, row_blocks)


# K slices of 1 partial (Kp 192: 12 chunks), 3 and 5 + 1 partial quad iterations (the prefetch
# loop runs its iterations in pairs: odd counts end after the first of a pair), 4 iterations,
# and N >= 8192 (where prefetch 'off' switches to two row tiles per warp).
PREFETCH_SHAPES = [(43, 172), (72, 768), (64, 1344), (72, 1000), (4096, 4096), (8320, 1344)]


@pytest.mark.parametrize("split_k", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", PREFETCH_SHAPES, ids=_shape_id)
def test_sparse24_gemv_prefetch_matches_reference(shape, split_k, make_sparse24) -> None:
    """The prefetch kernel (two quad iterations in flight) is right for every slice length, and
    at the same split gives the bits of the one-iteration kernel: only load timing differs."""
    n, k = shape
    dtype = torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    device = torch.cuda.current_device()
    for m in (1, 9, 16):
        x = _x(m, k, dtype, seed=300 + m)
        results = {}
        for prefetch in ("on", "off"):
            plan = _C.sparse24_gemv_plan_cuda(m, n, k, device, split_k, "kernel", prefetch)
            assert plan["prefetch"] == (prefetch == "on")
            y = _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, split_k,
                                      _poisoned(m, n, dtype), "kernel", prefetch)  # fmt: skip
            _check(y, x, dense)
            results[prefetch] = (plan["split_k"], y)
        (split_on, y_on), (split_off, y_off) = results["on"], results["off"]
        if split_on == split_off:
            assert torch.equal(y_on, y_off), f"m={m}: prefetch changed the bits at split {split_on}"


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 4096, 4096),
        (1, 14336, 4096),
        (8, 13824, 5120),
        (16, 4096, 14336),
        (16, 14336, 4096),
        (1, 1024, 4096),
    ],
)
def test_sparse24_gemv_prefetch_plan(m, n, k) -> None:
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    auto = _C.sparse24_gemv_plan_cuda(m, n, k, device, 0)
    off = _C.sparse24_gemv_plan_cuda(m, n, k, device, 0, "auto", "off")
    on = _C.sparse24_gemv_plan_cuda(m, n, k, device, 0, "auto", "on")
    assert auto == on and on["prefetch"] and not off["prefetch"]
    assert on["row_tiles_per_warp"] == 1
    assert on["warps_per_block"] == (8 if m > 8 else 4) and off["warps_per_block"] == 4
    assert off["row_tiles_per_warp"] == (2 if n >= 8192 else 1), "'off' is the 2026-12-04 plan"
    # 128 registers per thread: 16 warps per SM, so the grid stays within one wave unless the
    # x slice's shared memory forces more K slices than that
    rows = 16 * on["warps_per_block"]
    row_blocks = -(-n // rows)
    wave = 16 // on["warps_per_block"] * sms
    chunks = padded_k(k) // 16
    max_slice = max(16, ((_x_budget(on, m) // (m * 4) - 16) // 8) // 16 * 16)
    min_split = -(-chunks // max_slice)
    assert row_blocks * on["split_k"] <= max(wave, row_blocks * min_split, row_blocks)
    if (m, n, k) == (16, 4096, 14336):
        # the wide x budget keeps K = 14336 at M = 16 within one cluster (was 12 slices)
        assert on["split_k"] <= 8 and off["split_k"] == 12


def _sm90_image_runs() -> bool:
    plan = _C.sparse24_gemv_plan_cuda(1, 64, 64, torch.cuda.current_device(), 0)
    return plan["pdl"]


def test_sparse24_gemv_pdl_plan() -> None:
    """Programmatic dependent launch where the sm_90 image runs (it holds the wait), never
    elsewhere; forcing it there is a clear error."""
    device = torch.cuda.current_device()
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    assert hopper or not _sm90_image_runs(), "PDL planned off Hopper"
    if _cluster_reduce_runs_here():  # the sm_90 image runs here
        assert _sm90_image_runs()
    off = _C.sparse24_gemv_plan_cuda(1, 4096, 4096, device, 0, "auto", "auto", "off")
    assert not off["pdl"]
    if _sm90_image_runs():
        assert _C.sparse24_gemv_plan_cuda(1, 4096, 4096, device, 0, "auto", "auto", "on")["pdl"]
    else:
        with pytest.raises(RuntimeError, match="pdl='on' needs an sm_90 GPU"):
            _C.sparse24_gemv_plan_cuda(1, 4096, 4096, device, 0, "auto", "auto", "on")


@pytest.mark.parametrize("m", [1, 16])
def test_sparse24_gemv_pdl_waits_for_the_kernel_that_writes_x(m, make_sparse24) -> None:
    """Back to back in one stream: a kernel writes x, the GEMV (launched as its programmatic
    dependent: PDL pairs kernels only, so not a memcpy) reads it. A GEMV that read x before its griddepcontrol.wait would see the
    previous x in some blocks. The same bits as without PDL."""
    n, k = 4096, 4096
    dtype = torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    xs = [_x(m, k, dtype, seed=400 + i) for i in range(12)]
    x = torch.empty_like(xs[0])
    filler = torch.empty(64 * 1024 * 1024, device="cuda")  # a slow kernel before each write
    outs = {}
    for pdl in ("auto", "off"):
        ys = []
        for fresh in xs:
            filler.mul_(1.0)
            torch.mul(fresh, 1.0, out=x)  # a kernel (copy_ would be a memcpy, not a primary)
            ys.append(
                _C.sparse24_gemv_cuda(
                    x, packed.values, packed.meta, n, k, 0, None, "auto", "auto", pdl
                )  # fmt: skip
            )
        torch.cuda.synchronize()
        outs[pdl] = ys
    for fresh, y, y_off in zip(xs, outs["auto"], outs["off"]):
        _check(y, fresh, dense)
        assert torch.equal(y, y_off)


def test_sparse24_gemv_pdl_waits_for_the_kernel_that_writes_the_weights(make_sparse24) -> None:
    """A kernel rewrites the packed values just before each GEMV (as a GPU pack or an in-place
    update would): before its wait a PDL GEMV only prefetches them into L2, so it reads the
    new ones."""
    n, k, m = 4096, 4096, 1
    dtype = torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    x = _x(m, k, dtype, seed=500)
    values = torch.empty_like(packed.values)
    for scale in (1.0, -2.0, 0.5, 4.0):
        torch.mul(packed.values, scale, out=values)  # exact in bf16: powers of two
        y = _C.sparse24_gemv_cuda(x, values, packed.meta, n, k)
        _check(y, x, dense * scale)


def test_sparse24_gemv_rejects_unknown_prefetch() -> None:
    with pytest.raises(ValueError, match="prefetch must be 'auto', 'on' or 'off'"):
        _C.sparse24_gemv_plan_cuda(1, 64, 64, torch.cuda.current_device(), 0, "auto", "yes")


def test_sparse24_gemv_rejects_unknown_reduce(make_sparse24) -> None:
    with pytest.raises(ValueError, match="'auto', 'kernel' or 'cluster'"):
        _C.sparse24_gemv_plan_cuda(1, 64, 64, torch.cuda.current_device(), 0, "atomic")


def test_sparse24_gemv_unaligned_x_uses_the_safe_path(make_sparse24) -> None:
    n, k, m = 64, 64, 3
    dtype = torch.float16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    storage = _x(1, m * k + 1, dtype, seed=5).reshape(-1)
    x = storage[1:].view(m, k)  # 2-byte offset: no 16-byte loads possible
    assert x.data_ptr() % 16 != 0
    y = _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, out=_poisoned(m, n, dtype))
    _check(y, x, dense)


def test_sparse24_gemv_rejects_bad_input(make_sparse24) -> None:
    n, k = 64, 64
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    x = _x(2, k, torch.float16, seed=1)
    with pytest.raises(ValueError, match="M <= 16"):
        _C.sparse24_gemv_cuda(_x(17, k, torch.float16, 2), packed.values, packed.meta, n, k)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _C.sparse24_gemv_cuda(x.float(), packed.values, packed.meta, n, k)
    with pytest.raises(TypeError, match="values must be"):
        _C.sparse24_gemv_cuda(x.bfloat16(), packed.values, packed.meta, n, k)
    with pytest.raises(ValueError, match="values must be on"):
        _C.sparse24_gemv_cuda(x, packed.values.cpu(), packed.meta, n, k)
    with pytest.raises(ValueError, match="meta must be"):
        _C.sparse24_gemv_cuda(x, packed.values, packed.meta[:, :4].contiguous(), n, k)
    with pytest.raises(ValueError, match="contiguous"):
        _C.sparse24_gemv_cuda(_x(k, 2, torch.float16, 3).T, packed.values, packed.meta, n, k)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        _C.sparse24_gemv_cuda(_x(2, 32, torch.float16, 4), packed.values, packed.meta, n, k)
    with pytest.raises(ValueError, match="out must be"):
        _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, out=_poisoned(2, n + 1, x.dtype))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        _C.sparse24_gemv_cuda(x.cpu(), packed.values, packed.meta, n, k)
    with pytest.raises(ValueError, match=r"split_k must be in 0\.\.65535"):
        _C.sparse24_gemv_cuda(x, packed.values, packed.meta, n, k, 2**31)
    with pytest.raises(ValueError, match="32-bit ints"):
        _C.sparse24_gemv_plan_cuda(1, 2**31, 64, 0, 0, "auto")


def test_sparse24_gemv_empty_batch(make_sparse24) -> None:
    _, packed = _weight("sparse24", 64, 64, torch.float16, make_sparse24)
    y = _C.sparse24_gemv_cuda(_x(0, 64, torch.float16, 1), packed.values, packed.meta, 64, 64)
    assert y.shape == (0, 64)


@pytest.mark.parametrize("reduce", ["auto", "kernel"])  # auto: a cluster launch on Hopper
def test_sparse24_gemv_replays_in_a_cuda_graph(make_sparse24, reduce) -> None:
    n, k, m = 4096, 4096, 1  # split K (the plan's), so the reduction is in the graph too
    dtype = torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    assert _C.sparse24_gemv_plan_cuda(m, n, k, torch.cuda.current_device())["split_k"] > 1
    static_x = _x(m, k, dtype, seed=11)
    static_y = _poisoned(m, n, dtype)

    def call() -> None:
        _C.sparse24_gemv_cuda(static_x, packed.values, packed.meta, n, k, out=static_y,
                              reduce=reduce)  # fmt: skip

    call()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    fresh = _x(m, k, dtype, seed=12)
    static_x.copy_(fresh)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _check(static_y, fresh, dense)


# ------------------------------------------------------------------------------------------
# bitmap_gemv


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_bitmap_gemv_matches_reference(dtype, shape, m, make_unstructured) -> None:
    n, k = shape
    dense, packed = _weight("bitmap", n, k, dtype, make_unstructured)
    x = _x(m, k, dtype, seed=m + 1)
    out = _poisoned(m, n, dtype)
    y = _C.bitmap_gemv_cuda(x, packed.values, packed.bitmask, packed.row_offsets, n, k, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, dense)


# M = 1 picks 8, 4 or 2 warps per block by N so that small N still covers the SMs: rows
# around the switch points (on 132 SMs: ~1056 and ~2112) and a dense stretch past the
# value ring (rows over ~62% kept run the fallback loop)
@pytest.mark.parametrize("n", [1024, 1057, 2111, 2112])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_bitmap_gemv_block_sizes_at_m1(dtype, n, make_unstructured) -> None:
    dense, packed = _weight("bitmap", n, 1000, dtype, make_unstructured)
    x = _x(1, 1000, dtype, seed=n)
    y = _C.bitmap_gemv_cuda(
        x, packed.values, packed.bitmask, packed.row_offsets, n, 1000, out=_poisoned(1, n, dtype)
    )
    _check(y, x, dense)


# K: one sub-tile (172, 1024), two (2048: the prologue fills both slots), three with a short
# last one (2200), long (14336); N = 43 leaves the last warp's second row past N.
@pytest.mark.parametrize("k", [172, 1024, 2048, 2200, 14336])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_bitmap_gemv_ring_depths_give_the_same_bits_at_m1(dtype, k, make_unstructured) -> None:
    """M = 1 keeps two sub-tiles of each row in flight by default (ring_depth=2): the same
    fmaf sequence per output as one (ring_depth=1), so the same bits, and right."""
    n = 43
    dense, packed = _weight("bitmap", n, k, dtype, make_unstructured)
    x = _x(1, k, dtype, seed=k)
    args = (x, packed.values, packed.bitmask, packed.row_offsets, n, k)
    two = _C.bitmap_gemv_cuda(*args, out=_poisoned(1, n, dtype))
    _check(two, x, dense)
    assert torch.equal(two, _C.bitmap_gemv_cuda(*args, out=_poisoned(1, n, dtype), ring_depth=2))
    assert torch.equal(two, _C.bitmap_gemv_cuda(*args, out=_poisoned(1, n, dtype), ring_depth=1))


# Launch shapes the N = 43 grid does not reach: several passes of row groups per block
# (N = 17000), two x windows and the shared-memory opt-in with 8-warp blocks (K = 20480), and
# the 7B layer shape (8-warp blocks, 48 KB without the opt-in).
@pytest.mark.parametrize("shape", [(17000, 1024), (2048, 20480), (4096, 4096)], ids=_shape_id)
def test_bitmap_gemv_ring_depths_on_large_launches(shape, make_unstructured) -> None:
    n, k = shape
    dense, packed = _weight("bitmap", n, k, torch.bfloat16, make_unstructured)
    x = _x(1, k, torch.bfloat16, seed=n + k)
    args = (x, packed.values, packed.bitmask, packed.row_offsets, n, k)
    two = _C.bitmap_gemv_cuda(*args, out=_poisoned(1, n, torch.bfloat16), ring_depth=2)
    _check(two, x, dense)
    assert torch.equal(two, _C.bitmap_gemv_cuda(*args, out=_poisoned(1, n, torch.bfloat16),
                                                ring_depth=1))  # fmt: skip


def test_bitmap_gemv_ring_depth_two_past_the_ring() -> None:
    """Rows denser than a ring slot holds (80% kept) read their overflow from global memory
    at either depth: same bits."""
    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(40, 4400, generator=gen).to(torch.bfloat16)
    dense[:, ::5] = 0
    packed = pack_bitmap(dense).to("cuda")
    x = _x(1, 4400, torch.bfloat16, seed=9)
    args = (x, packed.values, packed.bitmask, packed.row_offsets, 40, 4400)
    two = _C.bitmap_gemv_cuda(*args, out=_poisoned(1, 40, torch.bfloat16), ring_depth=2)
    _check(two, x, dense.cuda())
    assert torch.equal(two, _C.bitmap_gemv_cuda(*args, ring_depth=1))


def test_bitmap_gemv_rejects_bad_ring_depth(make_unstructured) -> None:
    n, k = 43, 172
    _, packed = _weight("bitmap", n, k, torch.float16, make_unstructured)
    args = (packed.values, packed.bitmask, packed.row_offsets, n, k)
    with pytest.raises(ValueError, match="ring_depth must be 0 .automatic., 1 or 2, got 3"):
        _C.bitmap_gemv_cuda(_x(1, k, torch.float16, 1), *args, ring_depth=3)
    with pytest.raises(ValueError, match="ring_depth=2 is the M = 1 kernel's, got M=4"):
        _C.bitmap_gemv_cuda(_x(4, k, torch.float16, 1), *args, ring_depth=2)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_bitmap_gemv_dense_rows_take_the_fallback_small(m) -> None:
    gen = torch.Generator().manual_seed(5)
    dense = torch.randn(40, 2200, generator=gen).to(torch.bfloat16)
    dense[:, ::5] = 0  # 80% kept: more than the ring holds per sub-tile
    packed = pack_bitmap(dense).to("cuda")
    x = _x(m, 2200, torch.bfloat16, seed=m)
    y = _C.bitmap_gemv_cuda(
        x, packed.values, packed.bitmask, packed.row_offsets, 40, 2200,
        out=_poisoned(m, 40, torch.bfloat16),
    )  # fmt: skip
    _check(y, x, dense.cuda())


@pytest.mark.parametrize("m", [1, 5, 16])
def test_bitmap_gemv_extreme_rows_small(m) -> None:
    # rows: empty, full, a single kept value at the last column, every other column
    k = 2200  # more than one 1024-column sub-tile, not a multiple of 64
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(4, k, generator=gen).add_(3.0).to(torch.float16)
    dense[0] = 0
    dense[2, :-1] = 0
    dense[3, 1::2] = 0
    packed = pack_bitmap(dense).to("cuda")
    dense = dense.cuda()
    x = _x(m, k, torch.float16, seed=m)
    y = _C.bitmap_gemv_cuda(
        x, packed.values, packed.bitmask, packed.row_offsets, 4, k, out=_poisoned(m, 4, dense.dtype)
    )
    _check(y, x, dense)
    assert torch.equal(y[:, 0], torch.zeros(m, dtype=y.dtype, device="cuda"))


@pytest.mark.parametrize("m", [1, 16])
def test_bitmap_gemv_all_zero_weight_small(m) -> None:
    # packs to an empty values tensor (a null data pointer): the answer is zeros, no launch
    packed = pack_bitmap(torch.zeros(43, 172, dtype=torch.bfloat16)).to("cuda")
    assert packed.values.numel() == 0
    out = _poisoned(m, 43, torch.bfloat16)
    x = _x(m, 172, torch.bfloat16, seed=m)
    y = _C.bitmap_gemv_cuda(x, packed.values, packed.bitmask, packed.row_offsets, 43, 172, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(y, torch.zeros_like(y))


def test_bitmap_gemv_rejects_bad_input(make_unstructured) -> None:
    n, k = 43, 172
    _, packed = _weight("bitmap", n, k, torch.float16, make_unstructured)
    x = _x(1, k, torch.float16, seed=1)
    with pytest.raises(ValueError, match="M <= 16"):
        x17 = _x(17, k, torch.float16, 2)
        _C.bitmap_gemv_cuda(x17, packed.values, packed.bitmask, packed.row_offsets, n, k)
    with pytest.raises(TypeError, match="row_offsets must be"):
        _C.bitmap_gemv_cuda(x, packed.values, packed.bitmask, packed.row_offsets.int(), n, k)
    with pytest.raises(ValueError, match="bitmask must be"):
        short = packed.bitmask[:-1].contiguous()
        _C.bitmap_gemv_cuda(x, packed.values, short, packed.row_offsets, n, k)


# ------------------------------------------------------------------------------------------
# sparse24 GEMM, sm80 kernel (runs on sm_80 and later, Hopper included)


@pytest.mark.parametrize("m", [1, 17, 64, 128, 257])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_sparse24_gemm_sm80_matches_reference(dtype, shape, m, make_sparse24) -> None:
    n, k = shape
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    x = _x(m, k, dtype, seed=1000 + m)
    out = _poisoned(m, n, dtype)
    y = _C.sparse24_gemm_sm80_cuda(x, packed.values, packed.meta, n, k, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, dense)


@pytest.mark.slow
def test_sparse24_gemm_sm80_runs_past_the_grid_limit(make_sparse24) -> None:
    """More rows than one launch's grid.y covers (65535 tiles of 128): the glue launches per
    row slice. Rows on both sides of the seam and the last rows are checked (x: ~1 GB)."""
    n, k, dtype = 64, 64, torch.bfloat16
    limit = 65535 * 128
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    x = _x(limit + 300, k, dtype, seed=7)
    y = _C.sparse24_gemm_sm80_cuda(x, packed.values, packed.meta, n, k)
    for rows in (slice(0, 256), slice(limit - 256, limit + 256), slice(-64, None)):
        _check(y[rows], x[rows], dense)


# ------------------------------------------------------------------------------------------
# sparse24 GEMM, sm90 CUTLASS kernel


def _sm90_or_skip() -> None:
    if not _C.sparse24_gemm_sm90_available(torch.cuda.current_device()):
        pytest.skip("needs a compute capability 9.0 GPU and a build with sm_90a")


SM90_SHAPES = [s for s in SHAPES if s[0] % 8 == 0]


@pytest.mark.parametrize("m", [1, 64, 128, 257, 2048])
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_sparse24_gemm_sm90_matches_reference(dtype, shape, m, make_sparse24) -> None:
    _sm90_or_skip()
    n, k = shape
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    meta_sm90 = _C.sparse24_sm90_reorder_meta_cuda(packed.meta, n, k)
    x = _x(m, k, dtype, seed=2000 + m)
    out = _poisoned(m, n, dtype)
    y = _C.sparse24_gemm_sm90_cuda(x, packed.values, meta_sm90, n, k, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, dense)


def _sm90_checked(n: int, m: int, seed: int, make_sparse24, **options) -> Callable:
    """Runs the sm90 GEMM (k = 512, bf16) with `options` into a poisoned output, checks it
    against the reference, and returns a function that calls it again with other options."""
    _sm90_or_skip()
    k, dtype = 512, torch.bfloat16
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    meta_sm90 = _C.sparse24_sm90_reorder_meta_cuda(packed.meta, n, k)
    x = _x(m, k, dtype, seed=seed)

    def call(**kw) -> torch.Tensor:
        return _C.sparse24_gemm_sm90_cuda(x, packed.values, meta_sm90, n, k, **kw)

    _check(call(out=_poisoned(m, n, dtype), **options), x, dense)
    return call


@pytest.mark.parametrize("m", [64, 512, 2048])
def test_sparse24_gemm_sm90_both_schedules(m, make_sparse24) -> None:
    """N = 4096: M = 64 and 512 leave fewer than two 128 x 128 output tiles per SM (stream-K,
    partial sums reduced in the workspace), M = 2048 does not (data-parallel). Stream-K's
    reduction runs in a fixed order: a second call gives the same bits."""
    call = _sm90_checked(4096, m, 2100 + m, make_sparse24)
    assert torch.equal(call(), call())


@pytest.mark.parametrize("m", [64, 2048])
@pytest.mark.parametrize("swizzle", [1, 2, 4, 8])
def test_sparse24_gemm_sm90_tile_swizzle(swizzle, m, make_sparse24) -> None:
    """Every tile order (stream-K at M = 64, data-parallel at 2048) covers every output tile
    once: right against the reference, and each tile's sum is the same whichever CTA runs it."""
    call = _sm90_checked(4096, m, 2200 + m, make_sparse24, swizzle=swizzle)
    if m == 2048:
        assert torch.equal(call(swizzle=swizzle), call())


@pytest.mark.parametrize("m", [64, 200, 2048])
@pytest.mark.parametrize("tile", ["128x128", "256x128", "128x256"])
def test_sparse24_gemm_sm90_tiles(tile, m, make_sparse24) -> None:
    """Each named tile (data-parallel at any M, so M = 64 runs it where "auto" takes stream-K;
    M = 200 leaves partial tiles on the tokens) reads the one reordered metadata right: N = 320
    is a partial 256-row tile too."""
    _sm90_checked(320, m, 2300 + m, make_sparse24, tile=tile)


def test_sparse24_gemm_sm90_rejects_bad_tile(make_sparse24) -> None:
    n, k = 64, 64
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    with pytest.raises(ValueError, match="tile must be 'auto', '128x128', '256x128' or '128x256'"):
        _C.sparse24_gemm_sm90_cuda(_x(64, k, torch.float16, 1), packed.values,
                                   packed.meta, n, k, tile="64x64")  # fmt: skip


def test_sparse24_gemm_sm90_rejects_bad_swizzle(make_sparse24) -> None:
    n, k = 64, 64
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    with pytest.raises(ValueError, match="swizzle must be 0 .automatic., 1, 2, 4 or 8"):
        _C.sparse24_gemm_sm90_cuda(_x(64, k, torch.float16, 1), packed.values,
                                   packed.meta, n, k, swizzle=3)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_sm90_meta_reorder_matches_python_reference(shape, make_sparse24) -> None:
    n, k = shape
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    on_device = _C.sparse24_sm90_reorder_meta_cuda(packed.meta, n, k)
    assert on_device.numel() == _C.sparse24_sm90_meta_nbytes(n, k)
    assert torch.equal(on_device, reorder_meta_sm90(packed.meta))


@pytest.mark.parametrize("shape", [(64, 64), (43, 192), (4096, 4096)], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_sm90_cutlass_compressor_agrees_with_our_packing(dtype, shape, make_sparse24) -> None:
    """Our values are CUTLASS's compressed A, and our reordered meta is its E."""
    _sm90_or_skip()
    n, k = shape
    assert k % 64 == 0  # no padding groups (CUTLASS codes an all-zero group differently)
    dense, packed = _weight("sparse24", n, k, dtype, make_sparse24)
    values_c, meta_c = _C.sparse24_sm90_compress_dense_cuda(dense)
    assert torch.equal(values_c.view(torch.int16), packed.values.view(torch.int16))
    ours = reorder_meta_sm90(packed.meta)
    mapped = sm90_meta_offsets(n, k)[:n, : k // 8].reshape(-1).cuda()
    assert torch.equal(meta_c[mapped], ours[mapped])
    # and the GEMM on CUTLASS's own buffers gives the same answer as on ours
    if n % 8 == 0:
        x = _x(128, k, dtype, seed=7)
        y_theirs = _C.sparse24_gemm_sm90_cuda(x, values_c, meta_c, n, k)
        y_ours = _C.sparse24_gemm_sm90_cuda(
            x, packed.values, _C.sparse24_sm90_reorder_meta_cuda(packed.meta, n, k), n, k
        )
        assert torch.equal(y_theirs, y_ours)


def test_sm90_rejects_rows_not_multiple_of_8(make_sparse24) -> None:
    n, k = 43, 172
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    meta_sm90 = _C.sparse24_sm90_reorder_meta_cuda(packed.meta, n, k)
    with pytest.raises(ValueError, match="multiple of 8"):
        _C.sparse24_gemm_sm90_cuda(_x(64, k, torch.float16, 1), packed.values, meta_sm90, n, k)


def test_sm90_rejects_meta_in_the_wrong_layout(make_sparse24) -> None:
    n, k = 64, 64
    _, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    with pytest.raises(ValueError, match="meta_sm90 must be"):
        # the sparse24 meta ([N, Kp/8]) is not the CUTLASS buffer (1-D)
        _C.sparse24_gemm_sm90_cuda(_x(64, k, torch.float16, 1), packed.values, packed.meta, n, k)


def test_sm90_meta_size_refuses_sizes_past_int32() -> None:
    """The CUTLASS metadata size is computed in int64 and refused where the kernels' int32
    indexing ends (it overflowed int before)."""
    assert _C.sparse24_sm90_meta_nbytes(64, 64) > 0
    with pytest.raises(ValueError, match="32-bit ints"):
        _C.sparse24_sm90_meta_nbytes(2**31, 64)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_follow_the_tensors_device(make_sparse24) -> None:
    n, k, m = 128, 200, 3
    dense, packed = _weight("sparse24", n, k, torch.float16, make_sparse24)
    dev = torch.device("cuda", 1)
    x = _x(m, k, torch.float16, seed=3).to(dev)
    with torch.cuda.device(0):
        y = _C.sparse24_gemv_cuda(x, packed.values.to(dev), packed.meta.to(dev), n, k)
    assert y.device == dev
    _check(y.cuda(0), x.cuda(0), dense)
