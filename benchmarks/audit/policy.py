"""The leakage policy (DESIGN.md §7; issue 6 item 6): limits per threat, pass/fail per cell, a verdict.

A policy is YAML::

    statistic: value          # or ci_high: judge the conservative end of each 95 % interval
    minimize: client_gflops_sample   # the cost the recommendation minimises
    limits:
      T1: {reid_pool: {max: 0.05}, auc: {max: 0.6}}
      T2: {auc: {max: 0.6}}
      utility: {accuracy: {min: 0.5}}

Each limit is checked against the WORST value in the cell over every attack and target
of that threat (for ``max``: the largest; for ``min``: the smallest), upper bounds
included — an auditor's policy must hold against the strongest attacker measured.
A threat whose target does not exist in the cell (no payload crosses at c = 1, no server
model at c = 1, no client model at c = 0) passes with that reason. A cell is *complete*
when every threat of the policy applies to its kind (payload-only cells measure T1 only).
The recommendation is the complete, passing cell with the least client compute.

The worst value is always the attack's own AUC (or rate): an attack flagged ``inverted`` (AUC
significantly below 0.5) is never turned into 1 − AUC with the labels; the calibrated attacks
(``lira``, ``rmia``: their direction comes from reference models) are what uses such a signal
(DESIGN.md §4.2 "Direction"). Where attacks tie on the worst value, the calibrated one is named
(:func:`worst_index`), so the verdict rests on an attack that needed no labels to orient itself.

Membership limits (T1–T4): ``auc``, ``tpr_at_1pct_fpr``, ``tpr_at_01pct_fpr``, ``balanced_accuracy``,
``epsilon_lb``, ``epsilon_gdp``, all on the final (released) models. A ``max`` limit on
``tpr_at_01pct_fpr`` where a target has fewer than 1000 non-members is *not measured* (that value
is the TPR at FPR 0, a lower bound) unless a resolved value already breaks it. The curves
(``auc_at_t`` per query step, ``*_at_epoch`` per training snapshot) are reported, not judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from collafuse.errors import ConfigError
from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit.grid import Cell, GridSpec, read_yaml

# extraction: (ℓ2, δ)-extraction (Carlini et al. 2023), δ = 0.1 in normalised ℓ2 on [0, 1]; T1 per
# reconstruction attack, T4 by nn-distance's nearest generated sample.
RECONSTRUCTION_METRICS = ("mse", "psnr", "ssim", "reid_client", "reid_pool", "label", "linkage_accuracy", "extraction")
MEMBERSHIP_METRICS = ("auc", "tpr_at_1pct_fpr", "epsilon_lb", "tpr_at_01pct_fpr", "balanced_accuracy", "epsilon_gdp")
# A metric that is only a lower bound where its flag row is 0: TPR at 0.1 % FPR needs >= 1000 non-members,
# with fewer it is the TPR at FPR 0. A max limit cannot pass on such a value (DESIGN.md §4.2).
RESOLVED_FLAG = {"tpr_at_01pct_fpr": "tpr_at_01pct_fpr_resolved"}
METRICS: dict[str, tuple[str, ...]] = {
    "T1": RECONSTRUCTION_METRICS + MEMBERSHIP_METRICS,
    "T2": MEMBERSHIP_METRICS,
    "T3": MEMBERSHIP_METRICS,
    "T4": MEMBERSHIP_METRICS + ("extraction",),
    "utility": ("fid", "kid", "precision", "recall", "accuracy", "accuracy_real", "fid_inception"),
    "cost": ("client_eval_share_train", "client_eval_share_sample", "client_flops_share_train",
             "client_flops_share_sample", "client_gflops_train_per_image_epoch", "client_gflops_sample",
             "payload_bytes_per_image_epoch"),
    "formal": ("epsilon_payload", "epsilon_model_clients", "epsilon_model_server"),
    # Is the server's hand-off distributed like a payload (DESIGN §2.3; benchmarks/audit/handoff.py)?
    "sampling": ("handoff_auc", "handoff_std_error", "handoff_off_distribution"),
}
STATISTICS = ("value", "ci_low", "ci_high")


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

    def to_json(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "minimize": self.minimize, "source": self.source,
                "limits": [{"threat": l.threat, "metric": l.metric, "op": l.op, "limit": l.bound} for l in self.limits]}


def load_policy(path: Path | str | None) -> Policy:
    """The policy at ``path`` or the embedded default, validated (one-line ConfigError otherwise)."""
    raw, text, source = read_yaml(path, "default_policy.yaml", "policy")
    return parse_policy(raw, text, source)


def parse_policy(raw: Any, text: str = "", source: str = "policy") -> Policy:
    if not isinstance(raw, dict):
        raise ConfigError("policy error: the policy must be a mapping with 'limits'")
    unknown = set(raw) - {"statistic", "minimize", "limits"}
    if unknown:
        raise ConfigError(f"policy error: unknown key {sorted(unknown)[0]!r} (valid: statistic, minimize, limits)")
    statistic = raw.get("statistic", "value")
    if statistic not in STATISTICS:
        raise ConfigError(f"policy error: statistic {statistic!r} is not one of {', '.join(STATISTICS)}")
    minimize = raw.get("minimize", "client_gflops_sample")
    if minimize not in METRICS["cost"]:
        raise ConfigError(f"policy error: minimize {minimize!r} is not a cost metric; valid: {', '.join(METRICS['cost'])}")
    limits_raw = raw.get("limits")
    if not isinstance(limits_raw, dict) or not limits_raw:
        raise ConfigError("policy error: 'limits' must be a non-empty mapping of threat → metric → {max|min: number}")
    limits = []
    for threat, metrics in limits_raw.items():
        if threat not in METRICS:
            raise ConfigError(f"policy error: unknown threat {threat!r}; valid: {', '.join(METRICS)}")
        if not isinstance(metrics, dict) or not metrics:
            raise ConfigError(f"policy error: limits.{threat} must map metrics to {{max|min: number}}")
        for metric, bound in metrics.items():
            if metric not in METRICS[threat]:
                raise ConfigError(f"policy error: unknown metric {metric!r} for {threat}; valid: {', '.join(METRICS[threat])}")
            if not isinstance(bound, dict) or len(bound) != 1 or next(iter(bound)) not in ("max", "min"):
                raise ConfigError(f"policy error: limits.{threat}.{metric} must be {{max: number}} or {{min: number}}")
            op, value = next(iter(bound.items()))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"policy error: limits.{threat}.{metric}.{op} must be a number, got {value!r}")
            limits.append(Limit(threat, metric, op, float(value)))
    return Policy(tuple(limits), statistic, minimize, text, source)


def check_against_grid(policy: Policy, spec: GridSpec) -> None:
    """Refuse a policy on a threat (or metric) that no cell of the grid measures."""
    from collafuse.attacks.membership.catalog import ATTACKS as MEMBERSHIP

    blocks = [b for b in spec.systems if (b.cut_ratios and b.defenses and b.payload_kinds) or b.runs]
    systems = bool(blocks)
    attacked = {t: {a for b in blocks for a in b.attacks.get(t, ())} for t in THREAT_IDS}
    t1_recon = bool(spec.payload_curve.cut_ratios and spec.payload_curve.attacks) or any(
        a not in MEMBERSHIP for a in attacked["T1"])
    t1_member = any(a in MEMBERSHIP for a in attacked["T1"])
    for limit in policy.limits:
        if limit.threat == "T1":
            ok = t1_member if limit.metric in MEMBERSHIP_METRICS else t1_recon
        elif limit.threat in THREAT_IDS:  # T2..T4 (T1 above)
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
    from collafuse.attacks.membership.catalog import ATTACKS as MEMBERSHIP

    return frozenset(MEMBERSHIP.needing("references"))


def worst_index(values: pd.Series, attacks: pd.Series, op: str = "max"):
    """The index of the worst of ``values`` (largest for ``max``, smallest for ``min``); among ties the
    first row of a calibrated attack (:func:`calibrated_attacks`), else the first row. ``attacks``: the
    attack name of each row, same index. The values are used as measured: nothing is flipped."""
    target = values.max() if op == "max" else values.min()
    tied = values.index[values == target]
    calibrated = calibrated_attacks()
    preferred = [i for i in tied if attacks.loc[i] in calibrated]
    return preferred[0] if preferred else tied[0]


def _absent_reason(cell: Cell, threat: str, rows: pd.DataFrame) -> str | None:
    """Why a threat has nothing to measure in this cell, or None if it should have been measured."""
    T = cell.run_config.diffusion.T
    if threat == "T1":
        count = rows[(rows.threat == "T1") & (rows.metric == "payload_rows")]["value"]
        if len(count) and float(count.iloc[0]) == 0:
            return "no payload crosses to the server (c = 1)"
    if cell.kind == "system":
        if threat == "T2" and cell.t_c >= T:
            return "no server model (c = 1)"
        if threat == "T3" and cell.t_c == 0:
            return "no client model (c = 0)"
        if threat == "sampling" and not 0 < cell.t_c < T:
            return "no hand-off: one party runs the whole chain (c = 0 or 1)"
    return None


def _unresolved(rows: pd.DataFrame, sel: pd.DataFrame, limit: Limit) -> pd.Series:
    """Per selected row: True where a max limit meets a value that is only a lower bound (its
    :data:`RESOLVED_FLAG` row for the same target and attack is 0)."""
    flag = RESOLVED_FLAG.get(limit.metric)
    if flag is None or limit.op != "max":
        return pd.Series(False, index=sel.index)
    flags = rows[(rows.threat == limit.threat) & (rows.metric == flag)]
    resolved = {(t, a): v for t, a, v in zip(flags["target"], flags["attack"], flags["value"])}
    return pd.Series([resolved.get((t, a), 1.0) == 0 for t, a in zip(sel["target"], sel["attack"])], index=sel.index,
                     dtype=bool)


def _applies(cell: Cell, threat: str) -> bool:
    return cell.kind == "system" or threat in ("T1", "cost", "formal")


def evaluate_cell(policy: Policy, cell: Cell, rows: pd.DataFrame) -> dict[str, Any]:
    """Every check of the policy on one cell's rows."""
    checks, complete = [], True
    for limit in policy.limits:
        check = {"threat": limit.threat, "metric": limit.metric, "op": limit.op, "limit": limit.bound,
                 "observed": None, "attack": None, "target": None, "pass": None, "note": ""}
        if not _applies(cell, limit.threat):
            complete = False
            check["note"] = "not measured in a payload-only cell"
            checks.append(check)
            continue
        sel = rows[(rows.threat == limit.threat) & (rows.metric == limit.metric)]
        stat = policy.statistic
        values = sel[stat].where(sel[stat].notna(), sel["value"]) if stat != "value" else sel["value"]
        values = values.dropna()
        if values.empty:
            reason = _absent_reason(cell, limit.threat, rows)
            if reason is not None:
                check.update({"pass": True, "note": reason})
            else:
                complete = False
                check["note"] = "not measured"
            checks.append(check)
            continue
        unresolved = _unresolved(rows, sel.loc[values.index], limit)
        if unresolved.any() and not (values[~unresolved] > limit.bound).any():
            # Only lower bounds stand between the limit and a pass (a failing resolved value still fails below).
            complete = False
            check["note"] = (f"unresolved: {int(unresolved.sum())} of {len(values)} values lack the non-members to "
                             f"resolve {limit.metric} (they are TPR at FPR 0, a lower bound)")
            checks.append(check)
            continue
        values = values[~unresolved] if unresolved.any() else values
        idx = worst_index(values, sel.loc[values.index, "attack"], limit.op)
        observed = float(values.loc[idx])
        ok = observed <= limit.bound if limit.op == "max" else observed >= limit.bound
        check.update({"observed": observed, "attack": sel.loc[idx, "attack"], "target": sel.loc[idx, "target"],
                      "pass": bool(ok)})
        checks.append(check)
    passed = complete and all(c["pass"] for c in checks)
    return {"cell": cell.cell_id, "config_hash": cell.config_hash, "pass": passed, "complete": complete, "checks": checks}


