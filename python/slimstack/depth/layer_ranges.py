"""Layer range specs as users type them: "20:28", "5", "-4:", "0:8,24:32" (Python-style,
half-open), checked against a model's depth. Unlike Python slicing, a range that runs past
the end is an error, not silently clipped: a typo must not produce a different model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_RANGE_RE = re.compile(r"^\s*(-?\d+)?\s*(:)?\s*(-?\d+)?\s*$")
SYNTAX = "a layer index (5, -1) or a Python-style half-open range (20:28, 24:, :8, -4:)"


class LayerRangeError(ValueError):
    """A layer spec that does not parse or does not fit the model."""


def split_specs(specs: str | Iterable[str]) -> list[str]:
    """Flatten "0:8,24:32" and repeated options into single range strings."""
    items = [specs] if isinstance(specs, str) else list(specs)
    parts = [p.strip() for item in items for p in str(item).split(",")]
    if not parts or any(not p for p in parts):
        raise LayerRangeError(f"empty layer range in {items!r}; expected {SYNTAX}")
    return parts


def _resolve(value: int, num_layers: int, spec: str) -> int:
    resolved = value + num_layers if value < 0 else value
    if not 0 <= resolved <= num_layers:
        raise LayerRangeError(
            f"layer range {spec!r} is out of range: the model has {num_layers} layers "
            f"(indices 0..{num_layers - 1}, or -{num_layers}..-1)"
        )
    return resolved


def parse_range(spec: str, num_layers: int) -> range:
    """One spec -> the range of layer indices it names (never empty)."""
    match = _RANGE_RE.match(spec)
    if not match or (match.group(1) is None and match.group(3) is None):
        raise LayerRangeError(f"cannot parse layer range {spec!r}; expected {SYNTAX}")
    start_text, colon, stop_text = match.groups()
    if not colon:  # a single index
        index = int(start_text)
        resolved = index + num_layers if index < 0 else index
        if not 0 <= resolved < num_layers:
            raise LayerRangeError(
                f"layer {index} is out of range: the model has {num_layers} layers "
                f"(indices 0..{num_layers - 1})"
            )
        return range(resolved, resolved + 1)
    start = _resolve(int(start_text), num_layers, spec) if start_text else 0
    stop = _resolve(int(stop_text), num_layers, spec) if stop_text else num_layers
    if start >= stop:
        raise LayerRangeError(
            f"layer range {spec!r} is empty (start {start} >= end {stop}); ranges are "
            "half-open: 20:28 names layers 20..27"
        )
    return range(start, stop)


def parse_ranges(specs: str | Iterable[str], num_layers: int) -> list[range]:
    return [parse_range(spec, num_layers) for spec in split_specs(specs)]


def drop_to_keep(specs: str | Iterable[str], num_layers: int) -> list[int]:
    """The layers that remain after dropping `specs`; overlaps and dropping all are errors."""
    ranges = parse_ranges(specs, num_layers)
    dropped: dict[int, range] = {}
    for r in ranges:
        for index in r:
            if index in dropped:
                raise LayerRangeError(
                    f"drop ranges overlap: layer {index} is in both "
                    f"{_fmt(dropped[index])} and {_fmt(r)}"
                )
            dropped[index] = r
    kept = [i for i in range(num_layers) if i not in dropped]
    if not kept:
        raise LayerRangeError(
            f"dropping {', '.join(_fmt(r) for r in ranges)} removes all {num_layers} layers; "
            "at least one must remain"
        )
    return kept


def keep_layers(specs: str | Iterable[str], num_layers: int) -> list[int]:
    """Layers in the order the ranges give them; a layer may repeat (up-scaling)."""
    return [i for r in parse_ranges(specs, num_layers) for i in r]


def _fmt(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}:{r.stop}"


def format_layers(layers: Sequence[int]) -> str:
    """Compact "0:4,6,9:12" form of an index list (runs of consecutive indices)."""
    runs: list[range] = []
    for index in layers:
        if runs and runs[-1].stop == index:
            runs[-1] = range(runs[-1].start, index + 1)
        else:
            runs.append(range(index, index + 1))
    return ",".join(_fmt(r) for r in runs)
