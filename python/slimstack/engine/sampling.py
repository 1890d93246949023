"""Next-token choice on the device: greedy, temperature, top-k, top-p; no host sync.

Sampling draws from the categorical distribution with the exponential race
(argmax of p_i / E_i with E_i ~ Exp(1)), which needs no cumulative sum search and no
`.item()`, and takes an explicit generator so that a seed reproduces a run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(
                f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}"
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the ones before it already reach p
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Token ids [B] (long) from fp32 logits [B, V]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # Shifted so the best logit is 0 first: a tiny temperature then sends the others to
    # -inf instead of every logit to +-inf (whose softmax is NaN, silently token 0).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k is not None:
        logits = filter_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`: seeded for reproducible runs, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
