"""The native CPU decoder ops (csrc/cpu/decoder_ops.cpp) against float64 references:
shapes x dtypes x instruction sets, outputs poisoned first, strided inputs as the engine
passes them, argument errors, and the custom-op contract (opcheck, torch.compile)."""

from __future__ import annotations

import pytest
import torch

from slimstack.engine import cpu_kernels
from slimstack.engine.fused import select_kernels
from slimstack.engine.model import REFERENCE_KERNELS
from slimstack.ops.library import native_extension

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="slimstack._C not built")
ext = native_extension()
ISAS = ext.cpu_isas() if cpu_kernels.available() else []
DTYPES = [torch.float32, torch.bfloat16]
# bf16: the kernels round where the reference rounds, so a few ulps of the output's size
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(params=ISAS)
def isa(request):
    before = ext.cpu_isa()
    ext.select_cpu_isa(request.param)
    yield request.param
    ext.select_cpu_isa(before)


def _randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _poison(like: torch.Tensor) -> torch.Tensor:
    return torch.full(like.shape, float("nan"), dtype=like.dtype)


def _close(got: torch.Tensor, want64: torch.Tensor, dtype) -> None:
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got.double(), want64, **TOL[dtype])


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 2048), (3, 172), (17, 43), (64, 2048), (2, 1)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm(isa, dtype, rows, hidden, with_delta):
    # x as the engine's last-token view: rows strided by a longer sequence
    x = _randn(rows, 3, hidden, dtype=dtype, seed=rows + hidden)[:, 1]
    delta = _randn(rows, hidden, dtype=dtype, seed=7) if with_delta else None
    weight = _randn(hidden, dtype=dtype, seed=8)
    eps = 1e-5
    out, total = _poison(x), _poison(x) if with_delta else None
    if with_delta:
        ext.add_rms_norm_cpu(x, delta, weight, eps, total, out)
        allocated = ext.add_rms_norm_cpu(x, delta, weight, eps)  # outputs made by the op
        assert torch.equal(allocated[0], total) and torch.equal(allocated[1], out)
    else:
        ext.rms_norm_cpu(x, weight, eps, out)
        assert torch.equal(ext.rms_norm_cpu(x, weight, eps), out)
    want_total = (x.double() + delta.double()).to(dtype) if with_delta else x
    if with_delta:
        assert torch.equal(total, want_total)  # one correctly rounded add
    t = want_total.double()
    want = weight.double() * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    _close(out, want, dtype)


def test_rms_norm_matches_the_reference_bits_in_bf16():
    x, delta = (
        _randn(5, 2048, dtype=torch.bfloat16, seed=1),
        _randn(5, 2048, dtype=torch.bfloat16, seed=2),
    )
    weight = _randn(2048, dtype=torch.bfloat16, seed=3)
    total, out = cpu_kernels.add_rms_norm(x, delta, weight, 1e-6)
    ref_total, ref_out = REFERENCE_KERNELS.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, ref_total)
    assert (out.float() - ref_out.float()).abs().max() <= 2**-7 * ref_out.float().abs().max()


# ----------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inter", [(1, 5632), (3, 172), (4, 43), (33, 4096)])
def test_swiglu(isa, dtype, rows, inter):
    fused = _randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=4.0)
    gate, up = fused.chunk(2, dim=-1)  # strided halves, as the fused gate/up projection gives
    out = _poison(gate)
    ext.swiglu_cpu(gate, up, out)
    assert torch.equal(ext.swiglu_cpu(gate[:, None], up[:, None]), out[:, None])  # N-D rows
    g = gate.double()
    _close(out, g * torch.sigmoid(g) * up.double(), dtype)


def test_swiglu_saturates_without_overflow():
    gate = torch.tensor([[-200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0, 1e30]])
    up = torch.ones_like(gate)
    out = _poison(gate)
    ext.swiglu_cpu(gate, up, out)
    want = (gate.double() * torch.sigmoid(gate.double())).float()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- rotary
