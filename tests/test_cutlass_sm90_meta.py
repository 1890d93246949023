"""CPU tests of the CUTLASS sm90 metadata layout reference (slimstack.formats.cutlass_sm90).

The golden offsets in tests/data/cutlass_sm90_meta.json come from CUTLASS's own layout
function (tools/cutlass_sm90_meta_probe.cu); the slow test rebuilds the probe against the
installed CUTLASS headers and checks that the committed file is still what CUTLASS says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from slimstack.formats import pack_sparse24, padded_k
from slimstack.formats.cutlass_sm90 import (
    PAD_BYTE,
    reorder_meta_sm90,
    restore_meta_sm90,
    sm90_meta_nbytes,
    sm90_meta_offsets,
    sm90_meta_shape,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "cutlass_sm90_meta.json"
PROBE = REPO / "tools" / "cutlass_sm90_meta_probe.cu"


def _golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: f"N{c['n_rows']}-Kp{c['kp']}")
def test_offsets_match_cutlass_layout(case: dict) -> None:
    n_rows, kp = case["n_rows"], case["kp"]
    assert sm90_meta_shape(n_rows, kp) == (case["rows"], case["cols"])
    expected = torch.tensor(case["offsets"], dtype=torch.int64).reshape(case["rows"], case["cols"])
    assert torch.equal(sm90_meta_offsets(n_rows, kp), expected)


@pytest.mark.parametrize(
    ("n_rows", "kp"), [(1, 64), (43, 192), (64, 128), (130, 320), (4096, 4096)]
)
def test_offsets_are_a_permutation_of_the_buffer(n_rows: int, kp: int) -> None:
    offsets = sm90_meta_offsets(n_rows, kp).reshape(-1)
    nbytes = sm90_meta_nbytes(n_rows, kp)
    assert offsets.numel() == nbytes
    assert torch.equal(offsets.sort().values, torch.arange(nbytes))


def test_sizes_pad_rows_to_64_and_columns_to_128() -> None:
    assert sm90_meta_shape(1, 64) == (64, 16)
    assert sm90_meta_shape(65, 128) == (128, 16)
    assert sm90_meta_shape(64, 192) == (64, 32)
    # 7B shapes: no padding, exactly the sparse24 meta size
    assert sm90_meta_nbytes(4096, 4096) == 4096 * 4096 // 8
    assert sm90_meta_nbytes(14336, 4096) == 14336 * 4096 // 8


def test_docstring_worked_example() -> None:
    meta = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)  # N = 1, Kp = 64
    out = reorder_meta_sm90(meta)
    assert out.numel() == 1024
    positions = [0, 1, 128, 129, 4, 5, 132, 133]
    assert out[positions].tolist() == list(range(1, 9))
    rest = torch.ones(1024, dtype=torch.bool)
    rest[positions] = False
    assert bool((out[rest] == PAD_BYTE).all())


@pytest.mark.parametrize(("n", "k"), [(43, 172), (1, 64), (70, 200), (128, 384)])
def test_reorder_roundtrip_on_packed_weight(n: int, k: int, make_sparse24) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    packed = pack_sparse24(make_sparse24(n, k, torch.float16, generator=gen))
    kp = padded_k(k)
    out = reorder_meta_sm90(packed.meta)
    assert out.dtype == torch.uint8 and out.shape == (sm90_meta_nbytes(n, kp),)
    assert torch.equal(restore_meta_sm90(out, n, kp), packed.meta)
    # every byte that is not one of ours is padding
    mask = torch.ones(out.numel(), dtype=torch.bool)
    mask[sm90_meta_offsets(n, kp)[:n, : kp // 8].reshape(-1)] = False
    assert bool((out[mask] == PAD_BYTE).all())


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        sm90_meta_shape(4, 100)
    with pytest.raises(ValueError, match="n_rows"):
        sm90_meta_shape(0, 64)
    with pytest.raises(TypeError, match="ints"):
        sm90_meta_shape(4.0, 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        reorder_meta_sm90(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        reorder_meta_sm90([[0] * 8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1024 bytes"):
        restore_meta_sm90(torch.zeros(10, dtype=torch.uint8), 1, 64)


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if "CUDA_HOME" in os.environ else []
    if nvcc:
        # nvcc may be a wrapper script; ask it where its toolkit lives
        text = Path(nvcc).read_text(errors="ignore") if Path(nvcc).stat().st_size < 4096 else ""
        for word in text.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parents[1] / "include")
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cccl").is_dir() or (inc / "cuda" / "std").is_dir():
            return inc
    return None


@pytest.mark.slow
def test_golden_file_is_what_installed_cutlass_says(tmp_path: Path) -> None:
    cutlass_library = pytest.importorskip("cutlass_library")
    cuda_inc = _cuda_include()
    compiler = shutil.which("g++")
    if cuda_inc is None or compiler is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (libcu++) to build the probe")
    cutlass_inc = Path(cutlass_library.__file__).parent / "source" / "include"
    exe = tmp_path / "probe"
    cmd = [compiler, "-std=c++17", "-O0", "-x", "c++", f"-I{cutlass_inc}", f"-I{cuda_inc}"]
    if (cuda_inc / "cccl").is_dir():
        cmd.append(f"-I{cuda_inc / 'cccl'}")
    subprocess.run([*cmd, str(PROBE), "-o", str(exe)], check=True, capture_output=True, timeout=300)
    produced = json.loads(subprocess.run([str(exe)], check=True, capture_output=True).stdout)
    assert produced["cases"] == _golden_cases()
