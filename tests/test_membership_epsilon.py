"""Empirical ε lower bounds (DESIGN.md §4.3) against mechanisms whose ε is known."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from collafuse.attacks.membership.epsilon import (
    clopper_pearson_upper, empirical_epsilon, epsilon_from_mu, epsilon_from_rates, gdp_delta,
)

DELTA = 1e-5


def test_clopper_pearson_closed_forms():
    # k = 0: the upper bound solves (1 − p)^n = α.
    for n, alpha in ((10, 0.05), (1000, 0.01)):
        assert clopper_pearson_upper(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-9)
    # k = n − 1: the upper bound solves P(X ≤ n−1 | p) = 1 − p^n = α, so p = (1 − α)^(1/n); k = n gives 1.
    for n, alpha in ((10, 0.05), (1000, 0.05), (50, 0.01)):
        assert clopper_pearson_upper(n - 1, n, alpha) == pytest.approx((1 - alpha) ** (1 / n), rel=1e-9)
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0
    # Monotone in k, and always above the point estimate.
    k = np.arange(0, 51)
    up = clopper_pearson_upper(k, 50, 0.05)
    assert np.all(np.diff(up) > 0) and np.all(up >= k / 50)


def test_gaussian_mechanism_epsilon_matches_balle_wang():
    # Balle & Wang (2018): the Gaussian mechanism with sensitivity 1 and noise σ is
    # (ε, δ)-DP iff Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ) ≤ δ. Check the root directly.
    for sigma in (0.5, 1.0, 2.0, 5.0):
        eps = epsilon_from_mu(1 / sigma, DELTA)
        lhs = norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
        assert lhs == pytest.approx(DELTA, rel=1e-6)
        assert gdp_delta(eps, 1 / sigma) == pytest.approx(DELTA, rel=1e-6)
    # The classical bound √(2 ln(1.25/δ))/σ (valid for ε < 1) is never beaten by the exact one.
    assert epsilon_from_mu(0.2, DELTA) < math.sqrt(2 * math.log(1.25 / DELTA)) / 5.0
    assert epsilon_from_mu(0.0, DELTA) == 0.0


@pytest.mark.parametrize(
    "schedule, t, expected",
    # DESIGN.md §5: one release of a 16×16 image, no clipping, sensitivity 2a√d, δ = 1e-5.
    [("cosine", 200, 4.9e3), ("cosine", 900, 33.0), ("cosine", 990, 2.0), ("linear", 800, 5.7)],
)
def test_payload_release_epsilon_matches_the_design_facts(schedule, t, expected):
    from collafuse.schedule import NoiseSchedule

    sched = NoiseSchedule.create(schedule, 1000)
    mu = 2 * sched.a(t) * math.sqrt(256) / sched.s(t)
    assert epsilon_from_mu(mu, DELTA) == pytest.approx(expected, rel=0.03)


def test_epsilon_from_rates_is_the_dp_inequality():
    # A test with FPR̄ = 0.01 and FNR̄ = 0.5 needs e^ε ≥ (1 − δ − 0.01)/0.5.
    assert epsilon_from_rates(0.01, 0.5, DELTA) == pytest.approx(math.log((1 - DELTA - 0.5) / 0.01))
    assert epsilon_from_rates(0.5, 0.5, DELTA) == 0.0


def _simulate(sigma: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of M(D) = f(D) + N(0, σ²) with sensitivity 1: members f = 1, non-members f = 0."""
    rng = np.random.default_rng(seed)
    return 1.0 + sigma * rng.standard_normal(n), sigma * rng.standard_normal(n)


def test_bounds_stay_below_the_true_epsilon_and_rise_with_the_signal():
    sigmas = (4.0, 2.0, 1.0, 0.5, 0.3)
    cp, gdp = [], []
    for sigma in sigmas:
        true_eps = epsilon_from_mu(1 / sigma, DELTA)
        for seed in range(3):
            m, n = _simulate(sigma, 20_000, seed)
            out = empirical_epsilon(m, n, delta=DELTA, alpha=0.05)
            assert out.delta == DELTA and out.confidence == 0.95 and out.to_json()["caveat"]
            # Sound (never above the truth) and not vacuous: 20,000 draws per side find the signal
            # even at σ = 4, and the Gaussian-DP form recovers most of the true ε (measured: ≥ 0.78×).
            assert 0.0 < out.clopper_pearson.epsilon_lb <= true_eps
            assert 0.75 * true_eps < out.gaussian_dp.epsilon_lb <= true_eps
            assert 0.75 / sigma < out.gaussian_dp.mu_lb <= 1 / sigma
        cp.append(out.clopper_pearson.epsilon_lb)
        gdp.append(out.gaussian_dp.epsilon_lb)
    assert all(b > a for a, b in zip(cp, cp[1:])), cp
    assert all(b > a for a, b in zip(gdp, gdp[1:])), gdp
    # With strong signal the Gaussian-DP form is informative: within a factor 2 of the truth.
    assert gdp[-1] > 0.5 * epsilon_from_mu(1 / sigmas[-1], DELTA)


def test_no_signal_gives_a_near_zero_bound_and_fixed_threshold_mode():
    rng = np.random.default_rng(0)
    m, n = rng.standard_normal(5000), rng.standard_normal(5000)
    out = empirical_epsilon(m, n, delta=DELTA)
    assert out.clopper_pearson.epsilon_lb < 0.1
    fixed = empirical_epsilon(*_simulate(0.5, 5000, 1), delta=DELTA, threshold=0.5)
    assert fixed.to_json()["threshold_selection"] == "fixed in advance" and fixed.to_json()["caveat"] is None
    assert 0 < fixed.clopper_pearson.epsilon_lb <= epsilon_from_mu(2.0, DELTA)
