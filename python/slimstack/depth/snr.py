"""Signal-to-noise ratio of each layer's `self_attn.v_proj` weight (laserRMT), with the
Marchenko-Pastur law as the noise model.

For an n x m weight (n <= m) whose entries were i.i.d. noise of standard deviation sigma,
the singular values would fill the Marchenko-Pastur bulk, whose upper edge is
sigma (sqrt(n) + sqrt(m)). Singular values above the edge are signal, the rest noise:

    SNR = sum(signal singular values) / sum(noise singular values)
    ratio = SNR / largest singular value          (laserRMT's reported number)

sigma is estimated from the spread of the spectrum, like laserRMT's inter-quartile-range
estimate, but against the right reference: the sorted singular values of the lower 90% of
the spectrum are fitted by least squares to the Marchenko-Pastur quantiles for this aspect
ratio (at plotting positions (k - 1/2) / n), slope sigma sqrt(m) with a free intercept, so
the estimate measures the spread of the bulk, not its location, and the top 10% (where
signal sits) does not pull it; where signal fills more than that, the fit is repeated on the
values under the threshold (the spectrum of the noise left by the signal directions) until
the signal count settles. laserRMT divides the IQR by 1.349, the IQR of a standard
normal, which is not the spectrum of a noise matrix: with it a pure Gaussian matrix comes
out as "all signal". Here pure noise gives sigma back and no singular value above the edge.
The edge gets the Tracy-Widom allowance for finite matrices (99th percentile of the largest
singular value of noise), so noise crosses it about once in a hundred matrices rather than
one time in six.

A layer whose singular values all lie above the edge has no noise part: its SNR is
infinite. Those layers are flagged; the Cluj-Napoca recipe removes them, so the drop order
lists them first, then the rest by ascending ratio (least signal first).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from slimstack.checkpoint import LAYER_PREFIX, Checkpoint

TRACY_WIDOM_99 = 2.0234  # 99th percentile of the Tracy-Widom (beta = 1) law
DEFAULT_MODULE = "self_attn.v_proj"


@functools.lru_cache(maxsize=64)
def mp_singular_quantiles(beta: float, probs: tuple[float, ...], grid: int = 20001) -> tuple:
    """Quantiles of s / (sigma sqrt(m)) for an n x m noise matrix with beta = n / m <= 1.

    The eigenvalues x = s^2 / (sigma^2 m) follow the Marchenko-Pastur density
    sqrt((b - x)(x - a)) / (2 pi beta x) on [a, b] = [(1 - sqrt beta)^2, (1 + sqrt beta)^2].
    Substituting x = a + (b - a) sin^2(t) removes the square-root singularities at both
    edges, so a plain cumulative trapezoid over t is accurate.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"aspect ratio beta must be in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    t = np.linspace(0.0, math.pi / 2, grid)
    x = lo + (hi - lo) * np.sin(t) ** 2
    width = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        density = (width * np.sin(t) * np.cos(t)) ** 2 / (math.pi * beta * x)
    if lo == 0.0:  # beta = 1: the limit at t -> 0 is 4 cos^2(t) / pi
        density[0] = 4.0 / math.pi
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    return tuple(float(math.sqrt(np.interp(p, cdf, x))) for p in probs)


def _bulk_fit(ascending: np.ndarray, n: int, m: int, fit_upto: float) -> float:
    """sigma from a least-squares fit of the lower `fit_upto` of an n x m noise spectrum
    (ascending, n values) to the Marchenko-Pastur quantiles: slope sigma sqrt(m)."""
    probs = (np.arange(1, n + 1) - 0.5) / n
    bulk = probs <= fit_upto
    if bulk.sum() < 2:
        return 0.0
    quantiles = np.asarray(mp_singular_quantiles(n / m, tuple(probs[bulk].tolist())))
    design = np.stack([np.ones_like(quantiles), quantiles], axis=1)
    (_, slope), *_ = np.linalg.lstsq(design, ascending[:n][bulk], rcond=None)
    return max(float(slope), 0.0) / math.sqrt(m)


def signal_threshold(sigma: float, n: int, m: int) -> float:
    """The Marchenko-Pastur edge sigma (sqrt n + sqrt m) plus the Tracy-Widom allowance."""
    mp_edge = sigma * (math.sqrt(n) + math.sqrt(m))
    return mp_edge + sigma * (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3) * TRACY_WIDOM_99 / 2