def _describe(cell: Cell) -> str:
    return f"c = {cell.cut_ratio:g} with {cell.defense} ({cell.kind}, {cell.payload_kind} payloads, seed {cell.seed})"


def _pooled_accuracy(df: pd.DataFrame, config_hash: str) -> float | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "utility") & (df.target == "pooled")
             & (df.metric == "accuracy")]["value"].dropna()
    return float(sel.iloc[0]) if len(sel) else None


def _metric_value(df: pd.DataFrame, config_hash: str, metric: str) -> float | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "cost") & (df.metric == metric)]["value"].dropna()
    return float(sel.iloc[0]) if len(sel) else None


def baseline_comparison(cell: Cell, cells: list[Cell], df: pd.DataFrame, cost_metric: str) -> dict[str, Any] | None:
    """The recommended cell against the local-only baseline (c = 1, same dataset, seed and payload kind):
    client cost of each, the fraction saved, and each one's pooled sample accuracy. None without a baseline."""
    base = next((c for c in cells if c.baseline == "local-only" and c.dataset == cell.dataset and c.seed == cell.seed),
                None)
    if base is None:
        return None
    cost, base_cost = _metric_value(df, cell.config_hash, cost_metric), _metric_value(df, base.config_hash, cost_metric)
    saved = None if cost is None or not base_cost else 1.0 - cost / base_cost
    return {"baseline_cell": base.cell_id, "cost_metric": cost_metric, "cost": cost, "baseline_cost": base_cost,
            "saved_fraction": saved, "accuracy": _pooled_accuracy(df, cell.config_hash),
            "baseline_accuracy": _pooled_accuracy(df, base.config_hash)}


