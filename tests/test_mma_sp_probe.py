"""The mma.sp fragment / metadata layout that the CUDA kernels rely on (csrc/cuda/common.cuh).

On CPU: the Python model of the layout (tests/mma_sp_layout.py) is self-consistent: the lanes'
registers hold every stored value and nibble exactly once and decode back to A. On a GPU: one
mma.sp run on registers built by that model gives A @ B, so a failure of sparse24_gemv or the
sm80 GEMM with this test passing points at their indexing, not at the layout.
"""

from __future__ import annotations

import pytest
import torch
from mma_sp_layout import a_from_fragments, accumulator, compress, fragments, random_sparse24

DTYPES = [torch.float16, torch.bfloat16]
ids = lambda v: str(v).removeprefix("torch.")  # noqa: E731


def _operands(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = random_sparse24(16, 32, dtype, gen)
    b = torch.randn(32, 8, generator=gen).to(dtype)
    return a, b


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("seed", range(3))
def test_layout_model_round_trips(dtype: torch.dtype, seed: int, selector: int) -> None:
    a, b = _operands(dtype, seed)
    a_regs, b_regs, e = fragments(a, b, selector)
    assert a_regs.shape == b_regs.shape == (32, 4) and e.shape == (32,)
    assert a_regs.dtype == b_regs.dtype == e.dtype == torch.int32
    assert torch.equal(a_from_fragments(a_regs, e, dtype, selector), a)
    # only the selected lane pair of each quad carries A's nibbles
    decoys = e[torch.arange(32) % 4 // 2 != selector]
    assert bool((decoys == 0x44444444).all())
    assert not torch.equal(a_from_fragments(a_regs, e, dtype, 1 - selector), a)
    # B: every element sits in exactly one lane's register half
    halves = b_regs.view(dtype).reshape(32, 4, 2)
    seen = torch.zeros(32, 8, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(4):
            for h in range(2):
                k = 2 * t + 8 * i + h
                assert halves[lane, i, h] == b[k, g]
                seen[k, g] += 1
    assert bool((seen == 1).all())


def test_accumulator_covers_every_output_once() -> None:
    c_regs = torch.arange(128, dtype=torch.float32).reshape(32, 4)
    c = accumulator(c_regs)
    assert not torch.isnan(c).any()
    assert sorted(c.flatten().tolist()) == list(range(128))


def test_compress_refuses_a_group_without_two_nonzeros() -> None:
    a, _ = _operands(torch.float16, 0)
    a[3, 4:8] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    with pytest.raises(AssertionError, match="exactly two nonzeros"):
        compress(a)


def _extension():
    if not torch.cuda.is_available():
        return None
    try:
        from slimstack import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "mma_sp_probe_cuda") else None


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("seed", range(4))
def test_mma_sp_on_the_documented_layout_gives_a_times_b(
    dtype: torch.dtype, seed: int, selector: int
) -> None:
    ext = _extension()
    if ext is None:
        pytest.skip("needs a GPU and slimstack._C with the CUDA kernels")
    a, b = _operands(dtype, seed)
    a_regs, b_regs, e = (t.cuda() for t in fragments(a, b, selector))
    c = accumulator(ext.mma_sp_probe_cuda(a_regs, b_regs, e, ids(dtype), selector).cpu())
    expected = a.double() @ b.double()
    # exact products of 16-bit inputs summed in fp32: only fp32 rounding of 16 terms
    torch.testing.assert_close(c.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_probe_rejects_bad_arguments() -> None:
    ext = _extension()
    if ext is None:
        pytest.skip("needs a GPU and slimstack._C with the CUDA kernels")
    regs = torch.zeros(32, 4, dtype=torch.int32, device="cuda")
    e = torch.zeros(32, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="dtype must be 'float16' or 'bfloat16'"):
        ext.mma_sp_probe_cuda(regs, regs, e, "float32")
    with pytest.raises(ValueError, match=r"b must be \[32, 4\]"):
        ext.mma_sp_probe_cuda(regs, regs[:16], e, "float16")
    with pytest.raises(ValueError, match="selector is 0 or 1"):
        ext.mma_sp_probe_cuda(regs, regs, e, "float16", 2)