def estimate_sigma(
    singular: torch.Tensor, n: int, m: int, fit_upto: float = 0.9, max_rounds: int = 50
) -> float:
    """Noise standard deviation of the entries from a Q-Q fit of the spectrum's bulk.

    A fit of the whole bulk would take in signal wherever it fills more of the spectrum than
    the part left out, and inflate sigma until the real signal fell under the threshold. So
    a first fit takes the lower half of the n values, and the fit (of the lower `fit_upto`)
    is repeated on the values under the threshold alone, read as the spectrum of the (n - r) x (m - r) noise left by r signal
    directions, until r stops changing. sigma never exceeds ||W||_F / sqrt(nm), the value
    that would put all of the matrix's energy into noise.
    """
    ascending = np.sort(singular.cpu().numpy())
    ceiling = math.sqrt(float(np.square(ascending).sum()) / (n * m))
    # the lower half first: noise as long as signal takes less than half of the spectrum
    sigma = min(_bulk_fit(ascending, n, m, min(fit_upto, 0.5)), ceiling)
    signal = -1
    for _ in range(max_rounds):
        now = int((ascending > signal_threshold(sigma, n, m)).sum())
        if now == signal or now >= n - 1:
            break
        signal = now
        sigma = min(_bulk_fit(ascending, n - signal, m - signal, fit_upto), ceiling)
    return sigma


@dataclass
class SnrResult:
    shape: tuple[int, int]
    max_singular_value: float
    sigma: float  # estimated noise standard deviation of the entries
    mp_edge: float  # sigma (sqrt(n) + sqrt(m))
    threshold: float  # mp_edge + Tracy-Widom allowance: the signal/noise cut
    signal_count: int
    noise_count: int
    snr: float  # math.inf when no singular value is at or below the threshold
    snr_ratio: float
    top_over_threshold: float  # how far the largest singular value stands above the cut

    @property
    def infinite(self) -> bool:
        return math.isinf(self.snr)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["shape"] = list(self.shape)
        record["infinite"] = self.infinite
        for key in ("snr", "snr_ratio", "top_over_threshold"):
            if math.isinf(record[key]):  # JSON has no infinity
                record[key] = None
        return record


def weight_snr(weight: torch.Tensor) -> SnrResult:
    w = weight.detach().to(torch.float64)
    if w.dim() != 2:
        raise ValueError(f"SNR needs a 2-D weight, got shape {tuple(w.shape)}")
    singular = torch.linalg.svdvals(w)
    n, m = sorted(w.shape)
    sigma = estimate_sigma(singular, n, m)
    mp_edge = sigma * (math.sqrt(n) + math.sqrt(m))
    threshold = signal_threshold(sigma, n, m)
    is_signal = singular > threshold
    signal = float(singular[is_signal].sum())
    noise = float(singular[~is_signal].sum())
    if noise > 0:
        snr = signal / noise
    else:  # no noise part: infinite, unless there is no signal either (a zero matrix)
        snr = math.inf if signal > 0 else 0.0
    top = float(singular[0])
    return SnrResult(
        shape=(int(w.shape[0]), int(w.shape[1])),
        max_singular_value=top,
        sigma=sigma,
        mp_edge=mp_edge,
        threshold=threshold,
        signal_count=int(is_signal.sum()),
        noise_count=int((~is_signal).sum()),
        snr=snr,
        snr_ratio=snr / top if top > 0 else 0.0,
        top_over_threshold=top / threshold if threshold > 0 else math.inf,
    )


def snr_drop_order(results: list[SnrResult]) -> list[int]:
    """Infinite-SNR layers first (the Cluj-Napoca recipe removes them), then by ascending
    ratio; ties (several layers with no signal at all) by how far the largest singular
    value stands above the cut, most noise-like first."""

    def key(i: int) -> tuple:
        r = results[i]
        return (not r.infinite, r.snr_ratio, r.top_over_threshold)

    return sorted(range(len(results)), key=key)


def snr_scores(ckpt: Checkpoint, module: str = DEFAULT_MODULE) -> dict[str, Any]:
    name = f"{module}.weight"
    if f"{LAYER_PREFIX}0.{name}" not in ckpt:
        raise ValueError(f"{ckpt.path}: layers have no {name!r} to compute the SNR of")
    results = [
        weight_snr(ckpt.get_tensor(f"{LAYER_PREFIX}{i}.{name}")) for i in range(ckpt.num_layers)
    ]
    return {
        "description": f"laserRMT signal-to-noise ratio of {module}: singular values above "
        "the Marchenko-Pastur edge (+ Tracy-Widom 99% allowance) are signal; ratio = SNR / "
        "largest singular value; sigma from a Q-Q fit of the lower 90% of the singular values "
        "to the Marchenko-Pastur law",
        "module": module,
        "layers": [r.to_json() for r in results],
        "scores": [None if r.infinite else r.snr_ratio for r in results],
        "infinite_layers": [i for i, r in enumerate(results) if r.infinite],
        "drop_order": snr_drop_order(results),
    }
