"""Triton kernels against float64 references: interpreter on CPU, compiled on CUDA.

Why the import dance below: TRITON_INTERPRET is read when ``triton`` is first imported (its
own ``tl.cdiv``/``tl.sum`` are @jit functions decorated then) and again when each kernel is
decorated, so one process cannot mix interpreted and compiled kernels.
- Run alone on a CPU machine, this module sets TRITON_INTERPRET=1 before anything imports
  triton and the tests run in-process (the variable stays set for later modules, so kernels
  they import agree with triton's mode).
- In a full run, an earlier module (anything importing transformers' modelling code, say) may
  already have imported triton in compiled mode. Then the in-process tests skip and
  ``test_interpreter_suite_in_fresh_process`` re-runs this file in a fresh interpreter-mode
  process, so CI exercises the kernels whatever the collection order.
- With CUDA, triton stays compiled and the same grids run on the GPU, bf16 included.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_support import interpreter_problem

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from slimstack.formats import pack_bitmap, pack_sparse24  # noqa: E402
from slimstack.kernels import (  # noqa: E402
    bitmap_gemv,
    bitmap_unpack,
    decode_attention,
    rmsnorm,
    rope,
    sparse24_gemm,
    sparse24_gemv,
    sparse24_unpack,
    splitk_sum,
    swiglu,
)

INTERPRETED = type(tl.cdiv).__name__ == "InterpretedFunction"
if INTERPRETED:
    DEVICE, MODE = "cpu", "interpreter"
elif _CUDA:
    DEVICE, MODE = "cuda", "compiled"
else:
    DEVICE, MODE = None, "unavailable"

pytestmark = pytest.mark.interpreter
if DEVICE is None:
    _WHY_NOT = (
        "triton was imported in compiled mode before this module and there is no GPU; "
        "test_interpreter_suite_in_fresh_process runs this file in interpreter mode instead"
    )
else:
    _WHY_NOT = interpreter_problem() if MODE == "interpreter" else None
runs_here = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

# bf16 arithmetic is wrong in triton 3.9's interpreter, so it is checked on GPUs only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if MODE == "compiled" else [])
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=2e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2),
}
SHAPES = [(43, 172), (1, 64), (64, 640)]  # (N, K): odd N and K % 64 != 0, N = 1, two K tiles
GEMV_M = [1, 3, 16]
GEMM_M = [17, 128]
ids = lambda v: str(v).replace("torch.", "")  # noqa: E731


def _assert_matches(y: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref64.shape
    assert torch.isfinite(y).all(), "output has NaN/inf: some element was never written"
    torch.testing.assert_close(y.double().cpu(), ref64.cpu(), **TOL[dtype])


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.empty/empty_like/Tensor.new_empty the launchers allocate starts as NaN (or
    a huge int): an element a kernel (or an early return) never writes cannot pass as 0."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else 2**30) if t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k))
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(M, K, generator=_gen(seed)).to(dtype).to(DEVICE)


def _bitmap_weight(make, N: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """~50% unstructured with uneven rows, plus an all-zero first row and a dense last row."""
    w = make(N, K, dtype, generator=_gen(seed))
    w[0] = 0
    if N > 1:
        w[-1] = torch.randn(K, generator=_gen(seed + 1)).to(dtype) + 3.0
    return w


# ---------------------------------------------------------------------------- sparse24 ----


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", GEMV_M)
def test_sparse24_gemv_matches_float64(poisoned, make_sparse24, dtype, N, K, M):
    w = make_sparse24(N, K, dtype, generator=_gen(N * K + M))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M)
    y = sparse24_gemv.sparse24_gemv(x, packed.values, packed.meta, N, K)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", GEMM_M)
def test_sparse24_gemm_matches_float64(poisoned, make_sparse24, dtype, N, K, M):
    w = make_sparse24(N, K, dtype, generator=_gen(N + K + M))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M + 1)
    y = sparse24_gemm.sparse24_gemm(x, packed.values, packed.meta, N, K)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


GEMV_CONFIGS = [
    pytest.param(1, dict(block_n=16, block_k=64, split_k=1), id="M1-fma-5-tiles-prefetch"),
    pytest.param(1, dict(block_n=16, block_k=128, split_k=4), id="M1-fma-split4-uneven"),
    pytest.param(1, dict(block_n=16, block_k=64, use_dot=True), id="M1-forced-dot"),
    pytest.param(1, dict(block_n=64, block_k=128, num_warps=8), id="M1-fma-k128-8warps"),
    # the bench's triton_n8 / triton_w8 (M = 1) and triton_n16 (M = 16) variants
    pytest.param(1, dict(block_n=8, block_k=512), id="M1-fma-8-rows"),
    pytest.param(1, dict(block_n=16, block_k=512, num_warps=8), id="M1-fma-8-warps"),
    pytest.param(16, dict(block_n=16, block_k=128), id="M16-dot-16-rows"),
    pytest.param(7, dict(block_n=16, block_k=64, split_k=1), id="M7-dot-5-tiles"),
    pytest.param(16, dict(block_n=32, block_k=128, split_k=3), id="M16-dot-split3"),
]


@runs_here
@pytest.mark.parametrize("M,cfg", GEMV_CONFIGS)
def test_sparse24_gemv_configs(poisoned, make_sparse24, M, cfg):
    N, K, dtype = 40, 300, torch.float32  # Kp = 320: five 64-wide tiles, odd splits
    w = make_sparse24(N, K, dtype, generator=_gen(7))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=8)
    config = sparse24_gemv.GemvConfig(**cfg)
    y = sparse24_gemv.sparse24_gemv(x, packed.values, packed.meta, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=ids)
@pytest.mark.parametrize(
    "M,N,K,cfg",
    [
        pytest.param(2, 40, 300, dict(block_n=16, block_k=64, split_k=1), id="M2-odd-K"),
        pytest.param(16, 43, 172, dict(block_n=64, block_k=128), id="M16-N43-K172"),
        pytest.param(9, 24, 256, dict(block_n=16, block_k=128, split_k=2), id="M9-even-K-split2"),
        pytest.param(1, 40, 300, dict(block_n=16, block_k=64, use_dot=True), id="M1-forced-dot"),
    ],
)
def test_sparse24_gemv_column_dots_match_the_dense_tile_dot(
    poisoned, make_sparse24, dtype, M, N, K, cfg
):
    """The tensor-core path's four per-column dots (the default) and its one dot on the
    interleaved tile (column_dots=False) both match float64; they differ only in the order
    of the fp32 sums."""
    w = make_sparse24(N, K, dtype, generator=_gen(N + K))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M + 40)
    config = sparse24_gemv.GemvConfig(**cfg)
    args = (x, packed.values, packed.meta, N, K)
    columns = sparse24_gemv.sparse24_gemv(*args, config=config)
    tile = sparse24_gemv.sparse24_gemv(*args, config=config, column_dots=False)
    ref = x.double() @ w.double().t().to(DEVICE)
    _assert_matches(columns, ref, dtype)
    _assert_matches(tile, ref, dtype)
    torch.testing.assert_close(columns, tile, **TOL[dtype])


@runs_here
@pytest.mark.parametrize(
    "N,K,cfg",
    [
        pytest.param(40, 300, dict(block_n=16, block_k=64, split_k=1), id="odd-K-5-tiles"),
        pytest.param(43, 172, dict(block_n=16, block_k=512), id="N43-K172-one-tile"),
        pytest.param(24, 1024, dict(block_n=16, block_k=256, split_k=3), id="even-K-split3"),
        pytest.param(24, 1024, dict(block_n=8, block_k=512, num_warps=8), id="even-K-8-warps"),
    ],
)
def test_sparse24_gemv_smem_gather_matches_the_global_gather(poisoned, make_sparse24, N, K, cfg):
    """M = 1: x gathered from the swizzled shared-memory slice (the default) reads the same
    values as the global gather, so the sums and the outputs are bitwise the same."""
    dtype = torch.float16
    w = make_sparse24(N, K, dtype, generator=_gen(N * K))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(1, K, dtype, seed=N)
    config = sparse24_gemv.GemvConfig(**cfg)
    args = (x, packed.values, packed.meta, N, K)
    smem = sparse24_gemv.sparse24_gemv(*args, config=config)
    direct = sparse24_gemv.sparse24_gemv(*args, config=config, smem_gather=False)
    assert torch.equal(smem, direct)
    _assert_matches(smem, x.double() @ w.double().t().to(DEVICE), dtype)


def test_swizzle_is_an_involution_that_spreads_the_lanes_over_the_banks():
    """The x slice's shared-memory order: a permutation of each step's columns (it maps
    back onto itself), pos(4m + f) = pos(4m) ^ f within a group, and for every register
    index the 32 lanes' reads (lane L: groups 4L..4L+3, any in-group index) land on all 32
    banks once each when the in-group index is the same, where column order gives 4 banks."""
    import numpy as np

    def swizzled(c):
        return c ^ (((c >> 6) & 7) << 1)

    c = np.arange(512)
    assert sorted(swizzled(c)) == list(c) and (swizzled(swizzled(c)) == c).all()
    m = np.arange(128)[:, None]
    f = np.arange(4)[None, :]
    assert (swizzled(4 * m + f) == (swizzled(4 * m) ^ f)).all()
    lanes = np.arange(32)
    for k in range(8):  # value 8L + k sits in group 4L + k // 2
        for f in range(4):
            col = 16 * lanes + 4 * (k // 2) + f
            assert len(set(swizzled(col) * 2 // 4 % 32)) == 32
            assert len(set(col * 2 // 4 % 32)) == 4


@runs_here
@pytest.mark.parametrize("M", [1, 4])
def test_sparse24_gemv_k_multiple_of_block(poisoned, make_sparse24, M):
    """K % BLOCK_K == 0 takes the unmasked x path (what 4096-wide layers run)."""
    N, K, dtype = 24, 256, torch.float16
    w = make_sparse24(N, K, dtype, generator=_gen(16))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=17)
    config = sparse24_gemv.GemvConfig(block_n=16, block_k=128, split_k=1)
    y = sparse24_gemv.sparse24_gemv(x, packed.values, packed.meta, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
def test_sparse24_gemm_grouped_tiles(poisoned, make_sparse24):
    """Several M and N blocks with a group that does not divide the N blocks."""
    N, K, M, dtype = 43, 172, 40, torch.float16
    w = make_sparse24(N, K, dtype, generator=_gen(9))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=10)
    config = sparse24_gemm.GemmConfig(block_m=16, block_n=16, block_k=64, group_n=2)
    y = sparse24_gemm.sparse24_gemm(x, packed.values, packed.meta, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


GEMM_CONFIGS = [
    # W as the B operand (the large-M tiles), small enough for the interpreter; the 256 x 64
    # tile itself with a register cap (ignored by the interpreter, honoured by ptxas)
    pytest.param(dict(block_m=32, block_n=16, w_as_a=False), id="w-as-b-32x16"),
    pytest.param(dict(block_m=16, block_n=32, group_n=2, w_as_a=False), id="w-as-b-grouped"),
    pytest.param(
        dict(block_m=256, block_n=64, num_warps=8, w_as_a=False, maxnreg=128), id="w-as-b-256x64"
    ),
    pytest.param(dict(block_m=32, block_n=16, w_as_a=True), id="w-as-a-32x16"),
]


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=ids)
@pytest.mark.parametrize("cfg", GEMM_CONFIGS)
def test_sparse24_gemm_orientations(poisoned, make_sparse24, dtype, cfg):
    """Both operand orientations on odd N and K, a partial last M tile and several N blocks,
    against the float64 product; the same answer either way."""
    N, K, M = 43, 172, 40
    w = make_sparse24(N, K, dtype, generator=_gen(21))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=22)
    config = sparse24_gemm.GemmConfig(**cfg)
    y = sparse24_gemm.sparse24_gemm(x, packed.values, packed.meta, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


def test_sparse24_gemm_default_tiles():
    """W as A up to M = 64 and for unaligned shapes; W as B past it: 256 x 64 at 128 registers
    once those tiles fill two per SM, 128 x 64 below."""
    small = sparse24_gemm.default_config(64, 4096)
    assert small.w_as_a and small.maxnreg is None
    big = sparse24_gemm.default_config(2048, 4096, sm_count=132)  # 8 x 64 = 512 tiles
    assert (big.block_m, big.block_n, big.num_warps, big.w_as_a, big.maxnreg) == (
        256, 64, 8, False, 128
    )  # fmt: skip
    mid = sparse24_gemm.default_config(512, 4096, sm_count=132)  # 2 x 64 = 128 < 264
    assert (mid.block_m, mid.block_n, mid.w_as_a, mid.maxnreg) == (128, 64, False, None)
    assert sparse24_gemm.default_config(8192, 4096, aligned=False).w_as_a
    assert sparse24_gemm.PREVIOUS_LARGE_M_CONFIG.w_as_a


@runs_here
def test_sparse24_gemm_large_m_tile(poisoned, make_sparse24):
    """The 256 x 128 tile that large prefills use, with a partial M tile and N < BLOCK_N."""
    N, K, M, dtype = 43, 172, 300, torch.float16
    w = make_sparse24(N, K, dtype, generator=_gen(18))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=19)
    assert sparse24_gemm.default_config(8192, 4096).block_m == 256
    # unaligned K or N (scalar x loads): the big tiles would spill, so 64 rows at most
    unaligned = sparse24_gemm.default_config(8192, 4096, aligned=False)
    assert unaligned.block_m == sparse24_gemm.MAX_UNALIGNED_BLOCK_M == 64
    config = sparse24_gemm.default_config(8192, 4096)
    y = sparse24_gemm.sparse24_gemm(x, packed.values, packed.meta, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
def test_strided_activations(poisoned, make_sparse24, make_unstructured):
    """Rows with a stride > K and a transposed (column-major) x give the same results, in
    every kernel that takes that M (the bitmap GEMV too)."""
    N, K, dtype = 43, 172, torch.float32
    w24 = make_sparse24(N, K, dtype, generator=_gen(11))
    wbm = _bitmap_weight(make_unstructured, N, K, dtype, seed=14)
    wide = _activations(3, K + 20, dtype, seed=12)[:, 5 : 5 + K]
    column_major = _activations(K, 20, dtype, seed=13).t()
    narrow_column_major = _activations(K, 5, dtype, seed=15).t()
    for x in (wide, column_major, narrow_column_major):
        assert not x.is_contiguous()
        decode = x.shape[0] <= 16
        kernels = [("gemv", w24), ("bitmap", wbm)] if decode else [("gemm", w24)]
        for kernel, w in kernels:
            ref = x.double() @ w.double().t().to(DEVICE)
            _assert_matches(_run_kernel(kernel, x, w), ref, dtype)


def _run_kernel(kernel: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w^T through the named Triton kernel ("gemv", "gemm" or "bitmap")."""
    N, K = w.shape
    if kernel == "bitmap":
        p = pack_bitmap(w).to(DEVICE)
        return bitmap_gemv.bitmap_gemv(x, p.values, p.bitmask, p.row_offsets, N, K)
    p = pack_sparse24(w).to(DEVICE)
    fn = sparse24_gemv.sparse24_gemv if kernel == "gemv" else sparse24_gemm.sparse24_gemm
    return fn(x, p.values, p.meta, N, K)


