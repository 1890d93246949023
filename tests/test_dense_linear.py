"""The dense CPU kernel (slimstack::dense_mm, DenseLinear) against a float64 reference, and
the routing of dense_linear: native rows where they are faster, F.linear elsewhere."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from slimstack.ops.dense_linear import DenseLinear, dense_linear, native_rows_max_m

_C = pytest.importorskip("slimstack._C", reason="the native extension is not built")

TOLERANCES = {  # (atol, rtol) against float64: fp32 sums, one rounding to the output dtype
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (6e-2, 8e-3),
}
# K = 172 and 200 end on a partial 64-column step (masked loads), 64 on a full one; K = 4160
# passes 16 KB of x rows from M = 2 on, where a pass takes four weight rows (M = 3, 4) or two
# (M = 5..8): N = 43 leaves a tail for the one-row kernel
SHAPES = [(43, 172), (1, 64), (64, 64), (16, 200), (300, 128), (5, 1000), (43, 4160)]
MS = [1, 2, 3, 4, 5, 8, 9, 17]


@pytest.fixture
def isa() -> Iterator[None]:
    before = _C.cpu_isa()
    yield
    _C.select_cpu_isa(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[x.dtype]
    ref = x.double() @ w.double().t()
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name", _C.cpu_isas())
def test_dense_mm_grid(isa, name: str, m: int, shape: tuple[int, int], dtype) -> None:
    n, k = shape
    _C.select_cpu_isa(name)
    x = torch.randn(m, k, generator=gen(m * 7 + k)).to(dtype)
    w = torch.randn(n, k, generator=gen(n * 13 + k)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = _C.dense_mm_cpu(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    check(y, x, w)


def has_bf16_dots() -> bool:
    before = _C.cpu_isa()
    if "avx512" not in _C.cpu_isas():
        return False
    _C.select_cpu_isa("avx512")
    try:
        return _C.cpu_dense_tiles_min_m(torch.bfloat16) == 16  # avx512 with BF16 dots
    finally:
        _C.select_cpu_isa(before)


def test_rows_limit_follows_the_instruction_set(isa) -> None:
    for name in _C.cpu_isas():
        _C.select_cpu_isa(name)
        expected = 4 if name == "avx512" and has_bf16_dots() else 0
        assert _C.cpu_dense_rows_max_m() == expected, name
        assert native_rows_max_m() == expected


def test_bf16_rows_run_the_dot_kernel(isa) -> None:
    """vdpbf16ps flushes bf16 subnormal inputs (x = 1e-39 against weights of 1e20 gives 0),
    fp32 matmuls do not (3.2e-18 per product): the flush tells which code ran, by M."""
    if _C.cpu_dense_rows_max_m() == 0:
        pytest.skip("no AVX512-BF16 dot kernel on this CPU")
    w = torch.full((16, 64), 1e20).bfloat16()
    for m in (1, _C.cpu_dense_rows_max_m()):
        y = _C.dense_mm_cpu(torch.full((m, 64), 1e-39).bfloat16(), w)
        assert torch.equal(y, torch.zeros_like(y)), m
    # past the limit ATen's matmul runs, bit for bit
    x = torch.randn(_C.cpu_dense_rows_max_m() + 1, 172, generator=gen(11)).bfloat16()
    w = torch.randn(43, 172, generator=gen(12)).bfloat16()
    assert torch.equal(_C.dense_mm_cpu(x, w), x @ w.t())


def test_non_finite_values_propagate(isa) -> None:
    x = torch.randn(3, 172, generator=gen(1)).bfloat16()
    w = torch.randn(43, 172, generator=gen(2)).bfloat16()
    x[1, 171] = float("nan")  # in the partial last step
    w[7, 0] = float("inf")
    y = _C.dense_mm_cpu(x, w)
    assert torch.isnan(y[1]).all()
    assert torch.isinf(y[0, 7]) or torch.isnan(y[0, 7])
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[1] = False
    finite[:, 7] = False
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(y.double()[finite], ref[finite], atol=6e-2, rtol=8e-3)


def test_argument_checks() -> None:
    x = torch.randn(2, 64).bfloat16()
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        _C.dense_mm_cpu(x, w[0])
    with pytest.raises(ValueError, match=r"x must be \[M, K=32\]"):
        _C.dense_mm_cpu(x, w[:, :32].contiguous())
    with pytest.raises(TypeError, match="weight must be BFloat16"):
        _C.dense_mm_cpu(x, w.float())
    with pytest.raises(ValueError, match="weight must be contiguous"):
        _C.dense_mm_cpu(x, torch.randn(64, 8).bfloat16().t())
    square = torch.randn(2, 2).bfloat16()
    with pytest.raises(ValueError, match="out must not share memory with weight"):
        _C.dense_mm_cpu(torch.randn(2, 2).bfloat16(), square, out=square)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        _C.dense_mm_cpu(square, torch.randn(2, 2).bfloat16(), out=square)
    with pytest.raises(ValueError, match="x is on"):
        _C.dense_mm_cpu(x.to("meta"), w)
    assert _C.dense_mm_cpu(x[:0], w).shape == (0, 8)


# ----------------------------------------------------------------------------- dense_linear


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Rows of each call dense_linear makes to the native kernel."""
    module = importlib.import_module("slimstack.ops.dense_linear")  # the package exports
    # a function of the same name
    calls: list[int] = []
    real = module._dense_mm_cpu

    def counted(x, weight):
        calls.append(x.shape[0])
        return real(x, weight)

    monkeypatch.setattr(module, "_dense_mm_cpu", counted)
    return calls


