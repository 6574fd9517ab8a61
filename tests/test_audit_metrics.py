"""Every membership metric in the audit (issue 14, items 4 and 5): the rows a system cell writes, the
table's curve columns (``t``, ``epoch``) through results.json / results.csv, and the report's sections 4a / 4b.

Row scheme: beside ``auc`` / ``tpr_at_1pct_fpr`` / ``epsilon_lb``, each (threat, target, attack) has
``tpr_at_01pct_fpr`` (interval), ``tpr_at_01pct_fpr_resolved`` (1.0 / 0.0), ``balanced_accuracy``
(interval), ``epsilon_gdp`` and one ``auc_at_t`` row per query step (the step in column ``t``); a
``training.snapshots`` model's rows are ``<metric>_at_epoch`` with the epoch in column ``epoch``.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from conftest import tiny_config_dict
from collafuse.benchmarks.audit.cells import CellOutput
from collafuse.benchmarks.audit.cells.system import client_samples, membership_rows, trained_system
from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.report import write_report
from collafuse.benchmarks.audit.results import collect, read_results, write_results
from collafuse.benchmarks.audit.runner import write_cell
from collafuse.runs import Run

SNAPSHOTS = [1, 2, 4]
NEW = ("tpr_at_01pct_fpr", "tpr_at_01pct_fpr_resolved", "balanced_accuracy", "epsilon_gdp")
AT_EPOCH = ("auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "balanced_accuracy", "epsilon_lb", "epsilon_gdp")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A tiny system cell with snapshots, trained through the audit's cache, and its membership rows."""
    root = tmp_path_factory.mktemp("audit-metrics")
    base = tiny_config_dict(training={"epochs": 4, "batch_size": 32})
    base.pop("seed")
    base["diffusion"].pop("cut_ratio", None)  # each block's cut_ratios set it
    grid = {"name": "metrics", "base": base, "seeds": [1],
            "systems": {"cut_ratios": [0.2], "defenses": {"none": []}, "snapshots": SNAPSHOTS,
                        "attacks": {"T2": ["loss"], "T3": ["loss", "sima"], "T4": ["nn-distance"]},
                        "samples_per_client": 8}}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    cell = load_grid(root / "grid.yaml").cells()[0]
    path, _ = trained_system(cell, root / "cache")
    run = Run.load(path)
    rows, _, _ = membership_rows(run, cell, client_samples(run, cell))
    return root, cell, run, rows