@runs_here
@pytest.mark.parametrize("kernel,M", [("gemv", 1), ("gemv", 3), ("gemm", 17), ("bitmap", 3)])
def test_reads_of_x_stop_at_k(poisoned, make_sparse24, kernel, M):
    """x's last row ends where NaN memory begins: a load at a column >= K (the padding up to
    Kp, or a whole BLOCK_K past it) that is not masked off puts NaN into y."""
    N, K, dtype = 43, 172, torch.float16
    w = make_sparse24(N, K, dtype, generator=_gen(40))
    storage = torch.full((M * K + 1024,), float("nan"), dtype=dtype)
    storage[: M * K] = torch.randn(M * K, generator=_gen(41)).to(dtype)
    storage = storage.to(DEVICE)
    x = storage[: M * K].view(M, K)
    y = _run_kernel(kernel, x, w)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize(
    "kernel,M", [("gemv", 1), ("gemv", 3), ("gemm", 17), ("bitmap", 1), ("bitmap", 3)]
)
def test_non_finite_x_reaches_the_rows_that_keep_its_column(make_sparse24, kernel, M, bad):
    """The contract (slimstack.ops.sparse_linear): a NaN/inf in x reaches every output whose
    weight row keeps that column, whichever kernel runs; rows that pruned it may or may not
    see it (the gather and mma.sp paths never read it, decoded tiles multiply it by 0)."""
    N, K, dtype, column = 43, 172, torch.float16, 61
    w = make_sparse24(N, K, dtype, generator=_gen(42))
    x = _activations(M, K, dtype, seed=43)
    x[:, column] = bad
    y = _run_kernel(kernel, x, w)
    keeps = (w[:, column] != 0).to(DEVICE)
    assert 0 < int(keeps.sum()) < N
    assert not torch.isfinite(y[:, keeps]).any()
    pruned = ~keeps  # where finite, still the product of the other columns
    others = x.double().clone()
    others[:, column] = 0
    ref = others @ w.double().t().to(DEVICE)
    finite = torch.isfinite(y[:, pruned])
    torch.testing.assert_close(
        y[:, pruned][finite].double().cpu(), ref[:, pruned][finite].cpu(), **TOL[dtype]
    )