def against_baseline(cell: Cell, cells: list[Cell], df: pd.DataFrame, cost_metric: str, cost: float) -> str:
    """The recommendation against training alone, in plain words, for the verdict sentence."""
    if cell.baseline == "local-only":
        return "That is training alone (local-only, c = 1): no split setting that saves client compute passes."
    cmp = baseline_comparison(cell, cells, df, cost_metric)
    if cmp is None:
        return "The grid has no local-only baseline (c = 1) to compare it with."
    if cmp["saved_fraction"] is None:
        return "Its client compute against training alone was not measured."
    def fmt(a: float | None) -> str:
        return "not measured" if a is None else f"{a:.2f}"

    saves = cmp["saved_fraction"]
    verb = f"saves {saves:.0%}" if saves >= 0 else f"costs {-saves:.0%} more"
    return (f"Against training alone (local-only, c = 1) it {verb} of the client compute "
            f"({cost_metric} {cmp['cost']:.3g} vs {cmp['baseline_cost']:.3g}); "
            f"sample accuracy {fmt(cmp['accuracy'])} vs {fmt(cmp['baseline_accuracy'])}.")


# The pooled utility metrics the verdict compares, and which way is better (DESIGN §6).
UTILITY_DIRECTIONS = {"accuracy": "higher", "fid": "lower", "kid": "lower", "precision": "higher", "recall": "higher"}


