"""Audit grid and policy: expansion, hashing, validation and the pass/fail logic (no training)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from collafuse.errors import ConfigError

from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.policy import check_against_grid, load_policy, parse_policy
from collafuse.benchmarks.audit.verdict import evaluate_cell, verdict


def write(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, allow_unicode=True, sort_keys=False))
    return str(path)


GRID = {
    "base": {"data": {"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
             "diffusion": {"T": 50}},
    "payload_curve": {"cut_ratios": [0.2, 0.6], "epochs": 2, "defenses": {"none": [], "noise": [{"name": "payload-noise", "sigma": 1.0}]}},
    "systems": {"cut_ratios": [0.5], "defenses": {"none": []}, "attacks": {"T1": ["rescale", "payload-lr"], "T2": ["loss"]}},
}


def test_embedded_grids_expand_with_stable_unique_hashes():
    for quick in (False, True):
        cells = load_grid(None, quick).cells()
        again = load_grid(None, quick).cells()
        assert [c.config_hash for c in cells] == [c.config_hash for c in again]
        assert len({c.config_hash for c in cells}) == len(cells)
    default = load_grid(None).cells()
    curve = [c for c in default if c.kind == "payload"]
    assert len({c.cut_ratio for c in curve}) >= 10  # the dense payload-only curve of issue 6
    assert {c.kind for c in default} == {"payload", "system"}


def test_grid_cells_are_the_product_and_carry_their_config(tmp_path):
    cells = load_grid(write(tmp_path, "g.yaml", GRID)).cells()
    assert [(c.kind, c.defense, c.cut_ratio) for c in cells] == [
        ("payload", "none", 0.2), ("payload", "none", 0.6), ("payload", "noise", 0.2), ("payload", "noise", 0.6),
        ("system", "none", 0.5)]
    noise = cells[2]
    assert noise.run_config.defenses == ({"name": "payload-noise", "sigma": 1.0},)
    assert noise.run_config.t_c == 10 and noise.run_config.training.epochs == 2
    assert cells[-1].attacks == {"T1": ("rescale", "payload-lr"), "T2": ("loss",)}
    # A different seed or defense is a different cell.
    other = load_grid(write(tmp_path, "g2.yaml", {**GRID, "seeds": [1]})).cells()
    assert not {c.config_hash for c in cells} & {c.config_hash for c in other}


@pytest.mark.parametrize("change, message", [
    ({"payload_curve": {"cut_ratios": [1.5]}}, "outside [0, 1]"),
    ({"payload_curve": {"cut_ratios": []}, "systems": {"cut_ratios": []}}, "empty"),
    ({"payload_curve": {"cut_ratios": [0.2], "attacks": ["telepathy"]}}, "telepathy"),
    ({"systems": {"cut_ratios": [0.5], "attacks": {"T2": ["payload-lr"]}}}, "not an attack on T2"),
    ({"systems": {"cut_ratios": [0.5], "attacks": {"T9": ["loss"]}}}, "unknown threat"),
    ({"payload_curve": {"cut_ratios": [0.2], "defenses": {"x": [{"name": "dp-sgd", "epsilon": 8}]}}}, "dp-sgd"),
    ({"payload_curve": {"cut_ratios": [0.2], "defenses": {"x": [{"name": "payload-noise", "sigma": -1}]}}}, "sigma"),
    ({"colour": "blue"}, "unknown grid key"),
    ({"seeds": [0, 0]}, "lists a cell twice"),
    # grid integers are strict, as in a run config: a bool or a string is a mistake, not 1 or 2
    ({"payload_curve": {"cut_ratios": [0.2], "epochs": True}}, "payload_curve.epochs: Input should be a valid integer"),
    ({"systems": {"cut_ratios": [0.5], "references": "2"}}, "systems.0.references: Input should be a valid integer"),
    ({"systems": {"cut_ratios": [0.5], "samples_per_client": 32.0}}, "samples_per_client: Input should be a valid integer"),
    ({"systems": {"cut_ratios": [0.5], "snapshots": [True]}}, "snapshots.0: Input should be a valid integer"),
    ({"seeds": [False]}, "seeds.0: Input should be a valid integer"),
])
def test_bad_grids_are_refused_with_one_line(tmp_path, change, message):
    raw = {**GRID, **change}
    with pytest.raises(ConfigError) as err:
        load_grid(write(tmp_path, "bad.yaml", raw))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("policy, message", [
    ({"limits": {"T2": {"accuracy": {"max": 0.5}}}}, "unknown metric"),
    ({"limits": {"T7": {"auc": {"max": 0.5}}}}, "unknown threat"),
    ({"limits": {"T2": {"auc": {"below": 0.5}}}}, "max: number"),
    ({"limits": {"T2": {"auc": {"max": "low"}}}}, "must be a number"),
    ({"limits": {}}, "non-empty"),
    ({"statistic": "median", "limits": {"T2": {"auc": {"max": 0.5}}}}, "statistic"),
])
def test_bad_policies_are_refused(policy, message):
    with pytest.raises(ConfigError) as err:
        parse_policy(policy)
    assert message in str(err.value)


def test_a_policy_on_a_threat_nobody_attacks_is_refused(tmp_path):
    spec = load_grid(write(tmp_path, "g.yaml", GRID)).spec
    check_against_grid(parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.1}, "auc": {"max": 0.6}}, "T2": {"auc": {"max": 0.6}}}}), spec)
    for threat in ("T3", "T4"):
        with pytest.raises(ConfigError, match="no attack in the grid measures it"):
            check_against_grid(parse_policy({"limits": {threat: {"auc": {"max": 0.6}}}}), spec)
    curve_only = load_grid(write(tmp_path, "c.yaml", {**GRID, "systems": {}})).spec
    with pytest.raises(ConfigError, match="utility"):
        check_against_grid(parse_policy({"limits": {"utility": {"accuracy": {"min": 0.5}}}}), curve_only)


def _rows(cell, rows):
    return pd.DataFrame([{"config_hash": cell.config_hash, "threat": t, "target": g, "attack": a, "metric": m,
                          "value": v, "ci_low": lo, "ci_high": hi} for t, g, a, m, v, lo, hi in rows])


def test_policy_takes_the_worst_attack_and_the_statistic_it_is_told(tmp_path):
    cells = load_grid(write(tmp_path, "g.yaml", GRID)).cells()
    system = cells[-1]
    rows = _rows(system, [
        ("T1", "payload", "rescale", "reid_pool", 0.02, 0.01, 0.04),
        ("T1", "payload", "oracle", "reid_pool", 0.04, 0.03, 0.07),
        ("T2", "server", "loss", "auc", 0.55, 0.50, 0.61),
        ("T2", "server", "sima", "auc", 0.52, 0.47, 0.57),
    ])
    limits = {"limits": {"T1": {"reid_pool": {"max": 0.05}}, "T2": {"auc": {"max": 0.6}}}}
    ev = evaluate_cell(parse_policy(limits), system, rows)
    assert ev.passed and ev.complete
    assert [(c.attack, c.observed) for c in ev.checks] == [("oracle", 0.04), ("loss", 0.55)]
    strict = evaluate_cell(parse_policy({**limits, "statistic": "ci_high"}), system, rows)
    assert not strict.passed
    assert [(c.attack, c.observed, c.passed) for c in strict.checks] == [("oracle", 0.07, False), ("loss", 0.61, False)]
    # A payload-only cell cannot answer a T2 limit: it is incomplete, never a pass.
    payload = evaluate_cell(parse_policy(limits), cells[0], _rows(cells[0], [("T1", "payload", "rescale", "reid_pool", 0.0, None, None)]))
    assert payload.complete is False and payload.passed is False


@pytest.mark.parametrize("metric, values, limit, worst", [
    ("tpr_at_01pct_fpr", (0.02, 0.09), 0.05, 0.09),
    ("balanced_accuracy", (0.61, 0.55), 0.6, 0.61),
    ("epsilon_gdp", (0.4, 1.3), 1.0, 1.3),
])
def test_policy_limits_every_membership_metric(tmp_path, metric, values, limit, worst):
    """Issue 14 item 4: TPR at 0.1 % FPR, balanced accuracy and ε_GDP are limits like auc: the worst attack counts."""
    system = load_grid(write(tmp_path, "g.yaml", GRID)).cells()[-1]
    flags = [("T2", "server", a, "tpr_at_01pct_fpr_resolved", 1.0, None, None) for a in ("loss", "sima")]
    rows = _rows(system, [("T2", "server", "loss", metric, values[0], None, None),
                          ("T2", "server", "sima", metric, values[1], None, None), *flags,
                          # a curve row of the same metric name family is not judged
                          ("T2", "server", "loss", f"{metric}_at_epoch", 0.99, None, None)])
    loose = evaluate_cell(parse_policy({"limits": {"T2": {metric: {"max": worst}}}}), system, rows)
    assert loose.passed and loose.checks[0].observed == worst
    tight = evaluate_cell(parse_policy({"limits": {"T2": {metric: {"max": limit}}}}), system, rows)
    assert not tight.passed and tight.complete
    assert (tight.checks[0].observed, tight.checks[0].attack) == (worst, "sima" if values[1] == worst else "loss")


def test_an_unresolved_tpr_at_01pct_fpr_cannot_pass_a_max_limit(tmp_path):
    """With < 1000 non-members TPR at 0.1 % FPR is the TPR at FPR 0: a lower bound, so a max limit is not measured;
    a resolved value above the limit still fails."""
    system = load_grid(write(tmp_path, "g.yaml", GRID)).cells()[-1]

    def rows(resolved_loss: float, value_loss: float):
        return _rows(system, [("T2", "server", "loss", "tpr_at_01pct_fpr", value_loss, None, None),
                              ("T2", "server", "loss", "tpr_at_01pct_fpr_resolved", resolved_loss, None, None),
                              ("T2", "server", "sima", "tpr_at_01pct_fpr", 0.0, None, None),
                              ("T2", "server", "sima", "tpr_at_01pct_fpr_resolved", 0.0, None, None)])

    policy = parse_policy({"limits": {"T2": {"tpr_at_01pct_fpr": {"max": 0.1}}}})
    unknown = evaluate_cell(policy, system, rows(1.0, 0.05))
    assert unknown.checks[0].passed is None and not unknown.complete and "unresolved" in unknown.checks[0].note
    broken = evaluate_cell(policy, system, rows(1.0, 0.3))
    assert broken.checks[0].passed is False and broken.checks[0].observed == 0.3
    # a min limit may rely on a lower bound
    floor = evaluate_cell(parse_policy({"limits": {"T2": {"tpr_at_01pct_fpr": {"min": 0.0}}}}), system, rows(0.0, 0.05))
    assert floor.passed


def test_a_systems_block_passes_snapshots_to_training(tmp_path):
    grid = {**GRID, "base": {**GRID["base"], "training": {"epochs": 6}},
            "systems": {**GRID["systems"], "snapshots": [2, 4]}}
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    assert cells[-1].run_config.training.snapshots == (2, 4)
    assert all(c.run_config.training.snapshots == () for c in cells if c.kind == "payload")
    plain = load_grid(write(tmp_path, "p.yaml", {**grid, "systems": GRID["systems"]})).cells()
    assert cells[-1].config_hash != plain[-1].config_hash  # a system with snapshots is trained apart
    assert "snapshots" not in plain[-1].to_json()["run_config"]["training"]  # older hashes stay valid
    with pytest.raises(ConfigError, match="snapshots must be distinct epochs"):
        load_grid(write(tmp_path, "bad.yaml", {**grid, "systems": {**GRID["systems"], "snapshots": [4, 9]}}))


def test_verdict_recommends_the_cheapest_passing_setting(tmp_path):
    grid = {**GRID, "payload_curve": {}, "systems": {**GRID["systems"], "cut_ratios": [0.2, 0.5, 0.9]}}
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    reid = {0.2: 0.9, 0.5: 0.03, 0.9: 0.01}
    gflops = {0.2: 0.1, 0.5: 0.5, 0.9: 0.9}
    df = pd.concat([_rows(c, [("T1", "payload", "oracle", "reid_pool", reid[c.cut_ratio], None, None),
                              ("cost", "clients", "count", "client_gflops_sample", gflops[c.cut_ratio], None, None)])
                    for c in cells], ignore_index=True)
    policy = parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.05}}}})
    evaluations, decision = verdict(policy, cells, df)
    assert [e.passed for e in evaluations] == [False, True, True]
    assert decision.status == "pass"
    assert decision.recommendation.cut_ratio == 0.5 and math.isclose(decision.recommendation.cost, 0.5)
    _, none = verdict(parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.001}}}}), cells, df)
    assert none.status == "fail" and none.recommendation is None and "reid_pool" in none.text


def test_embedded_policy_loads_and_fits_the_embedded_grids():
    policy = load_policy(None)
    assert {l.threat for l in policy.limits} >= {"T1", "T2", "T3", "T4"}
    for quick in (False, True):
        check_against_grid(policy, load_grid(None, quick).spec)


def test_systems_may_be_several_blocks_each_its_own_product(tmp_path):
    grid = {**GRID, "payload_curve": {}, "systems": [
        {"cut_ratios": [0.2, 0.5], "defenses": {"none": []}, "attacks": {"T2": ["loss"]}},
        {"cut_ratios": [0.5], "defenses": {"dp": [{"name": "dp-sgd", "target": "clients", "epsilon": 8}]},
         "attacks": {"T3": ["loss"]}},
    ]}
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    assert [(c.defense, c.cut_ratio, tuple(c.attacks)) for c in cells] == [
        ("none", 0.2, ("T2",)), ("none", 0.5, ("T2",)), ("dp", 0.5, ("T3",))]
    spec = load_grid(write(tmp_path, "g.yaml", grid)).spec
    check_against_grid(parse_policy({"limits": {"T2": {"auc": {"max": 0.6}}, "T3": {"auc": {"max": 0.6}}}}), spec)
    with pytest.raises(ConfigError, match="T4"):
        check_against_grid(parse_policy({"limits": {"T4": {"auc": {"max": 0.6}}}}), spec)


def test_inception_fid_needs_its_optional_wheel(tmp_path, monkeypatch):
    from collafuse.benchmarks.audit import utility

    grid = {**GRID, "systems": {**GRID["systems"], "inception_fid": True}}
    monkeypatch.setattr(utility, "inception_available", lambda: False)
    with pytest.raises(ConfigError, match=r"collafuse\[fid\]"):
        load_grid(write(tmp_path, "g.yaml", grid))
    monkeypatch.setattr(utility, "inception_available", lambda: True)
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    assert cells[-1].inception_fid and cells[-1].to_json()["inception_fid"] is True
    assert "inception_fid" not in cells[0].to_json()  # off: the key is absent, older hashes stay valid


def test_verdict_compares_the_recommendation_with_training_alone(tmp_path):
    """Issue 11 item 7: the verdict says what the recommended split saves against local-only training (c = 1)
    and what it costs in sample quality; the baselines are marked as such."""
    grid = {**GRID, "payload_curve": {}, "systems": {**GRID["systems"], "cut_ratios": [0.0, 0.5, 1.0]}}
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    assert [c.baseline for c in cells] == ["central", None, "local-only"]
    reid = {0.0: 1.0, 0.5: 0.03, 1.0: 0.0}
    gflops = {0.0: 0.0, 0.5: 0.6, 1.0: 0.8}
    accuracy = {0.0: 0.9, 0.5: 0.6, 1.0: 0.7}
    df = pd.concat([_rows(c, [("T1", "payload", "oracle", "reid_pool", reid[c.cut_ratio], None, None),
                              ("cost", "clients", "count", "client_gflops_sample", gflops[c.cut_ratio], None, None),
                              ("utility", "pooled", "classifier-features", "accuracy", accuracy[c.cut_ratio], None, None)])
                    for c in cells], ignore_index=True)
    policy = parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.05}}}})
    _, decision = verdict(policy, cells, df)
    assert decision.recommendation.cut_ratio == 0.5
    cmp = decision.recommendation.against_local_only
    assert math.isclose(cmp.saved_fraction, 0.25) and cmp.accuracy == 0.6 and cmp.baseline_accuracy == 0.7
    assert "saves 25% of the client compute" in decision.text and "sample accuracy 0.60 vs 0.70" in decision.text
    # Without a local-only cell in the grid the verdict says there is nothing to compare with.
    _, alone = verdict(policy, cells[:2], df)
    assert "no local-only baseline" in alone.text
    # When only training alone passes, the verdict says so.
    _, only = verdict(parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.001}}}}), cells, df)
    assert only.recommendation.cut_ratio == 1.0 and "That is training alone" in only.text


def test_default_grid_holds_both_baselines():
    cells = load_grid(None).cells()
    assert {c.baseline for c in cells if c.baseline} == {"central", "local-only"}


def test_verdict_gives_every_utility_metric_against_both_baselines_and_says_when_they_disagree(tmp_path):
    """Issue 19 item 3: accuracy alone once called saturated noise good; the verdict now gives accuracy, FID,
    KID, precision and recall with their intervals against local-only and central training."""
    grid = {**GRID, "payload_curve": {}, "systems": {**GRID["systems"], "cut_ratios": [0.0, 0.5, 1.0]}}
    cells = load_grid(write(tmp_path, "g.yaml", grid)).cells()
    utility = {  # metric: (central, split, local-only) as (value, low, high)
        "accuracy": ((0.95, 0.9, 0.98), (0.60, 0.55, 0.65), (0.36, 0.30, 0.42)),
        "fid": ((150.0, None, None), (2181.0, None, None), (382.0, None, None)),
        "precision": ((0.58, 0.5, 0.66), (0.013, 0.0, 0.04), (0.23, 0.17, 0.30)),
        "recall": ((0.83, 0.8, 0.86), (0.80, 0.77, 0.83), (0.79, 0.76, 0.82)),
    }
    index = {0.0: 0, 0.5: 1, 1.0: 2}
    df = pd.concat([_rows(c, [("T1", "payload", "oracle", "reid_pool", {0.0: 1.0, 0.5: 0.03, 1.0: 0.0}[c.cut_ratio], None, None),
                              ("cost", "clients", "count", "client_gflops_sample", c.cut_ratio, None, None)]
                          + [("utility", "pooled", "classifier-features", m, *v[index[c.cut_ratio]]) for m, v in utility.items()])
                    for c in cells], ignore_index=True)
    _, decision = verdict(parse_policy({"limits": {"T1": {"reid_pool": {"max": 0.05}}}}), cells, df)
    text = decision.text
    assert "accuracy 0.6 [0.55, 0.65], fid 2.18e+03, precision 0.013 [0, 0.04], recall 0.8 [0.77, 0.83]" in text
    assert "Local-only (accuracy 0.36 [0.3, 0.42], fid 382" in text
    assert ("the recommendation is better on accuracy; worse on fid, precision; indistinguishable on recall. "
            "The metrics disagree.") in text
    assert "Central (accuracy 0.95 [0.9, 0.98]" in text and "worse on accuracy, fid, precision" in text