# ------------------------------------------------------------------------------ bitmap ----


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", GEMV_M)
def test_bitmap_gemv_matches_float64(poisoned, make_unstructured, dtype, N, K, M):
    w = _bitmap_weight(make_unstructured, N, K, dtype, seed=N * K + M)
    p = pack_bitmap(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M + 2)
    y = bitmap_gemv.bitmap_gemv(x, p.values, p.bitmask, p.row_offsets, N, K)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("M,cfg", GEMV_CONFIGS)
def test_bitmap_gemv_configs(poisoned, make_unstructured, M, cfg):
    """Forced split-K makes later splits skip earlier tiles' values by popcount."""
    N, K, dtype = 40, 300, torch.float32
    w = _bitmap_weight(make_unstructured, N, K, dtype, seed=14)
    p = pack_bitmap(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=15)
    config = sparse24_gemv.GemvConfig(**cfg)
    y = bitmap_gemv.bitmap_gemv(x, p.values, p.bitmask, p.row_offsets, N, K, config=config)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize(
    "M,cfg",
    [
        pytest.param(1, dict(block_n=16, block_k=64, split_k=1), id="M1-5-tiles"),
        pytest.param(1, dict(block_n=16, block_k=128, split_k=2), id="M1-split2-runs-of-2-and-1"),
        pytest.param(1, dict(block_n=16, block_k=64, split_k=5), id="M1-one-tile-per-run"),
        pytest.param(1, dict(block_n=16, block_k=256), id="M1-one-tile"),
        pytest.param(5, dict(block_n=64, block_k=64, split_k=1), id="M5-dot-5-tiles"),
        pytest.param(16, dict(block_n=32, block_k=64, split_k=3), id="M16-dot-split3"),
    ],
)
def test_bitmap_gemv_prefetch_matches_the_plain_loop(poisoned, make_unstructured, M, cfg):
    """The software-pipelined loop reads the same tiles in the same order as the plain one
    (its prologue and the steps past a run's end must neither drop nor add a tile), so the
    outputs are bitwise equal; both match float64."""
    N, K, dtype = 40, 300, torch.float32  # Kp = 320: five 64-wide tiles
    w = _bitmap_weight(make_unstructured, N, K, dtype, seed=17)
    p = pack_bitmap(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=18)
    config = sparse24_gemv.GemvConfig(**cfg)
    args = (x, p.values, p.bitmask, p.row_offsets, N, K)
    piped = bitmap_gemv.bitmap_gemv(*args, config=config, prefetch=True)
    plain = bitmap_gemv.bitmap_gemv(*args, config=config, prefetch=False)
    assert torch.equal(piped, plain)
    _assert_matches(piped, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("M", [1, 16])
def test_bitmap_gemv_all_zero_weight(poisoned, M):
    p = pack_bitmap(torch.zeros(43, 172, dtype=torch.float16)).to(DEVICE)
    assert p.values.numel() == 0
    x = _activations(M, 172, torch.float16, seed=16)
    y = bitmap_gemv.bitmap_gemv(x, p.values, p.bitmask, p.row_offsets, 43, 172)
    assert y.shape == (M, 43) and torch.equal(y, torch.zeros_like(y))


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("N,K", SHAPES + [(40, 1000)])
def test_bitmap_unpack_is_exact(poisoned, make_unstructured, dtype, N, K):
    """Bit for bit the weight that was packed (padding columns dropped), every split of K."""
    w = _bitmap_weight(make_unstructured, N, K, dtype, seed=N + K)
    p = pack_bitmap(w).to(DEVICE)
    for split_k in (None, 1, 2, 3, 4):
        config = bitmap_unpack.UnpackConfig(split_k=split_k)
        dense = bitmap_unpack.bitmap_unpack(p.values, p.bitmask, p.row_offsets, N, K, config=config)
        assert dense.shape == (N, K) and dense.dtype == dtype
        assert torch.equal(dense.cpu(), w), f"split_k={split_k}"


@runs_here
@pytest.mark.parametrize("block_n,block_k,num_warps", [(1, 64, 1), (32, 128, 4), (8, 512, 8)])
def test_bitmap_unpack_configs(poisoned, make_unstructured, block_n, block_k, num_warps):
    N, K = 43, 300
    w = _bitmap_weight(make_unstructured, N, K, torch.float32, seed=21)
    p = pack_bitmap(w).to(DEVICE)
    config = bitmap_unpack.UnpackConfig(block_n, block_k, num_warps)
    dense = bitmap_unpack.bitmap_unpack(p.values, p.bitmask, p.row_offsets, N, K, config=config)
    assert torch.equal(dense.cpu(), w)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("M", GEMM_M)
def test_bitmap_mm_unpacked_matches_float64(poisoned, make_unstructured, dtype, M):
    N, K = 43, 172
    w = _bitmap_weight(make_unstructured, N, K, dtype, seed=M)
    p = pack_bitmap(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M + 5)
    y = bitmap_unpack.bitmap_mm_unpacked(x, p.values, p.bitmask, p.row_offsets, N, K)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("N,K", SHAPES + [(40, 1000)])
def test_sparse24_unpack_is_exact(poisoned, make_sparse24, dtype, N, K):
    """Bit for bit the weight that was packed (padding columns dropped), for tiles that
    cover N and K evenly and not."""
    w = make_sparse24(N, K, dtype, generator=_gen(N + K))
    packed = pack_sparse24(w).to(DEVICE)
    for config in (
        None,
        sparse24_unpack.UnpackConfig(8, 64, 1),
        sparse24_unpack.UnpackConfig(64, 256, 8),
    ):
        dense = sparse24_unpack.sparse24_unpack(packed.values, packed.meta, N, K, config=config)
        assert dense.shape == (N, K) and dense.dtype == dtype
        assert torch.equal(dense.cpu(), w), config


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("M", GEMM_M)
def test_sparse24_mm_unpacked_matches_float64(poisoned, make_sparse24, dtype, M):
    N, K = 43, 172
    w = make_sparse24(N, K, dtype, generator=_gen(M))
    packed = pack_sparse24(w).to(DEVICE)
    x = _activations(M, K, dtype, seed=M + 6)
    y = sparse24_unpack.sparse24_mm_unpacked(x, packed.values, packed.meta, N, K)
    _assert_matches(y, x.double() @ w.double().t().to(DEVICE), dtype)


@runs_here
def test_sparse24_unpack_rejects_bad_input(make_sparse24):
    packed = pack_sparse24(make_sparse24(43, 172, torch.float16, generator=_gen(3))).to(DEVICE)
    values, meta = packed.values, packed.meta
    with pytest.raises(ValueError, match=r"meta must have shape \[43, 24\]"):
        sparse24_unpack.sparse24_unpack(values, meta[:, :-1].contiguous(), 43, 172)
    with pytest.raises(TypeError, match="meta must have dtype torch.uint8"):
        sparse24_unpack.sparse24_unpack(values, meta.view(torch.int8), 43, 172)
    with pytest.raises(TypeError, match="values must be a float tensor"):
        sparse24_unpack.sparse24_unpack(values.view(torch.int16), meta, 43, 172)
    with pytest.raises(ValueError, match=r"values must have shape \[43, 160\], got \[43, 96\]"):
        sparse24_unpack.sparse24_unpack(values, meta, 43, 300)
    with pytest.raises(ValueError, match="block_k must be a multiple of 64, got 32"):
        sparse24_unpack.sparse24_unpack(
            values, meta, 43, 172, config=sparse24_unpack.UnpackConfig(block_k=32)
        )
    x = torch.randn(5, 172).to(values)
    with pytest.raises(ValueError, match=r"x must have shape \[M, K=172\]"):
        sparse24_unpack.sparse24_mm_unpacked(x[:, :-1], values, meta, 43, 172)
    with pytest.raises(TypeError, match="x is torch.float32 but the weight is torch.float16"):
        sparse24_unpack.sparse24_mm_unpacked(x.float(), values, meta, 43, 172)


@runs_here
def test_bitmap_unpack_all_zero_weight_and_bad_input(make_unstructured):
    p = pack_bitmap(torch.zeros(43, 172, dtype=torch.float16)).to(DEVICE)
    dense = bitmap_unpack.bitmap_unpack(p.values, p.bitmask, p.row_offsets, 43, 172)
    assert dense.shape == (43, 172) and torch.equal(dense, torch.zeros_like(dense))
    p = pack_bitmap(_bitmap_weight(make_unstructured, 43, 172, torch.float16, seed=2)).to(DEVICE)
    with pytest.raises(ValueError, match=r"bitmask must have shape \[43, 24\]"):
        bitmap_unpack.bitmap_unpack(p.values, p.bitmask[:, :-1], p.row_offsets, 43, 172)
    with pytest.raises(TypeError, match="row_offsets must have dtype torch.int64"):
        bitmap_unpack.bitmap_unpack(p.values, p.bitmask, p.row_offsets.int(), 43, 172)
    with pytest.raises(TypeError, match="values must be a float tensor"):
        bitmap_unpack.bitmap_unpack(p.values.view(torch.int16), p.bitmask, p.row_offsets, 43, 172)
    with pytest.raises(ValueError, match="N must be >= 1"):
        bitmap_unpack.bitmap_unpack(p.values, p.bitmask, p.row_offsets, 0, 172)
    with pytest.raises(ValueError, match="block_k must be a multiple of 64"):
        bitmap_unpack.bitmap_unpack(
            p.values, p.bitmask, p.row_offsets, 43, 172,
            config=bitmap_unpack.UnpackConfig(block_k=96),
        )  # fmt: skip
    x = _activations(17, 172, torch.float32, seed=3)
    with pytest.raises(TypeError, match="x is torch.float32 but the weight is torch.float16"):
        bitmap_unpack.bitmap_mm_unpacked(x, p.values, p.bitmask, p.row_offsets, 43, 172)


# ---------------------------------------------------------------- launcher policy ----


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("split,M,N", [(1, 1, 43), (3, 3, 43), (16, 16, 1100)])
def test_splitk_sum_adds_in_slice_order(poisoned, dtype, split, M, N):
    partial = (torch.randn(split, M, N, generator=_gen(31)) * 3).to(DEVICE)
    y = splitk_sum.splitk_sum(partial, dtype)
    _assert_matches(y, partial.double().sum(0), dtype)
    _assert_matches(y, splitk_sum.splitk_sum_reference(partial, dtype).double(), dtype)
    in_order = partial[0].clone()
    for s in range(1, split):
        in_order += partial[s]
    assert torch.equal(y, in_order.to(dtype)), "splits must be added in slice order"


def test_splitk_sum_rejects_bad_input():
    partial = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="float32"):
        splitk_sum.splitk_sum(partial.half(), torch.float16)
    with pytest.raises(ValueError, match=r"\[split, M, N\]"):
        splitk_sum.splitk_sum(partial[0], torch.float16)
    with pytest.raises(ValueError, match="not contiguous"):
        splitk_sum.splitk_sum(partial.transpose(1, 2), torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        splitk_sum.splitk_sum(partial, torch.int8)


def test_split_k_only_for_small_n():
    assert sparse24_gemv.choose_split_k(n_blocks=896, k_tiles=16, sm_count=132) == 1
    for n_blocks in (1, 3, 64, 131):
        for k_tiles in (1, 2, 5, 8, 64):
            split = sparse24_gemv.choose_split_k(n_blocks, k_tiles, sm_count=132)
            per_split = -(-k_tiles // split)
            assert 1 <= split <= k_tiles
            assert (split - 1) * per_split < k_tiles, "a split would get no K tile"


def test_block_m_paths():
    assert sparse24_gemv.block_m_for(1) == 1
    assert [sparse24_gemv.block_m_for(m) for m in (2, 3, 16)] == [16, 16, 16]
    assert sparse24_gemv.block_m_for(1, use_dot=True) == 16
    with pytest.raises(ValueError, match="M = 1 only"):
        sparse24_gemv.block_m_for(4, use_dot=False)


# -------------------------------------------------------------------- bad input ----


def _packed24(make_sparse24, N=43, K=172, dtype=torch.float16):
    p = pack_sparse24(make_sparse24(N, K, dtype, generator=_gen(0)))
    return p.values, p.meta


def _gemv_call(make_sparse24, **change):
    """Keyword arguments of a valid sparse24_gemv call with some of them replaced."""
    values, meta = _packed24(make_sparse24)

    def on_device(v):
        return v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v

    args = dict(x=torch.randn(2, 172).half(), values=values, meta=meta, N=43, K=172)
    args = {k: on_device(v) for k, v in args.items()}
    # changes apply on the device: moving a strided tensor there would make it contiguous
    args.update({k: v(args) if callable(v) else on_device(v) for k, v in change.items()})
    return args


BAD_GEMV_CALLS = {
    "int-x": (dict(x=torch.zeros(2, 172, dtype=torch.int32)), TypeError, "x must be float16"),
    "x-wrong-K": (dict(x=torch.zeros(2, 171).half()), ValueError, "x must have shape"),
    "M-17": (dict(x=torch.zeros(17, 172).half()), ValueError, "use the GEMM"),
    "values-fp32": (
        dict(values=lambda a: a["values"].float()), TypeError, "values must have dtype"
    ),
    "meta-short": (
        dict(meta=lambda a: a["meta"][:, :-1].contiguous()), ValueError,
        r"meta must have shape \[43, 24\]",
    ),
    "values-strided": (
        dict(values=lambda a: a["values"].repeat(1, 2)[:, ::2]), ValueError, "contiguous"
    ),
    "meta-elsewhere": (dict(meta=lambda a: a["meta"].to("meta")), ValueError, "meta is on meta"),
    "N-float": (dict(N=43.0), TypeError, "N must be an int"),
    "N-zero": (dict(N=0), ValueError, "N must be >= 1"),
    "block_k-96": (
        dict(config=sparse24_gemv.GemvConfig(16, 96)), ValueError, "multiple of 64"
    ),
    # tl.arange takes powers of two only: refused before Triton's own, less clear error
    "block_k-192": (
        dict(config=sparse24_gemv.GemvConfig(16, 192)), ValueError,
        "block_k must be a power of two, got 192",
    ),
    "block_n-5": (
        dict(config=sparse24_gemv.GemvConfig(5, 64)), ValueError,
        "block_n must be a power of two, got 5",
    ),
    "split_k-negative": (
        dict(config=sparse24_gemv.GemvConfig(16, 64, split_k=-1)), ValueError,
        r"config.split_k must be >= 1, got -1",
    ),
    "num_warps-3": (
        dict(config=sparse24_gemv.GemvConfig(16, 64, num_warps=3)), ValueError,
        "num_warps must be a power of two",
    ),
}  # fmt: skip


@runs_here
@pytest.mark.parametrize("case", BAD_GEMV_CALLS)
def test_sparse24_gemv_rejects_bad_input(make_sparse24, case):
    change, error, match = BAD_GEMV_CALLS[case]
    with pytest.raises(error, match=match):
        sparse24_gemv.sparse24_gemv(**_gemv_call(make_sparse24, **change))


@runs_here
def test_gemm_and_bitmap_reject_bad_input(make_sparse24, make_unstructured):
    values, meta = _packed24(make_sparse24)
    x = torch.randn(20, 172).half().to(DEVICE)
    values, meta = values.to(DEVICE), meta.to(DEVICE)
    with pytest.raises(ValueError, match="block_m and block_n >= 16"):
        sparse24_gemm.sparse24_gemm(
            x, values, meta, 43, 172, config=sparse24_gemm.GemmConfig(block_m=8, block_n=64)
        )
    with pytest.raises(ValueError, match="block_k must be a multiple of 64, got 96"):
        sparse24_gemm.sparse24_gemm(
            x, values, meta, 43, 172, config=sparse24_gemm.GemmConfig(64, 64, block_k=96)
        )
    with pytest.raises(ValueError, match="block_m must be a power of two, got 48"):
        sparse24_gemm.sparse24_gemm(
            x, values, meta, 43, 172, config=sparse24_gemm.GemmConfig(48, 64)
        )
    with pytest.raises(ValueError, match="group_n must be >= 1, got 0"):
        sparse24_gemm.sparse24_gemm(
            x, values, meta, 43, 172, config=sparse24_gemm.GemmConfig(64, 64, group_n=0)
        )
    with pytest.raises(ValueError, match=r"maxnreg must be None or an int in 24\.\.255"):
        sparse24_gemm.sparse24_gemm(
            x, values, meta, 43, 172, config=sparse24_gemm.GemmConfig(64, 64, maxnreg=512)
        )
    with pytest.raises(TypeError, match="meta must have dtype torch.uint8"):
        sparse24_gemm.sparse24_gemm(x, values, meta.to(torch.int8), 43, 172)

    p = pack_bitmap(_bitmap_weight(make_unstructured, 43, 172, torch.float16, seed=1)).to(DEVICE)
    xs = x[:2]
    with pytest.raises(TypeError, match="row_offsets must have dtype torch.int64"):
        bitmap_gemv.bitmap_gemv(xs, p.values, p.bitmask, p.row_offsets.int(), 43, 172)
    with pytest.raises(ValueError, match="block_k must be a multiple of 64, got 32"):
        bitmap_gemv.bitmap_gemv(
            xs, p.values, p.bitmask, p.row_offsets, 43, 172,
            config=sparse24_gemv.GemvConfig(16, 32),
        )  # fmt: skip
    with pytest.raises(ValueError, match="outside 0..16; there is no bitmap GEMM"):
        bitmap_gemv.bitmap_gemv(x[:17], p.values, p.bitmask, p.row_offsets, 43, 172)
    with pytest.raises(ValueError, match=r"bitmask must have shape \[43, 24\]"):
        bitmap_gemv.bitmap_gemv(xs, p.values, p.bitmask[:, :-1], p.row_offsets, 43, 172)
    with pytest.raises(TypeError, match="column_dots must be True or False, got 1"):
        sparse24_gemv.sparse24_gemv(x[:2], values, meta, 43, 172, column_dots=1)
    with pytest.raises(TypeError, match="smem_gather must be True or False, got None"):
        sparse24_gemv.sparse24_gemv(x[:1], values, meta, 43, 172, smem_gather=None)
    with pytest.raises(TypeError, match="prefetch must be True or False, got 'on'"):
        bitmap_gemv.bitmap_gemv(xs, p.values, p.bitmask, p.row_offsets, 43, 172, prefetch="on")
    if DEVICE == "cpu":  # the offsets/values cross-check costs a sync on CUDA, so CPU only
        with pytest.raises(ValueError, match="end within values"):
            bitmap_gemv.bitmap_gemv(xs, p.values[:-8], p.bitmask, p.row_offsets, 43, 172)


@runs_here
@pytest.mark.parametrize("M", [0])
def test_empty_batch_returns_empty(make_sparse24, M):
    values, meta = (t.to(DEVICE) for t in _packed24(make_sparse24))
    x = torch.randn(M, 172).half().to(DEVICE)
    assert sparse24_gemv.sparse24_gemv(x, values, meta, 43, 172).shape == (0, 43)
    assert sparse24_gemm.sparse24_gemm(x, values, meta, 43, 172).shape == (0, 43)


# ------------------------------------------------------------------ decode attention ----


def _decode_mask(batch: int, length: int, slot: int, window: int | None, seed: int):
    """The engine's decode mask: slots up to the current one, minus each row's left padding
    (row 0 unpadded), within the window."""
    pads = torch.randint(0, max(1, slot), (batch,), generator=_gen(seed))
    pads[0] = 0
    t = torch.arange(length)
    allowed = (t[None, :] <= slot) & (t[None, :] >= pads[:, None])
    if window is not None:
        allowed &= slot - t[None, :] < window
    return allowed


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=ids)
@pytest.mark.parametrize(
    "B,Hkv,G,D,T,slot,window",
    [(1, 2, 4, 64, 200, 150, None), (3, 1, 7, 80, 17, 16, None), (2, 2, 1, 8, 300, 299, 100),
     (1, 1, 16, 128, 64, 0, None), (2, 3, 2, 32, 129, 70, 8)],
)  # fmt: skip
def test_decode_attention_matches_float64(poisoned, dtype, B, Hkv, G, D, T, slot, window):
    torch.manual_seed(B * 1000 + T)
    q = torch.randn(B, Hkv, G, D).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, T, D).to(dtype)
    v = torch.randn(B, Hkv, T, D).to(dtype)
    k[:, :, slot + 1 :] = float("nan")  # slots after the current one: never read
    v[:, :, slot + 1 :] = float("nan")
    allowed = _decode_mask(B, T, slot, window, seed=T).to(DEVICE)
    k, v = k.to(DEVICE), v.to(DEVICE)
    ref = decode_attention.decode_attention_reference(
        q, k.nan_to_num(0.0), v.nan_to_num(0.0), allowed
    )
    for splits in (None, 1, 3):
        y = decode_attention.decode_attention(q, k, v, allowed[:, None, None], splits=splits)
        _assert_matches(y, ref.double(), dtype)


