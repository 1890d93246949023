"""Copies derived from packed weights (reordered metadata, PyTorch's semi-structured weight),
built once and kept while their source tensors live and keep their bytes.

Keyed by tensor identity, like a plain WeakIdKeyDictionary, but each entry also records its
sources' ``_version`` counters: ``load_state_dict`` and ``copy_`` write new bytes into the
same tensor objects, and a copy keyed by identity alone would keep serving the old weight.
A rebuilt tensor copy is written into the old one where shapes match, so a CUDA graph that
captured its address reads the new bytes after one eager call rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
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


def _refreshable(old: object, new: object) -> bool:
    """Whether `new` can be written into `old`: plain tensors of one layout, and `old`
    writable here (an inference tensor takes writes only inside inference mode)."""
    return (
        type(old) is Tensor
        and type(new) is Tensor
        and (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device)
        and old.is_contiguous()
        and (not old.is_inference() or torch.is_inference_mode_enabled())
    )


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
        entry = self._entries.get(key)
        stamp = _stamp(sources)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        derived = build()
        stale = None if entry is None else entry[1]
        if _refreshable(stale, derived):
            # a CUDA graph captured with the old copy keeps its address: refresh it in place
            stale.copy_(derived)
            derived = stale
        self._entries[key] = (stamp, derived)
        return derived

    def __len__(self) -> int:
        return len(self._entries)