ROPE_SHAPES = [(1, 1, 32, 64), (2, 3, 5, 16), (1, 7, 3, 6), (3, 1, 4, 128), (1, 2, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope(isa, dtype, shape):
    B, S, H, D = shape
    x = _randn(B, S, H + 2, D, dtype=dtype, seed=D)[:, :, 1 : H + 1]  # strided heads
    cos, sin = _randn(B, S, D, dtype=dtype, seed=1), _randn(B, S, D, dtype=dtype, seed=2)
    out = _poison(x)
    ext.rope_cpu(x, cos, sin, out)
    assert torch.equal(ext.rope_cpu(x, cos, sin), out)
    want = (
        x.double() * cos.double()[:, :, None] + _rotate_half(x.double()) * sin.double()[:, :, None]
    )
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, D, T", [(32, 4, 64, 256), (6, 2, 16, 37), (3, 3, 6, 5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_rope_to_cache_writes_only_the_slot(isa, dtype, heads, kv_heads, D, T, batch):
    width = (heads + 2 * kv_heads) * D
    qkv = _randn(batch, 1, width, dtype=dtype, seed=heads)
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q, k, v = (t.view(batch, 1, -1, D) for t in (q, k, v))  # views into qkv, as the engine's
    cos, sin = _randn(batch, 1, D, dtype=dtype, seed=3), _randn(batch, 1, D, dtype=dtype, seed=4)
    k_cache = _randn(batch, kv_heads, T, D, dtype=dtype, seed=5)
    v_cache = _randn(batch, kv_heads, T, D, dtype=dtype, seed=6)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slot = T - 2 if T > 2 else 0
    q_out = _poison(q)
    ext.rope_to_cache_cpu(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([slot]), q_out)

    def rotated(x):
        return (
            x.double() * cos.double()[:, :, None]
            + _rotate_half(x.double()) * sin.double()[:, :, None]
        )

    _close(q_out, rotated(q), dtype)
    _close(k_cache[:, :, slot], rotated(k)[:, 0], dtype)
    assert torch.equal(v_cache[:, :, slot], v[:, 0])
    others = torch.arange(T) != slot
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


# ----------------------------------------------------------------------------- attention
def _attention64(q, k, v, mask):
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


ATTENTION_SHAPES = [(1, 4, 8, 256, 64), (2, 3, 1, 37, 16), (1, 2, 7, 300, 128), (3, 1, 5, 5, 6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_decode_attention(isa, dtype, shape):
    B, Hkv, G, T, D = shape
    # q as the engine passes it: the query heads of a [B, 1, H, D] tensor grouped by kv head
    q = _randn(B, 1, Hkv * G, D, dtype=dtype, seed=T).transpose(1, 2).reshape(B, Hkv, G, D)
    k, v = _randn(B, Hkv, T, D, dtype=dtype, seed=1), _randn(B, Hkv, T, D, dtype=dtype, seed=2)
    gen = torch.Generator().manual_seed(T)
    mask = torch.rand(B, 1, 1, T, generator=gen) < 0.6
    mask[..., 0] = True  # every row sees something
    out = _poison(q)
    ext.decode_attention_cpu(q, k, v, mask, out)
    _close(out, _attention64(q, k, v, mask), dtype)
    assert torch.equal(ext.decode_attention_cpu(q, k, v, mask), out)


def test_decode_attention_reads_no_masked_slot_and_zeros_a_blind_row():
    B, Hkv, G, T, D = 2, 2, 3, 40, 16
    q = _randn(B, Hkv, G, D, dtype=torch.float32, seed=0)
    k, v = (
        _randn(B, Hkv, T, D, dtype=torch.float32, seed=1),
        _randn(B, Hkv, T, D, dtype=torch.float32, seed=2),
    )
    mask = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., 5:17] = True  # row 1 sees nothing
    k[0, :, 20:], v[0, :, 20:] = float("nan"), float("nan")  # masked: must never be read
    out = _poison(q)
    ext.decode_attention_cpu(q, k, v, mask, out)
    _close(
        out[:1],
        _attention64(q[:1], k[:1].nan_to_num(), v[:1].nan_to_num(), mask[:1]),
        torch.float32,
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# ----------------------------------------------------------------------------- errors
def test_argument_errors_name_what_is_wrong():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(TypeError, match="take float32 or bfloat16, got Half"):
        ext.rms_norm_cpu(x.half(), w.half(), 1e-5, torch.empty(2, 8, dtype=torch.half))
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        ext.rms_norm_cpu(x, torch.randn(7), 1e-5, torch.empty(2, 8))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        ext.rms_norm_cpu(x, w, 1e-5, x)
    with pytest.raises(ValueError, match=r"sum_out must be \[2, 8\], got \[2, 7\]"):
        ext.add_rms_norm_cpu(x, torch.randn(2, 8), w, 1e-5, torch.empty(2, 7))
    with pytest.raises(ValueError, match=r"delta must be \[2, 8\]"):
        ext.add_rms_norm_cpu(x, torch.randn(8), w, 1e-5)
    with pytest.raises(TypeError, match="must be BFloat16 like the first input"):
        ext.swiglu_cpu(x.bfloat16(), x, torch.empty(2, 8, dtype=torch.bfloat16))
    q, cs = torch.randn(1, 1, 2, 6), torch.randn(1, 1, 6)
    with pytest.raises(ValueError, match="head size must be even"):
        ext.rope_cpu(
            torch.randn(1, 1, 2, 5),
            torch.randn(1, 1, 5),
            torch.randn(1, 1, 5),
            torch.empty(1, 1, 2, 5),
        )
    cache = torch.randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match="slot 4 is outside the cache's 4 slots"):
        ext.rope_to_cache_cpu(
            q, q, q, cs, cs, cache, cache.clone(), torch.tensor([4]), torch.empty_like(q)
        )
    with pytest.raises(ValueError, match=r"mask must be a CPU \[1, 1, 1, 4\] tensor"):
        ext.decode_attention_cpu(
            q.view(1, 2, 1, 6),
            cache,
            cache,
            torch.ones(1, 4, dtype=torch.bool),
            torch.empty(1, 2, 1, 6),
        )
    # the KV cache is written in place: a cache strided in its last dimension is refused
    strided_cache = torch.randn(1, 2, 6, 4).transpose(-1, -2)
    with pytest.raises(ValueError, match="k_cache must be contiguous in its last dimension"):
        ext.rope_to_cache_cpu(q, q, q, cs, cs, strided_cache, cache, torch.tensor([0]))


def test_inputs_strided_in_their_last_dimension_are_copied():
    x, w = torch.randn(8, 2).t(), torch.randn(8)  # [2, 8], column stride 2
    torch.testing.assert_close(
        ext.swiglu_cpu(x, x), REFERENCE_KERNELS.swiglu(x, x), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        ext.rms_norm_cpu(x, w, 1e-5), REFERENCE_KERNELS.rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-6
    )
    q = torch.randn(1, 1, 2, 6, 2)[..., 0]  # [1, 1, 2, 6], last stride 2
    cos, sin = torch.randn(1, 1, 6), torch.randn(1, 1, 6)
    want = REFERENCE_KERNELS.rotary(q, q, cos, sin)[0]
    torch.testing.assert_close(ext.rope_cpu(q, cos, sin), want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- custom ops
def _samples():
    x, d, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    qkv = torch.randn(2, 1, 8 * 16)
    q, k, v = (t.view(2, 1, -1, 16) for t in qkv.split([64, 32, 32], dim=-1))
    cos, sin = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    cache_k, cache_v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 1, 9) < 0.7
    mask[..., 0] = True
    return [
        (cpu_kernels.rms_norm_op, (x, w, 1e-5)),
        (cpu_kernels.add_rms_norm_op, (x, d, w, 1e-5)),
        (cpu_kernels.swiglu_op, tuple(torch.randn(3, 80).chunk(2, dim=-1))),
        (cpu_kernels.rotary_op, (q, k, cos, sin)),
        (cpu_kernels.rotary_to_cache_op, (q, k, v, cos, sin, cache_k, cache_v, torch.tensor([4]))),
        (cpu_kernels.decode_attention_op, (torch.randn(2, 2, 2, 16), cache_k, cache_v, mask)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _samples()[index]
    torch.library.opcheck(op, args)


def test_ops_under_torch_compile_match_eager():
    import torch._dynamo

    torch._dynamo.reset()
    x, d, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    gate_up = torch.randn(3, 80)

    def step(x, d, w, gate_up):
        total, normed = cpu_kernels.add_rms_norm(x, d, w, 1e-5)
        return total, cpu_kernels.swiglu(*gate_up.chunk(2, dim=-1)) + normed.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, d, w, gate_up), step(x, d, w, gate_up)):
        assert torch.equal(got, want)


def test_half_runs_the_references():
    x, d, w = torch.randn(2, 16).half(), torch.randn(2, 16).half(), torch.randn(16).half()
    got = cpu_kernels.add_rms_norm(x, d, w, 1e-5)
    want = REFERENCE_KERNELS.add_rms_norm(x, d, w, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    gate, up = torch.randn(2, 16).half(), torch.randn(2, 16).half()
    assert torch.equal(cpu_kernels.swiglu(gate, up), REFERENCE_KERNELS.swiglu(gate, up))


def test_cpu_engine_selects_native_and_refuses_it_on_cuda():
    assert select_kernels("cpu").name == "native"
    assert select_kernels("cpu", "torch") is REFERENCE_KERNELS
    with pytest.raises(ValueError, match="native decoder kernels are CPU kernels"):
        select_kernels("cuda", "native")
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, triton, native"):
        select_kernels("cpu", "fast")
