"""ops: sparse_linear dispatch, custom ops, SparseLinear and sparsify_model on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from triton_support import interpreter_problem

from slimstack.ops import (
    SparseLinear,
    SparsifyReport,
    available_backends,
    choose_backend,
    dispatch,
    sparse_linear,
    sparsify_model,
)
from slimstack.ops import backends as ops_backends

HAS_EXT = available_backends()["cpu_extension"]
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the native extension is not built")
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (6e-2, 8e-3),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    """Every test starts from the default table, no forced backend, no memoized choice."""
    monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    dispatch.set_dispatch_table(None)
    yield
    dispatch.set_dispatch_table(None)


def reference(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ dense.double().t()
    return y if bias is None else y + bias.double()


# ----------------------------------------------------------------------------- sparse_linear


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(43, 172), (1, 64)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
# auto: the table's choice (the CPU kernels where built); reference: the pure-PyTorch
# fallback every install falls back to, in every dtype
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sparse_linear_matches_reference(
    make_weight, monkeypatch, fmt, dtype, shape, lead, with_bias, backend
) -> None:
    monkeypatch.setenv(dispatch.FORCE_ENV, backend)
    n, k = shape
    dense, packed = make_weight(fmt, n, k, dtype, seed=sum(lead))
    x = torch.randn(*lead, k, generator=gen(1)).to(dtype)
    bias = torch.randn(n, generator=gen(2)).to(dtype) if with_bias else None
    y = sparse_linear(x, packed, bias)
    if backend == "reference":
        assert choose_backend(fmt, CPU, dtype, x.numel() // k) == "reference"
    assert y.shape == (*lead, n) and y.dtype == dtype and torch.isfinite(y).all()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), reference(x, dense, bias), atol=atol, rtol=rtol)


@needs_ext
@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
@pytest.mark.parametrize("m", [1, 16, 17, 128])
def test_cpu_is_chosen_and_agrees_with_reference_backend(make_weight, monkeypatch, fmt, m) -> None:
    dense, packed = make_weight(fmt, 43, 172, seed=m)
    x = torch.randn(m, 172, generator=gen(3))
    assert choose_backend(fmt, CPU, torch.float32, m) == "cpu"
    y_cpu = sparse_linear(x, packed)
    monkeypatch.setenv(dispatch.FORCE_ENV, "reference")
    assert choose_backend(fmt, CPU, torch.float32, m) == "reference"
    y_ref = sparse_linear(x, packed)
    torch.testing.assert_close(y_cpu, y_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y_cpu.double(), reference(x, dense, None), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
@pytest.mark.parametrize("packed_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [0, 3])
def test_autocast_runs_in_the_weight_dtype_and_returns_autocasts(
    make_weight, fmt, packed_dtype, x_dtype, m
) -> None:
    """Under torch.autocast a SparseLinear behaves as the nn.Linear it replaced: any float x
    is accepted and y has autocast's dtype (outside autocast a mismatch is refused)."""
    dense, packed = make_weight(fmt, 43, 172, packed_dtype, seed=7)
    bias = torch.randn(43, generator=gen(8)).to(packed_dtype)
    layer = SparseLinear(packed, bias=bias)
    linear = nn.Linear(172, 43).to(packed_dtype)
    with torch.no_grad():
        linear.weight.copy_(dense), linear.bias.copy_(bias)
    x = torch.randn(2, m, 172, generator=gen(9)).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), linear(x)
    assert y.dtype == expected.dtype == torch.bfloat16 and y.shape == (2, m, 43)
    # the product ran in the weight's dtype on x cast to it; only y was rounded to bf16
    want = reference(x.to(packed_dtype), dense, bias).to(torch.bfloat16)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y.double(), want.double(), atol=atol, rtol=rtol)
    if x_dtype != packed_dtype:
        with pytest.raises(TypeError, match="cast one"):
            layer(x)


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_empty_batch(make_weight, fmt) -> None:
    """M = 0 gives [..., 0, N] and, like nn.Linear, stays differentiable in x."""
    _, packed = make_weight(fmt, 8, 64)
    assert sparse_linear(torch.empty(2, 0, 64), packed).shape == (2, 0, 8)
    x = torch.empty(0, 64, requires_grad=True)
    y = SparseLinear(packed, bias=torch.randn(8))(x)
    assert y.shape == (0, 8) and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 64)


