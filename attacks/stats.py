"""Confidence intervals for attack metrics (DESIGN.md §4.1, §4.2: "each with a confidence interval").

Three well-known constructions, all pure functions of arrays:

- :func:`t_interval` — Student-t interval for a mean of (roughly) independent values;
- :func:`wilson_interval` — Wilson score interval for a binomial proportion
  (Wilson 1927; good coverage even near 0 and 1, unlike the Wald interval);
- :func:`cluster_bootstrap_interval` — percentile bootstrap that resamples whole
  clusters, for values that are not independent (e.g. several payloads of the same
  image across epochs share that image).

:func:`summarize` picks between them and returns one :class:`Interval`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

from collafuse.jsonio import encode


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval: the project's one interval type.

    ``low`` / ``high`` are None where no interval was computed (no bootstrap); ±∞ where the
    construction gives no finite bound (a t interval of one value). ``method`` names the construction;
    ``n`` is the number of independent units (values, or clusters when a cluster bootstrap was used).
    """

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    method: str | None = None
    level: float = 0.95

    def ci(self) -> list[float] | None:
        """[low, high], or None without an interval."""
        return None if self.low is None else [self.low, self.high]

    def finite_bounds(self) -> tuple[float | None, float | None]:
        """(low, high) with every non-finite or absent bound as None: how a results row stores them."""
        def finite(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return finite(self.low), finite(self.high)

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in [low, high] (False without an interval)."""
        return self.low is not None and self.low <= x <= self.high

    def to_json(self) -> dict:
        """The interval as the attack reports write it (∞ as "inf", through :mod:`collafuse.jsonio`)."""
        return encode(asdict(self))


def t_interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """Mean of ``values`` (shape (n,)) with the Student-t interval mean ± t_{n-1} · sd/√n."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "t")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, "t", level)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, "t", level)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Proportion successes/n with the Wilson score interval (Wilson 1927)."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "wilson", level)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n={n}, got {successes}")
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; say so instead of a rounding residue.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, lo, hi, n, "wilson", level)


def cluster_bootstrap_interval(
    values: np.ndarray,
    clusters: np.ndarray,
    rng: np.random.Generator,
    level: float = 0.95,
    n_boot: int = 1000,
) -> Interval:
    """Mean of ``values`` (n,) with a percentile bootstrap that resamples whole ``clusters`` (n,).

    The statistic is the row mean of the resampled clusters (each cluster keeps all
    its rows), so images with more payloads weigh as they do in the point estimate.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    c = np.asarray(clusters).ravel()
    if x.shape != c.shape:
        raise ValueError(f"values and clusters must have the same shape, got {x.shape} and {c.shape}")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "cluster-bootstrap", level)
    # Clusters numbered in order of first appearance, not by their labels: the interval must not depend
    # on how images happen to be numbered (an imported copy of a run numbers them differently).
    _, first, inverse = np.unique(c, return_index=True, return_inverse=True)
    inverse = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse.ravel()]
    k = int(inverse.max()) + 1
    sums = np.bincount(inverse, weights=x, minlength=k)
    counts = np.bincount(inverse, minlength=k).astype(np.float64)
    mean = float(x.mean())
    if k == 1:
        return Interval(mean, -math.inf, math.inf, 1, "cluster-bootstrap", level)
    draws = rng.integers(0, k, size=(n_boot, k))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(mean, float(lo), float(hi), k, "cluster-bootstrap", level)


def summarize(
    values: np.ndarray,
    clusters: np.ndarray | None = None,
    proportion: bool = False,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """One interval for per-row ``values``: Wilson (0/1 values) or t (means) when every row is
    its own cluster, else a cluster bootstrap with a fixed ``seed``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    independent = clusters is None or np.unique(np.asarray(clusters)).size == x.size
    if independent:
        if proportion:
            return wilson_interval(int(round(x.sum())), x.size, level)
        return t_interval(x, level)
    return cluster_bootstrap_interval(x, np.asarray(clusters), np.random.default_rng(seed), level)
