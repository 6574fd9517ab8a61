"""The one-run audit's ε lower bound (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846; DESIGN.md §4.3):
exact cases, its monotonicity, and simulated Gaussian mechanisms of known ε it must never exceed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from collafuse.attacks.membership.one_run import (GUESS_FRACTIONS, guess_sets, one_run_audit, one_run_audit_sizes,
                                                  one_run_epsilon_lb, p_value)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The exact ε(δ) of μ-GDP (Dong, Roth & Su 2019, Cor. 2.13): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta
    return 0.0 if f(0.0) <= 0 else brentq(f, 0.0, 100.0)


def test_all_correct_at_delta_zero_has_the_closed_form():
    """v = r, δ = 0: p-value = q^r, so ε_LB = logit(β^(1/r)) exactly."""
    for r, beta in ((10, 0.05), (100, 0.05), (500, 0.01)):
        q = beta ** (1 / r)
        assert one_run_epsilon_lb(r, r, 0, 1000, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
        assert one_run_epsilon_lb(r, r // 2, r - r // 2, 1000, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert one_run_epsilon_lb(50, 50, 50, 1000, 1e-5, 0.05) == 0.0   # half right: ε = 0 explains it
    bounds = [one_run_epsilon_lb(v, 50, 50, 1000, 1e-5, 0.05) for v in range(50, 101, 5)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:])) and bounds[-1] > 2.0
    # δ > 0 only loosens the bound; more canaries with δ > 0 loosen it further
    assert one_run_epsilon_lb(90, 50, 50, 1000, 1e-3, 0.05) <= one_run_epsilon_lb(90, 50, 50, 1000, 0.0, 0.05)
    assert one_run_epsilon_lb(90, 50, 50, 10**5, 1e-5, 0.05) <= one_run_epsilon_lb(90, 50, 50, 1000, 1e-5, 0.05)
    # the bound is where the p-value crosses β
    eps = one_run_epsilon_lb(80, 50, 50, 1000, 1e-5, 0.05)
    assert p_value(80, 100, 1000, eps * 0.999, 1e-5) < 0.05 <= p_value(80, 100, 1000, eps * 1.01, 1e-5)


def test_the_inputs_are_validated():
    with pytest.raises(ValueError, match="exceed the m"):
        one_run_epsilon_lb(5, 60, 60, 100, 0.0, 0.05)
    with pytest.raises(ValueError, match="correct = 11 exceeds"):
        one_run_epsilon_lb(11, 5, 5, 100, 0.0, 0.05)
    with pytest.raises(ValueError, match="beta"):
        one_run_epsilon_lb(5, 5, 5, 100, 0.0, 1.0)
    with pytest.raises(ValueError, match="matching"):
        one_run_audit(np.zeros(3), np.zeros(4, bool), 1, 1, 0.0)


def test_guesses_are_the_most_and_least_confident_canaries():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    audit = one_run_audit(scores, included, 2, 2, 0.0, 0.05)
    assert (audit.m, audit.k_plus, audit.k_minus, audit.correct, audit.guesses) == (6, 2, 2, 4, 4)
    assert audit.confidence == pytest.approx(0.95)
    assert set(audit.to_json()) == {"epsilon_lb", "m", "k_plus", "k_minus", "correct", "guesses", "confidence",
                                    "delta", "sizes"}


# ---------------------------------------------------------------------------------------
# ties and guess sizes (issue 21): the bound must come from the scores, never from their order


def test_tied_scores_are_never_right_guesses_whatever_the_order():
    """Information-free, all-equal scores: the old rule (ties broken by position, IN canaries first) counted
    12 of 12 guesses right on 64 canaries and reported ε_LB = 1.258; now no guess is made."""
    included = np.r_[np.ones(32, bool), np.zeros(32, bool)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        order = rng.permutation(64)
        for k in (1, 6, 16, 32):
            audit = one_run_audit(np.zeros(64), included[order], k, k, 1e-5)
            assert audit.epsilon_lb == 0.0 and audit.guesses == 0
        assert one_run_audit_sizes(np.zeros(64), included[order], 1e-5).epsilon_lb == 0.0
    # a tie across a cut: abstain on the tied value only
    scores = np.array([9.0, 8.0, 5.0, 5.0, 5.0, 1.0, 0.0, -1.0])
    guess_in, guess_out = guess_sets(scores, 3, 2)
    assert guess_in.tolist() == [True, True, False, False, False, False, False, False]
    assert guess_out.tolist() == [False, False, False, False, False, False, True, True]


def test_the_bound_does_not_depend_on_the_order_of_the_canaries():
    rng = np.random.default_rng(3)
    included = rng.random(200) < 0.5
    scores = np.round(included * 1.5 + rng.standard_normal(200), 1)  # rounding makes many ties
    reference = one_run_audit_sizes(scores, included, 1e-5)
    for _ in range(20):
        order = rng.permutation(200)
        again = one_run_audit_sizes(scores[order], included[order], 1e-5)
        assert (again.epsilon_lb, again.correct, again.guesses, again.k_plus) == (
            reference.epsilon_lb, reference.correct, reference.guesses, reference.k_plus)


def test_half_the_canaries_per_side_beat_a_tenth_on_a_strong_signal():
    """64 canaries, a strong signal: 10 % per side caps the bound (6 + 6 guesses) where m/2 per side, also fixed
    in advance, goes higher; the union over the sizes fixed in advance keeps most of it."""
    rng = np.random.default_rng(11)
    included = rng.random(64) < 0.5
    scores = included * 6.0 + rng.standard_normal(64)
    tenth = one_run_audit(scores, included, 6, 6, 1e-5).epsilon_lb
    half = one_run_audit(scores, included, 32, 32, 1e-5).epsilon_lb
    union = one_run_audit_sizes(scores, included, 1e-5)
    assert half > tenth + 0.2 and union.epsilon_lb > half > tenth  # here the union picks m/4 per side: 32 of 32 right
    assert union.sizes == (3, 6, 16, 32) and union.confidence == pytest.approx(0.95)


def test_the_union_bound_never_exceeds_the_epsilon_of_a_gaussian_mechanism():
    """1000 one-run audits (m = 256 canaries, the sizes fixed in advance with β split between them) of μ-GDP
    mechanisms y_i = μ·1[IN_i] + N(0, 1): a bound above the mechanism's true ε(δ) is allowed at most in β = 5 %
    of runs (binomial slack for 1000 trials), and on a strong signal the bound is not vacuous."""
    delta, m, trials = 1e-5, 256, 1000
    for mu in (1.0, 3.0):
        true_eps = gdp_epsilon(mu, delta)
        rng = np.random.default_rng(int(mu * 7))
        exceed, bounds = 0, []
        for _ in range(trials):
            included = rng.random(m) < 0.5
            audit = one_run_audit_sizes(mu * included + rng.standard_normal(m), included, delta, 0.05)
            exceed += audit.epsilon_lb > true_eps
            bounds.append(audit.epsilon_lb)
        assert exceed <= trials * 0.05 + 3 * math.sqrt(trials * 0.05 * 0.95), (mu, exceed)
        if mu == 3.0:
            assert np.mean(bounds) > 1.0


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0])
def test_never_exceeds_the_true_epsilon_of_a_gaussian_mechanism(sigma):
    """m canaries, each IN with probability ½; the mechanism releases y_i = 1[IN_i] + N(0, σ²) per canary,
    so adding or removing one canary moves one coordinate by 1: (1/σ)-GDP, whose ε(δ) is exact. The
    audit guesses its 100 highest and 100 lowest y (fixed in advance). Over 20 independent runs the bound
    stays below the true ε (at 95 % confidence at most a few percent of runs may exceed; none do)."""
    delta, m, k = 1e-5, 1000, 100
    true_eps = gdp_epsilon(1 / sigma, delta)
    rng = np.random.default_rng(int(sigma * 100))
    bounds = []
    for _ in range(20):
        included = rng.random(m) < 0.5
        y = included + sigma * rng.standard_normal(m)
        bounds.append(one_run_audit(y, included, k, k, delta, 0.05).epsilon_lb)
    assert max(bounds) <= true_eps, (max(bounds), true_eps)
    if sigma <= 1.0:
        assert np.mean(bounds) > 0.3 * true_eps  # not vacuous where the signal is strong


def test_bound_rises_with_the_signal():
    delta, m, k = 1e-5, 1000, 100
    rng = np.random.default_rng(7)
    means = []
    for sigma in (4.0, 2.0, 1.0, 0.5, 0.25):
        runs = []
        for _ in range(10):
            included = rng.random(m) < 0.5
            runs.append(one_run_audit(included + sigma * rng.standard_normal(m), included, k, k, delta).epsilon_lb)
        means.append(np.mean(runs))
    assert all(b > a for a, b in zip(means, means[1:])), means
    assert means[0] < 0.5 and means[-1] > 2.0, means


# ---------------------------------------------------------------------------------------
# canaries in the run config, the splits, the training and `attack membership`


def test_canaries_config_is_validated_and_absent_when_off():
    from conftest import tiny_config
    from collafuse.config import config_to_yaml
    from collafuse.errors import ConfigError

    assert "canaries" not in config_to_yaml(tiny_config())  # older configs (and their hashes) stay as they were
    assert "canaries" in config_to_yaml(tiny_config(canaries={"count": 8}))
    with pytest.raises(ConfigError, match="canaries.client 5 does not exist"):
        tiny_config(canaries={"count": 8, "client": 5})
    with pytest.raises(ConfigError, match="canaries.count"):
        tiny_config(canaries={"count": -1})


def test_canaries_are_held_out_coin_flipped_and_trained_on_by_one_client_only(tmp_path):
    import torch
    from conftest import tiny_config
    from collafuse.runs import Run, create_run, prepare_data
    from collafuse.transcript import AuditKey

    cfg = tiny_config(canaries={"count": 60, "client": 1})
    data, splits = prepare_data(cfg)
    _, plain = prepare_data(tiny_config())
    assert torch.equal(splits.members, plain.members) and torch.equal(splits.aux, plain.aux)  # other splits unchanged
    used = set(torch.cat([splits.members, splits.nonmembers, splits.aux]).tolist())
    assert len(set(splits.canaries.tolist())) == 60 and not used & set(splits.canaries.tolist())
    assert 15 <= int(splits.canaries_in.sum()) <= 45
    assert torch.equal(splits.training_set(0), splits.clients[0])
    assert len(splits.training_set(1)) == len(splits.clients[1]) + int(splits.canaries_in.sum())
    run = Run.load(create_run(cfg, tmp_path / "run", progress=False))
    _, loaded = run.load_data()
    assert torch.equal(loaded.canaries, splits.canaries) and torch.equal(loaded.canaries_in, splits.canaries_in)
    key = AuditKey.open(run.path)
    sent = set(key.member_index[key.client == 1].tolist())
    assert set(splits.canaries[splits.canaries_in].tolist()) <= sent            # IN canaries were trained on
    assert not set(splits.canaries[~splits.canaries_in].tolist()) & set(key.member_index.tolist())
    assert not set(splits.canaries.tolist()) & set(key.member_index[key.client == 0].tolist())


def test_attack_membership_reports_the_one_run_audit_per_target_and_attack(tmp_path):
    from conftest import tiny_config
    from collafuse.attacks.membership.engine import run_membership
    from collafuse.runs import Run, create_run

    from collafuse.api import formal_ceilings

    run = Run.load(create_run(tiny_config(canaries={"count": 40}), tmp_path / "run", progress=False))
    result = run_membership(run, ("loss", "sima", "payload-lr"), ("client", "server", "payload"),
                            formal=formal_ceilings(run))
    rep = result.to_json()["targets"]
    keys = {"epsilon_lb", "m", "k_plus", "k_minus", "correct", "guesses", "confidence", "delta", "sizes",
            "formal_epsilon"}
    # the canary client's model, the server (it trains on its payloads) and the payloads themselves (T1)
    for key, names in (("client_0", ("loss", "sima")), ("server", ("loss", "sima")), ("payload", ("payload-lr",))):
        for name in names:
            one = rep[key]["attacks"][name]["one_run"]
            assert set(one) == keys
            assert one["m"] == 40 and one["sizes"] == [2, 4, 10, 20] and one["k_plus"] == one["k_minus"]
            assert one["k_plus"] in one["sizes"] and 0 <= one["correct"] <= one["guesses"] <= 2 * one["k_plus"]
            assert one["confidence"] == pytest.approx(0.95) and one["epsilon_lb"] >= 0
            if key == "client_0":
                assert one["formal_epsilon"] == "inf"  # no DP-SGD: the client model has no formal bound
            else:  # the cut's own noise is a Gaussian mechanism: finite, vacuous; the server inherits it
                assert one["formal_epsilon"] == rep["payload"]["attacks"]["payload-lr"]["one_run"]["formal_epsilon"]
                assert one["formal_epsilon"] > 100
    assert "one_run" not in rep["client_1"]["attacks"]["loss"]  # client 1 trained on no canary


def test_payload_channel_one_run_bound_sits_beside_its_formal_epsilon(tmp_path):
    """The payload channel (T1) audited on the canaries' payloads by payload-lr: undefended, the canaries
    sent at c = 0.2 are found (ε_LB > 1 with the guess sizes fixed in advance, m = 100); behind payload noise σ = 1 the
    bound is reported beside the defense's formal ε and stays below it."""
    from conftest import tiny_config
    from collafuse.attacks.membership.engine import run_membership
    from collafuse.runs import Run, create_run

    from collafuse.api import formal_ceilings

    plain = Run.load(create_run(tiny_config(canaries={"count": 100}), tmp_path / "plain", progress=False))
    one = run_membership(plain, ("payload-lr",), ("payload",), formal=formal_ceilings(plain)).targets[
        "payload"].attacks["payload-lr"].one_run
    assert one.m == 100 and one.sizes == (5, 10, 25, 50) and one.k_plus == one.k_minus
    assert one.epsilon_lb > 1.0 and one.epsilon_lb <= one.formal_epsilon, one

    from collafuse.benchmarks.audit.cells import trained_system  # the audit's way to train a defended system
    from collafuse.benchmarks.audit.grid import Cell

    cfg = tiny_config(canaries={"count": 100}, defenses=[{"name": "payload-noise", "sigma": 1.0}])
    cell = Cell("system", "digits", 0.2, "payload-noise", "cut", 1, 2, cfg)
    path, _ = trained_system(cell, tmp_path / "cache")
    noisy_run = Run.load(path)
    noisy = run_membership(noisy_run, ("payload-lr",), ("payload",), formal=formal_ceilings(noisy_run)).targets[
        "payload"].attacks["payload-lr"].one_run
    assert isinstance(noisy.formal_epsilon, float) and math.isfinite(noisy.formal_epsilon), noisy
    assert 0 <= noisy.epsilon_lb <= noisy.formal_epsilon, noisy