def test_sparse_linear_refuses_bad_inputs(make_weight) -> None:
    _, packed = make_weight("sparse24", 8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="x is torch.float16 but the packed weight is"):
        sparse_linear(x.half(), packed)
    with pytest.raises(ValueError, match=r"\[\.\.\., K=64\]"):
        sparse_linear(torch.randn(2, 63), packed)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        sparse_linear(x, packed, torch.zeros(7))
    with pytest.raises(TypeError, match="Sparse24Weight or BitmapWeight"):
        sparse_linear(x, torch.zeros(8, 64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sparse_linear([[1.0] * 64], packed)


# ----------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize(
    "forced, match",
    [
        ("cuda", "SLIMSTACK_BACKEND=cuda cannot run"),
        ("torch", "SLIMSTACK_BACKEND=torch cannot run"),
        ("triton", "SLIMSTACK_BACKEND=triton cannot run"),
    ],
)
def test_forced_backend_that_cannot_run_is_an_error(make_weight, monkeypatch, forced, match):
    if torch.cuda.is_available():
        pytest.skip("these backends may run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed = make_weight("sparse24", 8, 64)
    monkeypatch.setenv(dispatch.FORCE_ENV, forced)
    with pytest.raises(RuntimeError, match=match):
        sparse_linear(torch.randn(2, 64), packed)


def test_forced_cpu_without_extension_is_an_error(make_weight, monkeypatch) -> None:
    _, packed = make_weight("bitmap", 8, 64)
    monkeypatch.setitem(ops_backends.UNAVAILABLE, "cpu", "slimstack._C is not built")
    monkeypatch.setenv(dispatch.FORCE_ENV, "cpu")
    with pytest.raises(RuntimeError, match="SLIMSTACK_BACKEND=cpu .*slimstack._C is not built"):
        sparse_linear(torch.randn(2, 64), packed)
    # unforced, the table falls through to the pure-PyTorch fallback
    monkeypatch.delenv(dispatch.FORCE_ENV)
    assert choose_backend("bitmap", CPU, torch.float32, 2) == "reference"


def test_unknown_forced_backend(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.FORCE_ENV, "fpga")
    with pytest.raises(ValueError, match="'fpga' is not a backend; use one of"):
        choose_backend("sparse24", CPU, torch.float32, 1)
    monkeypatch.setenv(dispatch.FORCE_ENV, "auto")
    assert choose_backend("sparse24", CPU, torch.float32, 1) in ("cpu", "reference")


def test_triton_is_not_picked_automatically_for_cpu_tensors(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    table = {"version": 1, "rules": [{"order": ["triton", "reference"]}]}
    dispatch.set_dispatch_table(table)
    assert choose_backend("sparse24", CPU, torch.float16, 1) == "reference"


@needs_ext
def test_table_rules_by_m_range_and_dtype(make_weight) -> None:
    table = {
        "version": 1,
        "rules": [
            {"device": "cpu", "format": "sparse24", "m_max": 16, "order": ["cpu"]},
            {"device": "cpu", "dtype": "bfloat16", "order": ["cpu"]},
            {"device": "cpu", "order": ["reference"]},
        ],
    }
    dispatch.set_dispatch_table(table)
    assert choose_backend("sparse24", CPU, torch.float32, 16) == "cpu"
    assert choose_backend("sparse24", CPU, torch.float32, 17) == "reference"
    assert choose_backend("bitmap", CPU, torch.bfloat16, 100) == "cpu"
    assert choose_backend("bitmap", CPU, torch.float16, 1) == "reference"
    dense, packed = make_weight("sparse24", 43, 172)
    x = torch.randn(20, 172, generator=gen(4))
    for rows in (x, x[:16]):  # reference backend, then the CPU kernel
        expected = reference(rows, dense, None)
        torch.testing.assert_close(
            sparse_linear(rows, packed).double(), expected, atol=1e-4, rtol=1e-5
        )


def test_table_file_round_trip(tmp_path, monkeypatch) -> None:
    table = {
        "version": 1,
        "rules": [{"device": "cpu", "m_min": 5, "order": ["reference"], "note": "bench"}],
    }
    path = tmp_path / "table.json"
    dispatch.save_dispatch_table(table, path)
    assert json.loads(path.read_text()) == table
    assert dispatch.dispatch_table() == table
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    assert dispatch.load_dispatch_table() == table
    # no rule matches M = 1: the pure-PyTorch fallback
    assert choose_backend("sparse24", CPU, torch.float32, 1) == "reference"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"rules": [{"order": ["cpu"]}]}, "version"),
        ({"version": 1, "rules": []}, "non-empty"),
        ({"version": 1, "rules": [{"order": ["gpu"]}]}, "order must list backends"),
        ({"version": 1, "rules": [{"device": "tpu", "order": ["cpu"]}]}, "device must be"),
        ({"version": 1, "rules": [{"dtype": "float64", "order": ["cpu"]}]}, "dtype must be"),
        ({"version": 1, "rules": [{"m_max": "16", "order": ["cpu"]}]}, "m_min and m_max"),
        ({"version": 1, "rules": [{"M": 1, "order": ["cpu"]}]}, "unknown keys"),
    ],
)
def test_bad_tables_are_refused(tmp_path, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        dispatch.save_dispatch_table(bad, tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "No such file"),
        ("{bad", "Expecting property name"),
        ('{"version": 1, "rules": [{"order": ["gpu"]}]}', "order must list backends"),
    ],
)
def test_a_bad_table_named_by_the_environment_says_so(tmp_path, monkeypatch, content, match):
    """The table is read when slimstack.ops is imported: a stale $SLIMSTACK_DISPATCH_TABLE was
    a bare FileNotFoundError / JSONDecodeError / rule error naming neither file nor variable."""
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    expected = f"dispatch table {path} \\(named by {dispatch.TABLE_ENV}\\) cannot be used: .*"
    with pytest.raises(ValueError, match=expected + match):
        dispatch.load_dispatch_table()
    monkeypatch.delenv(dispatch.TABLE_ENV)
    with pytest.raises(ValueError, match=f"dispatch table {path} cannot be used: .*{match}"):
        dispatch.load_dispatch_table(path)


def test_available_backends_report() -> None:
    """Each entry against what this install has, looked up independently (membership checks
    such as `in (True, False)` hold for any report)."""
    import importlib.metadata

    report = available_backends()
    for key in ("cpu_extension", "cuda_extension", "triton", "torch_semi_structured", "gpu"):
        assert key in report
    try:
        import slimstack._C as ext
    except ImportError:
        ext = None
    assert report["cpu_extension"] is (ext is not None and hasattr(ext, "sparse24_mm_cpu"))
    assert report["cuda_extension"] is bool(getattr(ext, "with_cuda", False))
    if report["cpu_extension"]:
        assert report["cpu_isa"] == ext.cpu_isa() and report["cpu_isa"] in ext.cpu_isas()
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = False
    assert report["triton"] == triton_version
    assert report["cuda_device"] is torch.cuda.is_available()
    assert (report["gpu"] is False) == (not torch.cuda.is_available())
    assert report["forced_backend"] is False  # clean_dispatch unset SLIMSTACK_BACKEND


@pytest.mark.parametrize("hopper", [True, False])
def test_cuda_kernel_choice_by_shape(hopper) -> None:
    """Decode takes the GEMV; prefill the Hopper GEMM only where its TMA store can write y
    (N % 8 == 0), else the mma.sp GEMM that takes any N (N = 43 must not reach sm90)."""
    from types import SimpleNamespace

    from slimstack.ops.library import cuda_sparse24_kernel

    asked = []
    ext = SimpleNamespace(sparse24_gemm_sm90_available=lambda d: asked.append(d) or hopper)
    assert cuda_sparse24_kernel(ext, 16, 43, 0) == "gemv"
    assert cuda_sparse24_kernel(ext, 17, 43, 0) == "sm80"
    assert cuda_sparse24_kernel(ext, 17, 4096, 1) == ("sm90" if hopper else "sm80")
    assert cuda_sparse24_kernel(ext, 2048, 1, 0) == "sm80"
    assert asked == [1], "availability is asked only for shapes the Hopper GEMM can take"


