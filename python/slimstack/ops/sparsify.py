"""``sparsify_model``: swap every sparse enough nn.Linear of a model for a SparseLinear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimstack.formats import is_sparse24, zero_fraction
from slimstack.formats.common import SUPPORTED_DTYPES
from slimstack.ops.dense_linear import DenseLinear
from slimstack.ops.sparse_linear import PATTERNS, Pattern, SparseLinear

# The linears swapped: their owners call forward() and nothing else (an nn.Linear subclass
# in general may be read through .weight, e.g. nn.MultiheadAttention's out_proj).
SWAPPABLE = (nn.Linear, DenseLinear)
# Below this share of zeros a bitmap weight is no smaller than dense for 16-bit types
# (bits + compacted values + row offsets: ~0.5625x at 50%), so it is left dense.
BITMAP_MIN_ZEROS = 0.45


@dataclass
class SwappedLinear:
    name: str
    format: str
    shape: tuple[int, int]
    dense_bytes: int
    packed_bytes: int


@dataclass
class SparsifyReport:
    """Which linears were packed (and how), which were left dense and why."""

    swapped: list[SwappedLinear] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(s.dense_bytes for s in self.swapped)

    @property
    def bytes_after(self) -> int:
        return sum(s.packed_bytes for s in self.swapped)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        lines = [
            f"{len(self.swapped)} linear(s) packed, {len(self.skipped)} left dense; weight bytes "
            f"{self.bytes_before:,} -> {self.bytes_after:,} (saved {self.bytes_saved:,})"
        ]
        lines += [
            f"  {s.name}: {s.format} {s.shape[0]}x{s.shape[1]}, "
            f"{s.dense_bytes:,} -> {s.packed_bytes:,} bytes"
            for s in self.swapped
        ]
        lines += [f"  {name}: dense ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _choose_format(weight: torch.Tensor, pattern: Pattern) -> tuple[str | None, str]:
    """(format, reason): the format to pack ``weight`` in, or None and why not."""
    if weight.device.type == "meta":
        return None, "weight is on the meta device"
    if weight.dtype not in SUPPORTED_DTYPES.values():
        return None, f"dtype {weight.dtype} has no sparse kernels"
    if weight.numel() == 0:  # the formats refuse it, which failed the whole model's swap
        return None, f"weight is empty ({weight.shape[0]}x{weight.shape[1]})"
    if pattern in ("auto", "sparse24") and is_sparse24(weight):
        return "sparse24", "2:4"
    zeros = zero_fraction(weight)
    if pattern in ("auto", "bitmap") and zeros >= BITMAP_MIN_ZEROS:
        return "bitmap", f"{zeros:.0%} zeros"
    few_zeros = f"only {zeros:.0%} zeros (< {BITMAP_MIN_ZEROS:.0%})"
    return None, {"sparse24": "not 2:4", "bitmap": few_zeros}.get(
        pattern, f"not 2:4 and {few_zeros}"
    )


def sparsify_model(model: nn.Module, pattern: Pattern = "auto") -> SparsifyReport:
    """Replace, in place, each nn.Linear whose weight is exactly 2:4 (pattern "auto" or
    "sparse24") or at least 45% zeros (pattern "auto" or "bitmap": bitmap format) by a
    SparseLinear computing the same function; other modules are left alone.

    A linear reachable under several names is packed once and shared. Returns the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "sparsify_model swaps the nn.Linear children of a model in place and cannot "
            "replace the model itself; for a single linear use SparseLinear.from_linear(linear)"
        )
    report = SparsifyReport()
    owners = _parameter_owners(model)
    replacements: dict[int, nn.Module] = {}
    # list first: the module tree is modified while walking it
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): the latter hides a module's second name
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) not in SWAPPABLE:
                # e.g. nn.MultiheadAttention's out_proj: its owner reads .weight directly,
                # which a SparseLinear does not have
                report.skipped[name] = (
                    f"{type(child).__name__} is a subclass of nn.Linear (its owner may read "
                    ".weight); only plain nn.Linear modules are swapped"
                )
                continue
            why_not = _unswappable(child)
            if why_not:
                report.skipped[name] = why_not
                continue
            if id(child) not in replacements:
                tied = [n for m, n in owners[id(child.weight)].items() if m != id(child)]
                replacements[id(child)] = _pack_linear(name, child, pattern, report, tied)
            setattr(parent, child_name, replacements[id(child)])
    return report


def _unswappable(linear: nn.Linear) -> str | None:
    """Why a plain nn.Linear must stay as it is, or None."""
    if not isinstance(linear._parameters.get("weight"), nn.Parameter):
        # weight_norm / spectral_norm: .weight is recomputed from other parameters by a hook
        return "its weight is computed from other parameters (weight_norm, spectral_norm?)"
    hooks = [
        kind
        for kind, table in (
            ("forward", linear._forward_hooks),
            ("forward pre", linear._forward_pre_hooks),
            ("backward", linear._backward_hooks),
        )
        if table
    ]
    if hooks:
        return f"it has {' and '.join(hooks)} hooks, which a swap would drop"
    return None


def _parameter_owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """id(parameter) -> {id(module): its first name} for every module holding it: a tied
    weight has several modules, a module reachable under two names counts once."""
    owners: dict[int, dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), {}).setdefault(id(module), module_name)
    return owners


def _pack_linear(
    name: str, linear: nn.Linear, pattern: Pattern, report: SparsifyReport, tied: list[str]
) -> nn.Module:
    # Another module (a tied embedding) keeps the dense tensor alive: packing would add bytes.
    if tied:
        report.skipped[name] = f"weight shared with {', '.join(sorted(tied))}"
        return linear
    fmt, reason = _choose_format(linear.weight.detach(), pattern)
    if fmt is None:
        report.skipped[name] = reason
        return linear
    sparse = SparseLinear.from_linear(linear, pattern=fmt)
    dense_bytes, packed_bytes = linear.weight.nbytes, sparse.packed.nbytes
    if packed_bytes >= dense_bytes:  # tiny K: padding to the 64-column tile outweighs the zeros
        report.skipped[name] = f"{fmt} would take {packed_bytes:,} bytes, dense {dense_bytes:,}"
        return linear
    report.swapped.append(SwappedLinear(name, fmt, sparse.shape, dense_bytes, packed_bytes))
    return sparse
