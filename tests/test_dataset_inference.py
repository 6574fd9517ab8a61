"""Dataset inference per client (DESIGN.md §4.2; issue 25 part B, item 1).

The statistics against their oracles (scipy's Welch test, scikit-learn's logistic regression), the p-value
under its null (random scores with ties and small samples, and untrained models: 40 seeds each, plus 1,000
draws for the rate itself), its power where no single image leaks (best per-image AUC ≤ 0.6, p < 0.01 with
at most 256 member images), a memorising client (p < 1e-6), and the wiring: engine, audit rows, policy.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats
from sklearn.linear_model import LogisticRegression

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.dataset_inference import (
    NAME, DatasetInferenceSettings, combined_test, dataset_inference, logistic_fit, per_client, size_grid,
    welch_greater,
)
from collafuse.attacks.membership.engine import MembershipSettings, run_membership
from collafuse.attacks.membership.signals import ModelView, model_signal_cache
from collafuse.config import config_from_dict
from collafuse.data import load_digits16
from collafuse.model import UNetConfig
from collafuse.runs import Run, create_run
from collafuse.schedule import NoiseSchedule
from collafuse.training import build_model

from collafuse.benchmarks.audit.cells.rows import dataset_rows
from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.policy import parse_policy
from collafuse.benchmarks.audit.results import cell_columns
from collafuse.benchmarks.audit.verdict import evaluate_cell

SEEDS = range(40)
MODEL_ATTACKS = ("loss", "sima", "pia", "secmi")


# ---------------------------------------------------------------- the statistics against their oracles

def test_welch_greater_is_scipys_one_sided_welch_test():
    rng = np.random.default_rng(0)
    for n1, n2 in [(2, 2), (3, 17), (25, 9), (200, 200)]:
        x, y = rng.normal(0.3, 1.0, n1), rng.normal(0.0, 2.0, n2)
        t, p = welch_greater(x, y)
        ref = stats.ttest_ind(x, y, equal_var=False, alternative="greater")
        assert math.isclose(t, ref.statistic, rel_tol=1e-12) and math.isclose(p, ref.pvalue, rel_tol=1e-9)
    # constant samples, where scipy gives NaN: no spread, so the exact permutation p of the order stands in
    assert welch_greater(np.ones(4), np.ones(5)) == (0.0, 1.0)
    assert welch_greater(np.zeros(4), np.ones(5))[1] == 1.0
    assert welch_greater(np.ones(4), np.zeros(5))[1] == 1 / math.comb(9, 4)
    with pytest.raises(ValueError, match="at least 2 values per side"):
        welch_greater(np.ones(1), np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        welch_greater(np.array([1.0, np.nan]), np.ones(5))


def test_logistic_fit_is_scikit_learns_default_logistic_regression():
    rng = np.random.default_rng(1)
    cases = [rng.normal(size=(30, 3)), rng.normal(size=(8, 1)), np.c_[rng.normal(size=(40, 2)), np.zeros(40)]]
    for x in cases:
        labels = (rng.random(len(x)) < 0.5).astype(float)
        labels[:2] = [0.0, 1.0]
        ref = LogisticRegression(tol=1e-12, max_iter=100_000).fit(x, labels)
        np.testing.assert_allclose(logistic_fit(x, labels), np.r_[ref.intercept_, ref.coef_[0]], atol=1e-6)
    # separable rows: the L2 penalty keeps the coefficients finite, as scikit-learn's
    x = np.r_[rng.normal(3, 0.1, (5, 2)), rng.normal(-3, 0.1, (5, 2))]
    labels = np.r_[np.ones(5), np.zeros(5)]
    ref = LogisticRegression(tol=1e-12, max_iter=100_000).fit(x, labels)
    np.testing.assert_allclose(logistic_fit(x, labels), np.r_[ref.intercept_, ref.coef_[0]], atol=1e-6)


def test_settings_and_inputs_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        DatasetInferenceSettings(alpha=0.0)
    with pytest.raises(ValueError, match="min_size"):
        DatasetInferenceSettings(min_size=3)
    with pytest.raises(ValueError, match="at least 4 suspect and held-out"):
        dataset_inference(np.zeros((3, 1)), np.zeros((9, 1)), ("loss",), 0, 0)
    with pytest.raises(ValueError, match=r"\(n, F\) with F = 2"):
        dataset_inference(np.zeros((9, 1)), np.zeros((9, 1)), ("loss", "sima"), 0, 0)
    assert size_grid(40, 4) == (4, 8, 16, 32, 40) and size_grid(4, 4) == (4,)


# ---------------------------------------------------------------- the null: p-values are valid

def _gauss(r, n):
    return r.normal(size=(n, 3))


def _ties(r, n):  # three values per attack: most scores tie
    return r.integers(0, 3, size=(n, 2)).astype(float)


def _heavy(r, n):  # Student t with 2 degrees of freedom: no variance
    return r.standard_t(2, size=(n, 3))


def _constant(r, n):  # an attack that says nothing
    return np.ones((n, 2))


@pytest.mark.parametrize("scores, n_suspect, n_heldout", [
    (_gauss, 64, 64), (_gauss, 4, 4), (_ties, 16, 16), (_ties, 6, 10), (_heavy, 16, 64), (_constant, 8, 8)])
def test_under_the_null_random_scores_reject_at_their_level(scores, n_suspect, n_heldout):
    """Suspect and held-out scores from one distribution: over 40 seeds the p-value falls below 0.05 at most 10 % of
    the time, whatever the ties and however small the sets; a constant attack never rejects."""
    p = []
    for seed in SEEDS:
        r = np.random.default_rng(seed)
        suspect, heldout = scores(r, n_suspect), scores(r, n_heldout)
        names = tuple("abc"[: suspect.shape[1]])
        p.append(dataset_inference(suspect, heldout, names, 0, seed, DatasetInferenceSettings(repeats=2)).p_value)
    p = np.array(p)
    assert np.all((p > 0) & (p <= 1))
    assert np.mean(p < 0.05) <= 0.1, np.sort(p)[:6]
    if scores is _constant:
        assert np.all(p == 1.0)


@pytest.mark.parametrize("scores, n", [(_gauss, 16), (_ties, 16), (_gauss, 6)])
def test_under_the_null_the_rejection_rate_is_the_level(scores, n):
    """1,000 draws of the combined test (fit, then Welch): the rate of p < 0.05 is 0.05 within its binomial
    spread (3 SD: [0.029, 0.071]) or below it (ties make the test conservative), and of p < 0.01 at most 0.02."""
    p = np.array([combined_test(scores(r, n), scores(r, n), r, 0.2)[1]
                  for seed in range(1000) for r in [np.random.default_rng(10_000 + seed)]])
    assert np.mean(p < 0.05) <= 0.071 and np.mean(p < 0.01) <= 0.02, (np.mean(p < 0.05), np.mean(p < 0.01))
    if scores is _gauss and n == 16:
        assert np.mean(p < 0.05) >= 0.029  # and not vacuous: continuous scores reach the level


def _untrained(seed: int):
    """A freshly initialised UNet whose zero-initialised output layer gets random weights: a non-degenerate
    function that has seen no data (as in tests/test_membership_attacks.py)."""
    model = build_model(UNetConfig(channels=(8, 16), time_dim=16), seed, 9)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.out.weight.copy_(0.1 * torch.randn(model.out.weight.shape, generator=g))
    return model.eval()


def test_under_the_null_untrained_models_reject_at_their_level():
    """40 untrained client models, each on its own random 24 + 24 digits, scored by loss, SimA, PIA and SecMI:
    none of them saw the 'members', so p < 0.05 happens at most 10 % of the time."""
    digits = load_digits16(1, 8).images
    schedule = NoiseSchedule.create("cosine", 100)
    p = []
    for seed in SEEDS:
        order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))[:48]
        view = ModelView.client(_untrained(seed), schedule, 20, False)
        cache = model_signal_cache(view, digits[order], None, SignalSettings(n_steps=4, n_noise=2),
                                   torch.Generator().manual_seed(seed))
        scores = np.column_stack([ATTACKS.get(a).score(cache.require(ATTACKS.get(a).signals)).scores
                                  for a in MODEL_ATTACKS])
        p.append(dataset_inference(scores[:24], scores[24:], MODEL_ATTACKS, 0, seed,
                                   DatasetInferenceSettings(repeats=2)).p_value)
    assert np.mean(np.array(p) < 0.05) <= 0.1, sorted(p)[:6]


# ---------------------------------------------------------------- power: real models

def _client_config(epochs: int, n: int, lr: float, channels: int) -> dict:
    """One client, c = 1 (it owns every step, no server), 8×8 digits, unconditional."""
    return {"seed": 0, "device": "cpu", "conditional": False,
            "data": {"image_size": 8, "n_members": n, "n_nonmembers": n, "n_aux": 32, "num_clients": 1},
            "diffusion": {"T": 100, "cut_ratio": 1.0},
            "client_model": {"channels": [channels, 2 * channels], "time_dim": 32},
            "server_model": {"channels": [8, 16], "time_dim": 16},
            "training": {"epochs": epochs, "batch_size": min(n, 64), "lr": lr, "ema_decay": 0.99},
            "sampling": {"steps": 5, "per_client": 2}}


@pytest.mark.slow
def test_finds_a_client_set_that_no_single_image_gives_away(tmp_path):
    """A client model trained 60 epochs on 512 digits: no per-image attack reaches AUC 0.6, yet dataset inference
    shows the set with at most 256 of the client's images (its power curve) and on 256 of them alone."""
    run = Run.load(create_run(config_from_dict(_client_config(60, 512, 2e-3, 8)), tmp_path / "run", progress=False))
    target = run_membership(run, MODEL_ATTACKS, ("client",), MembershipSettings(n_boot=0)).targets["client_0"]
    aucs = {a: o.metrics.auc.value for a, o in target.attacks.items()}
    assert max(aucs.values()) <= 0.6, aucs
    (found,) = target.dataset
    assert found.n_members == 512 and found.members_needed <= 256, (found.p_value, found.curve)
    assert found.p_value < 0.01
    names = tuple(target.attacks)
    members = np.column_stack([target.attacks[a].member_scores for a in names])
    heldout = np.column_stack([target.attacks[a].nonmember_scores for a in names])
    assert dataset_inference(members[:256], heldout[:256], names, 0, 1).p_value < 0.01


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> Run:
    """32 members, 300 full-batch epochs: a client model that has memorised its images."""
    return Run.load(create_run(config_from_dict(_client_config(300, 32, 3e-3, 8)), tmp_path_factory.mktemp("mem") / "run",
                               progress=False))