def _pick(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def test_system_cell_rows_hold_every_membership_metric(system):
    _, _, run, rows = system
    for threat, target, attack in [("T2", "server", "loss"), ("T3", "client_0", "sima"), ("T4", "samples_1", "nn-distance")]:
        mine = _pick(rows, threat=threat, target=target, attack=attack)
        metrics = [r["metric"] for r in mine]
        assert metrics[:3] == ["auc", "tpr_at_1pct_fpr", "epsilon_lb"]   # the rows that were there, first and unchanged
        assert metrics[3:7] == list(NEW)
        for name in ("tpr_at_01pct_fpr", "balanced_accuracy"):
            (r,) = _pick(mine, metric=name)
            assert r["ci_low"] <= r["value"] <= r["ci_high"]
        (flag,) = _pick(mine, metric="tpr_at_01pct_fpr_resolved")
        assert flag["value"] == 0.0  # 32 non-members: TPR at 0.1 % FPR needs 1000
        (gdp,) = _pick(mine, metric="epsilon_gdp")
        assert gdp["value"] >= 0
        assert all("t" not in r and "epoch" not in r for r in mine if r["metric"] in ("auc", *NEW))
    steps = _pick(rows, threat="T3", target="client_1", attack="loss", metric="auc_at_t")
    assert len(steps) >= 2 and all(1 <= r["t"] <= run.t_hand for r in steps)
    assert [r["t"] for r in steps] == sorted(r["t"] for r in steps)
    server_steps = _pick(rows, threat="T2", target="server", metric="auc_at_t")
    assert server_steps and all(run.t_hand < r["t"] <= run.schedule.T for r in server_steps)
    assert not _pick(rows, threat="T4", metric="auc_at_t")  # a sample target has no query steps


def test_snapshot_rows_are_curves_apart_from_the_final_models(system):
    _, _, run, rows = system
    snap = [r for r in rows if r["metric"].endswith("_at_epoch")]
    assert {r["threat"] for r in snap} == {"T2", "T3"}  # payload and sample targets: final models only
    assert {r["epoch"] for r in snap} == set(SNAPSHOTS)
    for epoch in SNAPSHOTS:
        mine = _pick(snap, threat="T3", target="client_0", attack="loss", epoch=epoch)
        assert [r["metric"] for r in mine] == [m + "_at_epoch" for m in AT_EPOCH]
    # the last snapshot is the final model
    final = {r["metric"]: r["value"] for r in _pick(rows, threat="T2", target="server", attack="loss") if "epoch" not in r}
    last = {r["metric"].removesuffix("_at_epoch"): r["value"] for r in _pick(snap, threat="T2", epoch=4)}
    assert all(last[m] == final[m] for m in AT_EPOCH)


def test_curve_columns_reach_results_json_and_csv(system, tmp_path):
    _, cell, _, rows = system
    write_cell(tmp_path, cell, CellOutput(rows))
    df, _ = collect([cell], tmp_path)
    csv_path, json_path = write_results(df, tmp_path)
    records = json.loads(json_path.read_text())
    assert {"t", "epoch"} <= set(records[0])
    assert {r["metric"] for r in records} >= {"auc", *NEW, "auc_at_t", "auc_at_epoch", "tpr_at_1pct_fpr_at_epoch"}
    at_t = [r for r in records if r["metric"] == "auc_at_t"]
    assert all(isinstance(r["t"], int) and r["epoch"] is None for r in at_t)
    assert all(r["t"] is None and r["epoch"] is None for r in records if r["metric"] in ("auc", *NEW))
    csv = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert list(csv["metric"]) == [r["metric"] for r in records]
    assert set(csv.loc[csv["metric"] == "auc_at_epoch", "epoch"]) == {str(e) for e in SNAPSHOTS}  # "4", not "4.0"
    back = read_results(tmp_path)
    assert back["t"].dtype == float and back.loc[back["metric"] == "auc", "t"].isna().all()
    assert set(back.loc[back["metric"] == "auc_at_epoch", "epoch"]) == set(map(float, SNAPSHOTS))


def test_report_shows_the_new_metrics_and_the_epoch_curve(tmp_path):
    from test_audit_report import _row, _table, make_audit

    root = make_audit(tmp_path / "audit")
    rows = json.loads((root / "results.json").read_text())
    cell = {k: rows[-1][k] for k in ("cell", "config_hash", "kind", "dataset", "cut_ratio", "t_c", "defense",
                                     "payload_kind", "epochs", "seed")}
    extra = []
    for attack, tpr01, bal, gdp in (("loss", 0.02, 0.61, 0.7), ("sima", 0.05, 0.58, 0.9)):
        extra += [_row(cell, "T2", "server", attack, "tpr_at_01pct_fpr", tpr01, 0.0, 0.1),
                  _row(cell, "T2", "server", attack, "tpr_at_01pct_fpr_resolved", 0.0),
                  _row(cell, "T2", "server", attack, "balanced_accuracy", bal, bal - 0.02, bal + 0.02),
                  _row(cell, "T2", "server", attack, "epsilon_gdp", gdp)]
        extra += [{**_row(cell, "T2", "server", attack, "auc_at_t", 0.5 + t / 1000), "t": t} for t in (40, 60, 80)]
    for epoch, auc in ((1, 0.52), (2, 0.58)):
        extra += [{**_row(cell, "T3", "client_0", "loss", m + "_at_epoch", v), "epoch": epoch}
                  for m, v in (("auc", auc), ("tpr_at_1pct_fpr", auc - 0.5))]
    (root / "results.json").write_text(json.dumps(rows + extra))
    html_path, md_path = write_report(root)
    text = html_path.read_text(encoding="utf-8")
    detail = _table(text, "membership-detail-table")
    mine = detail[(detail["cell"].map(lambda c: c[0]) == cell["cell"]) & (detail["threat"].map(lambda c: c[0]) == "T2")]
    assert len(mine) == 1
    r = mine.iloc[0]
    assert float(r["TPR at 0.1 % FPR"][1]) == 0.05 and r["TPR@0.1% by"][0] == "sima / server"
    assert r["resolved"][0].startswith("no")
    assert float(r["balanced accuracy"][1]) == 0.61 and float(r["ε_GDP lower bound"][1]) == 0.9
    epochs = _table(text, "epochs-table")
    auc = epochs[(epochs["metric"].map(lambda c: c[0]) == "auc") & (epochs["threat"].map(lambda c: c[0]) == "T3")]
    # snapshots 1 and 2, then the final models at the cell's epochs (4): its worst T3 AUC over targets and attacks
    final = max(x["value"] for x in rows if x["cell"] == cell["cell"] and x["threat"] == "T3" and x["metric"] == "auc")
    assert [e[0] for e in auc["epoch"]] == ["1", "2", "4"]
    assert [float(v[1]) for v in auc["worst value"]] == [0.52, 0.58, pytest.approx(final)]
    md = md_path.read_text(encoding="utf-8")
    assert "4a. Membership at low FPR" in md and "4b. Leakage against training length" in md
    assert "figures/auc_per_step.png" in md and "figures/leakage_vs_epochs.png" in md
    assert not math.isnan(final)