def test_derived_cache_rebuilds_after_in_place_writes() -> None:
    """A copy derived from a weight is reused while the weight's bytes stand, and rebuilt once
    copy_ (what load_state_dict does) or a swap of another source changes them."""
    from slimstack.ops.derived import DerivedCache

    cache: DerivedCache[int] = DerivedCache()
    values, meta = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.uint8)
    builds = []

    def build() -> int:
        builds.append(1)
        return len(builds)

    assert cache.get(values, (values, meta), build) == 1
    assert cache.get(values, (values, meta), build) == 1, "unchanged sources: no rebuild"
    meta.copy_(torch.ones_like(meta))
    assert cache.lookup(values, (values, meta)) is None
    assert cache.get(values, (values, meta), build) == 2
    assert cache.get(values, (values, torch.zeros_like(meta)), build) == 3, "a swapped source"
    del values
    assert len(cache) == 0, "entries go with their key tensor"
    with torch.inference_mode():  # no version counter there: cached, never an error
        frozen = torch.randn(4, 8)
    assert cache.get(frozen, (frozen,), build) == cache.get(frozen, (frozen,), build) == 4


def test_derived_cache_refreshes_a_tensor_copy_at_its_address() -> None:
    """A rebuilt copy of the same layout is written into the old one: a CUDA graph captured
    with the old address then reads the new bytes. A copy of another layout is replaced."""
    from slimstack.ops.derived import DerivedCache

    cache: DerivedCache[torch.Tensor] = DerivedCache()
    meta = torch.randint(0, 255, (4, 2), dtype=torch.uint8, generator=gen(0))
    first = cache.get(meta, (meta,), lambda: meta.to(torch.int32) + 1)
    address = first.data_ptr()
    meta.copy_(torch.randint(0, 255, (4, 2), dtype=torch.uint8, generator=gen(1)))
    second = cache.get(meta, (meta,), lambda: meta.to(torch.int32) + 1)
    assert second.data_ptr() == address
    assert torch.equal(second, meta.to(torch.int32) + 1)
    meta.add_(1)
    wider = cache.get(meta, (meta,), lambda: meta.to(torch.int64).repeat(1, 2))
    assert wider.shape == (4, 4) and torch.equal(wider[:, :2], meta.to(torch.int64))


def test_semi_structured_copy_follows_load_state_dict(monkeypatch, make_weight) -> None:
    """The torch backend's semi-structured copy of a weight must follow load_state_dict, which
    writes into the same tensors (a cache keyed by identity alone kept the old weight)."""
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda dense: dense)
    dense_a, packed_a = make_weight("sparse24", 64, 128, torch.float32)
    dense_b, packed_b = make_weight("sparse24", 64, 128, torch.float32, seed=1)
    a, b = SparseLinear(packed_a), SparseLinear(packed_b)
    x = torch.randn(5, 128, generator=gen(3))
    before = ops_backends._torch_sparse24(x, b.values, b.meta, 64, 128)
    torch.testing.assert_close(before, x @ dense_b.t())
    b.load_state_dict(a.state_dict())
    after = ops_backends._torch_sparse24(x, b.values, b.meta, 64, 128)
    torch.testing.assert_close(after, x @ dense_a.t())


def test_bitmap_state_dict_loads_across_kept_counts(make_unstructured) -> None:
    """A bitmap weight's values length is its kept count: a state_dict from another bitmap
    weight of the same shape loads (values resized), and one whose offsets disagree with its
    mask is refused before anything is copied."""
    w_a = make_unstructured(43, 172, torch.float32, density=0.4, generator=gen(30))
    w_b = make_unstructured(43, 172, torch.float32, density=0.6, generator=gen(31))
    a, b = (
        SparseLinear.from_dense(w_a, pattern="bitmap"),
        SparseLinear.from_dense(w_b, pattern="bitmap"),
    )
    assert a.values.numel() != b.values.numel()
    x = torch.randn(3, 172, generator=gen(32))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), x @ w_a.t())

    corrupt = a.state_dict()
    corrupt["row_offsets"] = corrupt["row_offsets"].clone()
    corrupt["row_offsets"][1:] += 8  # the last offset now points past values
    c = SparseLinear.from_dense(w_b, pattern="bitmap")
    before = {name: t.clone() for name, t in c.state_dict().items()}
    with pytest.raises(RuntimeError, match="not a valid \\[43, 172\\] weight"):
        c.load_state_dict(corrupt)
    for name, t in c.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed by a refused load"


