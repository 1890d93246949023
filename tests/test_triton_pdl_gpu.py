"""GPU test of programmatic dependent launch in the small Triton decode kernels
(kernels/_pdl.py): launched right after a kernel that writes their input, they read it."""

from __future__ import annotations

import pytest
import torch

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HOPPER, reason="programmatic dependent launch needs an sm_90 GPU"),
]


def test_pdl_kernels_wait_for_the_kernel_that_writes_their_input(monkeypatch):
    """Each small decode kernel, launched as the programmatic dependent of a kernel that has
    just written its input, reads the new input: the same bits as without PDL, and right."""
    pytest.importorskip("triton")
    from slimstack.kernels import _pdl, rmsnorm, splitk_sum, swiglu

    assert _pdl.pdl_for(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(31)
    dtype = torch.bfloat16
    fresh = [torch.randn(4, 4096, generator=gen, device="cuda").to(dtype) for _ in range(8)]
    weight = torch.randn(4096, generator=gen, device="cuda").to(dtype)
    partial = torch.randn(4, 4, 1024, generator=gen, device="cuda")
    filler = torch.empty(32 * 1024 * 1024, device="cuda")  # work queued before each writer
    x = torch.empty_like(fresh[0])
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(_pdl.ENV, flag)
        outs = []
        for f in fresh:
            filler.mul_(1.0)
            torch.mul(f, 1.0, out=x)  # a kernel, so the next launch pairs with it
            outs.append(rmsnorm.rmsnorm(x, weight))
            torch.mul(f, 1.0, out=x)
            outs.append(rmsnorm.add_rmsnorm(x, f, weight)[1])
            torch.mul(f, 1.0, out=x)
            outs.append(swiglu.swiglu(x[:, :2048], x[:, 2048:]))
            torch.mul(partial, 1.0, out=partial)
            outs.append(splitk_sum.splitk_sum(partial, dtype))
        torch.cuda.synchronize()
        runs[flag] = outs
    for with_pdl, without in zip(runs["1"], runs["0"]):
        assert torch.equal(with_pdl, without)
    for i, f in enumerate(fresh):
        got = runs["1"][4 * i : 4 * i + 4]
        torch.testing.assert_close(got[0], rmsnorm.rmsnorm_reference(f, weight))
        torch.testing.assert_close(got[1], rmsnorm.rmsnorm_reference(f + f, weight))
        torch.testing.assert_close(got[2], swiglu.swiglu_reference(f[:, :2048], f[:, 2048:]))
        torch.testing.assert_close(got[3], splitk_sum.splitk_sum_reference(partial, dtype))
