"""`model.info()`: what was loaded: layers, which linears are packed in which format, and
the bytes they take against the dense weights they replace."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from slimstack.engine.model import DecoderModel


@dataclass
class LinearInfo:
    name: str  # "model.layers.3.mlp.down_proj"
    shape: tuple[int, int]  # (out_features, in_features)
    format: str  # "dense", "sparse24", "bitmap"
    nbytes: int  # bytes held in memory (weight + bias)
    dense_nbytes: int  # bytes the dense weight + bias would take in the model dtype
    sparsity: float | None  # fraction of zero weights (None when not measured)


@dataclass
class ModelInfo:
    source: str | None
    model_type: str
    num_layers: int  # positions that run
    unique_layers: int  # distinct layer modules (fewer when an up-scaled model shares)
    shared: dict[int, int]  # position -> earlier position whose weights it reuses
    dtype: str
    device: str
    linears: list[LinearInfo]
    other_nbytes: int  # embeddings, norms, lm_head (when not tied)
    huge_page_nbytes: int = 0  # weight bytes in huge-page mappings (CPU; engine.huge_pages)

    @property
    def linear_nbytes(self) -> int:
        return sum(info.nbytes for info in self.linears)

    @property
    def dense_linear_nbytes(self) -> int:
        return sum(info.dense_nbytes for info in self.linears)

    @property
    def total_nbytes(self) -> int:
        return self.linear_nbytes + self.other_nbytes

    @property
    def formats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for info in self.linears:
            counts[info.format] = counts.get(info.format, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            linear_nbytes=self.linear_nbytes,
            dense_linear_nbytes=self.dense_linear_nbytes,
            total_nbytes=self.total_nbytes,
            formats=self.formats,
        )
        return out

    @property
    def linear_ratio(self) -> float:
        """Bytes of the linears as held, over their dense bytes."""
        return self.linear_nbytes / max(self.dense_linear_nbytes, 1)

    @property
    def formats_summary(self) -> str:
        """e.g. "4 dense, 16 sparse24"."""
        return ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.formats.items()))

    def table(self) -> str:
        ratio, formats = self.linear_ratio, self.formats_summary
        lines = [
            f"model      {self.source or '(in memory)'} ({self.model_type}, {self.dtype}, "
            f"{self.device})",
            f"layers     {self.num_layers} run, {self.unique_layers} distinct in memory"
            + (f" (shared: {self.shared})" if self.shared else ""),
            f"linears    {formats}",
            f"bytes      linears {_mb(self.linear_nbytes)} vs dense {_mb(self.dense_linear_nbytes)}"
            f" ({ratio:.3f}x); total {_mb(self.total_nbytes)}"
            + (f"; {_mb(self.huge_page_nbytes)} in huge pages" if self.huge_page_nbytes else ""),
            "",
            f"{'linear':<40} {'shape':>14} {'format':>9} {'sparsity':>8} {'MB':>9} {'dense MB':>9}",
        ]
        for info in self.linears:
            sparsity = "-" if info.sparsity is None else f"{info.sparsity:.3f}"
            shape = "x".join(map(str, info.shape))
            lines.append(
                f"{info.name:<40} {shape:>14} {info.format:>9} {sparsity:>8} "
                f"{info.nbytes / 2**20:>9.3f} {info.dense_nbytes / 2**20:>9.3f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB"


def linear_info(name: str, module: nn.Module, dtype: torch.dtype) -> LinearInfo:
    """Facts about one projection, dense nn.Linear or a packed sparse module."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    bias = getattr(module, "bias", None)
    bias_nbytes = bias.nbytes if isinstance(bias, torch.Tensor) else 0
    if isinstance(module, nn.Linear):
        weight = module.weight
        return LinearInfo(
            name=name,
            shape=(weight.shape[0], weight.shape[1]),
            format="dense",
            nbytes=weight.nbytes + bias_nbytes,
            dense_nbytes=weight.numel() * itemsize + bias_nbytes,
            sparsity=float((weight == 0).float().mean()),
        )
    packed = module.packed  # SparseLinear: a formats.Sparse24Weight / BitmapWeight
    out_features, in_features = packed.shape
    return LinearInfo(
        name=name,
        shape=(out_features, in_features),
        format=packed.format,
        nbytes=packed.nbytes + bias_nbytes,
        dense_nbytes=out_features * in_features * itemsize + bias_nbytes,
        # the nonzeros are among the stored values (padding columns are checked to be zero)
        sparsity=1 - int(packed.values.count_nonzero()) / max(out_features * in_features, 1),
    )


def model_info(model: DecoderModel) -> ModelInfo:
    first_position: dict[int, int] = {}
    shared: dict[int, int] = {}
    linears: list[LinearInfo] = []
    for index, layer in enumerate(model.layers):
        if id(layer) in first_position:
            shared[index] = first_position[id(layer)]
            continue
        first_position[id(layer)] = index
        for name, module in layer.named_modules():
            if name.endswith("_proj"):
                linears.append(linear_info(f"model.layers.{index}.{name}", module, model.dtype))
    linear_ids = {id(t) for layer in model.layers for t in _tensors(layer, projections=True)}
    other = {id(t): t.nbytes for t in _tensors(model, projections=False) if id(t) not in linear_ids}
    return ModelInfo(
        source=model.source,
        model_type=model.config.model_type,
        num_layers=len(model.layers),
        unique_layers=len(first_position),
        shared=shared,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        linears=linears,
        other_nbytes=sum(other.values()),
        huge_page_nbytes=model.huge_page_nbytes,
    )


def _tensors(module: nn.Module, projections: bool) -> list[torch.Tensor]:
    """Parameters and persistent buffers; with projections=True only those of *_proj."""
    out = []
    for name, sub in module.named_modules():
        if name.startswith("cache") or name == "rotary":
            continue
        if projections and not name.endswith("_proj"):
            continue
        out += list(sub.parameters(recurse=False))
        out += [b for b in sub.buffers(recurse=False) if b is not None]
    return out
