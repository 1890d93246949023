"""The CPU loader's huge-page weights: same bits, advised mappings, ties and sharing kept,
mappings released, and a switch that turns it off."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from engine_support import single_thread, write_tiny_model  # noqa: F401
from torch import nn

from slimstack.engine import huge_pages
from slimstack.engine.loader import load

needs_thp = pytest.mark.skipif(
    not huge_pages.available(), reason="no transparent huge pages (madvise) on this machine"
)


def _mapping_flags(address: int) -> list[str] | None:
    """VmFlags of the mapping holding `address` in /proc/self/smaps (None: unmapped)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return None


def _advised(tensor: torch.Tensor) -> bool:
    flags = _mapping_flags(tensor.data_ptr())
    return flags is not None and "hg" in flags  # "hg": the mapping is MADV_HUGEPAGE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
@pytest.mark.parametrize("shape", [(43, 172), (1,), (3, 5, 7), (0, 4)])
def test_copy_is_bitwise_and_in_an_advised_mapping(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        source = torch.randn(shape, generator=gen).to(dtype)
    else:
        source = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=dtype)
    copy = huge_pages.huge_page_copy(source)
    assert copy.dtype == dtype and copy.shape == source.shape and copy.is_contiguous()
    assert copy.numel() == 0 or copy.data_ptr() != source.data_ptr()
    assert torch.equal(copy.view(torch.uint8), source.contiguous().view(torch.uint8))
    if huge_pages.available() and copy.numel():
        assert _advised(copy)
        assert not _advised(source)  # torch's own allocation: the control


def test_copy_of_a_strided_view_is_its_values():
    source = torch.randn(16, 32).t()[3:, ::2]
    copy = huge_pages.huge_page_copy(source)
    assert copy.is_contiguous() and torch.equal(copy, source)


def test_copy_refuses_non_cpu_tensors():
    with pytest.raises(ValueError, match="huge pages are for CPU tensors, got one on meta"):
        huge_pages.huge_page_copy(torch.empty(4, device="meta"))


@needs_thp
def test_mapping_is_released_with_its_tensor():
    copy = huge_pages.huge_page_copy(torch.randn(3 << 20))  # 12 MB
    address = copy.data_ptr()
    view = copy[5:]  # a view keeps the storage, so the mapping, alive
    del copy
    gc.collect()
    assert _mapping_flags(address) is not None
    del view
    gc.collect()
    assert _mapping_flags(address) is None


def test_switch_and_platform(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    assert not huge_pages.available()
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "1")
    monkeypatch.setattr(huge_pages, "_THP_SETTING", Path("/nonexistent/enabled"))
    assert not huge_pages.available()


@pytest.mark.parametrize(
    "setting, expected",
    [("always [madvise] never\n", True), ("[always] madvise never\n", True),
     ("always madvise [never]\n", False)],
)  # fmt: skip
def test_kernel_setting_decides(tmp_path, monkeypatch, setting, expected):
    monkeypatch.delenv(huge_pages.ENV_SWITCH, raising=False)
    path = tmp_path / "enabled"
    path.write_text(setting)
    monkeypatch.setattr(huge_pages, "_THP_SETTING", path)
    assert huge_pages.available() is expected


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(64, 32, bias=False)
        self.tied = nn.Linear(64, 32, bias=False)
        self.tied.weight = self.big.weight
        self.small = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("table", torch.randn(40, 8))
        self.register_buffer("window", torch.randn(100)[10:60])  # a view: stays
        self.child = nn.Module()
        self.child.register_buffer("table", self.table)  # the same buffer in two modules


def test_move_weights_keeps_values_ties_and_views():
    torch.manual_seed(0)
    model = _Shared()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    window_ptr, small_ptr = model.window.data_ptr(), model.small.data_ptr()
    moved = huge_pages.move_weights(model, min_bytes=1024)
    # big.weight (8 KB, once for both ties) and table (1.25 KB, once for both modules)
    assert moved == 64 * 32 * 4 + 40 * 8 * 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.tied.weight is model.big.weight
    assert model.child.table is model.table
    assert model.window.data_ptr() == window_ptr and model.small.data_ptr() == small_ptr
    if huge_pages.available():
        assert _advised(model.big.weight) and _advised(model.table)
    x = torch.randn(2, 64)
    assert torch.equal(model.big(x), x @ before["big.weight"].T)


@needs_thp
def test_loader_moves_large_weights_and_changes_no_result(tmp_path, monkeypatch):
    # embed (tied lm_head) 4096 x 256 fp32: 4 MiB; gate_up 2048 x 256 fp32: 2 MiB
    folder = write_tiny_model(
        tmp_path / "m", "llama", vocab_size=4096, hidden_size=256, intermediate_size=1024,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    plain = load(folder, device="cpu", dtype=torch.float32)
    monkeypatch.delenv(huge_pages.ENV_SWITCH)
    model = load(folder, device="cpu", dtype=torch.float32)
    assert plain.huge_page_nbytes == 0 and not _advised(plain.embed_tokens.weight)
    layers = len(model.layers)
    assert model.huge_page_nbytes == 4096 * 256 * 4 + layers * 2048 * 256 * 4
    assert model.info().huge_page_nbytes == model.huge_page_nbytes
    assert "in huge pages" in model.info().table()
    assert model.lm_head.weight is model.embed_tokens.weight
    assert _advised(model.embed_tokens.weight)
    assert _advised(model.layers[0].mlp.gate_up_proj.weight)
    assert not _advised(model.layers[0].mlp.down_proj.weight)  # 1 MiB: stays
    prompts = [[5, 17, 300, 4000, 9], [1, 2, 3]]
    ids = torch.tensor([[5, 17, 300, 4000, 9]])
    assert torch.equal(model.logits(ids), plain.logits(ids))
    assert (
        model.generate(prompts, max_new_tokens=6).token_ids
        == plain.generate(prompts, max_new_tokens=6).token_ids
    )
