"""Shared test fixtures: paths to the shared model/data and sparse weight factories."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_ENV = "SLIMSTACK_SHARED"


def find_shared_dir(repo: Path = REPO_DIR) -> Path:
    """The shared models/data: $SLIMSTACK_SHARED, else ``../shared`` beside the checkout
    (developer machines, CI), else ``shared/`` inside it. The lent GPU machine receives the
    checkout alone (``../shared`` never travels, a ``shared/`` inside it does), so a GPU run
    copies the folder in; without this fallback every test of stories260K skipped there."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    beside, inside = repo.parent / "shared", repo / "shared"
    return inside if not beside.is_dir() and inside.is_dir() else beside


SHARED_DIR = find_shared_dir()


def _missing(what: str) -> None:
    """Outside CI a checkout without the shared folder skips these tests; in CI it is an error."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI runs with ../shared beside the checkout)")
    pytest.skip(f"{what} (put the shared folder beside the checkout or in it, or set {SHARED_ENV})")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED_DIR


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    path = SHARED_DIR / "models" / "stories260K"
    if not path.is_dir():
        _missing(f"tiny model not found at {path}")
    return path


def _away_from_zero(values: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Shift values away from 0 so that "kept" entries never round to zero in fp16/bf16."""
    return torch.where(values >= 0, values + margin, values - margin)


def random_sparse24(
    n: int, k: int, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random [n, k] weight with exactly 2 nonzeros in every full group of 4 along K."""
    groups = -(-k // 4)
    scores = torch.rand(n, groups, 4, generator=generator)
    keep = torch.zeros(n, groups, 4, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(2, dim=-1).indices, True)
    dense = _away_from_zero(torch.randn(n, groups * 4, generator=generator))
    return torch.where(keep.reshape(n, -1), dense, 0.0)[:, :k].to(dtype).contiguous()


def random_unstructured(
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random [n, k] weight with about ``density`` of its entries nonzero (uneven rows)."""
    keep = torch.rand(n, k, generator=generator) < density
    dense = _away_from_zero(torch.randn(n, k, generator=generator))
    return torch.where(keep, dense, 0.0).to(dtype).contiguous()


@pytest.fixture
def make_sparse24() -> Callable[..., torch.Tensor]:
    return random_sparse24


@pytest.fixture
def make_unstructured() -> Callable[..., torch.Tensor]:
    return random_unstructured


@pytest.fixture
def make_weight() -> Callable[..., tuple[torch.Tensor, object]]:
    """make_weight(fmt, n, k, dtype, seed) -> (dense masked weight, its packed form)."""
    from slimstack.formats import pack_bitmap, pack_sparse24

    def make(fmt: str, n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        if fmt == "sparse24":
            dense = random_sparse24(n, k, dtype=dtype, generator=generator)
            return dense, pack_sparse24(dense)
        dense = random_unstructured(n, k, dtype=dtype, density=0.5, generator=generator)
        return dense, pack_bitmap(dense)

    return make


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    path = SHARED_DIR / "data" / "wikitext-2"
    if not path.is_dir():
        _missing(f"wikitext-2 not found at {path}")
    return path


def write_tiny_checkpoint(
    folder: Path, model_type: str = "llama", layers: int = 2, seed: int = 0, **overrides
) -> Path:
    """A random tiny HF checkpoint of a supported family, saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    def make(model_type: str = "llama", name: str = "tiny", **kwargs) -> Path:
        return write_tiny_checkpoint(tmp_path / name, model_type, **kwargs)

    return make


def _cuda_extension_built() -> bool:
    try:
        from slimstack import _C
    except ImportError:
        return False
    return bool(getattr(_C, "with_cuda", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip without a CUDA device, `cuda_ext` tests without the CUDA build of
    slimstack._C, whatever each test file checks itself."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_ext = pytest.mark.skip(reason="needs slimstack._C built with CUDA")
    has_gpu = torch.cuda.is_available()
    has_ext = _cuda_extension_built() if has_gpu else False
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(no_gpu)
        elif item.get_closest_marker("cuda_ext") and not has_ext:
            item.add_marker(no_ext)
