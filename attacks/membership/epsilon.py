"""Empirical lower bounds on ε from an attack's member / non-member decisions (DESIGN.md §4.3).

A mechanism that is (ε, δ)-DP forces every membership test to satisfy
FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ (Kairouz et al. 2015). Plugging in
Clopper–Pearson *upper* confidence bounds FPR̄, FNR̄ gives the lower bound of
Jagielski, Ullman & Oprea (2020):

    ε_LB = max( ln((1 − δ − FPR̄)/FNR̄), ln((1 − δ − FNR̄)/FPR̄) ).

If the mechanism is μ-Gaussian-DP (Dong, Roth & Su 2019), every test satisfies
FNR ≥ Φ(Φ⁻¹(1 − FPR) − μ), hence μ_LB = Φ⁻¹(1 − FPR̄) − Φ⁻¹(FNR̄), converted to ε at δ with
the exact μ-GDP ↔ (ε, δ) curve δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). That
conversion is a lower bound on ε only for mechanisms whose trade-off curve is
Gaussian-shaped (like the Gaussian mechanism); it is usually tighter.

Confidence: the bound is maximised over a fixed number of label-free thresholds (quantiles
of the pooled scores, default 64). Each FPR̄ and FNR̄ is a one-sided Clopper–Pearson bound at
level 1 − α/(2·n_thresholds) (Bonferroni), so every bound at every threshold holds at once with
probability ≥ 1 − α, and so does their maximum: the multiple-testing problem of "take the best
threshold" is paid for, not ignored. A threshold fixed in advance needs no correction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, norm

from collafuse.attacks.membership.metrics import labels_and_scores
from collafuse.jsonio import encode

CAVEAT = (
    "maximised over label-free thresholds (quantiles of the pooled scores) with a Bonferroni "
    "correction over them, so the maximum holds at the stated confidence; a lower bound on the "
    "epsilon of this run's training, not an upper bound on anything"
)


def clopper_pearson_upper(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound at level 1 − α on a rate with k events out of n.

    Vectorised over ``k``; equals 1 where k = n.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        upper = beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1e-300))
    return np.where(k >= n, 1.0, upper)


def epsilon_from_rates(fpr_upper: np.ndarray, fnr_upper: np.ndarray, delta: float) -> np.ndarray:
    """max(ln((1−δ−FPR̄)/FNR̄), ln((1−δ−FNR̄)/FPR̄)), elementwise; 0 where neither is positive."""
    fpr_upper = np.asarray(fpr_upper, dtype=np.float64)
    fnr_upper = np.asarray(fnr_upper, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log((1.0 - delta - fpr_upper) / fnr_upper)
        b = np.log((1.0 - delta - fnr_upper) / fpr_upper)
    out = np.fmax(np.nan_to_num(a, nan=-np.inf), np.nan_to_num(b, nan=-np.inf))
    return np.maximum(out, 0.0)


def mu_from_rates(fpr_upper: np.ndarray, fnr_upper: np.ndarray) -> np.ndarray:
    """μ_LB = Φ⁻¹(1 − FPR̄) − Φ⁻¹(FNR̄), elementwise, floored at 0."""
    mu = norm.isf(np.asarray(fpr_upper, dtype=np.float64)) - norm.ppf(np.asarray(fnr_upper, dtype=np.float64))
    return np.maximum(np.nan_to_num(mu, nan=0.0, neginf=0.0), 0.0)


def gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of a μ-GDP mechanism: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong et al. 2019, Cor. 2.13)."""
    return float(norm.cdf(-eps / mu + mu / 2.0) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2.0)))


def epsilon_from_mu(mu: float, delta: float) -> float:
    """The smallest ε ≥ 0 at which a μ-GDP mechanism is (ε, δ)-DP.

    For the Gaussian mechanism with sensitivity Δ and noise σ, μ = Δ/σ and this is the
    analytic ε of Balle & Wang (2018).
    """
    if mu <= 0:
        return 0.0
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-10))