@pytest.mark.parametrize("corruption", ["nibble", "padding"])
def test_corrupt_sparse24_state_dict_is_refused(make_weight, corruption) -> None:
    """A sparse24 state_dict is checked as Sparse24Weight.load checks a file: a nibble with
    i0 >= i1 is no valid encoding (the CPU kernels place values by index, an earlier AVX-512
    path expanded them in column order: backends resolve it differently) and a value stored
    for a padding column reaches the kernels but not unpack, so either loaded silently gave
    backend-dependent outputs."""
    dense, packed = make_weight("sparse24", 43, 172, seed=33)
    corrupt = SparseLinear(packed).state_dict()
    corrupt = {name: t.clone() for name, t in corrupt.items()}
    if corruption == "nibble":
        corrupt["meta"][5, 2] = (corrupt["meta"][5, 2] & 0xF0) | 0x1  # row 5, group 4: i0=1, i1=0
        match = "row 5, group 4 has nibble 0x1"
    else:
        corrupt["values"][7, 90] = 1.5  # group 45 covers columns 180..183, all past K = 172
        match = "row 7, slot 90 holds 1.5 for a padding column"
    module = SparseLinear.from_dense(make_weight("sparse24", 43, 172, seed=34)[0])
    before = {name: t.clone() for name, t in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        module.load_state_dict(corrupt)
    for name, t in module.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed by a refused load"
    # the uncorrupted state_dict still loads, into a module of another weight, in fp16 too
    module.load_state_dict(SparseLinear(packed).state_dict())
    x = torch.randn(3, 172, generator=gen(35))
    torch.testing.assert_close(module(x).double(), reference(x, dense, None), atol=1e-4, rtol=1e-4)
    half = SparseLinear.from_dense(dense.half())
    half.load_state_dict(SparseLinear(packed).state_dict())
    assert half.values.dtype == torch.float16 and torch.equal(half.meta, packed.meta)


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_a_dense_weight_loads_into_a_sparse_linear(make_weight, fmt: str) -> None:
    """An nn.Linear's state_dict (a pruned model's, say) loads into its SparseLinear, packed
    in the module's format; a weight that format cannot hold, or of another shape, is refused
    naming why, and the module is left as it was."""
    dense_a, _ = make_weight(fmt, 43, 172, seed=36)
    dense_b, _ = make_weight(fmt, 43, 172, seed=37)
    linear = nn.Linear(172, 43)
    with torch.no_grad():
        linear.weight.copy_(dense_b)
    module = SparseLinear.from_dense(dense_a, torch.zeros(43), pattern=fmt)
    module.load_state_dict(linear.state_dict())  # strict: no missing or unexpected keys
    assert module.format == fmt
    x = torch.randn(3, 172, generator=gen(38))
    torch.testing.assert_close(
        module(x).double(), reference(x, dense_b, linear.bias), atol=1e-4, rtol=1e-4
    )
    before = {name: t.clone() for name, t in module.state_dict().items()}
    bad = {"weight": torch.randn(43, 172, generator=gen(39)), "bias": torch.zeros(43)}
    if fmt == "sparse24":  # a dense random weight is not 2:4; a bitmap holds any weight
        with pytest.raises(RuntimeError, match="cannot be packed as sparse24: .*row 0"):
            module.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="dense weight is \\[43, 171\\], this layer is"):
        module.load_state_dict({"weight": torch.zeros(43, 171), "bias": torch.zeros(43)})
    for name, t in module.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed by a refused load"


def test_sm90_meta_follows_copy_and_refuses_capture(monkeypatch) -> None:
    """The Hopper GEMM's reordered metadata is rebuilt after meta.copy_; its first build (a
    kernel plus a probe) is refused inside graph capture instead of being recorded."""
    from types import SimpleNamespace

    from slimstack.ops import library

    calls = []
    ext = SimpleNamespace(
        sparse24_sm90_reorder_meta_cuda=lambda meta, n, k: calls.append(1) or meta.clone()
    )
    meta = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
    assert torch.equal(library._sm90_meta(ext, meta, 2, 64), meta)
    library._sm90_meta(ext, meta, 2, 64)
    assert len(calls) == 1
    meta.copy_(meta.flip(1))
    assert torch.equal(library._sm90_meta(ext, meta, 2, 64), meta) and len(calls) == 2
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    library._sm90_meta(ext, meta, 2, 64)  # cached: fine inside capture
    fresh = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="eager call"):
        library._sm90_meta(ext, fresh, 2, 64)
    assert len(calls) == 2


def _cuda_bindings() -> dict[str, list[tuple[str, bool]]]:
    """The CUDA entry points as csrc/cuda/glue.cpp binds them: name -> [(argument, has a
    default)], in order."""
    import re

    glue = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "glue.cpp").read_text()
    block = glue[glue.index("void register_cuda(") :]
    bindings = {}
    for match in re.finditer(r'm\.def\(\s*"(\w+)"(.*?)\);', block, re.S):
        args = re.findall(r'py::arg\("(\w+)"\)(\s*=)?', match.group(2))
        bindings[match.group(1)] = [(name, bool(default)) for name, default in args]
    return bindings


