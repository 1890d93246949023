"""``sparse_linear`` (y = x @ W^T + b for a packed W, on whichever backend fits) and
``SparseLinear``, the nn.Module that holds a packed weight in place of an nn.Linear."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from slimstack.formats import (
    BitmapWeight,
    PackedWeight,
    Sparse24Weight,
    is_sparse24,
    pack_bitmap,
    pack_sparse24,
)
from slimstack.ops.backends import BACKENDS
from slimstack.ops.dispatch import choose_backend

Pattern = Literal["auto", "sparse24", "bitmap"]
PATTERNS = ("auto", "sparse24", "bitmap")


def _as_rows(x: Tensor, values: Tensor, bias: Tensor | None, n: int, k: int) -> Tensor:
    """Check x against the packed weight and view it as contiguous rows [M, K]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != values.dtype:
        raise TypeError(f"x is {x.dtype} but the packed weight is {values.dtype}; cast one")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K={k}], got {tuple(x.shape)}")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {values.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] {x.dtype}, got {list(bias.shape)} {bias.dtype}")
    return x.reshape(-1, k).contiguous()


def _autocast_to(x: Tensor, values: Tensor) -> tuple[Tensor, torch.dtype | None]:
    """Under torch.autocast on x's device: x in the packed weight's dtype, and the dtype the
    result must have (autocast's, as nn.Linear's would). The product runs in the weight's
    dtype: casting x costs M x K elements, casting the weight per call would cost N x K."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x, None  # _as_rows names what is wrong with it
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, None
    return x.to(values.dtype), torch.get_autocast_dtype(device)


def _no_rows(rows: Tensor, n: int) -> Tensor:
    """The [0, N] output of an empty batch, still a function of x for autograd (no kernel
    runs: some have no M = 0 launch)."""
    return rows[:, :1].expand(0, n).contiguous()


def _finish(
    y: Tensor, x: Tensor, bias: Tensor | None, n: int, out_dtype: torch.dtype | None = None
) -> Tensor:
    if bias is not None:
        y = y + bias
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y.reshape(*x.shape[:-1], n)


def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, shape: tuple[int, int], bias: Tensor | None = None
) -> Tensor:
    """y = x @ W^T (+ bias) for W packed as sparse24 (values, meta) of dense ``shape``."""
    n, k = shape
    x, out_dtype = _autocast_to(x, values)
    rows = _as_rows(x, values, bias, n, k)
    if rows.shape[0] == 0:
        return _finish(_no_rows(rows, n), x, bias, n, out_dtype)
    backend = choose_backend("sparse24", rows.device, rows.dtype, rows.shape[0])
    y = BACKENDS[backend].sparse24(rows, values, meta, n, k)
    return _finish(y, x, bias, n, out_dtype)


def bitmap_linear(
    x: Tensor,
    values: Tensor,
    bitmask: Tensor,
    row_offsets: Tensor,
    shape: tuple[int, int],
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T (+ bias) for W packed as bitmap (values, bitmask, row_offsets)."""
    n, k = shape
    x, out_dtype = _autocast_to(x, values)
    rows = _as_rows(x, values, bias, n, k)
    if rows.shape[0] == 0:
        return _finish(_no_rows(rows, n), x, bias, n, out_dtype)
    backend = choose_backend("bitmap", rows.device, rows.dtype, rows.shape[0])
    y = BACKENDS[backend].bitmap(rows, values, bitmask, row_offsets, n, k)
    return _finish(y, x, bias, n, out_dtype)


def sparse_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T (+ bias) for x [..., K] and a packed W [N, K]; y is [..., N] in x's dtype.

    Under torch.autocast, x of any float dtype is cast to the weight's dtype, the product
    runs in it, and y comes back in autocast's dtype, as an nn.Linear's would.

    The backend comes from ``slimstack.ops.dispatch`` (device, dtype, format, M); set
    SLIMSTACK_BACKEND to force one.

    Non-finite x: a NaN or inf in column k reaches every output whose weight row keeps column
    k, on every backend. Outputs whose row pruned k are backend-defined: kernels that skip
    pruned positions (the M = 1 gather GEMV, mma.sp) never read it, kernels that decode a
    dense tile multiply it by 0 and give NaN, as the dense matmul of the masked weight does.
    """
    if isinstance(packed, Sparse24Weight):
        return sparse24_linear(x, packed.values, packed.meta, packed.shape, bias)
    if isinstance(packed, BitmapWeight):
        return bitmap_linear(
            x, packed.values, packed.bitmask, packed.row_offsets, packed.shape, bias
        )
    raise TypeError(f"packed must be a Sparse24Weight or BitmapWeight, got {type(packed).__name__}")


def pack_weight(weight: Tensor, pattern: Pattern = "auto") -> PackedWeight:
    """Pack ``weight`` as sparse24 (pattern "sparse24", or "auto" when it is 2:4) or bitmap."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "sparse24" or (pattern == "auto" and is_sparse24(weight)):
        return pack_sparse24(weight)
    return pack_bitmap(weight)