@runs_here
def test_decode_attention_matches_sdpa_on_strided_grouped_q():
    """q as the engine makes it: the q part of a fused q/k/v projection [B, 1, (H + 2 Hkv) D],
    viewed [B, H, 1, D] and regrouped: rows a whole projection apart."""
    B, H, Hkv, D, T = 2, 8, 2, 16, 40
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=_gen(5)).to(DEVICE)
    q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2).reshape(B, Hkv, H // Hkv, D)
    assert not q.is_contiguous() and q.stride(0) == (H + 2 * Hkv) * D
    k, v = (torch.randn(B, Hkv, T, D, generator=_gen(s)).to(DEVICE) for s in (6, 7))
    allowed = _decode_mask(B, T, 30, None, seed=8).to(DEVICE)
    y = decode_attention.decode_attention(q, k, v, allowed)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None, None]
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@runs_here
def test_decode_attention_rejects_bad_input():
    q = torch.randn(1, 2, 4, 16).to(DEVICE)
    k = torch.randn(1, 2, 10, 16).to(DEVICE)
    ok = torch.ones(1, 10, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"k and v must be \[B=1, Hkv=2, T, D=16\]"):
        decode_attention.decode_attention(q, k[:, :1], k[:, :1], ok)
    with pytest.raises(ValueError, match=r"mask must be bool \[B=1, T=10\]"):
        decode_attention.decode_attention(q, k, k, ok.float())
    with pytest.raises(TypeError, match="must share a dtype"):
        decode_attention.decode_attention(q.half(), k, k, ok)
    with pytest.raises(ValueError, match="at most 64 query heads"):
        decode_attention.decode_attention(
            torch.randn(1, 1, 65, 16).to(DEVICE), k[:, :1], k[:, :1], ok
        )


