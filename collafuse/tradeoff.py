"""The ceiling on a membership ROC: the trade-off curve of a formal guarantee (DESIGN.md §4.2 "The ceiling").

A mechanism that is μ-Gaussian-DP (Dong, Roth & Su 2019) lets no test between neighbouring datasets
reach a true-positive rate above Φ(Φ⁻¹(FPR) + μ) at any false-positive rate. One that is (ε, δ)-DP
bounds it by min(1, e^ε·FPR + δ, 1 − e^{−ε}(1 − δ − FPR)) (Kairouz, Oh & Viswanath 2015). Where both
are known, the tighter (the pointwise minimum) holds. Membership inference is such a test, so an
empirical ROC that lies above its ceiling beyond its sampling error is an error of the audit (a wrong
guarantee, or a broken measurement), never leakage.

Pure math, in the core because three parts share it: the defenses state the guarantee, the attacks
check an ROC against it, the report draws it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from collafuse.jsonio import encode


LOOSE_EPSILON = 50.0   # e^{-50} ≈ 2e-22: no audit resolves an FPR that small, so the (ε, δ) curve is 1 in practice
LOOSE_MU = 40.0        # Φ(Φ⁻¹(1e-300) + 40) ≈ 1: likewise for the Gaussian-DP curve


def gdp_tpr_bound(fpr: np.ndarray, mu: float) -> np.ndarray:
    """Φ(Φ⁻¹(FPR) + μ): the largest TPR a μ-GDP mechanism allows at each FPR (1 for μ = ∞)."""
    fpr = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    if math.isinf(mu):
        return np.ones_like(fpr)
    with np.errstate(divide="ignore"):
        return norm.cdf(norm.ppf(fpr) + mu)


def dp_tpr_bound(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """min(1, e^ε·FPR + δ, 1 − e^{−ε}(1 − δ − FPR)): the (ε, δ)-DP region's upper edge (1 for ε = ∞)."""
    fpr = np.clip(np.asarray(fpr, dtype=np.float64), 0.0, 1.0)
    if epsilon > 700.0:  # e^ε overflows a float: the bound is 1 wherever FPR > 0 (and δ at FPR 0)
        return np.where(fpr > 0, 1.0, min(1.0, delta))
    return np.minimum.reduce([np.ones_like(fpr), math.exp(epsilon) * fpr + delta,
                              1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)])


@dataclass(frozen=True)
class Ceiling:
    """A formal guarantee as a trade-off curve: (ε, δ), and the Gaussian-DP μ where the mechanism is Gaussian.

    ``epsilon`` may be ∞ (no (ε, δ) bound); ``mu`` None where no GDP form is known. ``source`` says where
    the guarantee comes from, in words (e.g. "payload channel: 3 releases at t = 180").
    """

    epsilon: float
    delta: float
    mu: float | None = None
    source: str = ""

    @property
    def finite(self) -> bool:
        """Whether the curve bounds anything a finite sample could test: ε below :data:`LOOSE_EPSILON`, or a finite μ
        below :data:`LOOSE_MU` (beyond them the curve is 1 at every FPR a sample resolves)."""
        return self.epsilon < LOOSE_EPSILON or (self.mu is not None and self.mu < LOOSE_MU)

    def tpr_bound(self, fpr: np.ndarray) -> np.ndarray:
        """The largest TPR any attack can reach at each FPR under this guarantee."""
        bound = dp_tpr_bound(fpr, self.epsilon, self.delta)
        if self.mu is not None:
            bound = np.minimum(bound, gdp_tpr_bound(fpr, self.mu))
        return bound

    def to_json(self) -> dict:
        return encode({"epsilon": self.epsilon, "delta": self.delta, "mu": self.mu, "source": self.source})


def tighter(a: Ceiling | None, b: Ceiling | None) -> Ceiling | None:
    """The ceiling that both guarantees impose (the pointwise minimum): smaller ε, smaller μ.

    Two guarantees on the same mechanism at the same δ: each alone bounds every test, so both hold."""
    if a is None or b is None:
        return a if b is None else b
    mus = [m for m in (a.mu, b.mu) if m is not None]
    return Ceiling(min(a.epsilon, b.epsilon), max(a.delta, b.delta), min(mus) if mus else None,
                   "; ".join(s for s in (a.source, b.source) if s))
