"""Formal ε of the payload channel and of DP-SGD (DESIGN.md §5): golden points and the math's invariants."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from collafuse.defenses.accounting import (
    calibrate_noise_multiplier, composed_release_epsilon, dpsgd_epsilon, gaussian_delta, gaussian_epsilon,
    l2_sensitivity, poisson_release_epsilon, release_epsilon, release_mu,
)
from collafuse.defenses.guarantees import payload_guarantee
from collafuse.schedule import NoiseSchedule


COSINE = NoiseSchedule.create("cosine", 1000)
LINEAR = NoiseSchedule.create("linear", 1000)
D16 = 16 * 16
DELTA = 1e-5


@pytest.mark.parametrize(
    "schedule, t_c, expected, rel",
    [
        (COSINE, 200, 4.9e3, 0.02),
        (COSINE, 900, 33.0, 0.03),
        (COSINE, 990, 2.0, 0.03),
        (LINEAR, 800, 5.7, 0.02),
    ],
)
def test_per_release_epsilon_matches_design_points(schedule, t_c, expected, rel):
    eps = release_epsilon(schedule.a(t_c), schedule.s(t_c), D16, DELTA)
    assert eps == pytest.approx(expected, rel=rel)


def test_design_point_coefficients():
    assert COSINE.a(200) == pytest.approx(0.948, abs=1e-3)
    assert COSINE.s(200) == pytest.approx(0.318, abs=1e-3)


def test_epsilon_solves_the_balle_wang_condition_and_beats_the_classical_bound():
    for mu in (0.3, 1.0, 5.0, 95.0):
        eps = gaussian_epsilon(mu, DELTA)
        assert gaussian_delta(eps, mu) == pytest.approx(DELTA, rel=1e-6)
        assert gaussian_delta(eps * 0.99, mu) > DELTA  # the smallest such ε
    # The classical mechanism needs σ ≥ Δ√(2 ln(1.25/δ))/ε for ε < 1; the analytic one is tighter.
    eps = 0.5
    sigma_classical = math.sqrt(2 * math.log(1.25 / DELTA)) / eps
    assert gaussian_epsilon(1.0 / sigma_classical, DELTA) < eps


def test_gaussian_delta_against_a_direct_privacy_loss_integral():
    # δ(ε) = P[L > ε] − e^ε P[L' > ε] with L ~ N(μ²/2, μ²) (Balle & Wang 2018, Lemma 3 / Theorem 8).
    mu, eps = 1.7, 2.0
    direct = norm.sf(eps, loc=mu * mu / 2, scale=mu) - math.exp(eps) * norm.sf(eps, loc=-mu * mu / 2, scale=mu)
    assert gaussian_delta(eps, mu) == pytest.approx(direct, rel=1e-9)


def test_epsilon_falls_monotonically_with_sigma_and_with_clip_norm():
    a, s = COSINE.a(200), COSINE.s(200)
    by_sigma = [release_epsilon(a, math.sqrt(s * s + sig * sig), D16, DELTA) for sig in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(x > y for x, y in zip(by_sigma, by_sigma[1:]))
    by_clip = [release_epsilon(a, s, D16, DELTA, clip_norm=c) for c in (16.0, 8.0, 4.0, 2.0, 1.0, 0.5)]
    assert all(x > y for x, y in zip(by_clip, by_clip[1:]))
    # C ≥ √d changes nothing: images in [-1, 1]^d are already that small.
    assert release_epsilon(a, s, D16, DELTA, clip_norm=100.0) == release_epsilon(a, s, D16, DELTA)
    assert l2_sensitivity(a, D16, 2.0) == pytest.approx(2 * a * 2.0)


def test_composition_is_exactly_gdp_and_below_opacus_rdp():
    mu = release_mu(COSINE.a(900), COSINE.s(900), D16)
    for k in (1, 4, 60):
        exact = composed_release_epsilon(mu, k, DELTA)
        assert exact == pytest.approx(gaussian_epsilon(mu * math.sqrt(k), DELTA))
        # RDP (an upper bound on the same mechanism, Opacus' accountant at sample rate 1) is never tighter.
        rdp = dpsgd_epsilon([(1.0 / mu, 1.0, k)], DELTA, "rdp")
        assert exact <= rdp * (1 + 1e-9)
        assert rdp < exact * 1.3
    eps = [composed_release_epsilon(mu, k, DELTA) for k in (1, 2, 10, 60)]
    assert all(x < y for x, y in zip(eps, eps[1:]))


def test_poisson_release_count_mixture():
    mu = 2.0
    # Sampling rate 1 is the deterministic composition.
    assert poisson_release_epsilon(mu, 10, 1.0, DELTA) == pytest.approx(composed_release_epsilon(mu, 10, DELTA), rel=1e-6)
    # Fewer expected releases → smaller ε; and a single release never costs more than one.
    by_q = [poisson_release_epsilon(mu, 40, q, DELTA) for q in (1.0, 0.5, 0.25, 0.1)]
    assert all(x > y for x, y in zip(by_q, by_q[1:]))
    assert poisson_release_epsilon(mu, 40, 0.25, DELTA, single_release=True) <= gaussian_epsilon(mu, DELTA) + 1e-9


def test_no_noise_is_unbounded_and_no_signal_is_free():
    assert release_epsilon(1.0, 0.0, D16, DELTA) == math.inf
    assert release_epsilon(0.0, 1.0, D16, DELTA) == 0.0


def test_payload_guarantee_for_each_setting():
    common = dict(schedule=COSINE, t_c=200, payload_kind="cut", d=D16, epochs=60)
    none = payload_guarantee(**common).epsilon
    noisy = [payload_guarantee(**common, noise_sigma=s).epsilon for s in (0.5, 2.0)]
    clipped = payload_guarantee(**common, clip_norm=2.0).epsilon
    single = payload_guarantee(**common, single_release=True)
    assert none > noisy[0] > noisy[1]
    assert clipped < none
    assert single.epsilon == pytest.approx(single.per_release_epsilon)
    assert single.epsilon < none
    assert payload_guarantee(**common, labels_sent=True).label_epsilon == math.inf
    assert payload_guarantee(**common).label_epsilon == 0.0
    assert payload_guarantee(COSINE, 200, "naive", D16, 60).epsilon == math.inf
    assert payload_guarantee(COSINE, 0, "cut", D16, 60).epsilon == math.inf  # the image itself crosses
    assert payload_guarantee(COSINE, 1000, "cut", D16, 60).epsilon == 0.0  # nothing crosses
    # Trajectory payloads are counted at their lowest step, t_c + 1: a little below the cut's ε.
    assert payload_guarantee(COSINE, 200, "trajectory", D16, 60).epsilon < none


def test_calibrated_sigma_reaches_the_target_with_opacus():
    sigma = calibrate_noise_multiplier(8.0, DELTA, 0.25, 40, "rdp")
    eps = dpsgd_epsilon([(sigma, 0.25, 40)], DELTA, "rdp")
    assert eps <= 8.0 and eps > 7.5
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(-1.0, DELTA, 0.25, 40, "rdp")
    assert np.isfinite(dpsgd_epsilon([(1.0, 0.1, 100)], DELTA, "prv"))