def test_decode_attention_split_plan():
    # Mistral-7B at batch 1 on 132 SMs: 8 heads -> 33 runs wanted, T = 2176 is 34 tiles
    assert decode_attention.plan_splits(8, 34, 132) == (34, 1)
    assert decode_attention.plan_splits(64, 34, 132) == (6, 6)  # batch 8: >= 2 programs per SM
    assert decode_attention.plan_splits(300, 4, 132) == (1, 4)  # enough heads: no split
    for heads, tiles in ((1, 1), (8, 3), (3, 1000)):
        splits, per = decode_attention.plan_splits(heads, tiles, 132)
        assert splits * per >= tiles and (splits - 1) * per < tiles  # no empty split


# ------------------------------------------------------------------ fused pieces ----


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(3, 172), (2, 5, 64), (1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rmsnorm_matches_hf_formula(poisoned, dtype, shape, layout):
    x = (torch.randn(shape, generator=_gen(20)) * 3).to(dtype).to(DEVICE)
    if layout == "transposed":  # hidden not the unit-stride dim: the launcher copies first
        x = x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
        assert x.shape == shape and (x.shape[-1] == 1 or x.stride(-1) != 1)
    weight = torch.randn(shape[-1], generator=_gen(21)).to(dtype).to(DEVICE)
    y = rmsnorm.rmsnorm(x, weight, eps=1e-5)
    assert y.shape == shape
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).double()
    ref = weight.double() * normed
    _assert_matches(y, ref, dtype)
    _assert_matches(y, rmsnorm.rmsnorm_reference(x, weight, 1e-5).double(), dtype)


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(3, 172), (2, 5, 64), (1, 1), (0, 8)])
def test_add_rmsnorm_is_the_add_then_the_norm(poisoned, dtype, shape):
    """The fused residual add: its sum is x + delta rounded as torch rounds it (bitwise), and
    its norm is the norm of that rounded sum, so fusing changes no result of the stack."""
    x = (torch.randn(shape, generator=_gen(24)) * 3).to(dtype).to(DEVICE)
    delta = (torch.randn(shape, generator=_gen(25)) * 3).to(dtype).to(DEVICE)
    weight = torch.randn(shape[-1], generator=_gen(26)).to(dtype).to(DEVICE)
    total, y = rmsnorm.add_rmsnorm(x, delta, weight, eps=1e-5)
    assert torch.equal(total, x + delta)
    s64 = (x + delta).double()
    normed = (s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).double()
    _assert_matches(y, weight.double() * normed, dtype)
    assert torch.equal(y, rmsnorm.rmsnorm(x + delta, weight, eps=1e-5))