def _fake_cuda_extension(calls: list[str]):
    """slimstack._C's CUDA entry points with the bindings' signatures, computed on CPU
    tensors with the CPU kernels, checking the packed tensors as the glue does (so an argument
    in the wrong place fails here instead of on the GPU)."""
    import inspect
    from types import SimpleNamespace

    from slimstack.formats import padded_k
    from slimstack.formats.cutlass_sm90 import restore_meta_sm90, sm90_meta_nbytes
    from slimstack.ops.library import native_extension

    cpu = native_extension()

    def check_x(x, values, n, k, max_m=None):
        assert x.dim() == 2 and x.shape[1] == k and x.is_contiguous() and x.dtype == values.dtype
        assert x.dtype in (torch.float16, torch.bfloat16), "the CUDA kernels take fp16/bf16"
        assert max_m is None or x.shape[0] <= max_m
        assert values.shape[0] == n or values.dim() == 1

    def sparse24_gemv_cuda(
        x, values, meta, N, K, split_k=0, out=None, reduce="auto", prefetch="auto", pdl="auto"
    ):
        calls.append("gemv")
        check_x(x, values, N, K, max_m=16)
        return cpu.sparse24_mm_cpu(x, values, meta, N, K)

    def sparse24_gemm_sm80_cuda(x, values, meta, N, K, out=None):
        calls.append("sm80")
        check_x(x, values, N, K)
        return cpu.sparse24_mm_cpu(x, values, meta, N, K)

    def sparse24_sm90_reorder_meta_cuda(meta, N, K):
        calls.append("reorder")
        assert meta.dtype == torch.uint8 and meta.shape == (N, padded_k(K) // 8)
        from slimstack.formats.cutlass_sm90 import reorder_meta_sm90

        return reorder_meta_sm90(meta)

    def sparse24_gemm_sm90_available(device=0):
        assert isinstance(device, int)
        return True

    def sparse24_gemm_sm90_cuda(x, values, meta_sm90, N, K, out=None, swizzle=0, tile="auto"):
        calls.append("sm90")
        check_x(x, values, N, K)
        assert N % 8 == 0, "the glue refuses N % 8 != 0"
        kp = padded_k(K)
        assert meta_sm90.dtype == torch.uint8 and meta_sm90.shape == (sm90_meta_nbytes(N, kp),)
        return cpu.sparse24_mm_cpu(x, values, restore_meta_sm90(meta_sm90, N, kp), N, K)

    def bitmap_gemv_cuda(x, values, bitmask, row_offsets, N, K, out=None, ring_depth=0):
        calls.append("bitmap_gemv")
        check_x(x, values, N, K, max_m=16)
        assert bitmask.dtype == torch.uint8 and row_offsets.dtype == torch.int64
        return cpu.bitmap_mm_cpu(x, values, bitmask, row_offsets, N, K)

    fns = {
        f.__name__: f
        for f in (
            sparse24_gemv_cuda,
            sparse24_gemm_sm80_cuda,
            sparse24_sm90_reorder_meta_cuda,
            sparse24_gemm_sm90_available,
            sparse24_gemm_sm90_cuda,
            bitmap_gemv_cuda,
        )
    }
    bindings = _cuda_bindings()
    for name, fn in fns.items():
        params = inspect.signature(fn).parameters.values()
        mine = [(p.name, p.default is not inspect.Parameter.empty) for p in params]
        assert mine == bindings[name], (
            f"{name}: the fake has {mine}, glue.cpp binds {bindings[name]}"
        )
    return SimpleNamespace(with_cuda=True, **fns)


@needs_ext
def test_cuda_kernels_are_called_as_the_bindings_declare(make_weight, monkeypatch) -> None:
    """The CUDA branch of the custom ops, run on CPU against a stand-in for slimstack._C
    whose entry points have glue.cpp's signatures: decode takes the GEMV, prefill the Hopper
    GEMM on metadata reordered once per weight (N % 8 == 0) or else the sm80 GEMM, and every
    argument lands where the bindings expect it."""
    from slimstack.ops import library

    calls: list[str] = []
    fake = _fake_cuda_extension(calls)
    monkeypatch.setattr(library, "native_extension", lambda: fake)
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((43, 172), (64, 200)):
            calls.clear()
            dense24, s24 = make_weight("sparse24", n, k, dtype, seed=n)
            dense_bm, bmp = make_weight("bitmap", n, k, dtype, seed=n + 1)
            for m in (1, 16, 17, 40):
                x = torch.randn(m, k, generator=gen(m)).to(dtype)
                y = library._sparse24_mm_cuda(x, s24.values, s24.meta, n, k)
                expected = "gemv" if m <= 16 else ("sm90" if n % 8 == 0 else "sm80")
                assert calls[-1] == expected and y.shape == (m, n) and y.dtype == dtype
                atol, rtol = TOLERANCES[dtype]
                torch.testing.assert_close(
                    y.double(), reference(x, dense24, None), atol=atol, rtol=rtol
                )
                if m <= 16:
                    y = library._bitmap_mm_cuda(x, bmp.values, bmp.bitmask, bmp.row_offsets, n, k)
                    assert calls[-1] == "bitmap_gemv" and y.shape == (m, n)
                    torch.testing.assert_close(
                        y.double(), reference(x, dense_bm, None), atol=atol, rtol=rtol
                    )
            # two prefills of the weight, one reordering of its metadata
            assert calls.count("reorder") == (1 if n % 8 == 0 else 0)


# ----------------------------------------------------------------------------- custom ops


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_native_ops(make_weight, dtype) -> None:
    _, s24 = make_weight("sparse24", 43, 172, dtype)
    _, bmp = make_weight("bitmap", 43, 172, dtype)
    x = torch.randn(3, 172, generator=gen(5)).to(dtype).requires_grad_()  # autograd too
    torch.library.opcheck(torch.ops.slimstack.sparse24_mm, (x, s24.values, s24.meta, 43, 172))
    torch.library.opcheck(
        torch.ops.slimstack.bitmap_mm, (x, bmp.values, bmp.bitmask, bmp.row_offsets, 43, 172)
    )


def test_fake_impls_give_output_shape(make_weight) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, s24 = make_weight("sparse24", 43, 172, torch.float16)
    _, bmp = make_weight("bitmap", 43, 172, torch.float16)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(5, 172).half())
        v, meta = mode.from_tensor(s24.values), mode.from_tensor(s24.meta)
        for op in (torch.ops.slimstack.sparse24_mm, torch.ops.slimstack.sparse24_mm_triton):
            y = op(x, v, meta, 43, 172)
            assert y.shape == (5, 43) and y.dtype == torch.float16
        args = [mode.from_tensor(t) for t in (bmp.values, bmp.bitmask, bmp.row_offsets)]
        for op in (torch.ops.slimstack.bitmap_mm, torch.ops.slimstack.bitmap_mm_triton):
            assert op(x, *args, 43, 172).shape == (5, 43)