def threshold_grid(scores: np.ndarray, n_thresholds: int) -> np.ndarray:
    """Up to ``n_thresholds`` distinct quantiles of the pooled scores (labels are not used)."""
    q = np.quantile(scores, np.linspace(0.0, 1.0, n_thresholds))
    return np.unique(q)


@dataclass(frozen=True)
class ThresholdBound:
    """One form of the ε lower bound at the threshold that maximised it (``mu_lb``: the Gaussian-DP form's μ)."""

    epsilon_lb: float
    threshold: float
    fpr_upper: float | None = None
    fnr_upper: float | None = None
    mu_lb: float | None = None


@dataclass(frozen=True)
class EpsilonBounds:
    """The ε lower bounds of one attack's scores: Clopper–Pearson and Gaussian-DP forms, at δ and 1 − α."""

    delta: float
    confidence: float
    clopper_pearson: ThresholdBound
    gaussian_dp: ThresholdBound
    thresholds: int
    fixed_threshold: bool

    def to_json(self) -> dict:
        """The ``epsilon`` entry of the membership report (∞ through :mod:`collafuse.jsonio`)."""
        cp, gdp = self.clopper_pearson, self.gaussian_dp
        return encode({
            "delta": self.delta,
            "confidence": self.confidence,
            "clopper_pearson": {"epsilon_lb": cp.epsilon_lb, "threshold": cp.threshold, "fpr_upper": cp.fpr_upper,
                                "fnr_upper": cp.fnr_upper},
            "gaussian_dp": {"mu_lb": gdp.mu_lb, "epsilon_lb": gdp.epsilon_lb, "threshold": gdp.threshold,
                            "assumes": "a Gaussian-shaped trade-off curve (mu-GDP)"},
            "thresholds": self.thresholds,
            "threshold_selection": "fixed in advance" if self.fixed_threshold
            else "max over pooled-score quantiles, Bonferroni-corrected",
            "caveat": None if self.fixed_threshold else CAVEAT,
        })


def empirical_epsilon(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    delta: float = 1e-5,
    alpha: float = 0.05,
    threshold: float | None = None,
    n_thresholds: int = 64,
) -> EpsilonBounds:
    """ε lower bounds (Clopper–Pearson form and Gaussian-DP form) from membership scores.

    ``member_scores`` (Nm,), ``nonmember_scores`` (Nn,); higher = more likely member, and a
    candidate is declared a member when its score ≥ threshold. With ``threshold=None`` the
    bound is maximised over :func:`threshold_grid` with a Bonferroni correction (module
    docstring).
    """
    labels, scores = labels_and_scores(member_scores, nonmember_scores)
    m, n = scores[labels == 1], scores[labels == 0]
    thr = np.array([threshold], dtype=np.float64) if threshold is not None else threshold_grid(scores, n_thresholds)
    # Declared member when score >= threshold.
    fp = (n[None, :] >= thr[:, None]).sum(1)
    fn = (m[None, :] < thr[:, None]).sum(1)
    level = alpha / (2.0 * thr.size)
    fpr_u = clopper_pearson_upper(fp, n.size, level)
    fnr_u = clopper_pearson_upper(fn, m.size, level)
    eps = epsilon_from_rates(fpr_u, fnr_u, delta)
    mu = mu_from_rates(fpr_u, fnr_u)
    i, j = int(np.argmax(eps)), int(np.argmax(mu))
    mu_lb = float(mu[j])
    return EpsilonBounds(
        delta=delta, confidence=1.0 - alpha,
        clopper_pearson=ThresholdBound(float(eps[i]), float(thr[i]), float(fpr_u[i]), float(fnr_u[i])),
        gaussian_dp=ThresholdBound(epsilon_from_mu(mu_lb, delta), float(thr[j]), mu_lb=mu_lb),
        thresholds=int(thr.size), fixed_threshold=threshold is not None,
    )
