"""Every provider of the GPU kernel suite builds its call on CPU (bench/common.py).

The CUDA cases only run on a lent GPU, where a typo in a new provider row (a wrong keyword,
a config the launcher refuses) would cost lease time: here each case's call is built with the
device properties faked, and each Triton variant's config passes the launcher's own checks.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture
def fake_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)


def _distinct_provider_cases() -> list[common.Case]:
    """One case per (op, provider, M) of the CUDA plan, on its first shape."""
    seen, picked = set(), []
    for case in common.cases("cuda"):
        key = (case.op, case.provider, case.M)
        if key not in seen and case.dtype == torch.bfloat16:
            seen.add(key)
            picked.append(case)
    return picked


@pytest.mark.parametrize("case", _distinct_provider_cases(), ids=str)
def test_every_cuda_provider_builds_its_call(fake_h100, case: common.Case) -> None:
    try:
        call = common.provider_call(case)
    except common.Unavailable as why:  # the CUDA extension is not built here
        assert "slimstack._C" in str(why), why
        return
    assert callable(call)


def test_the_triton_variants_pass_the_launchers_checks(fake_h100) -> None:
    from slimstack.kernels import bitmap_gemv, sparse24_gemv
    from slimstack.kernels._checks import check_config

    by_config = set(common._TRITON_CONFIG_VARIANTS) - {"triton"}
    variants = [c for c in _distinct_provider_cases() if c.provider in by_config]
    assert {c.provider for c in variants} == by_config
    for case in variants:
        module = sparse24_gemv if case.op == "sparse24_gemv" else bitmap_gemv
        config = common._triton_variant(case, sparse24_gemv, bitmap_gemv)
        check_config(case.op, config)
        assert config != module.default_config(case.M), case  # a real variant


# ------------------------------------------------------------- extension signatures ----

GLUE_SOURCES = [Path(__file__).resolve().parents[1] / "csrc" / p for p in
                ("bindings.cpp", "cuda/glue.cpp")]  # fmt: skip


def extension_signatures() -> dict[str, inspect.Signature]:
    """The Python signature of every slimstack._C function, read from its pybind11 m.def
    (py::arg names, and which have defaults): what a call must bind to on the GPU."""
    signatures = {}
    for source in GLUE_SOURCES:
        text = source.read_text()
        for match in re.finditer(r'm\.def\(\s*"(\w+)"(.*?)\);', text, re.S):
            params = [
                inspect.Parameter(
                    arg.group(1),
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=None if arg.group(2) else inspect.Parameter.empty,
                )
                for arg in re.finditer(r'py::arg\("(\w+)"\)(\s*=)?', match.group(2))
            ]
            signatures[match.group(1)] = inspect.Signature(params)
    return signatures


def test_the_signatures_are_read_from_the_glue() -> None:
    sigs = extension_signatures()
    gemm = sigs["sparse24_gemm_sm90_cuda"]
    assert list(gemm.parameters)[:5] == ["x", "values", "meta_sm90", "N", "K"]
    assert gemm.parameters["tile"].default is None  # has a default
    assert gemm.parameters["x"].default is inspect.Parameter.empty
    assert "sparse24_gemv_cuda" in sigs and "bitmap_mm_cpu" in sigs


class SignatureCheckingExtension:
    """Stands in for slimstack._C: each function binds its arguments to the glue's signature
    (TypeError on a wrong count or keyword) and returns an empty output."""

    def __init__(self) -> None:
        self.signatures = extension_signatures()
        self.looked_up: list[str] = []

    def __getattr__(self, name: str):
        if name not in self.signatures:
            raise AttributeError(name)
        self.looked_up.append(name)
        signature = self.signatures[name]

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            x = next(iter(bound.arguments.values()))
            return torch.empty(0, dtype=x.dtype if torch.is_tensor(x) else torch.uint8)

        return call


def test_every_extension_provider_calls_the_glue_with_its_signature(
    fake_h100, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that reaches slimstack._C passes arguments the glue's m.def accepts; checked
    on a small weight, since the fake kernels compute nothing."""
    checked = set()
    for case in _distinct_provider_cases():
        fake = SignatureCheckingExtension()
        monkeypatch.setattr(common, "_extension", lambda fake=fake: fake)
        call = common.provider_call(case)
        if not fake.looked_up:  # a Triton or torch provider
            continue
        weights = common.make_weight(64, 128, case.dtype, case.weight_format, "cpu", seed=0)
        x = torch.randn(min(case.M, 4), 128, dtype=case.dtype)
        try:
            call(x, weights)
        except TypeError as err:
            raise AssertionError(f"{case}: {fake.looked_up[-1]} refuses the call: {err}") from err
        checked.add(case.provider)
    assert {"cuda", "cuda_pdl", "cuda_ring1", "cuda_sm90", "cuda_sm90_256x128"} <= checked, checked


def test_the_triton_flag_variants_name_keywords_of_their_launchers() -> None:
    """Each on/off row (triton_tile_dot, ...) turns off a keyword its launcher really takes."""
    for provider, (name, flag) in common._TRITON_FLAG_VARIANTS.items():
        launcher = getattr(common._triton_kernel(name), name)
        assert flag in inspect.signature(launcher).parameters, (provider, name, flag)
