"""The engine with the Triton RMSNorm / RoPE / SwiGLU bundle, run by Triton's interpreter on
CPU: the in-place RoPE on strided views of the fused q/k/v output, padding and decode must
give the torch reference's logits and tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_support import interpreter_problem

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from slimstack.engine.fused import triton_kernels
from slimstack.engine.loader import load
from slimstack.engine.model import REFERENCE_KERNELS

model = load(sys.argv[1], device="cpu")
ids = torch.tensor([[1, 400, 33, 95, 7, 300, 21]] * 2)
mask = torch.ones_like(ids)
mask[1, :3] = 0
reference = model.logits(ids, mask)
prompts = [[1, 400, 33], [1, 5]]
expected = model.generate(prompts, max_new_tokens=8).token_ids
model.kernels = triton_kernels()
assert model.kernels.name == "triton" and model.kernels is not REFERENCE_KERNELS
error = (model.logits(ids, mask) - reference).abs().max().item()
assert error < 1e-4, error
assert model.generate(prompts, max_new_tokens=8).token_ids == expected
print("ok", error)
"""


@pytest.mark.interpreter
def test_triton_bundle_matches_torch_reference(stories260k_dir: Path, tmp_path: Path) -> None:
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    # weights and config only: no tokenizer, so the child does not import transformers
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(stories260k_dir / name)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
