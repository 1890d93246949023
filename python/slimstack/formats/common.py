"""What every packed format shares: K padding, input checks and safetensors (de)serialization.

A packed file is a plain safetensors file whose header metadata names the format, its
version, the dense shape ``N,K`` and the dtype, so a loader can refuse a file it does not
understand instead of misreading it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:  # typing.Self is 3.11+; the package supports 3.10
    from typing import Self

FORMAT_VERSION = 1
# K is padded with zero columns up to a multiple of this ("the K tile"), so every kernel
# can walk K in whole tiles; kernels still mask reads of x at columns >= K.
K_TILE = 64
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class PackedWeight:
    """What every packed container derives from its tensors: the padded K, the device and
    the bytes it occupies. Subclasses are dataclasses naming their tensor fields in
    ``TENSORS``."""

    TENSORS: ClassVar[tuple[str, ...]]  # the dataclass fields before shape, in order
    format: ClassVar[str]
    shape: tuple[int, int]
    dtype: torch.dtype

    def validate(self) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: getattr(self, name) for name in self.TENSORS}
        save_packed(path, tensors, self.format, self.shape, self.dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Self:
        fmt, shape, dtype, tensors = read_packed(path, device)
        if fmt != cls.format:
            raise ValueError(f"{path} holds a {fmt!r} weight, not {cls.format!r}")
        if set(tensors) != set(cls.TENSORS):
            raise ValueError(
                f"{path}: {cls.format} needs tensors {', '.join(cls.TENSORS)}; "
                f"found {sorted(tensors)}"
            )
        try:
            packed = cls(*(tensors[name] for name in cls.TENSORS), shape, dtype)
            packed.validate()
        except ValueError as error:  # name the file: the container's checks cannot
            raise ValueError(f"{path}: {error}") from None
        return packed

    @property
    def kp(self) -> int:
        """K padded to the 64-column tile."""
        return padded_k(self.shape[1])

    @property
    def device(self) -> torch.device:
        return getattr(self, self.TENSORS[0]).device

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.TENSORS)


def padded_k(k: int) -> int:
    """Return Kp, the smallest multiple of ``K_TILE`` that is >= k."""
    return -(-k // K_TILE) * K_TILE


def zero_fraction(weight: torch.Tensor) -> float:
    """Share of exact zeros, from an integer count: a float32 mean of the 0/1 mask rounds
    1800 / 4000 to just under 0.45, and thresholds like ">= 45% zeros" must hold exactly."""
    return int((weight == 0).sum()) / max(weight.numel(), 1)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in SUPPORTED_DTYPES.items():
        if value == dtype:
            return name
    raise TypeError(f"packed weights support dtypes {sorted(SUPPORTED_DTYPES)}, got {dtype}")


def check_dense_weight(weight: torch.Tensor) -> None:
    """Refuse anything that is not a non-empty 2-D fp32/fp16/bf16 tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    dtype_name(weight.dtype)
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D [out_features N, in_features K], got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")


def pad_columns(weight: torch.Tensor, kp: int) -> torch.Tensor:
    """Zero-pad ``weight`` [N, K] on the right to [N, kp]."""
    n, k = weight.shape
    if k == kp:
        return weight
    padded = weight.new_zeros((n, kp))
    padded[:, :k] = weight
    return padded


def expect(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds (container consistency checks)."""
    if not condition:
        raise ValueError(message)


def save_packed(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    fmt: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> None:
    """Write ``tensors`` and the format header atomically: a failed save leaves no file."""
    path = Path(path)
    metadata = {
        "format": fmt,
        "version": str(FORMAT_VERSION),
        "shape": f"{shape[0]},{shape[1]}",
        "dtype": dtype_name(dtype),
    }
    cpu_tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(cpu_tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _open_safetensors(path: str | os.PathLike) -> Iterator:
    """safe_open on CPU, but a file safetensors cannot parse (truncated, not safetensors at
    all) is a ValueError naming the file, like every other refusal here: safetensors' own
    error names neither the file nor the cause a user can act on. Always CPU, so that every
    SafetensorError is about the file (safetensors refuses devices such as "meta" or "cpu:0"
    with the same error type); callers move the tensors with ``.to(device)``."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None


def read_packed(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[str, tuple[int, int], torch.dtype, dict[str, torch.Tensor]]:
    """Read a packed file: (format, shape, dtype, tensors). Refuses unknown versions."""
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
        missing = [key for key in ("format", "version", "shape", "dtype") if key not in meta]
        if missing:
            raise ValueError(
                f"{path} is not a slimstack packed weight: header metadata lacks {missing}"
            )
        if meta["version"] != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has packed-format version {meta['version']}; this slimstack reads "
                f"version {FORMAT_VERSION} only"
            )
        if meta["dtype"] not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{path} declares dtype {meta['dtype']!r}; allowed: {sorted(SUPPORTED_DTYPES)}"
            )
        try:
            n, k = (int(part) for part in meta["shape"].split(","))
        except ValueError:
            raise ValueError(f"{path} declares a malformed shape {meta['shape']!r}") from None
        names = list(f.keys())  # safe_open is not iterable
        tensors = {name: f.get_tensor(name).to(device) for name in names}
    return meta["format"], (n, k), SUPPORTED_DTYPES[meta["dtype"]], tensors


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load any packed weight file, picking the container from the format in its header."""
    from slimstack.formats.bitmap import BitmapWeight
    from slimstack.formats.sparse24 import Sparse24Weight

    containers = {Sparse24Weight.format: Sparse24Weight, BitmapWeight.format: BitmapWeight}
    fmt = _peek_format(path)
    if fmt not in containers:
        raise ValueError(f"{path} has unknown packed format {fmt!r}; known: {sorted(containers)}")
    return containers[fmt].load(path, device=device)


def _peek_format(path: str | os.PathLike) -> str:
    with _open_safetensors(path) as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt is None:
        raise ValueError(f"{path} is not a slimstack packed weight: header metadata lacks 'format'")
    return fmt
