"""The verdict knows how long its systems trained (issue 25 part B, item 2), and names who decided each threat.

The trend test over ``training.snapshots`` (benchmarks/audit/trend.py) against its hand computation; the verdict
line of a PASS whose leakage is still rising at the last epoch, or whose deciding interval crosses the limit;
and end to end through the audit's own path (grid cell → trained system → membership rows → verdict): a client
whose T3 AUC rises between snapshots makes the verdict say so, an untrained one does not.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from scipy.stats import norm

from collafuse.runs import Run

from collafuse.benchmarks.audit.cells.rows import trend_rows
from collafuse.benchmarks.audit.cells.system import membership_rows, trained_system
from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.policy import parse_policy
from collafuse.benchmarks.audit.results import cell_columns
from collafuse.benchmarks.audit.trend import leakage_trends, worst_per_epoch
from collafuse.benchmarks.audit.verdict import verdict

Z = norm.ppf(0.975)
RISING = "still rising at the last epoch"
NOT_ROBUST = "not robust"


def _auc(threat, target, attack, value, low, high, epoch=None) -> dict:
    r = {"threat": threat, "target": target, "attack": attack, "value": value, "ci_low": low, "ci_high": high}
    return {**r, "metric": "auc"} if epoch is None else {**r, "metric": "auc_at_epoch", "epoch": epoch}


# ---------------------------------------------------------------- the trend test

def test_the_slope_between_the_last_two_epochs_and_its_interval():
    rows = [_auc("T3", "client_0", "sima", 0.52, 0.45, 0.59, epoch=5),
            _auc("T3", "client_0", "sima", 0.60, 0.54, 0.66, epoch=10),
            _auc("T3", "client_1", "secmi", 0.58, 0.50, 0.66, epoch=10),   # not the worst at 10
            _auc("T3", "client_0", "sima", 0.78, 0.73, 0.83),              # final models, epoch 25
            _auc("T3", "client_1", "loss", 0.81, 0.77, 0.85),              # the worst at 25
            _auc("T2", "server", "sima", 0.55, 0.50, 0.60)]                # T2: no snapshot, no trend
    points = worst_per_epoch(rows, "T3", 25)
    assert [(p.epoch, p.value, p.attack, p.target) for p in points] == [
        (5, 0.52, "sima", "client_0"), (10, 0.60, "sima", "client_0"), (25, 0.81, "loss", "client_1")]
    (trend,) = leakage_trends(rows, 25)
    slope = (0.81 - 0.60) / 15
    half = Z * math.hypot(0.12 / (2 * Z), 0.08 / (2 * Z)) / 15
    assert trend.threat == "T3" and math.isclose(trend.slope, slope)
    assert math.isclose(trend.low, slope - half) and math.isclose(trend.high, slope + half)
    assert trend.rising and (trend.start.epoch, trend.end.epoch) == (10, 25)
    rows_out = {r["metric"]: r for r in trend_rows((trend,))}
    assert rows_out["auc_still_rising"]["value"] == 1.0 and rows_out["auc_trend_start_epoch"]["value"] == 10
    assert rows_out["auc_epoch_slope"]["ci_low"] == trend.low and rows_out["auc_epoch_slope"]["target"] == "client_1"


def test_no_rise_is_called_within_the_error_without_intervals_or_from_one_epoch():
    flat = [_auc("T3", "client_0", "sima", 0.60, 0.50, 0.70, epoch=10), _auc("T3", "client_0", "sima", 0.66, 0.56, 0.76)]
    (trend,) = leakage_trends(flat, 25)
    assert trend.slope > 0 and trend.low < 0 and not trend.rising
    bare = [_auc("T3", "client_0", "sima", 0.5, None, None, epoch=10), _auc("T3", "client_0", "sima", 0.9, None, None)]
    (trend,) = leakage_trends(bare, 25)
    assert trend.low is None and not trend.rising
    # a snapshot at the final epoch is the final model: one epoch measured, no trend
    once = [_auc("T3", "client_0", "sima", 0.6, 0.5, 0.7, epoch=25), _auc("T3", "client_0", "sima", 0.6, 0.5, 0.7)]
    assert leakage_trends(once, 25) == ()
    falling = [_auc("T2", "server", "loss", 0.9, 0.88, 0.92, epoch=10), _auc("T2", "server", "loss", 0.6, 0.58, 0.62)]
    (trend,) = leakage_trends(falling, 25)
    assert trend.high < 0 and not trend.rising


# ---------------------------------------------------------------- the verdict line

GRID = {"base": {"data": {"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
                 "diffusion": {"T": 50}, "training": {"epochs": 25}},
        "systems": {"cut_ratios": [0.5], "defenses": {"none": []}, "snapshots": [10],
                    "attacks": {"T2": ["sima"], "T3": ["sima", "secmi"]}}}


@pytest.fixture
def cell(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(GRID))
    (only,) = load_grid(str(path)).cells()
    return only


def _frame(cell, rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{**cell_columns(cell), "epoch": None, **r} for r in rows])


def _rows(t3_final: tuple[float, float, float], t3_early: tuple[float, float, float]) -> list[dict]:
    rows = [_auc("T2", "server", "sima", 0.55, 0.50, 0.60), _auc("T3", "client_1", "secmi", *t3_final),
            _auc("T3", "client_0", "sima", 0.52, 0.47, 0.57), _auc("T3", "client_1", "secmi", *t3_early, epoch=10)]
    return rows + trend_rows(leakage_trends(rows, 25))


def test_a_pass_whose_leakage_is_still_rising_says_so_and_names_who_decided(cell):
    policy = parse_policy({"limits": {"T2": {"auc": {"max": 0.7}}, "T3": {"auc": {"max": 0.7}}}})
    _, rising = verdict(policy, [cell], _frame(cell, _rows((0.66, 0.63, 0.69), (0.51, 0.48, 0.54))))
    assert rising.status == "pass" and RISING in rising.text, rising.text
    assert "from epoch 10 to 25" in rising.text and "secmi on client_1" in rising.text
    assert "T2 PASS by sima on server (auc 0.55" in rising.text and "T3 PASS by secmi on client_1 (auc 0.66" in rising.text
    t2, t3 = rising.threats
    assert RISING in t3.note and RISING not in t2.note
    _, level = verdict(policy, [cell], _frame(cell, _rows((0.66, 0.63, 0.69), (0.65, 0.62, 0.68))))
    assert level.status == "pass" and RISING not in level.text and "Decided by" in level.text


def test_a_pass_whose_deciding_interval_crosses_the_limit_is_not_robust(cell):
    policy = parse_policy({"limits": {"T3": {"auc": {"max": 0.6}}}})
    # issue 25's default audit: T3 sima 0.586 [0.538, 0.639] against a limit of 0.6
    _, shaky = verdict(policy, [cell], _frame(cell, _rows((0.586, 0.538, 0.639), (0.58, 0.53, 0.63))))
    assert shaky.status == "pass" and NOT_ROBUST in shaky.text and "0.586 [0.538, 0.639]" in shaky.text
    assert RISING not in shaky.text and NOT_ROBUST in shaky.threats[0].note
    _, firm = verdict(policy, [cell], _frame(cell, _rows((0.55, 0.52, 0.58), (0.54, 0.51, 0.57))))
    assert firm.status == "pass" and NOT_ROBUST not in firm.text
    # judged at the interval's end (statistic: conservative), the same numbers fail instead
    strict = parse_policy({"statistic": "conservative", "limits": {"T3": {"auc": {"max": 0.6}}}})
    _, failed = verdict(strict, [cell], _frame(cell, _rows((0.586, 0.538, 0.639), (0.58, 0.53, 0.63))))
    assert failed.status == "fail" and "T3 FAIL by secmi on client_1" in failed.text


# ---------------------------------------------------------------- end to end: trained systems

def _system_grid(epochs: int, snapshots: list[int], lr: float) -> dict:
    """One client (c = 1: it owns every step), 32 members, full-batch steps on 8×8 digits (the memorising recipe
    of tests/test_reference_attacks.py), T3 attacked on every snapshot."""
    return {"seeds": [0],
            "base": {"device": "cpu", "conditional": False,
                     "data": {"image_size": 8, "n_members": 32, "n_nonmembers": 32, "n_aux": 64, "num_clients": 1},
                     "diffusion": {"T": 100},
                     "client_model": {"channels": [8, 16], "time_dim": 32},
                     "server_model": {"channels": [8, 16], "time_dim": 16},
                     "training": {"epochs": epochs, "batch_size": 32, "lr": lr, "ema_decay": 0.99},
                     "sampling": {"steps": 5, "per_client": 2}},
            "systems": {"cut_ratios": [1.0], "defenses": {"none": []}, "snapshots": snapshots,
                        "attacks": {"T3": ["loss", "sima", "secmi"]}}}


def _audited(tmp_path, grid: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(str(path)).cells()
    system, _ = trained_system(cell, tmp_path / "cache")
    rows, _, _ = membership_rows(Run.load(system), cell, {})
    df = pd.DataFrame([{**cell_columns(cell), **r} for r in rows])
    _, decision = verdict(parse_policy({"limits": {"T3": {"auc": {"max": 1.0}}}}), [cell], df)
    return df, decision


@pytest.mark.slow
def test_a_client_whose_leakage_rises_between_snapshots_makes_the_verdict_say_so(tmp_path):
    """50 → 150 full-batch epochs on 32 images: the worst T3 AUC rises from about 0.64 to about 0.90."""
    df, decision = _audited(tmp_path, _system_grid(150, [50], 3e-3))
    snap = df[df.metric == "auc_at_epoch"]["value"].max()
    final = df[df.metric == "auc"]["value"].max()
    assert final - snap >= 0.15, (snap, final)
    assert df[df.metric == "auc_still_rising"]["value"].tolist() == [1.0]
    assert decision.status == "pass" and f"T3 leakage was {RISING}" in decision.text, decision.text
    assert "from epoch 50 to 150" in decision.text


@pytest.mark.slow
def test_an_untrained_client_does_not(tmp_path):
    df, decision = _audited(tmp_path, _system_grid(2, [1], 1e-6))
    assert df[df.metric == "auc_still_rising"]["value"].tolist() == [0.0]
    assert decision.status == "pass" and RISING not in decision.text, decision.text
    assert "T3 PASS by" in decision.text
