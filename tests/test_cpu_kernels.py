"""CPU kernels of slimstack._C against a float64 dense reference on the masked weight."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from slimstack.formats import pack_bitmap, pack_sparse24

_C = pytest.importorskip("slimstack._C", reason="the native extension is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) against float64: fp32 accumulation, then one rounding to the output dtype
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (6e-2, 8e-3),
}
SHAPES = [(43, 172), (1, 64), (64, 64), (16, 200), (300, 128)]
# the AVX2 kernels take x rows 4 at a time: 6 and 17 end on a 2- and a 1-row step
MS = [1, 3, 6, 16, 17, 128]
FORMATS = ["sparse24", "bitmap"]


# The two strategies (csrc/cpu/dense_tiles.h): "rows" multiplies packed rows in registers
# (small M), "tiles" decompresses dense tiles for ATen's GEMM (large M); each call picks one
# by M and dtype, and these names force one for every call.
STRATEGIES = {"rows": 2**62, "tiles": 0}


@contextmanager
def cpu_strategy(name: str) -> Iterator[None]:
    _C.set_cpu_dense_tiles_min_m(STRATEGIES[name])
    try:
        yield
    finally:
        _C.set_cpu_dense_tiles_min_m(-1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_kernel(x: torch.Tensor, packed, out: torch.Tensor | None = None) -> torch.Tensor:
    n, k = packed.shape
    if packed.format == "sparse24":
        return _C.sparse24_mm_cpu(x, packed.values, packed.meta, n, k, out=out)
    return _C.bitmap_mm_cpu(x, packed.values, packed.bitmask, packed.row_offsets, n, k, out=out)


def reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return x.double() @ dense.double().t()


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[x.dtype]
    assert y.dtype == x.dtype and y.shape == (x.shape[0], dense.shape[0])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(x, dense), atol=atol, rtol=rtol)


@pytest.fixture
def isa() -> Iterator[None]:
    """Restore the default instruction set after a test that switches it."""
    default = _C.cpu_isa()
    yield
    _C.select_cpu_isa(default)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_kernel_grid(
    fmt: str, dtype: torch.dtype, shape: tuple[int, int], m: int, make_weight
) -> None:
    n, k = shape
    dense, packed = make_weight(fmt, n, k, dtype, seed=n * 1000 + k)
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every entry must be written
    y = run_kernel(x, packed, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_matches_reference(y, x, dense)
    assert_matches_reference(run_kernel(x, packed), x, dense)  # kernel-allocated output


def test_instruction_sets_are_listed() -> None:
    assert "generic" in _C.cpu_isas() and _C.cpu_isa() in _C.cpu_isas()


# The grid above runs the default (best) instruction set and each call's default strategy
# only. Each combination has its own code: in the rows strategy avx512 and avx2 expand packed
# rows in registers, generic (a CPU without AVX2) decompresses rows for the portable
# micro-kernel; in the tiles strategy avx512 decompresses with VBMI2 expands, the others one
# value at a time. Each gets the whole shape x dtype x M grid, into a poisoned output.
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name", _C.cpu_isas())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_instruction_set_and_strategy(
    isa, strategy: str, name: str, fmt: str, dtype: torch.dtype, shape: tuple[int, int], m: int,
    make_weight,
) -> None:  # fmt: skip
    n, k = shape
    dense, packed = make_weight(fmt, n, k, dtype, seed=n * 1000 + k + 1)
    x = torch.randn(m, k, generator=gen(m + 100)).to(dtype)
    _C.select_cpu_isa(name)
    assert _C.cpu_isa() == name
    out = torch.full((m, n), float("nan"), dtype=dtype)
    with cpu_strategy(strategy):
        assert_matches_reference(run_kernel(x, packed, out=out), x, dense)


def test_dense_tile_crossovers_and_their_override() -> None:
    never = 2**63 - 1
    # fp16: ATen's CPU fp16 GEMM is slower than the rows kernels at every M
    assert _C.cpu_dense_tiles_min_m(torch.float16) == never
    assert _C.cpu_dense_tiles_min_m(torch.float32) == 64
    # 16 against the AVX512-BF16 rows kernels, 8 against the AVX2 ones, 64 without BF16 dots
    assert _C.cpu_dense_tiles_min_m(torch.bfloat16) in (8, 16, 64)
    _C.set_cpu_dense_tiles_min_m(5)
    try:
        assert {_C.cpu_dense_tiles_min_m(d) for d in DTYPES} == {5}
    finally:
        _C.set_cpu_dense_tiles_min_m(-1)
    assert _C.cpu_dense_tiles_min_m(torch.float32) == 64


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", _C.cpu_isas())
def test_tiles_across_several_tiles_and_a_padded_k(isa, name, fmt, dtype, make_weight) -> None:
    """A tile holds 4 MB of dense rows: N = 600 at K = 4000 (Kp = 4032) is three tiles in
    fp32 (260, 260, 80 rows), and the GEMM reads K of each tile's Kp columns."""
    n, k, m = 600, 4000, 3
    dense, packed = make_weight(fmt, n, k, dtype, seed=12)
    x = torch.randn(m, k, generator=gen(13)).to(dtype)
    _C.select_cpu_isa(name)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    with cpu_strategy("tiles"):
        assert_matches_reference(run_kernel(x, packed, out=out), x, dense)


