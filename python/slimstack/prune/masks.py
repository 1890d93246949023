"""Turning importance scores into keep-masks for a pattern (True = weight is kept)."""

from __future__ import annotations

import torch

from slimstack.prune.patterns import NMPattern, Pattern, Unstructured


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the N highest-scoring weights of every M consecutive inputs of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    # stable sort so ties keep the lower index: masks are reproducible across backends
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(rows, cols)


def keep_row_top(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Keep all but the `prune` lowest scores of each row; as in `nm_mask`, ties keep the
    lower index."""
    cols = scores.shape[1]
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune > 0:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        keep.scatter_(1, order[:, cols - prune :], False)
    return keep


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest `ratio` of each row (Wanda's per-output comparison group)."""
    return keep_row_top(scores, Unstructured(ratio).pruned_count(scores.shape[1]))


def mask_for(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask for `pattern`; every method compares within each output row, as the README
    says (N:M groups run along the row, a ratio is taken per row)."""
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern)
    assert isinstance(pattern, Unstructured)
    return row_mask(scores, pattern.ratio)
