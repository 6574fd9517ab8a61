"""The audit's worst case rests on calibrated attacks (DESIGN.md §4.2 "Direction"; issue 13 item 2).

A memorising client model audited through the audit's own path (a grid cell, its trained system,
``membership_rows``, the report's :func:`worst_leakage` and the policy's :func:`evaluate_cell`): the
worst T3 AUC is a calibrated attack's (lira or rmia), no row carries a label-chosen 1 − AUC, and
``secmi``, whose signal is reversed on this model, is flagged inverted.
"""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from collafuse.benchmarks.audit.cells.system import membership_rows, trained_system
from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.policy import parse_policy
from collafuse.benchmarks.audit.verdict import evaluate_cell, worst_index
from collafuse.benchmarks.audit.report.analysis import worst_leakage
from collafuse.benchmarks.audit.results import cell_columns
from collafuse.runs import Run

CALIBRATED = ("lira", "rmia")


def test_ties_name_the_calibrated_attack_and_nothing_is_flipped():
    values = pd.Series([0.97, 1.0, 0.02, 1.0], index=[10, 11, 12, 13])
    attacks = pd.Series(["sima", "loss", "secmi", "rmia"], index=values.index)
    assert worst_index(values, attacks) == 13          # loss and rmia tie at 1.0: rmia is named
    assert worst_index(values.drop(13), attacks.drop(13)) == 11
    assert worst_index(values, attacks, "min") == 12   # a min limit: the smallest value, as measured
    # secmi's 0.02 is never read as 0.98: without the tie it does not come near the worst
    assert worst_index(pd.Series([0.6, 0.02]), pd.Series(["loss", "secmi"])) == 0


@pytest.mark.slow
def test_memorising_client_worst_t3_value_is_calibrated_and_secmi_is_flagged(tmp_path):
    """One client (c = 1: it owns every step, no server), 32 members, 300 full-batch epochs on 8×8 digits,
    the recipe of tests/test_reference_attacks.py; T3: loss, sima, secmi, lira, rmia with 2 references."""
    grid = {
        "base": {"device": "cpu", "conditional": False,
                 "data": {"image_size": 8, "n_members": 32, "n_nonmembers": 32, "n_aux": 64, "num_clients": 1},
                 "diffusion": {"T": 100},
                 "client_model": {"channels": [8, 16], "time_dim": 32},
                 "server_model": {"channels": [8, 16], "time_dim": 16},
                 "training": {"epochs": 300, "batch_size": 32, "lr": 3e-3, "ema_decay": 0.99},
                 "sampling": {"steps": 5, "per_client": 2}},
        "systems": {"cut_ratios": [1.0], "defenses": {"none": []}, "references": 2,
                    "attacks": {"T3": ["loss", "sima", "secmi", "lira", "rmia"]}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(path).cells()
    system, _ = trained_system(cell, tmp_path / "cache")
    rows, _, _ = membership_rows(Run.load(system), cell, {})
    df = pd.DataFrame([{**cell_columns(cell), **r} for r in rows])

    auc = df[(df.threat == "T3") & (df.metric == "auc")].set_index("attack")["value"]
    flag = df[(df.threat == "T3") & (df.metric == "inverted")].set_index("attack")["value"]
    assert set(auc.index) == {"loss", "sima", "secmi", "lira", "rmia"}
    assert min(auc[a] for a in CALIBRATED) >= 0.95, auc.to_dict()
    assert auc["secmi"] < 0.5 and flag["secmi"] == 1.0, (auc["secmi"], flag.to_dict())
    assert flag["lira"] == 0.0 and flag["rmia"] == 0.0

    (worst,) = worst_leakage(df)[lambda w: w.threat == "T3"].itertuples()
    assert worst.attack in CALIBRATED, (worst.attack, auc.to_dict())
    assert worst.value == auc.max() == max(auc[a] for a in CALIBRATED)
    # the values are the attacks' own: no row holds 1 − AUC of the inverted secmi
    assert set(df[(df.attack == "secmi") & (df.metric == "auc")]["value"]) == {auc["secmi"]}

    policy = parse_policy({"limits": {"T3": {"auc": {"max": 0.6}}}})
    check = evaluate_cell(policy, cell, df).checks[0]
    assert check.passed is False and check.attack in CALIBRATED and check.observed == auc.max()
