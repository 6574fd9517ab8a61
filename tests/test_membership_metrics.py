"""Membership metrics (DESIGN.md §4.2): equal to scikit-learn's, TPR@FPR at its edges, intervals, plots."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

from collafuse.attacks.membership.metrics import (
    ScoreError, evaluate, fast_roc, point_metrics, resolvable, save_roc_png, tpr_at_fpr_from_roc, validate_scores,
)


def _tpr_at(member, nonmember, target):
    labels = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    fpr, tpr, _ = roc_curve(labels, np.r_[member, nonmember], drop_intermediate=False)
    return tpr_at_fpr_from_roc(fpr, tpr, target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0.3, 1.0, 120)
    n = rng.normal(0.0, 1.0, 100)
    # Rounded copies force many ties.
    for ms, ns in ((m, n), (np.round(m, 1), np.round(n, 1))):
        labels = np.r_[np.ones(ms.size), np.zeros(ns.size)]
        scores = np.r_[ms, ns]
        point = point_metrics(labels, scores, targets=(0.01, 0.001, 0.1))
        assert point.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        # TPR@FPR by brute force over every threshold: the largest TPR with FPR <= target.
        thresholds = np.r_[np.inf, np.unique(scores)]
        fprs = np.array([(ns >= t).mean() for t in thresholds])
        tprs = np.array([(ms >= t).mean() for t in thresholds])
        for target in (0.01, 0.001, 0.1):
            assert point.tpr_at_fpr[target] == pytest.approx(tprs[fprs <= target].max())
        # Balanced accuracy at the best threshold = max over thresholds of sklearn's.
        best = max(balanced_accuracy_score(labels, (scores >= t).astype(int)) for t in thresholds)
        assert point.balanced_accuracy == pytest.approx(best, abs=1e-12)
        # The fast ROC used for the bootstrap is scikit-learn's curve.
        f1, t1 = fast_roc(labels, scores)
        f2, t2, _ = roc_curve(labels, scores, drop_intermediate=False)
        np.testing.assert_allclose(f1, f2)
        np.testing.assert_allclose(t1, t2)


def test_tpr_at_fpr_counts_an_fpr_exactly_at_the_target():
    # 100 non-members: one scores 10, so the threshold 10 has FPR exactly 0.01.
    nonmember = np.r_[10.0, np.zeros(99)]
    member = np.r_[np.full(30, 10.0), np.full(20, 5.0), np.full(50, -1.0)]
    # At t = 10: FPR = 0.01 (allowed), TPR = 0.30; at t = 5: FPR still 0.01, TPR = 0.50.
    assert _tpr_at(member, nonmember, 0.01) == pytest.approx(0.50)
    # Target just below 0.01: only FPR 0 qualifies, and no member scores above 10.
    assert _tpr_at(member, nonmember, 0.0099) == 0.0


def test_tpr_at_fpr_with_a_tie_group_that_jumps_over_the_target():
    # Two non-members tie with 40 members at the top score: that point has FPR 0.02 > 0.01,
    # so the tied members cannot be counted at 1 % FPR.
    nonmember = np.r_[7.0, 7.0, np.zeros(98)]
    member = np.r_[np.full(40, 7.0), np.full(10, 8.0), np.zeros(50)]
    assert _tpr_at(member, nonmember, 0.01) == pytest.approx(0.10)  # only the 10 members at 8.0
    assert _tpr_at(member, nonmember, 0.02) == pytest.approx(0.50)  # FPR 0.02 exactly: tie group counts


def test_unresolved_when_too_few_nonmembers():
    assert resolvable(100, 0.01) and not resolvable(99, 0.01)
    assert resolvable(1000, 0.001) and not resolvable(999, 0.001)
    rng = np.random.default_rng(0)
    out = evaluate(rng.normal(1, 1, 200), rng.normal(0, 1, 200), n_boot=20).to_json()
    assert out["tpr_at_fpr"]["0.01"]["resolved"] is True
    assert out["tpr_at_fpr"]["0.001"]["resolved"] is False
    assert "200 non-members" in out["tpr_at_fpr"]["0.001"]["note"]


def test_bootstrap_intervals_are_seeded_and_cover_the_point():
    rng = np.random.default_rng(3)
    m, n = rng.normal(0.5, 1, 400), rng.normal(0, 1, 400)
    a = evaluate(m, n, n_boot=100, seed=5).to_json()
    b = evaluate(m, n, n_boot=100, seed=5).to_json()
    c = evaluate(m, n, n_boot=100, seed=6).to_json()
    assert a == b and a["auc_ci"] != c["auc_ci"]
    lo, hi = a["auc_ci"]
    assert lo < a["auc"] < hi and hi - lo < 0.12
    assert a["balanced_accuracy_ci"][0] <= a["balanced_accuracy"] <= a["balanced_accuracy_ci"][1]


@pytest.mark.parametrize(
    "member, nonmember, message",
    [
        (np.array([]), np.array([1.0]), "no member candidates"),
        (np.array([1.0]), np.array([]), "no non-member candidates"),
        (np.array([1.0, np.nan]), np.array([0.0]), "NaN or infinite"),
        (np.array([1.0]), np.array([np.inf]), "NaN or infinite"),
        (np.ones((2, 2)), np.ones(2), "1-D"),
    ],
)
def test_bad_scores_raise_one_clear_error(member, nonmember, message):
    with pytest.raises(ScoreError, match=message):
        validate_scores(member, nonmember)
    with pytest.raises(ScoreError):
        evaluate(member, nonmember)


def test_roc_png_is_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "roc.png"
    save_roc_png({"a": (rng.normal(1, 1, 50), rng.normal(0, 1, 50))}, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]