@runs_here
def test_add_rmsnorm_reads_strided_rows_and_refuses_mismatches():
    """The engine passes the last column of a prefill (a strided [B, H] view)."""
    x = torch.randn(2, 5, 64, generator=_gen(27)).half().to(DEVICE)
    delta = torch.randn(2, 5, 64, generator=_gen(28)).half().to(DEVICE)
    weight = torch.randn(64, generator=_gen(29)).half().to(DEVICE)
    total, y = rmsnorm.add_rmsnorm(x[:, -1], delta[:, -1], weight)
    ref_total, ref_y = rmsnorm.add_rmsnorm_reference(x[:, -1], delta[:, -1], weight)
    assert torch.equal(total, ref_total)
    _assert_matches(y, ref_y.double(), torch.float16)
    with pytest.raises(ValueError, match="delta must be a tensor of x's shape and dtype"):
        rmsnorm.add_rmsnorm(x, delta[:, :-1], weight)
    with pytest.raises(ValueError, match="delta must be a tensor of x's shape and dtype"):
        rmsnorm.add_rmsnorm(x, delta.float(), weight)


@runs_here
def test_swiglu_reads_the_halves_of_a_fused_output_in_place(monkeypatch):
    """The MLP's gate/up are views into one [..., 2I] projection: no copy, one kernel."""
    fused = torch.randn(2, 3, 2 * 40, generator=_gen(24)).to(DEVICE)
    gate, up = fused.chunk(2, dim=-1)
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(
        torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or real(t, *a, **k)
    )
    y = swiglu.swiglu(gate, up)
    assert copies == []
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-5)
    assert y.is_contiguous()


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(7, 43), (2, 3, 172), (0, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "halves"])
def test_swiglu_matches_float64(poisoned, dtype, shape, layout):
    gate = (torch.randn(shape, generator=_gen(22)) * 4).to(dtype).to(DEVICE)
    up = torch.randn(shape, generator=_gen(23)).to(dtype).to(DEVICE)
    if layout == "halves":  # strided views: the two halves of a fused gate_up output
        gate, up = torch.cat([gate, up], dim=-1).chunk(2, dim=-1)
        assert gate.numel() == 0 or not (gate.is_contiguous() or up.is_contiguous())
    y = swiglu.swiglu(gate, up)
    assert y.shape == gate.shape
    g64 = gate.double()
    _assert_matches(y, g64 * torch.sigmoid(g64) * up.double(), dtype)