def test_dense_linear_routes_bf16_decode_to_the_kernel(native_calls) -> None:
    if not has_bf16_dots():
        pytest.skip("no AVX512-BF16 dot kernel on this CPU")
    w = torch.randn(16, 64, generator=gen(13)).bfloat16()

    def rows_taken(x: torch.Tensor, weight: torch.Tensor = w) -> list[int]:
        native_calls.clear()
        y = dense_linear(x, weight)
        torch.testing.assert_close(y, F.linear(x, weight), atol=6e-2, rtol=8e-3)
        return list(native_calls)

    x = torch.randn(1, 4, 64, generator=gen(14)).bfloat16()
    assert rows_taken(x) == [4]  # [1, 4, K]: 4 rows
    assert rows_taken(torch.randn(5, 64).bfloat16()) == []  # past the limit: F.linear
    assert rows_taken(x.float(), w.float()) == []  # fp32: F.linear
    assert rows_taken(x, w.t().contiguous().t()) == []  # a strided weight: F.linear
    grad_x = x.clone().requires_grad_()
    assert rows_taken(grad_x.detach()) == [4]
    native_calls.clear()
    dense_linear(grad_x, w)  # autograd: F.linear
    assert native_calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native_calls.clear()
        dense_linear(x, w)
        assert native_calls == []


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 2), (1, 9)])
def test_dense_linear_matches_f_linear(lead, dtype) -> None:
    x = torch.randn(*lead, 172, generator=gen(3)).to(dtype)
    w = torch.randn(43, 172, generator=gen(4)).to(dtype)
    b = torch.randn(43, generator=gen(5)).to(dtype)
    y = dense_linear(x, w, b)
    assert y.shape == (*lead, 43) and y.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    ref = x.double() @ w.double().t() + b.double()
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


def test_dense_linear_gradients_are_f_linears() -> None:
    x = torch.randn(2, 64, generator=gen(6)).bfloat16().requires_grad_()
    layer = DenseLinear(64, 8, dtype=torch.bfloat16)
    twin = torch.nn.Linear(64, 8, dtype=torch.bfloat16)
    twin.load_state_dict(layer.state_dict())
    layer(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    twin(x).sum().backward()
    assert torch.equal(grad, x.grad)
    assert torch.equal(layer.weight.grad, twin.weight.grad)


def test_dense_linear_is_an_nn_linear() -> None:
    layer = DenseLinear(64, 8, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_mismatched_shapes_are_f_linears_errors() -> None:
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        dense_linear(torch.randn(2, 32).bfloat16(), w)


def test_opcheck_dense_mm() -> None:
    x = torch.randn(3, 172, generator=gen(7)).bfloat16()
    w = torch.randn(43, 172, generator=gen(8)).bfloat16()
    torch.library.opcheck(torch.ops.slimstack.dense_mm, (x, w))
    torch.library.opcheck(torch.ops.slimstack.dense_mm, (x.float(), w.float()))


def test_dense_linear_under_torch_compile() -> None:
    layer = DenseLinear(172, 43, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 172, generator=gen(9)).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), atol=0, rtol=0)