def test_report_sets_the_one_run_bound_beside_the_formal_epsilon():
    import pandas as pd
    from collafuse.benchmarks.audit.report.analysis import formal_table

    def row(threat, target, attack, metric, value):
        return {"cell": "c", "kind": "system", "defense": "dp-sgd", "cut_ratio": 0.5, "threat": threat,
                "target": target, "attack": attack, "metric": metric, "value": value}

    rows = pd.DataFrame([
        row("formal", "payload", "accountant", "epsilon_payload", 2.0),
        row("formal", "clients", "accountant", "epsilon_model_clients", 8.0),
        row("T1", "payload", "payload-lr", "epsilon_lb", 0.3),
        row("T1", "payload", "payload-lr", "one_run_epsilon_lb", 0.9),
        row("T3", "client_0", "loss", "one_run_epsilon_lb", 0.4),
        row("T3", "client_0", "sima", "one_run_epsilon_lb", 1.1),
    ])
    table = formal_table(rows, ["c"]).set_index("threat")
    assert table.loc["T1", "formal"] == 2.0 and table.loc["T1", "one_run"] == 0.9
    assert table.loc["T1", "empirical"] == 0.3
    # T3: no threshold ε_LB row, but the one-run bound alone puts it beside the accountant's ε
    assert table.loc["T3", "formal"] == 8.0 and table.loc["T3", "one_run"] == 1.1
    assert (table.loc["T3", "one_run_attack"], table.loc["T3", "one_run_target"]) == ("sima", "client_0")
    assert math.isnan(table.loc["T3", "empirical"])


@pytest.mark.slow
def test_one_run_bound_exceeds_one_on_an_undefended_memorising_client(tmp_path):
    """32 members + 100 canaries (about half IN), 400 full-batch epochs, no defense: the loss attack's
    guesses (the sizes fixed in advance, the confidence split between them) certify ε > 1 at 95 %."""
    from test_reference_attacks import _config, _train
    from collafuse.attacks.membership.engine import run_membership

    cfg = _config(400, 32)
    cfg["canaries"] = {"count": 100}
    cfg["training"]["batch_size"] = 128
    run = _train(cfg, tmp_path / "run")
    one = run_membership(run, ("loss",), ("client",)).targets["client_0"].attacks["loss"].one_run
    assert one.m == 100 and one.sizes == (5, 10, 25, 50)
    assert one.epsilon_lb > 1.0, one
