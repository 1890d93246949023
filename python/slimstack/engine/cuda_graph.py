"""Decode-step runners: eager, one captured CUDA graph, or torch.compile(reduce-overhead).

Each runner owns static input buffers (`tokens` [B, 1], `slot` [1]) that the generate loop
writes in place on the device; `step()` returns the logits [B, V] of the token at `slot`.
The model's static KV cache makes the whole step shape-stable, so a graph captured once
per (batch, cache length) replays every token: one launch instead of hundreds, and no
host sync.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slimstack.engine.model import REFERENCE_KERNELS, DecoderModel

MODES = ("auto", "eager", "graph", "compile")
_WARMUP_STEPS = 2  # Triton JIT, cuBLAS workspaces, SDPA backend choice happen before capture


class DecodeRunner(Protocol):
    tokens: torch.Tensor
    slot: torch.Tensor

    def step(self) -> torch.Tensor: ...


class EagerRunner:
    def __init__(self, model: DecoderModel) -> None:
        cache = model._require_cache()
        self.model = model
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=model.device)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        return self.model.decode(self.tokens, self.slot)


class GraphRunner(EagerRunner):
    """model.decode captured as one CUDA graph against the model's current cache.

    Capture happens at construction, before any prefill: the warm-up and capture steps
    write garbage keys/values at the cache's last slot, which every real sequence
    overwrites before reading (a slot is written by the step that attends to it first).
    """

    def __init__(self, model: DecoderModel) -> None:
        super().__init__(model)
        if model.device.type != "cuda":
            raise ValueError(
                "CUDA graphs need a CUDA model; use mode='eager' (--mode eager) on CPU"
            )
        self.slot.fill_(model._require_cache().length - 1)
        # capture and replay on the model's device, whichever device is current (cuda:1)
        with torch.cuda.device(model.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(_WARMUP_STEPS):
                    model.decode(self.tokens, self.slot)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = model.decode(self.tokens, self.slot)

    def step(self) -> torch.Tensor:
        with torch.cuda.device(self.model.device):
            self.graph.replay()
        return self.logits


class CompiledRunner(EagerRunner):
    """torch.compile(mode="reduce-overhead"): inductor fuses the elementwise torch ops (so
    the reference kernels are used) and cudagraph trees replay the step."""

    def __init__(self, model: DecoderModel) -> None:
        super().__init__(model)

        def decode(tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
            return model.decode(tokens, slot, kernels=REFERENCE_KERNELS)

        self.compiled = torch.compile(decode, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(self.tokens, self.slot)


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode in ("graph", "compile") and device.type != "cuda":
        raise ValueError(
            f"mode={mode!r} needs a CUDA device; use mode='eager' (--mode eager) on CPU"
        )
    return mode


def decode_runner(model: DecoderModel, mode: str = "auto") -> DecodeRunner:
    """The runner for the model's current cache, built (and captured) on first use."""
    mode = resolve_mode(mode, model.device)
    runner = model._decoders.get(mode)
    if runner is None:
        runner = {"eager": EagerRunner, "graph": GraphRunner, "compile": CompiledRunner}[mode](
            model
        )
        model._decoders[mode] = runner
    return runner