def _rope_tables(B: int, S: int, D: int, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    positions = torch.arange(S, dtype=torch.float64)[None, :] + 3 * torch.arange(B)[:, None]
    angles = positions[..., None] * inv_freq  # [B, S, D/2]: each batch row at other positions
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if form == "SD":
        return cos[0], sin[0]
    if form == "1SD":
        return cos[:1], sin[:1]
    return cos, sin


@runs_here
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("form", ["SD", "1SD", "BSD"])
@pytest.mark.parametrize("B,S,Hq,Hk,D", [(2, 5, 8, 4, 8), (1, 3, 3, 1, 64)])
def test_rope_in_place_matches_float64(dtype, form, B, S, Hq, Hk, D):
    cos64, sin64 = _rope_tables(B, S, D, form)
    cos, sin = cos64.to(dtype).to(DEVICE), sin64.to(dtype).to(DEVICE)
    # q in HF's [B, H, S, D] layout, passed as a strided [B, S, H, D] view; k contiguous.
    q = torch.randn(B, Hq, S, D, generator=_gen(24)).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, generator=_gen(25)).to(dtype).to(DEVICE)
    expected = []
    for t in (q, k):
        t64, c, s = t.double(), cos.double(), sin.double()
        c, s = c.reshape(-1, S, 1, D), s.reshape(-1, S, 1, D)
        rotated = torch.cat([-t64[..., D // 2 :], t64[..., : D // 2]], dim=-1)
        expected.append(t64 * c + rotated * s)
    ref_q, ref_k = rope.apply_rope_reference(q, k, cos, sin)
    rope.apply_rope_(q, k, cos, sin)
    _assert_matches(q, expected[0], dtype)
    _assert_matches(k, expected[1], dtype)
    _assert_matches(ref_q, expected[0], dtype)  # the file's torch reference agrees too
    _assert_matches(ref_k, expected[1], dtype)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=ids)
@pytest.mark.parametrize("B,Hq,Hk,D,T", [(3, 8, 2, 64, 20), (1, 4, 4, 10, 5), (2, 6, 1, 128, 9)])
def test_rope_to_cache_is_rope_then_the_cache_write(dtype, B, Hq, Hk, D, T):
    """Bit for bit apply_rope_ on the fused q/k/v views followed by index_copy_ into the
    caches; every other slot of the caches untouched."""
    qkv = torch.randn(B, 1, (Hq + 2 * Hk) * D, generator=_gen(B + D)).to(dtype).to(DEVICE)
    pos = torch.randint(0, 50, (B, 1), generator=_gen(T))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.cat([pos[..., None] * inv] * 2, dim=-1)  # [B, 1, D]
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    slot = torch.tensor([T // 2], device=DEVICE)
    caches = [torch.randn(B, Hk, T, D, generator=_gen(s)).to(dtype).to(DEVICE) for s in (1, 2)]

    def views(buf):
        q, k, v = buf.split([Hq * D, Hk * D, Hk * D], dim=-1)
        return q.view(B, 1, Hq, D), k.view(B, 1, Hk, D), v.view(B, 1, Hk, D)

    ref_buf, ref_k, ref_v = qkv.clone(), caches[0].clone(), caches[1].clone()
    q_ref, k_ref, v_ref = views(ref_buf)
    rope.apply_rope_(q_ref, k_ref, cos, sin)
    ref_k.index_copy_(2, slot, k_ref.transpose(1, 2))
    ref_v.index_copy_(2, slot, v_ref.transpose(1, 2))

    q, k, v = views(qkv)
    rope.rope_to_cache_(q, k, v, cos, sin, caches[0], caches[1], slot)
    assert torch.equal(q, q_ref)
    assert torch.equal(caches[0], ref_k) and torch.equal(caches[1], ref_v)


@runs_here
def test_rope_to_cache_rejects_bad_input():
    q, k = torch.randn(2, 1, 4, 8).to(DEVICE), torch.randn(2, 1, 2, 8).to(DEVICE)
    cos = sin = torch.ones(2, 1, 8).to(DEVICE)
    cache = torch.zeros(2, 2, 6, 8).to(DEVICE)
    slot = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="one token per sequence"):
        rope.rope_to_cache_(q.expand(2, 2, 4, 8), k.expand(2, 2, 2, 8), k.expand(2, 2, 2, 8),
                            torch.ones(2, 2, 8).to(DEVICE), torch.ones(2, 2, 8).to(DEVICE),
                            cache, cache, slot)  # fmt: skip
    with pytest.raises(ValueError, match=r"k_cache must be torch.float32 \[B=2, Hk=2, T, D=8\]"):
        rope.rope_to_cache_(q, k, k, cos, sin, cache[:, :1], cache, slot)
    with pytest.raises(ValueError, match="slot must be one int64 element"):
        rope.rope_to_cache_(q, k, k, cos, sin, cache, cache, slot.int())


@runs_here
def test_rope_agrees_with_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, S, Hq, Hk, D = 2, 6, 4, 2, 16
    cos, sin = (t.float().to(DEVICE) for t in _rope_tables(B, S, D, "BSD"))
    q = torch.randn(B, Hq, S, D, generator=_gen(26)).to(DEVICE)  # HF layout [B, H, S, D]
    k = torch.randn(B, Hk, S, D, generator=_gen(27)).to(DEVICE)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope.apply_rope_(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(q, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf, atol=1e-5, rtol=1e-5)


@runs_here
def test_fused_pieces_reject_bad_input_and_leave_inputs_alone():
    q = torch.randn(1, 3, 2, 8).to(DEVICE)
    k = torch.randn(1, 3, 2, 8).to(DEVICE)
    q_before = q.clone()
    with pytest.raises(ValueError, match=r"cos must have shape \[S=3, D=8\]"):
        rope.apply_rope_(q, k, torch.ones(4, 8).to(DEVICE), torch.ones(4, 8).to(DEVICE))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope.apply_rope_(q[..., :7], k[..., :7], torch.ones(3, 7), torch.ones(3, 7))
    assert torch.equal(q, q_before)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rmsnorm.rmsnorm(torch.randn(2, 8).to(DEVICE), torch.ones(7).to(DEVICE))
    with pytest.raises(ValueError, match="eps must be a positive"):
        rmsnorm.rmsnorm(torch.randn(2, 8).to(DEVICE), torch.ones(8).to(DEVICE), eps=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        swiglu.swiglu(torch.randn(2, 8).to(DEVICE), torch.randn(2, 7).to(DEVICE))
    with pytest.raises(TypeError, match="must be float16, bfloat16 or float32"):
        swiglu.swiglu(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))


# ---------------------------------------------------------- order-proof CPU run ----


@pytest.mark.skipif(DEVICE is not None, reason="the kernels already ran in this process")
def test_interpreter_suite_in_fresh_process():
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter-mode run failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    skipped = re.search(r"(\d+) skipped", summary)
    assert passed and int(passed.group(1)) >= 50, tail
    assert skipped is None or int(skipped.group(1)) == 1, f"only this test may skip: {summary}"


def test_a_narrow_view_of_a_wide_buffer_counts_its_row_stride():
    """The int32 offset check must see what x's row stride addresses, not only its numel."""
    from slimstack.kernels._checks import addressed_elements, check_int32_offsets

    wide = torch.empty(2, 64, device="meta").as_strided((2, 64), (2**31, 1))
    assert addressed_elements(wide) == 2**31 + 64
    with pytest.raises(ValueError, match="int32 offsets"):
        check_int32_offsets("op", addressed_elements(wide))
    assert addressed_elements(torch.empty(3, 64, device="meta")) == 3 * 64
    assert addressed_elements(torch.empty(64, 3, device="meta").t()) == 3 * 64


def test_pdl_is_chosen_only_for_hopper_and_later(monkeypatch):
    """CPU tensors, the interpreter and SLIMSTACK_PDL=0 launch without PDL."""
    from slimstack.kernels import _pdl

    assert not _pdl.pdl_for(torch.device("cpu"))
    assert _pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}  # no launch_pdl keyword
    with monkeypatch.context() as patched:
        patched.setattr(_pdl, "pdl_for", lambda device: True)
        assert _pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _pdl.pdl_for(torch.device("cuda", 0))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(_pdl.ENV, "0")
    assert not _pdl.pdl_for(torch.device("cuda", 0))
