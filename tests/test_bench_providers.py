"""Every provider of the GPU kernel suite builds its call on CPU (bench/common.py).

The CUDA cases only run on a lent GPU, where a typo in a new provider row (a wrong keyword,
a config the launcher refuses) would cost lease time: here each case's call is built with the
device properties faked, and each Triton variant's config passes the launcher's own checks.
"""

from __future__ import annotations

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

    by_config = {"triton_n8", "triton_w8", "triton_n16", "triton_split2x"}
    variants = [c for c in _distinct_provider_cases() if c.provider in by_config]
    assert {c.provider for c in variants} == by_config
    for case in variants:
        module = sparse24_gemv if case.op == "sparse24_gemv" else bitmap_gemv
        config = common._triton_variant(case, sparse24_gemv, bitmap_gemv)
        check_config(case.op, config)
        assert config != module.default_config(case.M), case  # a real variant