@pytest.mark.slow
def test_memorising_client_is_shown_beyond_doubt(memorised):
    target = run_membership(memorised, ("loss", "sima", "secmi"), ("client",),
                            MembershipSettings(n_boot=0)).targets["client_0"]
    (found,) = target.dataset
    assert found.client == 0 and found.features == ("loss", "sima", "secmi")
    assert found.p_value < 1e-6 and found.members_needed <= 16, (found.p_value, found.curve)
    # SecMI's signal is reversed on this model (§4.2 "Direction"): the combiner learns its sign, it is not dropped
    assert target.attacks["secmi"].metrics.auc.value < 0.5


# ---------------------------------------------------------------- wiring: engine, rows, policy

def test_the_engine_tests_every_client_set_of_each_target(tiny_runs):
    run = Run.load(tiny_runs["cut"])
    result = run_membership(run, ("loss", "sima"), ("server", "client"), MembershipSettings(n_boot=0))
    server = result.targets["server"]
    owners = result.data_owner[server.candidate_index[: server.n_members]]
    assert [d.client for d in server.dataset] == [0, 1]
    assert [d.n_members for d in server.dataset] == [int((owners == k).sum()) for k in (0, 1)]
    for k in (0, 1):
        client = result.targets[f"client_{k}"]
        (own,) = client.dataset
        assert own.client == k and own.n_members == client.n_members and own.n_heldout == client.n_nonmembers
        assert own.features == ("loss", "sima")
    # the numbers are the pure function's on the attacks' own scores: nothing else goes in
    members = np.column_stack([server.attacks[a].member_scores for a in ("loss", "sima")])
    heldout = np.column_stack([server.attacks[a].nonmember_scores for a in ("loss", "sima")])
    again = per_client(members, owners, heldout, ("loss", "sima"), 0, DatasetInferenceSettings())
    assert [(d.client, d.n_members, d.n_heldout) for d in again] == [(d.client, d.n_members, d.n_heldout)
                                                                   for d in server.dataset]
    report = result.to_json()["targets"]
    assert [d["client"] for d in report["server"]["dataset_inference"]] == [0, 1]
    assert set(report["client_0"]["dataset_inference"][0]["weights"]) == {"loss", "sima"}
    # rows: T2 names the suspect client, T3 its own target
    rows = dataset_rows("T2", "server", server.client, server.dataset)
    assert {r["target"] for r in rows} == {"server/client_0", "server/client_1"}
    assert {r["attack"] for r in rows} == {NAME}
    own = dataset_rows("T3", "client_1", 1, result.targets["client_1"].dataset)
    assert {r["target"] for r in own} == {"client_1"}
    assert {r["metric"] for r in own} == {"dataset_p", "dataset_members_needed", "dataset_members", "dataset_heldout"}
    off = run_membership(run, ("sima",), ("client",), MembershipSettings(n_boot=0, dataset=None))
    assert all(t.dataset == () for t in off.targets.values())


