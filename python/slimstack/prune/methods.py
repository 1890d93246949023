"""Pruning methods on one weight matrix: magnitude, Wanda, SparseGPT.

Each takes an fp32 weight [out, in], the statistics of that layer's inputs it needs, and a
pattern, and returns the pruned weight. Unstructured ratios are applied within each output
row for all three (Wanda's comparison group; it also gives every row the same count, which
the bitmap kernels like). N:M groups run along the input dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimstack.prune.masks import keep_row_top, mask_for, nm_mask
from slimstack.prune.patterns import NMPattern, Pattern, Unstructured

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs over the calibration tokens."""

    features: int
    want_hessian: bool = False
    tokens: int = 0
    sq_norms: torch.Tensor | None = None  # [in]: sum over tokens of x_j^2
    hessian: torch.Tensor | None = field(default=None, repr=False)  # [in, in]: sum of x x^T
    # (percdamp, factor, dead) of inverse_hessian_factor, until the next update
    _inverse: tuple[float, torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def update(self, x: torch.Tensor) -> None:
        self._inverse = None
        x = x.reshape(-1, self.features).float()
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(self.features, device=x.device)
            if self.want_hessian:
                self.hessian = torch.zeros(self.features, self.features, device=x.device)
        self.sq_norms += x.square().sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def inverse_hessian_factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT's upper Cholesky factor of the damped inverse of H = 2 X X^T / tokens,
        and the dead inputs (never nonzero; their diagonal is set to 1). Computed once per
        input: the linears that share it (q/k/v, gate/up) take the same factor."""
        if self.hessian is None:
            raise ValueError("sparsegpt needs the input Hessian (InputStats(want_hessian=True))")
        if self._inverse is None or self._inverse[0] != percdamp:
            hessian = 2.0 * self.hessian / max(self.tokens, 1)
            dead = torch.diag(hessian) == 0
            hessian[dead, dead] = 1.0
            damp = percdamp * torch.diag(hessian).mean()
            hessian += damp * torch.eye(self.features, device=hessian.device)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
            self._inverse = (percdamp, torch.linalg.cholesky(inverse, upper=True), dead)
        return self._inverse[1], self._inverse[2]


class LayerInputs:
    """InputStats for the linears of one layer, one per distinct input tensor.

    q/k/v (and gate/up) are called on the very same tensor object, so they share one
    InputStats: a SparseGPT Hessian [in, in] is accumulated and held once per input rather
    than once per linear (a Llama layer: 4 instead of 7, the largest 14336^2 kept alone).
    Sharing is decided by object identity, which is safe because the last input is held
    (its id cannot be reused while it is alive); the grouping found on the first batch must
    repeat on every later one.
    """

    def __init__(self, want_hessian: bool) -> None:
        self.want_hessian = want_hessian
        self.by_module: dict[str, InputStats] = {}
        self._followers: set[str] = set()  # modules that reuse the previous module's stats
        self._last: tuple[torch.Tensor, InputStats] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        first_batch = name not in self.by_module
        shares = self._last is not None and self._last[0] is x
        if not first_batch and shares != (name in self._followers):
            raise RuntimeError(f"{name}: its input is shared on some batches and not on others")
        if shares:
            self.by_module[name] = self._last[1]
            self._followers.add(name)
            return
        if first_batch:
            self.by_module[name] = InputStats(x.shape[-1], want_hessian=self.want_hessian)
        stats = self.by_module[name]
        stats.update(x)
        self._last = (x, stats)

    def release(self) -> None:
        """Drop the held input (call after the layer's forward passes)."""
        self._last = None


def _by_row_chunks(weight: torch.Tensor, prune_rows, elements: int = 1 << 22) -> torch.Tensor:
    """Apply a row-wise pruning function chunk by chunk: masks and sort indices of a
    14336 x 4096 weight would otherwise need GBs of temporaries."""
    out = torch.empty_like(weight)
    step = max(1, elements // max(weight.shape[1], 1))
    for r0 in range(0, weight.shape[0], step):
        out[r0 : r0 + step] = prune_rows(weight[r0 : r0 + step])
    return out


def magnitude_prune(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return _by_row_chunks(weight, lambda w: w * mask_for(w.abs(), pattern))


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, the Wanda importance of each weight."""
    return weight.abs() * sq_norms.sqrt()[None, :]


def wanda_prune(weight: torch.Tensor, stats: InputStats, pattern: Pattern) -> torch.Tensor:
    def prune_rows(w: torch.Tensor) -> torch.Tensor:
        return w * mask_for(wanda_scores(w, stats.sq_norms), pattern)

    return _by_row_chunks(weight, prune_rows)


def sparsegpt_prune(
    weight: torch.Tensor,
    stats: InputStats,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): prune column by column, and after each column
    spread its pruning error over the columns not yet visited using the inverse Hessian of
    the layer's reconstruction loss; columns are processed in blocks with lazy updates.
    Masks are chosen adaptively per block (per row, from w^2 / [H^-1]_jj^2)."""
    hinv, dead = stats.inverse_hessian_factor(percdamp)
    w = weight.detach().clone().float()
    cols = w.shape[1]
    w[:, dead] = 0.0

    if isinstance(pattern, NMPattern):
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        block = w[:, b0:b1].clone()
        hinv_block = hinv[b0:b1, b0:b1]
        diag = torch.diag(hinv_block)
        errors = torch.zeros_like(block)
        if isinstance(pattern, Unstructured):
            # row totals come out at exactly pruned_count(cols), as row_mask gives
            count = pattern.pruned_count(b1) - pattern.pruned_count(b0)
            pruned = ~keep_row_top(block.square() / diag.square(), count)
        else:
            pruned = torch.zeros_like(block, dtype=torch.bool)
        for j in range(b1 - b0):
            if isinstance(pattern, NMPattern) and j % pattern.m == 0:
                scores = block[:, j : j + pattern.m].square() / diag[j : j + pattern.m].square()
                pruned[:, j : j + pattern.m] = ~nm_mask(scores, pattern)
            col = block[:, j]
            quantised = torch.where(pruned[:, j], torch.zeros_like(col), col)
            err = (col - quantised) / diag[j]
            block[:, j:] -= err[:, None] * hinv_block[j, j:][None, :]
            block[:, j] = quantised
            errors[:, j] = err
        w[:, b0:b1] = block
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return w


def prune_weight(
    method: str, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern
) -> torch.Tensor:
    if method == "magnitude":
        return magnitude_prune(weight, pattern)
    if method == "wanda":
        return wanda_prune(weight, stats, pattern)
    if method == "sparsegpt":
        return sparsegpt_prune(weight, stats, pattern)
    raise ValueError(f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}")
