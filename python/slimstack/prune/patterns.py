"""Sparsity patterns: parsing user specs ("2:4", "0.5", "50%") and checking weights."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
ALLOWED = (
    "an N:M pattern with 0 < N < M (e.g. 2:4, 4:8, 1:4), or a ratio 0 < s < 1 (e.g. 0.5 or 50%)"
)


class PatternError(ValueError):
    """A sparsity spec or a weight that does not fit its pattern."""


@dataclass(frozen=True)
class NMPattern:
    """N of every M consecutive weights along the input dimension are kept."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if shape[-1] % self.m:
            raise PatternError(
                f"{name} has shape {tuple(shape)}: in_features {shape[-1]} is not divisible by "
                f"M={self.m} of pattern {self}; exclude it (--exclude) or choose another pattern"
            )


@dataclass(frozen=True)
class Unstructured:
    """A fraction `ratio` of the weights is pruned (0 < ratio < 1)."""

    ratio: float

    @property
    def sparsity(self) -> float:
        return self.ratio

    def __str__(self) -> str:
        return f"{self.ratio:g}"

    def pruned_count(self, total: int) -> int:
        """How many of `total` weights the ratio prunes: floor(total x ratio), with a float
        product just below a whole number (0.29 x 100 = 28.999...) counted as that number."""
        return int(total * self.ratio + 1e-9)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self.pruned_count(shape[-1]) == 0:
            raise PatternError(
                f"sparsity {self} prunes none of the {shape[-1]} inputs per row of {name}; "
                f"use a ratio of at least 1/{shape[-1]} ({1 / shape[-1]:.3g})"
            )


Pattern = NMPattern | Unstructured


def parse_pattern(spec: str | float | Pattern) -> Pattern:
    """'2:4' -> NMPattern(2, 4); '0.5' or '50%' or 0.5 -> Unstructured(0.5)."""
    if isinstance(spec, NMPattern | Unstructured):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return _ratio(float(spec), str(spec))
    if not isinstance(spec, str):
        raise PatternError(f"sparsity must be a string or a number, got {type(spec).__name__}")
    if match := _NM_RE.match(spec):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise PatternError(f"invalid N:M pattern {spec!r}: need 0 < N < M; allowed: {ALLOWED}")
        return NMPattern(n, m)
    if match := _PERCENT_RE.match(spec):
        return _ratio(float(match.group(1)) / 100.0, spec)
    try:
        value = float(spec)
    except ValueError:
        raise PatternError(f"unrecognised sparsity {spec!r}; allowed: {ALLOWED}") from None
    return _ratio(value, spec)


def _ratio(value: float, spec: str) -> Unstructured:
    if not 0.0 < value < 1.0:
        raise PatternError(f"sparsity {spec!r} is outside (0, 1); allowed: {ALLOWED}")
    return Unstructured(value)


def follows_nm(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M along the last dim has at most N nonzeros."""
    if weight.shape[-1] % pattern.m:
        return False
    groups = (weight != 0).reshape(*weight.shape[:-1], -1, pattern.m).sum(-1)
    return bool((groups <= pattern.n).all())