def test_a_policy_limits_the_smallest_client_p_value(tmp_path):
    grid = {"base": {"data": {"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
                     "diffusion": {"T": 50}},
            "systems": {"cut_ratios": [0.5], "defenses": {"none": []}, "attacks": {"T2": ["sima"]}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(str(path)).cells()
    policy = parse_policy({"limits": {"T2": {"dataset_p": {"min": 0.01}, "dataset_members_needed": {"min": 64}}}})

    def rows(p0: float, p1: float, needed: float) -> pd.DataFrame:
        out = [{"threat": "T2", "target": f"server/client_{k}", "attack": NAME, "metric": m, "value": v,
                "ci_low": None, "ci_high": None}
               for k, p in enumerate((p0, p1)) for m, v in (("dataset_p", p), ("dataset_members_needed", needed))]
        return pd.DataFrame([{**cell_columns(cell), **r} for r in out])

    shown = evaluate_cell(policy, cell, rows(0.4, 0.001, 32.0))
    p_check, needed_check = shown.checks
    assert p_check.passed is False and p_check.observed == 0.001 and p_check.target == "server/client_1"
    assert p_check.attack == NAME and needed_check.passed is False and needed_check.observed == 32.0
    hidden = evaluate_cell(policy, cell, rows(0.4, 0.2, math.inf))  # never reached: ∞ members needed
    assert hidden.passed and [c.observed for c in hidden.checks] == [0.2, math.inf]