@needs_ext
@pytest.mark.slow
def test_torch_compile_on_cpu(make_weight) -> None:
    s24 = SparseLinear(make_weight("sparse24", 43, 172, seed=6)[1], torch.randn(43))
    bmp = SparseLinear(make_weight("bitmap", 43, 172, seed=7)[1])
    model = nn.Sequential(s24, nn.ReLU(), nn.Linear(43, 172), bmp)
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 17):
        x = torch.randn(2, m, 172, generator=gen(m))
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SparseLinear


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_sparse_linear_module_matches_linear(make_weight, fmt) -> None:
    dense, _ = make_weight(fmt, 43, 172)
    linear = nn.Linear(172, 43)
    with torch.no_grad():
        linear.weight.copy_(dense)
    sparse = SparseLinear.from_linear(linear)
    assert sparse.format == fmt and sparse.packed.format == fmt
    assert (sparse.in_features, sparse.out_features) == (172, 43)
    assert f"format={fmt}" in repr(sparse)
    x = torch.randn(4, 172, generator=gen(8))
    torch.testing.assert_close(sparse(x), linear(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse.packed.unpack(), dense)


def test_sparse_linear_module_half_and_state_dict(make_weight) -> None:
    dense, _ = make_weight("sparse24", 43, 172)
    bias = torch.randn(43, generator=gen(27))
    sparse = SparseLinear.from_dense(dense, bias)
    half = SparseLinear.from_dense(dense, bias).half()
    assert half.values.dtype == torch.float16 and half.meta.dtype == torch.uint8
    assert half.bias.dtype == torch.float16
    x = torch.randn(3, 172, generator=gen(9))
    # against float64 on the fp16-rounded operands, at fp16's tolerance (comparing with the
    # fp32 module at atol 5e-2 / rtol 1e-2 let a 0.5%-off fp16 path pass)
    y_half = half(x.half())
    assert y_half.dtype == torch.float16
    atol, rtol = TOLERANCES[torch.float16]
    expected = reference(x.half(), dense.half(), bias.half())
    torch.testing.assert_close(y_half.double(), expected, atol=atol, rtol=rtol)
    copy = SparseLinear.from_dense(torch.zeros_like(dense), torch.zeros(43))
    copy.load_state_dict(sparse.state_dict())
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(copy(x).double(), reference(x, dense, bias), atol=atol, rtol=rtol)
    assert set(sparse.state_dict()) == {"values", "meta", "bias"}


def test_sparse_linear_module_refusals(make_weight) -> None:
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_dense(torch.ones(4, 8), pattern="sparse24")
    with pytest.raises(ValueError, match="pattern must be one of"):
        SparseLinear.from_dense(torch.zeros(4, 8), pattern="4:8")
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        SparseLinear(make_weight("sparse24", 8, 64)[1], torch.zeros(3))


# ----------------------------------------------------------------------------- sparsify_model


class Mixed(nn.Module):
    def __init__(self, s24: torch.Tensor, unstructured: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Linear(172, 43)
        self.b = nn.Linear(43, 64, bias=False)
        self.dense = nn.Linear(64, 64)
        self.shared = self.a  # the same module under two names
        with torch.no_grad():
            self.a.weight.copy_(s24)
            self.b.weight.copy_(unstructured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.b(torch.relu(self.a(x)))) + self.shared(x).sum(-1, keepdim=True)


@pytest.fixture
def mixed(make_sparse24, make_unstructured) -> Mixed:
    torch.manual_seed(0)
    s24 = make_sparse24(43, 172, generator=gen(10))
    return Mixed(s24, make_unstructured(64, 43, density=0.5, generator=gen(11)))


def test_sparsify_auto(mixed: Mixed) -> None:
    x = torch.randn(5, 172, generator=gen(12))
    before = mixed(x)
    report = sparsify_model(mixed)
    assert isinstance(mixed.a, SparseLinear) and mixed.a.format == "sparse24"
    assert mixed.shared is mixed.a  # packed once, still shared
    assert isinstance(mixed.b, SparseLinear) and mixed.b.format == "bitmap"
    assert type(mixed.dense) is nn.Linear
    assert sorted((s.name, s.format) for s in report.swapped) == [
        ("a", "sparse24"),
        ("b", "bitmap"),
    ]
    assert "dense" in report.skipped and "0% zeros" in report.skipped["dense"]
    assert report.bytes_before == (43 * 172 + 64 * 43) * 4
    assert report.bytes_after == mixed.a.packed.nbytes + mixed.b.packed.nbytes
    assert 0 < report.bytes_saved < report.bytes_before
    assert "2 linear(s) packed" in str(report)
    torch.testing.assert_close(mixed(x), before, atol=1e-5, rtol=1e-5)


def test_sparsify_patterns(mixed: Mixed, make_sparse24, make_unstructured) -> None:
    report = sparsify_model(mixed, pattern="sparse24")
    assert [s.name for s in report.swapped] == ["a"]
    assert report.skipped["b"] == "not 2:4" and type(mixed.b) is nn.Linear
    other = Mixed(make_sparse24(43, 172, generator=gen(13)), make_unstructured(64, 43))
    report = sparsify_model(other, pattern="bitmap")
    assert {s.name: s.format for s in report.swapped} == {"a": "bitmap", "b": "bitmap"}
    with pytest.raises(ValueError, match="pattern must be one of"):
        sparsify_model(other, pattern="2:4")
    with pytest.raises(TypeError, match="must be an nn.Module"):
        sparsify_model(object())
    assert isinstance(sparsify_model(nn.ReLU()), SparsifyReport)


def test_sparsify_leaves_tied_weights_and_growing_packs_dense(make_sparse24) -> None:
    """A linear tied to an embedding keeps its dense tensor alive, and at tiny K the 64-column
    padding outweighs the zeros: packing either would add bytes, so both stay dense."""
    model = nn.Module()
    model.embed = nn.Embedding(43, 172)
    model.head = nn.Linear(172, 43, bias=False)
    model.tiny = nn.Linear(8, 16, bias=False)
    with torch.no_grad():
        model.embed.weight.copy_(make_sparse24(43, 172, generator=gen(16)))
        model.tiny.weight.copy_(make_sparse24(16, 8, generator=gen(17)))
    model.head.weight = model.embed.weight  # tied, and exactly 2:4
    report = sparsify_model(model)
    assert report.swapped == [] and type(model.head) is nn.Linear
    assert report.skipped["head"] == "weight shared with embed"
    assert type(model.tiny) is nn.Linear
    assert report.skipped["tiny"] == "sparse24 would take 2,176 bytes, dense 512"  # 16x(32x4+8)
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())  # untied
    assert [s.name for s in sparsify_model(model).swapped] == ["head"]


def test_sparsify_bitmap_threshold_is_exact_at_45_percent() -> None:
    """>= 45% zeros means exactly 45% too (a float32 mean puts 1800/4000 just under 0.45)."""
    weight = torch.randn(20, 200, generator=gen(18)).abs() + 0.1
    weight.view(-1)[torch.randperm(4000, generator=gen(19))[:1800]] = 0.0
    model = nn.Sequential(nn.Linear(200, 20, bias=False), nn.Linear(200, 20, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
        model[1].weight.copy_(weight)
        model[1].weight[0, weight[0] == 0] = 1.0  # a few zeros fewer: 44.x%
    report = sparsify_model(model)
    assert [(s.name, s.format) for s in report.swapped] == [("0", "bitmap")]
    assert "< 45%" in report.skipped["1"]


def test_sparsify_leaves_linear_subclasses_whose_owner_reads_weight(make_sparse24) -> None:
    """nn.MultiheadAttention reads out_proj.weight itself: swapping that module breaks it."""
    attention = nn.MultiheadAttention(64, 4, batch_first=True)
    with torch.no_grad():
        attention.out_proj.weight.copy_(make_sparse24(64, 64, generator=gen(20)))
    x = torch.randn(2, 5, 64, generator=gen(21))
    before = attention(x, x, x)[0]
    report = sparsify_model(attention)
    assert report.swapped == [] and "subclass of nn.Linear" in report.skipped["out_proj"]
    torch.testing.assert_close(attention(x, x, x)[0], before)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "forward_hook", "pre_hook"])
def test_sparsify_leaves_linears_with_computed_weights_or_hooks(make_sparse24, wrap) -> None:
    """weight_norm / spectral_norm make .weight a hook's output (not a parameter), and a swap
    would drop any hook: such linears stay dense with the reason, the model unchanged."""
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(make_sparse24(64, 128, generator=gen(22)))
    if wrap == "weight_norm":
        linear = torch.nn.utils.weight_norm(linear)
    elif wrap == "spectral_norm":
        linear = torch.nn.utils.spectral_norm(linear)
    elif wrap == "forward_hook":
        linear.register_forward_hook(lambda module, args, out: out * 2)
    else:
        linear.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    model = nn.Sequential(linear).eval()
    x = torch.randn(3, 128, generator=gen(23))
    before = model(x)
    report = sparsify_model(model)
    assert report.swapped == [] and list(report.skipped) == ["0"]
    assert ("computed" if "norm" in wrap else "hooks") in report.skipped["0"]
    assert model[0] is linear
    torch.testing.assert_close(model(x), before)


def test_sparsify_refuses_a_bare_linear(make_sparse24) -> None:
    """The root module cannot be swapped in place: say so instead of reporting 0 swapped."""
    linear = nn.Linear(128, 64)
    with pytest.raises(TypeError, match="SparseLinear.from_linear"):
        sparsify_model(linear)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_sparsify_leaves_empty_linears_and_packs_the_rest(make_sparse24) -> None:
    """A zero-size linear (in or out features 0) stays dense with a reason; it used to fail
    the whole call with the formats' "weight must be non-empty", naming no module."""
    model = nn.Sequential(nn.Linear(172, 0), nn.Linear(0, 43), nn.Linear(172, 43))
    with torch.no_grad():
        model[2].weight.copy_(make_sparse24(43, 172, generator=gen(36)))
    report = sparsify_model(model)
    assert [s.name for s in report.swapped] == ["2"]
    assert report.skipped == {"0": "weight is empty (0x172)", "1": "weight is empty (43x0)"}
    x = torch.randn(3, 172, generator=gen(37))
    torch.testing.assert_close(model[2](x), x @ model[2].packed.unpack().t() + model[2].bias)


def _prune_24_by_magnitude(model: nn.Module) -> int:
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "layers" in name:
            w = module.weight.data
            groups = w.reshape(w.shape[0], -1, 4)
            drop = groups.abs().argsort(-1)[..., :2]
            groups.scatter_(-1, drop, 0.0)
            count += 1
    return count


def test_sparsified_llama_gives_same_logits() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    pruned = _prune_24_by_magnitude(model)
    tokens = torch.randint(0, 256, (2, 24), generator=gen(14))
    with torch.no_grad():
        before = model(tokens).logits
        report = sparsify_model(model)
        after = model(tokens).logits
    assert len(report.swapped) == pruned == 14
    assert all(s.format == "sparse24" for s in report.swapped)
    assert "lm_head" in report.skipped  # tied to the dense embedding
    assert isinstance(model.model.layers[1].mlp.down_proj, SparseLinear)  # K = 172
    assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_slimstack_pruned_stories260k_gives_same_logits(stories260k_dir, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from slimstack.prune.driver import prune

    out = tmp_path / "pruned"
    prune(stories260k_dir, out, method="magnitude", sparsity="2:4", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, torch_dtype=torch.float32
    ).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen(15))
    with torch.no_grad():
        before = model(tokens).logits
        report = sparsify_model(model)
        after = model(tokens).logits
    layers = model.config.num_hidden_layers
    assert len(report.swapped) == 7 * layers
    assert report.bytes_after < 0.6 * report.bytes_before
    assert ((after - before).norm() / before.norm()).item() < 1e-5


# ----------------------------------------------------------------------------- triton (forced)

_TRITON_ON_CPU = """
import torch
from slimstack.formats import pack_bitmap, pack_sparse24
from slimstack.ops import choose_backend, sparse_linear
g = torch.Generator().manual_seed(0)
w = torch.randn(43, 172, generator=g)
w24 = w * (torch.rand(43, 43, 4, generator=g).argsort(-1) < 2).reshape(43, 172)
wbm = w * (torch.rand(43, 172, generator=g) < 0.5)
for m in (1, 3, 17):
    x = torch.randn(m, 172, generator=g).half()
    assert choose_backend("sparse24", x.device, x.dtype, m) == "triton"
    for dense, packed in ((w24, pack_sparse24(w24.half())), (wbm, pack_bitmap(wbm.half()))):
        y = sparse_linear(x, packed)  # bitmap at M = 17: unpacked by Triton, one dense matmul
        ref = x.double() @ dense.half().double().t()
        torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-3)
x = torch.randn(3, 172, generator=g).half()
s24, bmp = pack_sparse24(w24.half()), pack_bitmap(wbm.half())
ops = torch.ops.slimstack
torch.library.opcheck(ops.sparse24_mm_triton, (x, s24.values, s24.meta, 43, 172))
bmp_args = (x, bmp.values, bmp.bitmask, bmp.row_offsets, 43, 172)
torch.library.opcheck(ops.bitmap_mm_triton, bmp_args)
x17 = torch.randn(17, 172, generator=g).half()
torch.library.opcheck(ops.bitmap_mm_triton, (x17, *bmp_args[1:]))
print("triton-ok")
"""


@pytest.mark.interpreter
def test_forced_triton_under_interpreter_on_cpu() -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the compiled Triton kernels in the Triton tests")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    env = dict(os.environ, TRITON_INTERPRET="1", SLIMSTACK_BACKEND="triton")
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_ON_CPU],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton-ok" in result.stdout