def _pooled_utility(df: pd.DataFrame, config_hash: str, metric: str) -> tuple[float, float, float] | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "utility") & (df.target == "pooled") & (df.metric == metric)]
    sel = sel[sel["value"].notna()]
    if sel.empty:
        return None
    row = sel.iloc[0]
    lo, hi = row.get("ci_low"), row.get("ci_high")
    return float(row["value"]), (float(lo) if pd.notna(lo) else math.nan), (float(hi) if pd.notna(hi) else math.nan)


def _with_interval(v: tuple[float, float, float]) -> str:
    value, lo, hi = v
    return f"{value:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else "")


def _compare(mine: tuple[float, float, float], theirs: tuple[float, float, float], direction: str) -> str:
    """"better", "worse" or "indistinguishable" (the two 95 % intervals overlap); without intervals, by value."""
    (a, alo, ahi), (b, blo, bhi) = mine, theirs
    if all(math.isfinite(x) for x in (alo, ahi, blo, bhi)) and alo <= bhi and blo <= ahi:
        return "indistinguishable"
    if a == b:
        return "indistinguishable"
    return "better" if (a > b) == (direction == "higher") else "worse"


def utility_sentence(cell: Cell, cells: list[Cell], df: pd.DataFrame) -> str:
    """Every pooled utility metric of ``cell`` with its interval, against local-only (c = 1) and central (c = 0)
    training on the same dataset and seed, saying where the metrics disagree (issue 19: a class-accuracy
    judge alone called saturated noise good). '' when the cell has no utility rows."""
    mine = {m: _pooled_utility(df, cell.config_hash, m) for m in UTILITY_DIRECTIONS}
    mine = {m: v for m, v in mine.items() if v is not None}
    if not mine:
        return ""
    parts = [f"Its samples: {', '.join(f'{m} {_with_interval(v)}' for m, v in mine.items())}."]
    for name in ("local-only", "central"):
        base = next((c for c in cells if c.baseline == name and c.dataset == cell.dataset and c.seed == cell.seed
                     and c.config_hash != cell.config_hash), None)
        if base is None:
            continue
        verdicts: dict[str, list[str]] = {"better": [], "worse": [], "indistinguishable": []}
        shown = []
        for metric, v in mine.items():
            other = _pooled_utility(df, base.config_hash, metric)
            if other is None:
                continue
            shown.append(f"{metric} {_with_interval(other)}")
            verdicts[_compare(v, other, UTILITY_DIRECTIONS[metric])].append(metric)
        if not shown:
            continue
        said = "; ".join(f"{k} on {', '.join(v)}" for k, v in verdicts.items() if v)
        disagree = " The metrics disagree." if verdicts["better"] and verdicts["worse"] else ""
        parts.append(f"{name.capitalize()} ({', '.join(shown)}): the recommendation is {said}.{disagree}")
    return " ".join(parts)


