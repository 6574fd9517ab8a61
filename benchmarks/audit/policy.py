"""The leakage policy (DESIGN.md §7): limits per threat, read from YAML and checked against the grid.

A policy is YAML::

    statistic: value          # value | ci_low | ci_high | conservative (the interval end on each
                              # metric's worse side: ci_high for AUC, ci_low for accuracy)
    minimize: client_gflops_sample   # the cost the recommendation minimises
    blind_auc: 0.6            # the model-blind baseline's AUC above which (and significant, p < 0.01) a
                              # threat's membership checks are INCONCLUSIVE (DESIGN §4.2, §7)
    limits:
      T1: {reid_pool: {max: 0.05}, auc: {max: 0.6}}
      T2: {auc: {max: 0.6}}
      utility: {accuracy: {min: 0.5}}

Which metrics a limit may name under which group (threats T1–T5, ``utility``, ``cost``, ``formal``,
``sampling``), and which way each is worse, come from the one metric vocabulary
(:mod:`collafuse.metrics`); applying the policy to results is :mod:`~.verdict`'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse.attacks.membership.catalog import ATTACKS as MEMBERSHIP
from collafuse.errors import ConfigError
from collafuse.metrics import GROUPS, in_group
from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit.grid import GridSpec, read_yaml

STATISTICS = ("value", "ci_low", "ci_high", "conservative")
DEFAULT_BLIND_AUC = 0.6
MEMBERSHIP_METRICS = frozenset(in_group("T2"))  # what a membership attack measures, under every threat


@dataclass(frozen=True)
class Limit:
    threat: str
    metric: str
    op: str        # "max" or "min"
    bound: float


@dataclass(frozen=True)
class Policy:
    limits: tuple[Limit, ...]
    statistic: str
    minimize: str
    text: str
    source: str
    blind_auc: float = DEFAULT_BLIND_AUC

    def to_json(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "minimize": self.minimize, "source": self.source,
                "blind_auc": self.blind_auc,
                "limits": [{"threat": l.threat, "metric": l.metric, "op": l.op, "limit": l.bound} for l in self.limits]}


def load_policy(path: Path | str | None) -> Policy:
    """The policy at ``path`` or the embedded default, validated (one-line ConfigError otherwise)."""
    raw, text, source = read_yaml(path, "default_policy.yaml", "policy")
    return parse_policy(raw, text, source)


def parse_policy(raw: Any, text: str = "", source: str = "policy") -> Policy:
    if not isinstance(raw, dict):
        raise ConfigError("policy error: the policy must be a mapping with 'limits'")
    unknown = set(raw) - {"statistic", "minimize", "limits", "blind_auc"}
    if unknown:
        raise ConfigError(f"policy error: unknown key {sorted(unknown)[0]!r} (valid: statistic, minimize, blind_auc, "
                          "limits)")
    blind_auc = raw.get("blind_auc", DEFAULT_BLIND_AUC)
    if isinstance(blind_auc, bool) or not isinstance(blind_auc, (int, float)) or not 0.5 <= blind_auc <= 1.0:
        raise ConfigError(f"policy error: blind_auc must be a number in [0.5, 1], got {blind_auc!r}")
    statistic = raw.get("statistic", "value")
    if statistic not in STATISTICS:
        raise ConfigError(f"policy error: statistic {statistic!r} is not one of {', '.join(STATISTICS)}")
    minimize = raw.get("minimize", "client_gflops_sample")
    costs = in_group("cost", judged_only=True)
    if minimize not in costs:
        raise ConfigError(f"policy error: minimize {minimize!r} is not a cost metric; valid: {', '.join(costs)}")
    limits_raw = raw.get("limits")
    if not isinstance(limits_raw, dict) or not limits_raw:
        raise ConfigError("policy error: 'limits' must be a non-empty mapping of threat → metric → {max|min: number}")
    limits = []
    for threat, metrics in limits_raw.items():
        if threat not in GROUPS:
            raise ConfigError(f"policy error: unknown threat {threat!r}; valid: {', '.join(GROUPS)}")
        if not isinstance(metrics, dict) or not metrics:
            raise ConfigError(f"policy error: limits.{threat} must map metrics to {{max|min: number}}")
        judged = in_group(threat, judged_only=True)
        for metric, bound in metrics.items():
            if metric not in judged:
                raise ConfigError(f"policy error: unknown metric {metric!r} for {threat}; valid: {', '.join(judged)}")
            if not isinstance(bound, dict) or len(bound) != 1 or next(iter(bound)) not in ("max", "min"):
                raise ConfigError(f"policy error: limits.{threat}.{metric} must be {{max: number}} or {{min: number}}")
            op, value = next(iter(bound.items()))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"policy error: limits.{threat}.{metric}.{op} must be a number, got {value!r}")
            limits.append(Limit(threat, metric, op, float(value)))
    return Policy(tuple(limits), statistic, minimize, text, source, float(blind_auc))


def check_against_grid(policy: Policy, spec: GridSpec) -> None:
    """Refuse a policy on a threat (or metric) that no cell of the grid measures."""
    blocks = [b for b in spec.systems if (b.cut_ratios and b.defenses and b.payload_kinds) or b.runs]
    systems = bool(blocks)
    attacked = {t: {a for b in blocks for a in b.attacks.get(t, ())} for t in THREAT_IDS}
    t1_recon = bool(spec.payload_curve.cut_ratios and spec.payload_curve.attacks) or any(
        a not in MEMBERSHIP for a in attacked["T1"])
    t1_member = any(a in MEMBERSHIP for a in attacked["T1"])
    for limit in policy.limits:
        if limit.threat == "T1":
            ok = t1_member if limit.metric in MEMBERSHIP_METRICS else t1_recon
        elif limit.threat in THREAT_IDS:  # T2..T5 (T1 above; T5's extraction comes with any T5 attack)
            ok = bool(attacked[limit.threat])
        elif limit.threat in ("utility", "sampling"):
            ok = systems
        else:
            ok = True
        if not ok:
            raise ConfigError(f"policy error: limits.{limit.threat}.{limit.metric}: no attack in the grid measures it "
                              f"(add attacks for {limit.threat} to the grid or drop the limit)")


def calibrated_attacks() -> frozenset[str]:
    """The membership attacks that learn their direction from reference models (lira, rmia and variants)."""
    return frozenset(MEMBERSHIP.needing("references"))
