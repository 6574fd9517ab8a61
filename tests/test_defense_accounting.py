"""Formal ε of the payload channel and of DP-SGD (DESIGN.md §5): golden points and the math's invariants."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from collafuse.defenses.accounting import (
    calibrate_noise_multiplier, compose_gaussian_mu, composed_release_epsilon, dpsgd_epsilon, gaussian_delta,
    gaussian_epsilon, l2_sensitivity, mixture_delta, poisson_release_epsilon, release_epsilon, release_mu,
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


# ----------------------------------------------------------------------------- golden numbers
# Computed once with this code and cross-checked independently (see each test). The
# tolerance is far below any modelling change and far above float64 / root-finder noise
# (brentq runs to xtol 1e-12 for one release, 1e-10 for the Poisson mixture).


@pytest.mark.parametrize(
    "epsilon, mu, expected",
    # δ(ε; μ) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ): matched by mpmath at 60 digits to 3e-15
    # relative, and by scipy's plain norm.cdf form of Balle & Wang (2018, Thm 8).
    [(0.0, 1.0, 0.3829249225480263), (1.0, 1.0, 0.12693673750664392), (2.0, 1.7, 0.2142165523923298),
     (10.0, 3.0, 0.018589514315857855), (0.5, 0.5, 0.05244032328766968)],
)
def test_gaussian_delta_golden(epsilon, mu, expected):
    assert gaussian_delta(epsilon, mu) == pytest.approx(expected, rel=1e-9)


def test_gaussian_delta_at_zero_epsilon_is_the_total_variation():
    # δ(0; μ) = Φ(μ/2) − Φ(−μ/2) = 2Φ(μ/2) − 1: an independent closed form.
    for mu in (0.1, 1.0, 4.0):
        assert gaussian_delta(0.0, mu) == pytest.approx(2 * norm.cdf(mu / 2) - 1, rel=1e-12)


@pytest.mark.parametrize(
    "mu, expected",
    # The root of δ(ε; μ) = 1e-5, by 200-step bisection in mpmath (60 digits): agreement to 8e-14.
    [(0.3, 1.1317748966409809), (1.0, 4.377178095681427), (5.0, 33.10373233592253), (95.0, 4916.686455135372)],
)
def test_gaussian_epsilon_golden(mu, expected):
    assert gaussian_epsilon(mu, DELTA) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "schedule, t, mu, epsilon, mu_clip2",
    # μ = 2·a_t·16/s_t (no clipping, d = 256) and 2·a_t·2/s_t (C = 2); the mpmath schedule gives the same μ to 4e-16.
    [
        (COSINE, 200, 95.3162063580241, 4948.124567527727, 11.914525794753013),
        (COSINE, 900, 5.027816498051605, 33.360810815324335, 0.6284770622564506),
        (COSINE, 990, 0.4987446352801831, 1.9875045480863673, 0.062343079410022886),
        (LINEAR, 800, 1.253501902918978, 5.698328167487846, 0.15668773786487225),
    ],
)
def test_release_mu_and_epsilon_golden(schedule, t, mu, epsilon, mu_clip2):
    a, s = schedule.a(t), schedule.s(t)
    assert release_mu(a, s, D16) == pytest.approx(mu, rel=1e-12)
    assert release_mu(a, s, D16) == pytest.approx(2 * a * 16 / s, rel=1e-15)
    assert release_mu(a, s, D16, clip_norm=2.0) == pytest.approx(mu_clip2, rel=1e-12)
    assert release_epsilon(a, s, D16, DELTA) == pytest.approx(epsilon, rel=1e-9)


def test_composition_golden():
    mu = release_mu(COSINE.a(900), COSINE.s(900), D16)
    # Independent: the mpmath root at μ√k (33.36081081532426, 92.61169726735967, 923.5168360050002).
    for k, expected in ((1, 33.360810815324335), (4, 92.61169726735967), (60, 923.5168360050125)):
        assert composed_release_epsilon(mu, k, DELTA) == pytest.approx(expected, rel=1e-9)
    assert compose_gaussian_mu([0.3, 0.4, 1.2]) == pytest.approx(1.3, rel=1e-15)  # √(0.09 + 0.16 + 1.44)


def test_rdp_golden_against_the_closed_form_at_sample_rate_one():
    # At q = 1 the RDP of k Gaussian steps is k·α/(2σ²) and Opacus converts with
    # ε = min_α rdp(α) − (log δ + log α)/(α − 1) + log((α − 1)/α) over its default orders:
    # recomputed here in numpy, independently of Opacus.
    mu = release_mu(COSINE.a(900), COSINE.s(900), D16)
    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    for k, expected in ((1, 35.34674582023217), (4, 96.95312463929572)):
        rdp = k * alphas * mu * mu / 2
        by_hand = float(np.min(rdp - (np.log(DELTA) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)))
        assert by_hand == pytest.approx(expected, rel=1e-12)
        assert dpsgd_epsilon([(1.0 / mu, 1.0, k)], DELTA, "rdp") == pytest.approx(expected, rel=1e-9)


def test_dpsgd_epsilon_golden():
    # Opacus' own accountants (opacus 1.6.0), pinned so that a changed history (σ, q, steps) or
    # accountant wiring shows. Subsampled RDP and PRV have no independent closed form here; a new
    # Opacus release may move them and must then be re-pinned deliberately.
    assert dpsgd_epsilon([(1.0, 0.01, 1000)], DELTA, "rdp") == pytest.approx(2.1013652716430564, rel=1e-9)
    assert dpsgd_epsilon([(1.1, 0.25, 40)], DELTA, "rdp") == pytest.approx(10.686809130199526, rel=1e-9)
    assert dpsgd_epsilon([(1.0, 0.1, 100)], DELTA, "prv") == pytest.approx(7.057056439561377, rel=1e-9)
    assert dpsgd_epsilon([(1.0, 0.01, 1000)], DELTA, "prv") == pytest.approx(1.838371637017295, rel=1e-9)
    # PRV is the tighter accountant on the same history.
    assert dpsgd_epsilon([(1.0, 0.01, 1000)], DELTA, "prv") < dpsgd_epsilon([(1.0, 0.01, 1000)], DELTA, "rdp")
    assert dpsgd_epsilon([], DELTA, "rdp") == 0.0


def test_poisson_release_golden():
    # Independent: Σ_r Binom(r; n, q)·δ_G(ε; μ√r) = 1e-5 solved by bisection in mpmath (60 digits):
    # 62.61606412159005, 9.997251544980928, 8.16969437482247 (agreement to 2e-12).
    assert poisson_release_epsilon(2.0, 40, 0.25, DELTA) == pytest.approx(62.616064121590064, rel=1e-9)
    assert poisson_release_epsilon(2.0, 40, 0.25, DELTA, single_release=True) == pytest.approx(9.997251545002033, rel=1e-9)
    assert poisson_release_epsilon(1.0, 10, 0.1, DELTA) == pytest.approx(8.169694374811934, rel=1e-9)
    assert poisson_release_epsilon(2.0, 10, 1.0, DELTA) == pytest.approx(46.21121019121809, rel=1e-9)
    # mixture δ at ε = 3, μ = 1, P(r) = (1/4, 1/2, 1/4): ½δ_G(3; 1) + ¼δ_G(3; √2) (mpmath: 0.00868664123114719).
    assert mixture_delta(3.0, 1.0, [0.25, 0.5, 0.25]) == pytest.approx(0.0086866412311472, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, t_release, per_release, epsilon",
    # Cosine T = 1000, t_c = 200, cut payloads, 16×16, 60 epochs, δ = 1e-5. Cross-checked end to end in
    # mpmath: ᾱ from the definition, t' = the first step with ᾱ_t' ≤ ᾱ_200/(1 + σ²) (351 for σ = 0.5,
    # 720 for σ = 2), μ = 2a·min(C, 16)/s, ε the root at μ√60 (or μ for one release): agreement to 1e-14.
    [
        ({}, 200, 4948.124567527727, 275703.2165048404),
        ({"noise_sigma": 0.5}, 351, 1523.6006486984452, 80080.52992704316),
        ({"noise_sigma": 2.0}, 720, 174.11904445543755, 7173.126173173642),
        ({"clip_norm": 2.0}, 200, 120.93833886422675, 4651.3049241968),
        ({"single_release": True}, 200, 4948.124567527727, 4948.124567527727),
    ],
)
def test_payload_guarantee_golden(kwargs, t_release, per_release, epsilon):
    g = payload_guarantee(COSINE, 200, "cut", D16, 60, **kwargs)
    assert g.t_release == t_release
    assert g.per_release_epsilon == pytest.approx(per_release, rel=1e-9)
    assert g.epsilon == pytest.approx(epsilon, rel=1e-9)


def test_payload_guarantee_golden_high_cut_trajectory_and_poisson():
    high = payload_guarantee(COSINE, 900, "cut", D16, 60)
    assert high.t_release == 900 and high.mu_per_release == pytest.approx(5.027816498051605, rel=1e-12)
    assert high.sensitivity == pytest.approx(4.966882877564958, rel=1e-12)
    assert high.epsilon == pytest.approx(923.5168360050125, rel=1e-9)
    # Trajectory: counted at t_c + 1 = 201 (mpmath: μ = 94.82581331846558, ε = 272889.68635202426).
    traj = payload_guarantee(COSINE, 200, "trajectory", D16, 60)
    assert traj.t_release == 201 and traj.mu_per_release == pytest.approx(94.8258133184655, rel=1e-12)
    assert traj.epsilon == pytest.approx(272889.6863520239, rel=1e-9)
    # Poisson loader: the worst client over (rounds, q) is reported.
    pois = payload_guarantee(COSINE, 900, "cut", D16, 60, poisson_rounds=[(40, 0.25), (20, 0.5)])
    assert pois.epsilon == pytest.approx(311.8842342264554, rel=1e-9)
    assert pois.epsilon == pytest.approx(max(poisson_release_epsilon(high.mu_per_release, 40, 0.25, DELTA),
                                             poisson_release_epsilon(high.mu_per_release, 20, 0.5, DELTA)), rel=1e-12)
