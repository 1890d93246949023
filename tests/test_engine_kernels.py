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


def test_every_residual_add_runs_inside_a_norm(stories260k_dir: Path) -> None:
    """One decode step of L layers: one plain norm (the first layer's input) and 2L fused
    add + norm launches (L - 1 layer inputs, L post-attention, the final norm), with the
    same logits as the model's own bundle."""
    import dataclasses

    import torch

    from slimstack.engine.loader import load

    model = load(stories260k_dir, device="cpu")
    calls = {"rms_norm": 0, "add_rms_norm": 0}
    own = model.kernels

    def counting(name):
        def call(*args):
            calls[name] += 1
            return getattr(own, name)(*args)

        return call

    spy = dataclasses.replace(
        own, rms_norm=counting("rms_norm"), add_rms_norm=counting("add_rms_norm")
    )
    model.setup_cache(1, 16)
    model.prefill(torch.tensor([[1, 400, 33]]), [0])
    slot, token = torch.tensor([3]), torch.tensor([[95]])
    expected = model.decode(token, slot)
    got = model.decode(token, slot, kernels=spy)
    layers = model.config.num_layers
    assert calls == {"rms_norm": 1, "add_rms_norm": 2 * layers}
    assert torch.equal(got, expected)
