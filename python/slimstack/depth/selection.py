"""From criterion scores to the layers to drop, and where the criteria agree.

Angular distance picks a contiguous block: the n consecutive layers whose input and output
are closest. The per-layer criteria (Block Influence, Taylor+, perplexity, SNR) drop the n
layers first in their drop order, wherever they are, as ShortGPT and Shortened LLaMA do.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

CRITERIA = ("angular", "block_influence", "taylor", "perplexity", "snr")
ALIASES = {
    "angular": "angular",
    "angular_distance": "angular",
    "bi": "block_influence",
    "block_influence": "block_influence",
    "shortgpt": "block_influence",
    "taylor": "taylor",
    "taylor+": "taylor",
    "ppl": "perplexity",
    "perplexity": "perplexity",
    "snr": "snr",
}


def canonical_criterion(name: str) -> str:
    try:
        return ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown criterion {name!r}; choose one of: {', '.join(CRITERIA)} "
            "(aliases: bi, ppl, taylor+)"
        ) from None


def layers_to_drop(result: dict[str, Any], criterion: str, n: int) -> list[int]:
    """The `n` layers `criterion` would remove, ascending, from its entry in scores.json."""
    criterion = canonical_criterion(criterion)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of layers to drop must be a positive integer, got {n!r}")
    if criterion == "angular":
        best = result["best_block"].get(str(n))
        if best is None:
            raise ValueError(
                f"angular distance has no block of {n} layers (the model has "
                f"{len(result['best_block'])} layers)"
            )
        return list(range(best["start"], best["end"]))
    order = list(result["drop_order"])
    if n > len(order):
        note = " (Taylor+ never drops its kept layers)" if criterion == "taylor" else ""
        raise ValueError(f"{criterion} can drop at most {len(order)} layers{note}; asked for {n}")
    return sorted(order[:n])


def agreement(criteria: dict[str, dict[str, Any]], num_layers: int) -> list[dict[str, Any]]:
    """For n = 1 .. ceil(L / 4): each criterion's pick of n layers, the layers every
    criterion picks, and those a majority picks."""
    rows = []
    for n in range(1, max(1, math.ceil(num_layers / 4)) + 1):
        picks = {}
        for name, result in criteria.items():
            try:
                picks[name] = layers_to_drop(result, name, n)
            except ValueError:  # e.g. Taylor+ on a model too shallow for n candidates
                continue
        if not picks:
            continue
        votes = Counter(layer for chosen in picks.values() for layer in chosen)
        rows.append(
            {
                "n": n,
                "picks": picks,
                "all": sorted(layer for layer, count in votes.items() if count == len(picks)),
                "majority": sorted(layer for layer, c in votes.items() if 2 * c > len(picks)),
            }
        )
    return rows