class SparseLinear(nn.Module):
    """A linear layer whose weight is packed (sparse24 or bitmap): y = x @ W^T + b.

    The packed tensors are buffers, so ``.to()``, ``state_dict`` and ``model.half()`` treat
    them like nn.Linear's weight (``half()`` converts the values; the layout is kept), and
    ``load_state_dict`` also takes an nn.Linear's dense ``weight``, packed in this format.
    Inference only: no gradient flows to the packed weight.
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(packed, (Sparse24Weight, BitmapWeight)):
            raise TypeError(
                f"packed must be a Sparse24Weight or BitmapWeight, got {type(packed).__name__}"
            )
        self.out_features, self.in_features = packed.shape
        self.format = packed.format
        self.register_buffer("values", packed.values)
        if isinstance(packed, Sparse24Weight):
            self.register_buffer("meta", packed.meta)
        else:
            self.register_buffer("bitmask", packed.bitmask)
            self.register_buffer("row_offsets", packed.row_offsets)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {list(bias.shape)}")
            bias = nn.Parameter(bias.detach().to(packed.dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None = None, pattern: Pattern = "auto"
    ) -> SparseLinear:
        """Pack a dense (already pruned) weight [N, K]; see ``pack_weight`` for ``pattern``."""
        return cls(pack_weight(weight.detach(), pattern), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: Pattern = "auto") -> SparseLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias, pattern)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def packed(self) -> PackedWeight:
        """The packed weight as a formats container (sharing this module's buffers)."""
        if self.format == "sparse24":
            return Sparse24Weight(self.values, self.meta, self.shape, self.values.dtype)
        return BitmapWeight(
            self.values, self.bitmask, self.row_offsets, self.shape, self.values.dtype
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """As nn.Module's, plus: the incoming packed tensors are checked together before any
        is copied, as ``load`` checks a file (bitmap row offsets that disagree with the mask
        would send the kernels past ``values``; a sparse24 nibble with i0 >= i1, or a value
        stored for a padding column, makes the backends disagree), and a bitmap ``values``
        takes the incoming length (the kept count belongs to the weight, not to this
        module)."""
        container = BitmapWeight if self.format == "bitmap" else Sparse24Weight
        dense = state_dict.get(prefix + "weight")
        if isinstance(dense, Tensor) and not any(
            prefix + n in state_dict for n in container.TENSORS
        ):
            # an nn.Linear's (or a pruned checkpoint's) dense weight: pack it in this format
            problem = self._pack_into(state_dict, prefix, dense)
            if problem:
                errors.append(f"{prefix or 'SparseLinear'}: {problem}")
                return
        incoming = {name: state_dict.get(prefix + name) for name in container.TENSORS}
        if all(isinstance(t, Tensor) for t in incoming.values()):
            problem = self._incoming_problem(container, incoming)
            if problem:
                errors.append(f"{prefix or 'SparseLinear'}: {problem}")
                return
            if self.format == "bitmap" and incoming["values"].shape != self.values.shape:
                self.values = self.values.new_empty(incoming["values"].shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _pack_into(self, state_dict: dict, prefix: str, dense: Tensor) -> str | None:
        """Replace the dense ``weight`` entry by its packed tensors; why not, if it cannot be."""
        if tuple(dense.shape) != self.shape:
            return f"the incoming dense weight is {list(dense.shape)}, this layer is {list(self.shape)}"
        try:
            packed = pack_weight(dense.detach().to("cpu", self.values.dtype), self.format)
        except ValueError as error:
            return f"the incoming dense weight cannot be packed as {self.format}: {error}"
        del state_dict[prefix + "weight"]
        for name in packed.TENSORS:
            state_dict[prefix + name] = getattr(packed, name)
        return None

    def _incoming_problem(
        self, container: type[PackedWeight], incoming: dict[str, Tensor]
    ) -> str | None:
        """Why the incoming packed tensors are not a valid weight of this module's shape."""
        # values in this module's dtype (copy_ converts them); the index tensors as they are
        tensors = [
            t.detach().to("cpu", self.values.dtype if name == "values" else t.dtype)
            for name, t in incoming.items()
        ]
        try:
            container(*(t.contiguous() for t in tensors), self.shape, self.values.dtype).validate()
        except ValueError as error:
            return (
                f"the incoming {self.format} weight is not a valid {list(self.shape)} weight: "
                f"{error}"
            )
        return None

    def forward(self, x: Tensor) -> Tensor:
        if self.format == "sparse24":
            return sparse24_linear(x, self.values, self.meta, self.shape, self.bias)
        return bitmap_linear(x, self.values, self.bitmask, self.row_offsets, self.shape, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, bias={self.bias is not None}"
        )


__all__ = [
    "SparseLinear",
    "bitmap_linear",
    "pack_weight",
    "sparse24_linear",
    "sparse_linear",
]