def verdict(policy: Policy, cells: list[Cell], df: pd.DataFrame) -> tuple[list[dict], dict[str, Any]]:
    """(evaluations per cell, the verdict with the recommendation)."""
    evaluations = [evaluate_cell(policy, cell, df[df.config_hash == cell.config_hash]) for cell in cells]
    by_hash = {c.config_hash: c for c in cells}
    complete = [e for e in evaluations if e["complete"]]
    passing = [e for e in complete if e["pass"]]

    def cost(e: dict) -> float:
        sel = df[(df.config_hash == e["config_hash"]) & (df.threat == "cost") & (df.metric == policy.minimize)]["value"]
        return float(sel.iloc[0]) if len(sel) and pd.notna(sel.iloc[0]) else math.inf

    if passing:
        best = min(passing, key=lambda e: (cost(e), by_hash[e["config_hash"]].cut_ratio))
        cell = by_hash[best["config_hash"]]
        rec = {
            "cell": cell.cell_id, "config_hash": cell.config_hash, "defense": cell.defense, "cut_ratio": cell.cut_ratio,
            "cost_metric": policy.minimize, "cost": cost(best),
            "why": f"the least {policy.minimize} ({cost(best):.4g}) among the {len(passing)} complete settings that pass",
        }
        text = (f"PASS: {len(passing)} of {len(complete)} fully audited settings meet the policy; "
                f"recommended: {_describe(cell)}. {against_baseline(cell, cells, df, policy.minimize, cost(best))}")
        utility = utility_sentence(cell, cells, df)
        text = f"{text} {utility}" if utility else text
        rec["against_local_only"] = baseline_comparison(cell, cells, df, policy.minimize)
        status = "pass"
    else:
        rec = None
        status = "fail"
        if not complete:
            text = "FAIL: no setting was audited under every threat of the policy."
        else:
            failed: dict[str, int] = {}
            for e in complete:
                for c in e["checks"]:
                    if c["pass"] is False:
                        key = f"{c['threat']} {c['metric']} {'≤' if c['op'] == 'max' else '≥'} {c['limit']:g}"
                        failed[key] = failed.get(key, 0) + 1
            worst = ", ".join(f"{k} (fails in {n})" for k, n in sorted(failed.items(), key=lambda kv: -kv[1])[:3])
            text = f"FAIL: none of the {len(complete)} fully audited settings meets the policy; most often broken: {worst}."
    return evaluations, {"status": status, "text": text, "recommendation": rec,
                         "passing_cells": [e["cell"] for e in passing]}
