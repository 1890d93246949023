"""Copies derived from packed weights (reordered metadata, PyTorch's semi-structured weight),
built once and kept while their source tensors live and keep their bytes.

Keyed by tensor identity, like a plain WeakIdKeyDictionary, but each entry also records its
sources' ``_version`` counters: ``load_state_dict`` and ``copy_`` write new bytes into the
same tensor objects, and a copy keyed by identity alone would keep serving the old weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

Derived = TypeVar("Derived")


def _version(t: Tensor) -> int:
    # Inference-mode tensors keep no version counter; they can only be written inside
    # inference mode, where an in-place write to a weight is not something this tracks.
    return -1 if t.is_inference() else t._version


def _stamp(sources: tuple[Tensor, ...]) -> tuple[tuple[int, int, int], ...]:
    # id and data_ptr catch a source swapped for another tensor; _version, in-place writes
    return tuple((id(t), t.data_ptr(), _version(t)) for t in sources)


class DerivedCache(Generic[Derived]):
    """``get(key, sources, build)``: the cached copy for ``key``, rebuilt by ``build()`` when
    any of ``sources`` (``key`` usually among them) was written since it was made."""

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def lookup(self, key: Tensor, sources: tuple[Tensor, ...]) -> Derived | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != _stamp(sources):
            return None
        return entry[1]

    def get(
        self, key: Tensor, sources: tuple[Tensor, ...], build: Callable[[], Derived]
    ) -> Derived:
        derived = self.lookup(key, sources)
        if derived is None:
            derived = build()
            self._entries[key] = (_stamp(sources), derived)
        return derived

    def __len__(self) -> int:
        return len(self._entries)
