"""The one metric vocabulary (issue 20 item 1): producers, policy and report ask it; a misspelt name fails."""
import math

import pytest

from collafuse.errors import ConfigError
from collafuse.metrics import GROUPS, METRICS, MetricSpec, at_epoch, formal_metrics, headline_metrics, in_group, metric
from collafuse.registry import UnknownNameError

from collafuse.benchmarks.audit.cells.rows import interval_row, row
from collafuse.benchmarks.audit.policy import parse_policy
from collafuse.attacks.stats import Interval


def test_every_metric_has_one_definition_and_the_registry_refuses_a_second():
    assert len(set(METRICS)) == len(METRICS)
    with pytest.raises(ValueError, match="already registered"):
        METRICS.register("auc", metric("auc"))
    with pytest.raises(UnknownNameError, match="unknown metric 'acu'; valid: .*auc"):
        metric("acu")


def test_specs_are_consistent():
    for name in METRICS:
        spec = metric(name)
        assert set(spec.groups) <= set(GROUPS)
        if spec.judged:
            assert spec.worse in ("higher", "lower"), name
        if spec.resolved_by is not None:
            assert metric(spec.resolved_by).kind == "flag" and set(spec.groups) <= set(metric(spec.resolved_by).groups)
        if spec.axis is not None:
            assert spec.kind == "curve" and not spec.judged
    with pytest.raises(ValueError, match="direction"):
        MetricSpec("x", ("T1",), None, "x")
    with pytest.raises(ValueError, match="groups"):
        MetricSpec("x", ("T9",), "higher", "x")


def test_headlines_formal_bounds_and_curves_come_from_the_vocabulary():
    assert headline_metrics("T1") == ("reid_pool", "auc")
    assert all(headline_metrics(t) == ("auc",) for t in ("T2", "T3", "T4"))
    assert formal_metrics("T4") == ("epsilon_model_server", "epsilon_model_clients")
    assert at_epoch("auc") == "auc_at_epoch" and metric("auc_at_epoch").axis == "epoch"
    assert metric("auc").is_worse(0.7, 0.6) and metric("precision").is_worse(0.1, 0.2)


def test_policy_limits_exactly_the_judged_metrics_of_each_group():
    for group in GROUPS:
        for name in in_group(group, judged_only=True):
            bound = {"max": 1.0} if metric(name).worse == "higher" else {"min": 0.0}
            parse_policy({"limits": {group: {name: bound}}})
    with pytest.raises(ConfigError, match="unknown metric 'inverted' for T2"):  # a flag is reported, not judged
        parse_policy({"limits": {"T2": {"inverted": {"max": 0}}}})
    with pytest.raises(ConfigError, match="unknown metric 'auc' for utility"):
        parse_policy({"limits": {"utility": {"auc": {"max": 0.6}}}})


def test_a_row_is_refused_when_its_metric_is_misspelt_or_under_the_wrong_group():
    assert row("T2", "server", "loss", "auc", 0.6)["metric"] == "auc"
    with pytest.raises(UnknownNameError):
        row("T2", "server", "loss", "AUC", 0.6)
    with pytest.raises(ValueError, match="does not belong to 'utility'"):
        row("utility", "pooled", "x", "auc", 0.6)
    with pytest.raises(ValueError, match="needs the axis 't'"):
        row("T2", "server", "loss", "auc_at_t", 0.6)
    assert row("T2", "server", "loss", "auc_at_t", 0.6, t=20)["t"] == 20


def test_interval_rows_keep_finite_ends_and_values_keep_infinity():
    r = interval_row("T1", "payload", "rescale", "psnr", Interval(12.0, -math.inf, math.inf, 1, "t"))
    assert (r["value"], r["ci_low"], r["ci_high"]) == (12.0, None, None)
    assert row("formal", "payload", "accountant", "epsilon_payload", math.inf)["value"] == math.inf
    assert row("T2", "server", "loss", "auc", math.nan)["value"] is None
