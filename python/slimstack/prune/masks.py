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


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest `ratio` of each row (Wanda's per-output comparison group)."""
    rows, cols = scores.shape
    prune = Unstructured(ratio).pruned_count(cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune:
        order = torch.sort(scores, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :prune], False)
    return keep


def layer_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest `ratio` of the whole matrix (a layer-wise group; unused: all three
    methods prune within each output row, as the README says)."""
    prune = Unstructured(ratio).pruned_count(scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune:
        order = torch.sort(scores.flatten(), stable=True).indices
        keep[order[:prune]] = False
    return keep.reshape(scores.shape)


def mask_for(scores: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern)
    assert isinstance(pattern, Unstructured)
    return row_mask(scores, pattern.ratio) if per_row else layer_mask(scores, pattern.ratio)
