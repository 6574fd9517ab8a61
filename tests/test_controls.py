"""The controls every membership result carries (DESIGN §4.2; issue 21): the model-blind baseline, held-out
thresholds, the formal ceiling on every ROC, and the INCONCLUSIVE verdict a distribution shift forces."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from collafuse.attacks.membership.controls import (
    above_blind, blind_auc_spread, blind_control, ceiling_check, heldout_rates, threshold_at,
)
from collafuse.tradeoff import Ceiling, dp_tpr_bound, gdp_tpr_bound, tighter


def phi(x: float) -> float:
    """Standard normal CDF from math.erf (independent of scipy)."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def phi_inv(p: float) -> float:
    """Its inverse by bisection (independent of scipy)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi(mid) < p else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------- the trade-off curves (golden numbers)

def test_gdp_and_dp_ceilings_match_an_independent_computation():
    for fpr, mu in ((0.01, 1.0), (0.001, 2.5), (0.3, 0.2)):
        assert gdp_tpr_bound(np.array([fpr]), mu)[0] == pytest.approx(phi(phi_inv(fpr) + mu), abs=1e-9)
    # (ε, δ) = (1, 1e-5) at FPR 0.01: min(1, e·0.01 + 1e-5, 1 − e^{−1}(1 − 1e-5 − 0.01)) = 0.027192818...
    assert dp_tpr_bound(np.array([0.01]), 1.0, 1e-5)[0] == pytest.approx(math.e * 0.01 + 1e-5, rel=1e-12)
    assert dp_tpr_bound(np.array([0.01]), 1.0, 1e-5)[0] == pytest.approx(0.0271928182845904, abs=1e-15)
    # Near FPR 1 the second edge binds: 1 − e^{−ε}(1 − δ − FPR).
    assert dp_tpr_bound(np.array([0.9]), 1.0, 1e-5)[0] == pytest.approx(1 - math.exp(-1) * (1 - 1e-5 - 0.9), rel=1e-12)
    assert gdp_tpr_bound(np.array([0.0, 0.5, 1.0]), math.inf).tolist() == [1.0, 1.0, 1.0]
    both = Ceiling(2.0, 1e-5, 0.5)
    grid = np.logspace(-4, 0, 50)
    assert np.allclose(both.tpr_bound(grid), np.minimum(dp_tpr_bound(grid, 2.0, 1e-5), gdp_tpr_bound(grid, 0.5)))
    t = tighter(Ceiling(3.0, 1e-5, 1.0, "a"), Ceiling(1.0, 1e-6, None, "b"))
    assert (t.epsilon, t.delta, t.mu) == (1.0, 1e-5, 1.0)
    assert not Ceiling(math.inf, 1e-5, None).finite and Ceiling(math.inf, 1e-5, 1.0).finite


# ---------------------------------------------------------------- the formal ceiling on an ROC

def test_a_correct_ceiling_is_never_beaten_and_a_wrong_mu_is_caught():
    rng = np.random.default_rng(0)
    flagged = 0
    for _ in range(200):  # Gaussian scores of a true μ = 1 mechanism: its ceiling holds (false alarm ≤ α)
        m, n = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
        flagged += ceiling_check(m, n, Ceiling(math.inf, 1e-5, 1.0)).above
    assert flagged <= 10  # α = 0.05 of 200, and Bonferroni makes it far rarer
    m, n = rng.normal(3.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    wrong = ceiling_check(m, n, Ceiling(math.inf, 1e-5, 1.0))  # the truth is μ = 3
    assert wrong.above and wrong.gap > 0.2
    assert not ceiling_check(m, n, Ceiling(math.inf, 1e-5, 3.5)).above
    # An (ε, δ) ceiling: ε = 0.5 cannot hold a μ = 3 separation either.
    assert ceiling_check(m, n, Ceiling(0.5, 1e-5)).above


# ---------------------------------------------------------------- held-out thresholds

def test_heldout_threshold_is_the_in_sample_rule_on_the_calibration_half():
    m, n = np.array([5.0, 4.0, 3.0, 0.5]), np.array([2.0, 1.0, 0.0, -1.0])
    assert threshold_at(m, n, 0.01) == 3.0            # every member above every non-member: TPR 1 at FPR 0
    assert threshold_at(np.array([0.0]), np.array([1.0]), 0.01) == math.inf  # only the empty decision keeps FPR 0
    h = heldout_rates(np.arange(100.0) + 100, np.arange(100.0), seed=3)  # separable
    r = h.at(0.01)
    assert h.n_calibration == (50, 50) and h.n_test == (50, 50)
    # The threshold is the calibration half's lowest member score: held-out members below it are missed.
    assert r.fpr.value == 0.0 and r.tpr.value >= 0.9 and not r.resolved  # 50 calibration non-members < 100


def test_heldout_fpr_interval_covers_the_thresholds_true_fpr_under_the_null():
    """Random scores (an untrained model): the threshold fixed on the calibration half has a true FPR of
    1 − Φ(threshold); the Wilson interval of the FPR reached on the held-out half must cover it ~95 %."""
    rng = np.random.default_rng(1)
    covered, realised = 0, []
    trials = 300
    for seed in range(trials):
        s = rng.normal(size=1200)
        r = heldout_rates(s[:600], s[600:], seed).at(0.01)
        true_fpr = 1.0 - phi(r.threshold)
        covered += r.fpr.contains(true_fpr)
        realised.append(r.fpr.value)
    assert covered / trials >= 0.90
    assert abs(np.mean(realised) - 0.01) < 0.004  # nominal 1 % on average


# ---------------------------------------------------------------- the model-blind baseline

def digits(n: int) -> torch.Tensor:
    from collafuse.data import load_source

    return load_source("digits", 1, 16).images[:n]


def test_blind_control_on_a_random_split_of_the_embedded_data_sees_nothing():
    images = digits(800)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    blind = blind_control(images[order[:400]], images[order[400:]], seed=0)
    assert 0.4 <= blind.auc.value <= 0.6
    assert blind.p_value > 0.01 and not blind.exceeds(0.6)


def test_blind_control_sees_a_shifted_non_member_set():
    images = digits(400)
    brighter = (images[200:] * 0.8 + 0.25).clamp(-1, 1)  # another exposure: the same digits, brighter
    blind = blind_control(images[:200], brighter, seed=0)
    assert blind.auc.value >= 0.9 and blind.p_value <= 0.002 and blind.exceeds(0.6)


def test_blind_p_value_is_valid_under_the_null():
    rejections = 0
    for seed in range(40):
        x = torch.randn(80, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        rejections += blind_control(x[:40], x[40:], seed, n_boot=0, permutations=199).p_value <= 0.05
    assert rejections <= 6  # 5 % of 40 is 2; binomial 99.9 % upper tail ≈ 8


def test_above_blind_holds_its_level_and_has_power():
    rng = np.random.default_rng(2)
    random_above, own_above, strong_above = 0, 0, 0
    for seed in range(40):
        x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        x[:64] += 0.15  # a shift the blind classifier half sees
        blind = blind_control(x[:64], x[64:], seed, n_boot=0, permutations=0)
        spread = blind_auc_spread(blind, n_boot=100)
        noise = rng.normal(size=128)
        random_above += above_blind(noise[:64], noise[64:], blind, seed, spread).above
        own = np.r_[blind.member_scores, blind.nonmember_scores] + rng.normal(size=128) * 0.1
        own_above += above_blind(own[:64], own[64:], blind, seed, spread).above   # re-discovers the shift only
        strong = rng.normal(size=128) + np.r_[np.full(64, 2.5), np.zeros(64)]
        strong_above += above_blind(strong[:64], strong[64:], blind, seed, spread).above
    assert random_above <= 4 and own_above <= 4
    assert strong_above >= 36


# ---------------------------------------------------------------- the verdict

def _rows(blind_auc: float, blind_p: float) -> pd.DataFrame:
    base = {"cell": "c", "config_hash": "h", "kind": "system", "dataset": "d", "cut_ratio": 0.5, "defense": "none",
            "ci_low": np.nan, "ci_high": np.nan, "t": np.nan, "epoch": np.nan}
    rows = [
        ("T1", "payload", "rescale", "reid_pool", 0.01), ("T1", "payload", "payload-lr", "auc", 0.52),
        ("T1", "payload", "blind", "blind_auc", blind_auc), ("T1", "payload", "blind", "blind_p_value", blind_p),
        ("T3", "client_0", "loss", "auc", 0.55), ("T3", "client_0", "blind", "blind_auc", blind_auc),
        ("T3", "client_0", "blind", "blind_p_value", blind_p),
    ]
    return pd.DataFrame([{**base, "threat": t, "target": g, "attack": a, "metric": m, "value": v}
                         for t, g, a, m, v in rows])


def test_a_blind_control_above_its_limit_makes_membership_inconclusive_and_reid_is_still_judged():
    from collafuse.benchmarks.audit.policy import parse_policy
    from collafuse.benchmarks.audit.verdict import evaluate_cell, threat_verdicts

    class FakeCell:  # only what the checks read
        kind, cell_id, config_hash, t_c = "system", "c", "h", 10
        run_config = type("R", (), {"diffusion": type("D", (), {"T": 100})()})()

    policy = parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.05}, "auc": {"max": 0.6}},
                                      "T3": {"auc": {"max": 0.6}}}})
    shifted = evaluate_cell(policy, FakeCell(), _rows(0.95, 0.001))
    status = {(c.threat, c.metric): c.status for c in shifted.checks}
    assert status == {("T1", "reid_pool"): "pass", ("T1", "auc"): "inconclusive", ("T3", "auc"): "inconclusive"}
    assert shifted.inconclusive and not shifted.passed
    assert {t.threat: t.status for t in threat_verdicts(policy, [shifted], None)} == {"T1": "inconclusive",
                                                                                   "T3": "inconclusive"}
    # A blind AUC above the limit by chance (not significant) decides nothing; a fair split passes.
    for auc, p in ((0.65, 0.2), (0.5, 0.6)):
        fair = evaluate_cell(policy, FakeCell(), _rows(auc, p))
        assert fair.passed and not fair.inconclusive
    # A policy may move the limit.
    lenient = parse_policy({"blind_auc": 0.97, "limits": {"T3": {"auc": {"max": 0.6}}}})
    assert evaluate_cell(lenient, FakeCell(), _rows(0.95, 0.001)).passed


# ---------------------------------------------------------------- through the engine

def test_the_engine_flags_an_roc_above_a_deliberately_wrong_ceiling(tiny_runs):
    """The payloads of a c = 0.2 run give their images away (payload-lr AUC near 1). Claimed μ = 0.05 for the
    payload channel is wrong, and the ROC lies far above its curve: flagged as an error of the audit. The true
    guarantee of this run (huge: no noise defense) is never flagged."""
    from collafuse.api import formal_ceilings
    from collafuse.attacks.membership.engine import run_membership
    from collafuse.runs import Run

    run = Run.load(tiny_runs["cut"])
    wrong = run_membership(run, ("payload-lr",), ("payload",), formal={"T1": Ceiling(math.inf, 1e-5, 0.05, "wrong")})
    outcome = wrong.targets["payload"].attacks["payload-lr"]
    assert outcome.metrics.auc.value > 0.9 and outcome.ceiling.above
    right = run_membership(run, ("payload-lr",), ("payload",), formal=formal_ceilings(run))
    check = right.targets["payload"].attacks["payload-lr"].ceiling
    assert check is None or not check.above
    # Every control rides along, and the per-record evidence has one row per candidate.
    target = right.targets["payload"]
    assert target.blind is not None and 0.3 <= target.blind.auc.value <= 0.7
    frame = right.score_frame()
    assert len(frame) == target.n_members + target.n_nonmembers
    assert (frame["candidate"] >= 0).all() and frame["member"].sum() == target.n_members