def test_unknown_instruction_set_is_refused(isa) -> None:
    with pytest.raises(ValueError, match="not supported here; supported: .*generic"):
        _C.select_cpu_isa("avx9000")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_of_x_stop_at_k(fmt: str, dtype: torch.dtype, make_weight) -> None:
    # x's last row ends where NaN memory begins: any read at columns >= K poisons y
    m, n, k = 3, 43, 172
    dense, packed = make_weight(fmt, n, k, dtype, seed=5)
    storage = torch.full((m * k + 64,), float("nan"), dtype=dtype)
    storage[: m * k] = torch.randn(m * k, generator=gen(6)).to(dtype)
    x = storage[: m * k].view(m, k)
    assert_matches_reference(run_kernel(x, packed), x, dense)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", _C.cpu_isas())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_x_matches_the_dense_masked_matmul(
    fmt, name, bad, strategy, make_weight, isa
) -> None:
    """The CPU kernels expand each weight row to dense fp32 (in registers on avx2, in a
    buffer on generic), so a NaN / inf in x column k meets the pruned weights as
    0 x NaN = NaN: every output is non-finite exactly
    where the float64 dense matmul of the masked weight is (the contract in
    slimstack.ops.sparse_linear leaves pruned rows backend-defined; here they are NaN)."""
    _C.select_cpu_isa(name)
    m, n, k, column = 3, 43, 172, 61
    dense, packed = make_weight(fmt, n, k, torch.float32, seed=10)
    keeps = dense[:, column] != 0
    assert 0 < int(keeps.sum()) < n
    x = torch.randn(m, k, generator=gen(11))
    x[1, column] = bad
    out = torch.zeros(m, n)  # poisoned with finite values: every NaN must come from the kernel
    with cpu_strategy(strategy):
        y = run_kernel(x, packed, out=out)
    ref = reference(x, dense)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    assert not torch.isfinite(y[1]).any()  # kept rows and pruned rows alike
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y.double()[finite], ref[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batch(fmt: str, make_weight) -> None:
    _, packed = make_weight(fmt, 8, 64, torch.float32, seed=7)
    assert run_kernel(torch.empty(0, 64), packed).shape == (0, 8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_rows(fmt: str) -> None:
    dense = torch.zeros(5, 70)
    dense[2, 3] = 1.5
    packed = pack_sparse24(dense) if fmt == "sparse24" else pack_bitmap(dense)
    x = torch.randn(4, 70, generator=gen(8))
    assert_matches_reference(run_kernel(x, packed), x, dense)


# ----------------------------------------------------------------------------- checks


@pytest.fixture
def s24(make_weight):
    return make_weight("sparse24", 8, 64, torch.float32, seed=9)[1]


def test_sparse24_argument_checks(s24) -> None:
    v, meta = s24.values, s24.meta
    x = torch.randn(2, 64)
    cases = [
        (lambda: _C.sparse24_mm_cpu(x.half(), v, meta, 8, 64), TypeError, "values must be Half"),
        (lambda: _C.sparse24_mm_cpu(x.double(), v, meta, 8, 64), TypeError, "float32, float16"),
        (
            lambda: _C.sparse24_mm_cpu(torch.randn(2, 65), v, meta, 8, 64),
            ValueError,
            r"\[M, K=64\]",
        ),
        (lambda: _C.sparse24_mm_cpu(x, v, meta[:, :4], 8, 64), ValueError, "meta must be"),
        (lambda: _C.sparse24_mm_cpu(x, v, meta.int(), 8, 64), TypeError, "meta must be Byte"),
        (lambda: _C.sparse24_mm_cpu(x, v, meta, 9, 64), ValueError, "values must be"),
        (lambda: _C.sparse24_mm_cpu(x, v, meta, 0, 64), ValueError, "N and K must be positive"),
        (lambda: _C.sparse24_mm_cpu(x.t().contiguous().t(), v, meta, 8, 64), ValueError, None),
        (lambda: _C.sparse24_mm_cpu(x.to("meta"), v, meta, 8, 64), ValueError, "x is on meta"),
        (lambda: _C.sparse24_mm_cpu(x, v, meta, 8, 64, out=torch.empty(2, 9)), ValueError, "out"),
        (
            lambda: _C.sparse24_mm_cpu(x, v, meta, 8, 64, out=torch.empty(2, 8).half()),
            TypeError,
            "out",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", ["x itself", "a view into x"])
def test_an_out_that_shares_memory_with_x_is_refused(fmt, where, make_weight) -> None:
    """The kernels read x while writing y: out=x (N == K) would give wrong numbers."""
    _, packed = make_weight(fmt, 64, 64, torch.float32, seed=3)
    storage = torch.randn(4 * 64 + 64, generator=gen(4))
    x = storage[: 4 * 64].view(4, 64)
    out = x if where == "x itself" else storage[32 : 32 + 4 * 64].view(4, 64)
    before = storage.clone()
    with pytest.raises(ValueError, match="out must not share memory with x"):
        run_kernel(x, packed, out=out)
    assert torch.equal(storage, before)  # refused before anything was written
    separate = torch.full((4, 64), float("nan"))
    assert run_kernel(x, packed, out=separate) is not None and not separate.isnan().any()


def test_non_contiguous_x_is_refused(s24) -> None:
    x = torch.randn(64, 4).t()  # [4, 64], column-major
    with pytest.raises(ValueError, match="x must be contiguous"):
        _C.sparse24_mm_cpu(x, s24.values, s24.meta, 8, 64)


def test_bitmap_argument_checks(make_weight) -> None:
    _, p = make_weight("bitmap", 8, 64, torch.float32, seed=10)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="row_offsets must be"):
        _C.bitmap_mm_cpu(x, p.values, p.bitmask, p.row_offsets[:-1].contiguous(), 8, 64)
    with pytest.raises(TypeError, match="row_offsets must be Long"):
        _C.bitmap_mm_cpu(x, p.values, p.bitmask, p.row_offsets.int(), 8, 64)
    with pytest.raises(ValueError, match="values must be 1-D"):
        _C.bitmap_mm_cpu(x, p.values.view(-1, 8), p.bitmask, p.row_offsets, 8, 64)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_corrupt_bitmap_names_the_row(strategy: str, make_weight) -> None:
    _, p = make_weight("bitmap", 8, 64, torch.float32, seed=11)
    x = torch.randn(2, 64)
    short = p.row_offsets.clone()
    short[4] = short[3]  # row 3 keeps its bits but loses its values slot
    with cpu_strategy(strategy):
        with pytest.raises(ValueError, match="row 3 has offsets outside values or more set bits"):
            _C.bitmap_mm_cpu(x, p.values, p.bitmask, short, 8, 64)
        past_end = p.row_offsets.clone()
        past_end[-1] += 8  # the last row claims values that do not exist
        with pytest.raises(ValueError, match="row 7"):
            _C.bitmap_mm_cpu(x, p.values, p.bitmask, past_end, 8, 64)


@pytest.mark.parametrize("name", _C.cpu_isas())
@pytest.mark.parametrize("m", [1, 6, 17])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitmap_slots_with_nan_slack_never_reach_the_output(
    isa, name: str, m: int, strategy: str
) -> None:
    """A row's slot may be longer than its kept count (row_offsets leave gaps). The AVX2
    kernel loads 8 values at a time, past a row's last kept value into the gap and the next
    row, and must mask all of them (the tiles' decompression loads only the kept ones):
    NaN-filled gaps leave every output finite and exact."""
    _C.select_cpu_isa(name)
    n, k, gap = 43, 172, 5
    dense = torch.randn(n, k, generator=gen(40)) * (torch.rand(n, k, generator=gen(41)) > 0.5)
    packed = pack_bitmap(dense)
    counts = (packed.row_offsets[1:] - packed.row_offsets[:-1]).tolist()
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(counts) + gap, 0)
    values = torch.full((int(offsets[-1]) + 3,), float("nan"))
    for row, count in enumerate(counts):
        start = int(packed.row_offsets[row])
        values[int(offsets[row]) : int(offsets[row]) + count] = packed.values[start : start + count]
    x = torch.randn(m, k, generator=gen(42))
    with cpu_strategy(strategy):
        y = _C.bitmap_mm_cpu(x, values, packed.bitmask, offsets, n, k, None)
    assert_matches_reference(y, x, dense)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_give_atens_dense_product_bit_for_bit(fmt, dtype, make_weight) -> None:
    """One tile (256 rows) is one ATen GEMM of x with the decompressed rows: the same bits as
    F.linear on the unpacked weight, which also shows the forced strategy is the one that ran
    (the rows kernels sum in another order)."""
    dense, packed = make_weight(fmt, 256, 2048, dtype, seed=14)
    x = torch.randn(32, 2048, generator=gen(15)).to(dtype)
    with cpu_strategy("tiles"):
        tiles = run_kernel(x, packed)
    with cpu_strategy("rows"):
        rows = run_kernel(x, packed)
    assert torch.equal(tiles, torch.nn.functional.linear(x, dense))
    assert not torch.equal(rows, tiles)


@pytest.mark.skipif("avx512" not in _C.cpu_isas(), reason="no AVX-512 (F/BW/VBMI2) here")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [172, 2048, 4160])
def test_bf16_dot_rows_kernels_for_every_pass_width(isa, fmt: str, k: int, make_weight) -> None:
    """The AVX512-BF16 rows kernels take x in passes of up to 8 rows, each width its own
    instantiation: M = 1..9 covers all eight and a second pass, K = 172 the padded copy of x,
    K = 2048 x read in place. Past 16 KB of x rows per pass (K = 4160 from M = 2, K = 2048
    at M = 5..8) each pass takes four (M = 3, 4) or two (M = 5..8) weight rows at once: N = 43
    leaves a tail of three or one row for the one-row kernel."""
    n = 43
    dense, packed = make_weight(fmt, n, k, torch.bfloat16, seed=16)
    _C.select_cpu_isa("avx512")
    for m in range(1, 10):
        x = torch.randn(m, k, generator=gen(m + 17)).to(torch.bfloat16)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        with cpu_strategy("rows"):
            assert_matches_reference(run_kernel(x, packed, out=out), x, dense)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", _C.cpu_isas())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_which_bf16_paths_flush_subnormal_x(isa, fmt: str, name: str, strategy: str) -> None:
    """vdpbf16ps treats bf16 subnormal inputs as zero: the BF16-dot rows kernels (isa
    avx512 on a CPU with BF16 dots) give 0 for x = 1e-39 against weights of 1e20, the fp32
    FMA kernels 3.2e-18 (the flush tells which code ran). The tiles give what ATen's bf16
    GEMM gives at that M (it flushes where oneDNN runs on the same instruction)."""
    dense = torch.zeros(16, 64)
    dense[:, ::2] = 1e20
    dense = dense.bfloat16()
    packed = pack_sparse24(dense) if fmt == "sparse24" else pack_bitmap(dense)
    x = torch.full((2, 64), 1e-39).bfloat16()
    _C.select_cpu_isa(name)
    with_dots = _C.cpu_dense_tiles_min_m(torch.bfloat16) == 16  # avx512 with BF16 dots
    with cpu_strategy(strategy):
        y = run_kernel(x, packed)
    if strategy == "tiles":
        assert torch.equal(y, torch.nn.functional.linear(x, dense))
        return
    expected = 0.0 if with_dots else (x.double() @ dense.double().t())[0, 0].item()
    assert expected == 0.0 or expected > 1e-18
    torch.testing.assert_close(
        y.double(), torch.full((2, 16), expected, dtype=torch.float64), rtol=8e-3, atol=0
    )
