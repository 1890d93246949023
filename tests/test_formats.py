"""Packed formats: exact round trips, layout contract, refusals, safetensors files."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimstack.formats import (
    BitmapWeight,
    Sparse24Weight,
    is_sparse24,
    load_packed,
    pack_bitmap,
    pack_sparse24,
    padded_k,
    unpack_bitmap,
    unpack_sparse24,
)
from slimstack.formats import common as formats_common

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64), (43, 172), (16, 64), (7, 5), (64, 256), (3, 130)]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- sparse24


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse24_round_trip_is_bitwise(
    shape: tuple[int, int], dtype: torch.dtype, make_sparse24
) -> None:
    weight = make_sparse24(*shape, dtype=dtype, generator=gen(0))
    packed = pack_sparse24(weight)
    n, k = shape
    kp = padded_k(k)
    assert kp % 64 == 0 and kp >= k
    assert packed.values.shape == (n, kp // 2) and packed.values.dtype == dtype
    assert packed.meta.shape == (n, kp // 8) and packed.meta.dtype == torch.uint8
    assert packed.values.is_contiguous() and packed.meta.is_contiguous()
    assert packed.shape == shape and packed.dtype == dtype and packed.version == 1
    assert_bitwise_equal(unpack_sparse24(packed), weight)
    assert_bitwise_equal(packed.unpack(), weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse24_round_trip_keeps_every_16_bit_pattern(dtype: torch.dtype) -> None:
    """NaN payloads and infinities included (PyTorch's CPU gather would rewrite NaNs);
    -0.0 (0x8000) counts as a zero, which comes back as +0.0 (documented)."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    patterns = patterns[patterns != -(2**15)]  # 0x8000
    patterns = torch.cat([patterns, patterns[:1]])  # an even count: two per group of four
    dense = torch.zeros(patterns.numel() // 2, 4, dtype=torch.int16)
    dense[:, 1], dense[:, 3] = patterns[0::2], patterns[1::2]
    weight = dense.reshape(64, -1).view(dtype)
    assert_bitwise_equal(pack_sparse24(weight).unpack(), weight)


@pytest.mark.parametrize("shape", [(43, 172), (5, 64), (2, 7)])
def test_sparse24_matches_documented_column_formula(shape: tuple[int, int], make_sparse24) -> None:
    weight = make_sparse24(*shape, generator=gen(1))
    packed = pack_sparse24(weight)
    n, k = shape
    j = torch.arange(packed.kp // 2)
    meta = packed.meta.to(torch.int64)[:, j // 4]
    column = 4 * (j // 2) + ((meta >> (4 * ((j // 2) % 2) + 2 * (j % 2))) & 3)
    padded = torch.nn.functional.pad(weight, (0, packed.kp - k))
    assert torch.equal(packed.values, padded.gather(1, column))
    # i0 < i1 in every group, so the two columns of a group are strictly increasing
    assert bool((column[:, 1::2] > column[:, 0::2]).all())


def test_sparse24_uint16_reading_gives_group_nibbles(make_sparse24) -> None:
    weight = make_sparse24(4, 128, generator=gen(2))
    packed = pack_sparse24(weight)
    words = packed.meta.view(torch.int16).to(torch.int64) & 0xFFFF  # little-endian host
    for g in range(packed.kp // 4):
        nibble = (words[:, g // 4] >> (4 * (g % 4))) & 0xF
        byte_nibble = (packed.meta[:, g // 2].to(torch.int64) >> (4 * (g % 2))) & 0xF
        assert torch.equal(nibble, byte_nibble)


def test_sparse24_worked_example_from_docstring() -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    packed = pack_sparse24(weight)
    assert packed.values[0, :4].tolist() == [1.5, -2.0, 3.0, 0.0]
    assert packed.meta[0].tolist() == [0x4D] + [0x44] * 7
    assert torch.count_nonzero(packed.values[0, 4:]) == 0


def test_sparse24_short_groups_keep_lowest_zero_positions() -> None:
    # groups: no nonzeros, one at position 2, one at position 0, two at (2, 3)
    weight = torch.tensor([[0.0, 0, 0, 0, 0, 0, 5, 0, 6, 0, 0, 0, 0, 0, 7, 8]])
    packed = pack_sparse24(weight)
    nibbles = [(b >> s) & 0xF for b in packed.meta[0, :2].tolist() for s in (0, 4)]
    assert nibbles == [0 | 1 << 2, 0 | 2 << 2, 0 | 1 << 2, 2 | 3 << 2]
    assert packed.values[0, :8].tolist() == [0, 0, 0, 5, 6, 0, 7, 8]


def test_sparse24_padding_is_zero_and_k_masking_is_exact(make_sparse24) -> None:
    weight = make_sparse24(9, 70, generator=gen(3))
    packed = pack_sparse24(weight)
    assert packed.kp == 128
    # columns 72..127 are whole padding groups: stored 0.0 at positions (0, 1)
    assert torch.count_nonzero(packed.values[:, 36:]) == 0
    assert bool((packed.meta[:, 9:] == 0x44).all())
    assert unpack_sparse24(packed).shape == (9, 70)


def test_sparse24_refusal_names_first_offending_row_and_group(make_sparse24) -> None:
    weight = make_sparse24(8, 64, generator=gen(4))
    weight[3, 20:24] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # row 3, group 5
    weight[6, 0:4] = 1.0  # a later offender must not be the one reported
    assert not is_sparse24(weight)
    with pytest.raises(ValueError, match=r"row 3, group 5 \(columns 20\.\.23\) has 3 nonzeros"):
        pack_sparse24(weight)


def test_sparse24_refuses_dense_tail_group() -> None:
    weight = torch.zeros(2, 7)
    weight[1, 4:7] = 1.0  # the partial last group (columns 4..6) has 3 nonzeros
    with pytest.raises(ValueError, match=r"row 1, group 1 \(columns 4\.\.6\)"):
        pack_sparse24(weight)


def test_negative_zero_counts_as_zero() -> None:
    # masking by multiplication leaves -0.0 where negative weights were pruned
    base = torch.tensor([[-1.0, -2.0, -3.0, -4.0, 1.0, -1.0, 2.0, -2.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    weight = base * mask
    assert torch.signbit(weight[0, 1]) and weight[0, 1] == 0
    assert is_sparse24(weight)
    assert torch.equal(pack_sparse24(weight).unpack(), weight)
    assert torch.equal(pack_bitmap(weight).unpack(), weight)


def test_is_sparse24(make_sparse24) -> None:
    assert is_sparse24(make_sparse24(16, 172, generator=gen(5)))
    assert is_sparse24(torch.zeros(3, 5))
    assert not is_sparse24(torch.ones(3, 5))
    assert not is_sparse24(torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.ones(4, 8, dtype=torch.int32), TypeError, "dtypes"),
        (torch.zeros(4, 8, dtype=torch.float64), TypeError, "float64"),
        (torch.zeros(8), ValueError, "2-D"),
        (torch.zeros(0, 8), ValueError, "non-empty"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("pack", [pack_sparse24, pack_bitmap, is_sparse24])
def test_bad_inputs_are_refused(pack, weight, error, match) -> None:
    with pytest.raises(error, match=match):
        pack(weight)


def test_container_refuses_inconsistent_tensors(make_sparse24) -> None:
    packed = pack_sparse24(make_sparse24(4, 64, generator=gen(6)))
    with pytest.raises(ValueError, match="meta must be uint8"):
        Sparse24Weight(packed.values, packed.meta[:, :4].contiguous(), (4, 64), torch.float32)
    with pytest.raises(ValueError, match="values must be"):
        Sparse24Weight(packed.values.half(), packed.meta, (4, 64), torch.float32)


# ----------------------------------------------------------------------------- bitmap


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.1, 1.0])
def test_bitmap_round_trip_is_bitwise(shape, dtype, density, make_unstructured) -> None:
    weight = make_unstructured(*shape, dtype=dtype, density=density, generator=gen(7))
    packed = pack_bitmap(weight)
    n, k = shape
    assert packed.bitmask.shape == (n, padded_k(k) // 8) and packed.bitmask.dtype == torch.uint8
    assert packed.row_offsets.shape == (n + 1,) and packed.row_offsets.dtype == torch.int64
    assert packed.values.dim() == 1 and packed.values.dtype == dtype
    assert_bitwise_equal(unpack_bitmap(packed), weight)
    packed.validate()


def test_bitmap_layout_contract(make_unstructured) -> None:
    weight = make_unstructured(6, 100, density=0.4, generator=gen(8))
    packed = pack_bitmap(weight)
    offsets = packed.row_offsets
    assert int(offsets[0]) == 0 and int(offsets[-1]) == packed.values.numel()
    assert bool((offsets % 8 == 0).all())
    for n in range(6):
        bits = [(int(packed.bitmask[n, c // 8]) >> (c % 8)) & 1 for c in range(packed.kp)]
        columns = [c for c, bit in enumerate(bits) if bit]
        assert columns == weight[n].nonzero().flatten().tolist()
        start, end = int(offsets[n]), int(offsets[n + 1])
        assert end - start == -(-len(columns) // 8) * 8
        assert torch.equal(packed.values[start : start + len(columns)], weight[n, columns])
        assert torch.count_nonzero(packed.values[start + len(columns) : end]) == 0


def test_bitmap_worked_example_from_docstring() -> None:
    weight = torch.tensor(
        [[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0]]
    )
    packed = pack_bitmap(weight)
    assert packed.bitmask[:, 0].tolist() == [0x1A, 0x80]
    assert torch.count_nonzero(packed.bitmask[:, 1:]) == 0
    assert packed.values.tolist() == [1.5, -2.0, 3.0, 0, 0, 0, 0, 0, 7.0, 0, 0, 0, 0, 0, 0, 0]
    assert packed.row_offsets.tolist() == [0, 8, 16]


def test_packed_bytes_at_half_density(make_sparse24) -> None:
    n, k = 256, 512
    dense_bytes = n * k * 2
    s24 = pack_sparse24(make_sparse24(n, k, dtype=torch.float16, generator=gen(9)))
    assert s24.nbytes == n * k // 2 * 2 + n * k // 8
    assert s24.nbytes / dense_bytes <= 0.6
    keep = torch.rand(n, k, generator=gen(10)).argsort(-1) < k // 2  # exactly 50% per row
    bitmap = pack_bitmap(torch.where(keep, 1.0, 0.0).half())
    assert bitmap.nbytes == n * k // 2 * 2 + n * k // 8 + 8 * (n + 1)
    assert bitmap.nbytes / dense_bytes < 0.6


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sparse24", "bitmap"])
def test_save_load_round_trip(tmp_path, kind: str, dtype: torch.dtype, make_sparse24) -> None:
    weight = make_sparse24(43, 172, dtype=dtype, generator=gen(11))
    packed = pack_sparse24(weight) if kind == "sparse24" else pack_bitmap(weight)
    path = tmp_path / "w.safetensors"
    packed.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {
            "format": kind,
            "version": "1",
            "shape": "43,172",
            "dtype": str(dtype).removeprefix("torch."),
        }
    loaded = type(packed).load(path)
    assert loaded.shape == (43, 172) and loaded.dtype == dtype
    assert_bitwise_equal(loaded.unpack(), weight)
    generic = load_packed(path)
    assert type(generic) is type(packed)
    assert_bitwise_equal(generic.unpack(), weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_load_refuses_wrong_format_and_version(tmp_path, make_sparse24) -> None:
    path = tmp_path / "w.safetensors"
    pack_sparse24(make_sparse24(4, 64, generator=gen(12))).save(path)
    with pytest.raises(ValueError, match="not 'bitmap'"):
        BitmapWeight.load(path)
    packed = pack_sparse24(make_sparse24(4, 64, generator=gen(12)))
    tensors = {"values": packed.values, "meta": packed.meta}
    meta = {"format": "sparse24", "version": "2", "shape": "4,64", "dtype": "float32"}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="version 2"):
        Sparse24Weight.load(path)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="not a slimstack packed weight"):
        load_packed(path)


@pytest.mark.parametrize("kind", ["sparse24", "bitmap"])
@pytest.mark.parametrize("cut", ["empty", "header", "half", "last_byte"])
def test_truncated_file_is_a_value_error_naming_it(tmp_path, make_sparse24, kind, cut) -> None:
    """A truncated packed file was safetensors' SafetensorError (no file name, and not the
    ValueError every other bad file raises, so callers catching that missed it)."""
    packed = pack_sparse24(make_sparse24(43, 172, generator=gen(40)))
    packed = packed if kind == "sparse24" else pack_bitmap(packed.unpack())
    path = tmp_path / "w.safetensors"
    packed.save(path)
    data = path.read_bytes()
    keep = {"empty": 0, "header": 20, "half": len(data) // 2, "last_byte": len(data) - 1}[cut]
    path.write_bytes(data[:keep])
    for load in (type(packed).load, load_packed):
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a readable"):
            load(path)


def test_load_takes_any_torch_device_spelling(tmp_path, make_sparse24) -> None:
    """The file is parsed on CPU and the tensors moved with .to(device): safetensors itself
    refuses "cpu:0" with the error type a corrupt file raises, so it read as corrupt."""
    packed = pack_sparse24(make_sparse24(4, 64, generator=gen(42)))
    path = tmp_path / "w.safetensors"
    packed.save(path)
    for device in ("cpu:0", torch.device("cpu", 0)):
        loaded = load_packed(path, device=device)
        assert loaded.device.type == "cpu" and torch.equal(loaded.meta, packed.meta)


def test_container_refusals_on_load_name_the_file(tmp_path, make_sparse24) -> None:
    """A file whose tensors disagree with its header names the file, not only the tensor."""
    packed = pack_sparse24(make_sparse24(4, 64, generator=gen(41)))
    meta = {"format": "sparse24", "version": "1", "shape": "4,64", "dtype": "float16"}
    path = tmp_path / "w.safetensors"
    save_file({"values": packed.values, "meta": packed.meta}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: sparse24 values must be"):
        load_packed(path)


def test_load_refuses_corrupt_bitmap_offsets(tmp_path, make_unstructured) -> None:
    packed = pack_bitmap(make_unstructured(4, 64, generator=gen(13)))
    offsets = packed.row_offsets.clone()
    offsets[2] = offsets[1]  # row 1 now has an empty slot but set bits
    corrupt = BitmapWeight(packed.values, packed.bitmask, offsets, (4, 64), torch.float32)
    path = tmp_path / "w.safetensors"
    corrupt.save(path)
    with pytest.raises(ValueError, match="row 1 has more set bits"):
        BitmapWeight.load(path)


@pytest.mark.parametrize("nibble", [0x0, 0x5, 0x6, 0x1, 0xB])  # i0 == i1, or i0 > i1
def test_load_refuses_corrupt_sparse24_meta(tmp_path, make_sparse24, nibble: int) -> None:
    packed = pack_sparse24(make_sparse24(4, 64, generator=gen(16)))
    meta = packed.meta.clone()
    meta[2, 3] = (meta[2, 3] & 0x0F) | (nibble << 4)  # group 7 of row 2
    corrupt = Sparse24Weight(packed.values, meta, (4, 64), torch.float32)
    path = tmp_path / "w.safetensors"
    corrupt.save(path)
    with pytest.raises(ValueError, match=f"row 2, group 7 has nibble {nibble:#x}"):
        Sparse24Weight.load(path)
    with pytest.raises(ValueError, match="row 2, group 7"):
        load_packed(path)
    packed.save(path)
    assert torch.equal(Sparse24Weight.load(path).meta, packed.meta)


def test_load_refuses_values_stored_for_padding(tmp_path, make_sparse24) -> None:
    """K = 10: group 2 covers columns 8..11, so its kept positions may name 10 or 11 only
    with a zero value, and groups 3.. are all padding. A NaN there would reach the kernels'
    results (NaN x 0) but not unpack's: refused on load."""
    packed = pack_sparse24(make_sparse24(3, 10, generator=gen(22)))
    values = packed.values.clone()
    values[1, 20] = float("nan")  # group 10: padding
    corrupt = Sparse24Weight(values, packed.meta, (3, 10), torch.float32)
    path = tmp_path / "w.safetensors"
    corrupt.save(path)
    with pytest.raises(ValueError, match="row 1, slot 20 holds nan for a padding column"):
        Sparse24Weight.load(path)


def test_load_refuses_bitmap_bits_past_k(tmp_path, make_unstructured) -> None:
    for k, byte, bit in ((10, 1, 3), (64, 7, 7), (10, 5, 0)):
        packed = pack_bitmap(make_unstructured(3, k, generator=gen(23)))
        if k == 64:  # no padding bits at all: the pack itself must load
            packed.save(tmp_path / "ok.safetensors")
            assert torch.equal(BitmapWeight.load(tmp_path / "ok.safetensors").bitmask,
                               packed.bitmask)  # fmt: skip
            continue
        mask = packed.bitmask.clone()
        mask[2, byte] |= 1 << bit  # column 8 * byte + bit >= K
        corrupt = BitmapWeight(packed.values, mask, packed.row_offsets, (3, k), torch.float32)
        path = tmp_path / f"w{k}-{byte}.safetensors"
        corrupt.save(path)
        with pytest.raises(ValueError, match=f"row 2 keeps a padding column past K={k}"):
            BitmapWeight.load(path)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, make_sparse24) -> None:
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats_common, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        pack_sparse24(make_sparse24(4, 64, generator=gen(14))).save(tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])],
)  # fmt: skip
def test_to_device_keeps_everything(make_unstructured, device: str) -> None:
    dense = make_unstructured(5, 64, generator=gen(15))
    packed = pack_bitmap(dense)
    moved = packed.to(device)
    assert moved.shape == packed.shape and moved.dtype == packed.dtype
    assert moved.device.type == device
    assert torch.equal(moved.unpack().cpu(), dense)
    assert torch.equal(moved.to("cpu").unpack(), dense)