# ----------------------------------------------------------------------------- autograd


@needs_ext
@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_eager_calls_skip_the_custom_op_dispatch_but_autograd_does_not(
    make_weight, fmt, monkeypatch
) -> None:
    from slimstack.ops import library

    dispatched = []
    op = getattr(library, f"{fmt}_mm")
    monkeypatch.setattr(
        library, f"{fmt}_mm", lambda *a: dispatched.append(len(a)) or op(*a)
    )  # the custom op, as run_*_mm calls it
    dense, packed = make_weight(fmt, 43, 172, seed=40)
    module = SparseLinear(packed)
    x = torch.randn(3, 172, generator=gen(41))
    with torch.no_grad():
        direct = module(x)
    assert dispatched == []  # the implementation, called directly
    y = module(x.clone().requires_grad_())  # the op: its autograd formula records dx
    assert len(dispatched) == 1 and torch.equal(y.detach(), direct)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        module(x)  # under a profiler the op stays visible, by name
    assert len(dispatched) == 2
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = module(torch.empty(5, 172))  # fake tensors take the op's fake implementation
    assert fake.shape == (5, 43) and len(dispatched) == 3


@needs_ext
@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_gradient_flows_to_x(make_weight, fmt) -> None:
    dense, _ = make_weight(fmt, 43, 172, seed=16)
    linear = nn.Linear(172, 43)
    with torch.no_grad():
        linear.weight.copy_(dense)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 172, generator=gen(17), requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 43, generator=gen(18))
    sparse(x).backward(grad)
    linear(x_dense).backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-5, rtol=1e-5)
    assert not sparse.values.requires_grad


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_TOLERANCES = {torch.float16: (2e-2, 2e-3), torch.bfloat16: (1e-1, 1e-2)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch", "reference"])
@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(43, 172), (1, 64), (256, 512)])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 128])
def test_gpu_backends_match_reference(
    make_weight, monkeypatch, backend, fmt, dtype, shape, m
) -> None:
    cuda = torch.device("cuda")
    reason = dispatch.why_not(backend, fmt, cuda, dtype, m)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv(dispatch.FORCE_ENV, backend)
    n, k = shape
    dense, packed = make_weight(fmt, n, k, dtype, seed=m)
    x = torch.randn(m, k, generator=gen(19)).to(dtype)
    bias = torch.randn(n, generator=gen(20)).to(dtype)
    y = sparse_linear(x.to(cuda), packed.to(cuda), bias.to(cuda))
    assert choose_backend(fmt, cuda, dtype, m) == backend
    atol, rtol = GPU_TOLERANCES[dtype]
    torch.testing.assert_close(y.double().cpu(), reference(x, dense, bias), atol=atol, rtol=rtol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "op", ["sparse24_mm", "bitmap_mm", "sparse24_mm_triton", "bitmap_mm_triton"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_gpu_opcheck(make_weight, op, dtype, m) -> None:
    """The custom ops on CUDA tensors: schema, fake impl, autograd and dispatch agree."""
    fmt = "bitmap" if op.startswith("bitmap") else "sparse24"
    backend = "triton" if op.endswith("triton") else "cuda"
    reason = dispatch.why_not(backend, fmt, torch.device("cuda"), dtype, m)
    if reason is not None:
        pytest.skip(reason)
    _, packed = make_weight(fmt, 43, 172, dtype, seed=25)
    packed = packed.to("cuda")
    x = torch.randn(m, 172, generator=gen(26)).to(dtype).cuda().requires_grad_()
    tensors = (packed.values, packed.meta) if fmt == "sparse24" else (
        packed.values, packed.bitmask, packed.row_offsets
    )  # fmt: skip
    torch.library.opcheck(getattr(torch.ops.slimstack, op), (x, *tensors, 43, 172))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_dispatch_under_cuda_graph(make_weight, monkeypatch, backend, fmt, m) -> None:
    if backend != "auto":
        reason = dispatch.why_not(backend, fmt, torch.device("cuda"), torch.float16, m)
        if reason is not None:
            pytest.skip(reason)
        monkeypatch.setenv(dispatch.FORCE_ENV, backend)
    dense, packed = make_weight(fmt, 256, 512, torch.float16, seed=21)
    layer = SparseLinear(packed.to("cuda"))
    x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compiles, reorders metadata, allocates
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn(m, 512, generator=gen(22)).half())
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    atol, rtol = GPU_TOLERANCES[torch.float16]
    torch.testing.assert_close(
        y.double().cpu(), reference(x.cpu(), dense, None), atol=atol, rtol=rtol
    )


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile(make_weight) -> None:
    s24 = SparseLinear(make_weight("sparse24", 256, 512, torch.bfloat16, seed=23)[1])
    bmp = SparseLinear(make_weight("bitmap", 512, 256, torch.bfloat16, seed=24)[1])
    model = nn.Sequential(s24, nn.ReLU(), bmp).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 33):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- test setup


def test_shared_folder_is_found_beside_or_inside_the_checkout(tmp_path, monkeypatch) -> None:
    """The lent GPU machine gets the checkout alone: ../shared stays behind, so a shared/
    copied into the checkout must be found (else every stories260K GPU test skips there)."""
    from conftest import SHARED_ENV, find_shared_dir

    monkeypatch.delenv(SHARED_ENV, raising=False)
    repo = tmp_path / "checkout"
    (repo / "shared").mkdir(parents=True)
    assert find_shared_dir(repo) == repo / "shared"
    (tmp_path / "shared").mkdir()
    assert find_shared_dir(repo) == tmp_path / "shared", "../shared first, as before"
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "elsewhere"))
    assert find_shared_dir(repo) == tmp_path / "elsewhere"
