"""A policy applied to the results table: checks per cell, the verdict and the recommendation (DESIGN §7).

Typed, frozen values that ``audit.json`` serialises (:meth:`to_json`) and the report reads back
(:meth:`from_json`): :class:`Check` (one limit on one cell), :class:`CellEvaluation` (every check of a
cell), :class:`Recommendation` (the cheapest passing setting, with :class:`BaselineComparison` against
local-only training) and :class:`Verdict`.

Each limit is checked against the WORST value in the cell over every attack and target of that threat
(for ``max``: the largest; for ``min``: the smallest), upper bounds included — an auditor's policy must
hold against the strongest attacker measured. A threat whose target does not exist in the cell (no
payload crosses at c = 1, no server model at c = 1, no client model at c = 0, no hand-off at c = 0 or 1)
passes with that reason. A cell is *complete* when every threat of the policy applies to its kind
(payload-only cells measure T1 only). The recommendation is the complete, passing cell with the least
client compute.

The worst value is always the attack's own AUC (or rate): an attack flagged ``inverted`` (AUC
significantly below 0.5) is never turned into 1 − AUC with the labels; the calibrated attacks (``lira``,
``rmia``: their direction comes from reference models) are what uses such a signal (DESIGN §4.2
"Direction"). Where attacks tie on the worst value, the calibrated one is named (:func:`worst_index`).

A ``max`` limit on a metric that is only a lower bound where its resolved-flag row is 0
(``tpr_at_01pct_fpr`` with fewer than 1000 non-members: the vocabulary's ``resolved_by``) is *not
measured* unless a resolved value already breaks it. Curves (``auc_at_t``, ``*_at_epoch``) are reported,
not judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

from collafuse.jsonio import decode_number, encode_number
from collafuse.metrics import metric

from collafuse.benchmarks.audit.grid import Cell
from collafuse.benchmarks.audit.policy import Limit, Policy, calibrated_attacks

# The pooled utility metrics the verdict compares, with their directions from the vocabulary (DESIGN §6).
UTILITY_COMPARED = ("accuracy", "fid", "kid", "precision", "recall")


@dataclass(frozen=True)
class Check:
    """One limit of the policy on one cell: the worst value, who reached it, and whether it passes
    (``passed`` None: not measured, see ``note``)."""

    threat: str
    metric: str
    op: str
    limit: float
    observed: float | None = None
    attack: str | None = None
    target: str | None = None
    passed: bool | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"threat": self.threat, "metric": self.metric, "op": self.op, "limit": encode_number(self.limit),
                "observed": encode_number(self.observed), "attack": self.attack, "target": self.target,
                "pass": self.passed, "note": self.note}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Check":
        observed = d.get("observed")
        passed = d.get("pass")
        return cls(str(d.get("threat", "")), str(d.get("metric", "")), str(d.get("op", "")),
                   decode_number(d.get("limit")), None if observed is None else decode_number(observed),
                   _text_or_none(d.get("attack")), _text_or_none(d.get("target")),
                   passed if isinstance(passed, bool) else None, str(d.get("note") or ""))


def _text_or_none(x: Any) -> str | None:
    return None if x is None or x == "" else str(x)


@dataclass(frozen=True)
class CellEvaluation:
    """Every check of the policy on one cell."""

    cell: str
    config_hash: str
    passed: bool
    complete: bool
    checks: tuple[Check, ...]

    def to_json(self) -> dict[str, Any]:
        return {"cell": self.cell, "config_hash": self.config_hash, "pass": self.passed, "complete": self.complete,
                "checks": [c.to_json() for c in self.checks]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CellEvaluation":
        checks = d.get("checks") or []
        return cls(str(d.get("cell", "")), str(d.get("config_hash", "")), d.get("pass") is True,
                   d.get("complete") is True, tuple(Check.from_json(c) for c in checks if isinstance(c, Mapping)))


@dataclass(frozen=True)
class BaselineComparison:
    """The recommended cell against the local-only baseline (c = 1): client cost of each and pooled accuracy."""

    baseline_cell: str
    cost_metric: str
    cost: float | None
    baseline_cost: float | None
    saved_fraction: float | None
    accuracy: float | None
    baseline_accuracy: float | None

    def to_json(self) -> dict[str, Any]:
        return {k: encode_number(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BaselineComparison":
        def num(key: str) -> float | None:
            return None if d.get(key) is None else decode_number(d.get(key))

        return cls(str(d.get("baseline_cell", "")), str(d.get("cost_metric", "")), num("cost"), num("baseline_cost"),
                   num("saved_fraction"), num("accuracy"), num("baseline_accuracy"))


@dataclass(frozen=True)
class Recommendation:
    """The cheapest complete, passing setting."""

    cell: str
    config_hash: str
    defense: str
    cut_ratio: float
    cost_metric: str
    cost: float
    why: str
    against_local_only: BaselineComparison | None = None
    client_gflops: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cell": self.cell, "config_hash": self.config_hash, "defense": self.defense,
                "cut_ratio": self.cut_ratio, "cost_metric": self.cost_metric, "cost": encode_number(self.cost),
                "why": self.why,
                "against_local_only": None if self.against_local_only is None else self.against_local_only.to_json(),
                "client_gflops": encode_number(self.client_gflops)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Recommendation":
        cmp = d.get("against_local_only")
        gflops = d.get("client_gflops")
        return cls(str(d.get("cell", "")), str(d.get("config_hash", "")), str(d.get("defense", "")),
                   decode_number(d.get("cut_ratio")), str(d.get("cost_metric", "")), decode_number(d.get("cost")),
                   str(d.get("why", "")), BaselineComparison.from_json(cmp) if isinstance(cmp, Mapping) else None,
                   None if gflops is None else decode_number(gflops))


@dataclass(frozen=True)
class Verdict:
    """The audit's answer: ``status`` "pass" (some complete setting meets the policy) or "fail"."""

    status: str
    text: str
    recommendation: Recommendation | None
    passing_cells: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "text": self.text,
                "recommendation": None if self.recommendation is None else self.recommendation.to_json(),
                "passing_cells": list(self.passing_cells)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Verdict":
        rec = d.get("recommendation")
        status = str(d.get("status", "unknown")).lower()
        return cls(status if status in ("pass", "fail") else "unknown", str(d.get("text") or ""),
                   Recommendation.from_json(rec) if isinstance(rec, Mapping) else None,
                   tuple(str(c) for c in d.get("passing_cells") or ()))


# ---------------------------------------------------------------- worst values

def worst_index(values: pd.Series, attacks: pd.Series, op: str = "max"):
    """The index of the worst of ``values`` (largest for ``max``, smallest for ``min``); among ties the
    first row of a calibrated attack (:func:`~.policy.calibrated_attacks`), else the first row. ``attacks``:
    the attack name of each row, same index. The values are used as measured: nothing is flipped."""
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
    """Per selected row: True where a max limit meets a value that is only a lower bound (its resolved-flag
    row, the vocabulary's ``resolved_by``, is 0 for the same target and attack)."""
    flag = metric(limit.metric).resolved_by
    if flag is None or limit.op != "max":
        return pd.Series(False, index=sel.index)
    flags = rows[(rows.threat == limit.threat) & (rows.metric == flag)]
    resolved = {(t, a): v for t, a, v in zip(flags["target"], flags["attack"], flags["value"])}
    return pd.Series([resolved.get((t, a), 1.0) == 0 for t, a in zip(sel["target"], sel["attack"])], index=sel.index,
                     dtype=bool)


def _applies(cell: Cell, threat: str) -> bool:
    return cell.kind == "system" or threat in ("T1", "cost", "formal")


def _judged_values(policy: Policy, limit: Limit, sel: pd.DataFrame) -> pd.Series:
    """The values a limit judges: the point estimates, or the interval end the policy's statistic names
    (``conservative``: the end on the metric's worse side, from the vocabulary); rows without that end
    fall back to their value."""
    stat = policy.statistic
    if stat == "conservative":
        stat = "ci_high" if metric(limit.metric).worse == "higher" else "ci_low"
    values = sel[stat].where(sel[stat].notna(), sel["value"]) if stat != "value" else sel["value"]
    return values.dropna()


def _check(policy: Policy, limit: Limit, cell: Cell, rows: pd.DataFrame) -> tuple[Check, bool]:
    """One limit on one cell: (the check, whether the cell stays complete)."""
    blank = Check(limit.threat, limit.metric, limit.op, limit.bound)
    if not _applies(cell, limit.threat):
        return Check(**{**blank.__dict__, "note": "not measured in a payload-only cell"}), False
    sel = rows[(rows.threat == limit.threat) & (rows.metric == limit.metric)]
    values = _judged_values(policy, limit, sel)
    if values.empty:
        reason = _absent_reason(cell, limit.threat, rows)
        if reason is not None:
            return Check(**{**blank.__dict__, "passed": True, "note": reason}), True
        return Check(**{**blank.__dict__, "note": "not measured"}), False
    unresolved = _unresolved(rows, sel.loc[values.index], limit)
    if unresolved.any() and not (values[~unresolved] > limit.bound).any():
        # Only lower bounds stand between the limit and a pass (a failing resolved value still fails below).
        note = (f"unresolved: {int(unresolved.sum())} of {len(values)} values lack the non-members to resolve "
                f"{limit.metric} (they are TPR at FPR 0, a lower bound)")
        return Check(**{**blank.__dict__, "note": note}), False
    values = values[~unresolved] if unresolved.any() else values
    idx = worst_index(values, sel.loc[values.index, "attack"], limit.op)
    observed = float(values.loc[idx])
    ok = observed <= limit.bound if limit.op == "max" else observed >= limit.bound
    return Check(limit.threat, limit.metric, limit.op, limit.bound, observed, str(sel.loc[idx, "attack"]),
                 str(sel.loc[idx, "target"]), bool(ok)), True


def evaluate_cell(policy: Policy, cell: Cell, rows: pd.DataFrame) -> CellEvaluation:
    """Every check of the policy on one cell's rows."""
    checks, complete = [], True
    for limit in policy.limits:
        check, stays_complete = _check(policy, limit, cell, rows)
        checks.append(check)
        complete = complete and stays_complete
    passed = complete and all(c.passed for c in checks)
    return CellEvaluation(cell.cell_id, cell.config_hash, passed, complete, tuple(checks))


# ---------------------------------------------------------------- the recommendation against the baselines

def _describe(cell: Cell) -> str:
    return f"c = {cell.cut_ratio:g} with {cell.defense} ({cell.kind}, {cell.payload_kind} payloads, seed {cell.seed})"


def _pooled_accuracy(df: pd.DataFrame, config_hash: str) -> float | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "utility") & (df.target == "pooled")
             & (df.metric == "accuracy")]["value"].dropna()
    return float(sel.iloc[0]) if len(sel) else None


def _cost_value(df: pd.DataFrame, config_hash: str, name: str) -> float | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "cost") & (df.metric == name)]["value"].dropna()
    return float(sel.iloc[0]) if len(sel) else None


def _baseline(cell: Cell, cells: list[Cell], name: str) -> Cell | None:
    return next((c for c in cells if c.baseline == name and c.dataset == cell.dataset and c.seed == cell.seed
                 and c.config_hash != cell.config_hash), None)


def baseline_comparison(cell: Cell, cells: list[Cell], df: pd.DataFrame, cost_metric: str) -> BaselineComparison | None:
    """The recommended cell against the local-only baseline (c = 1, same dataset, seed and payload kind):
    client cost of each, the fraction saved, and each one's pooled sample accuracy. None without a baseline."""
    base = next((c for c in cells if c.baseline == "local-only" and c.dataset == cell.dataset and c.seed == cell.seed),
                None)
    if base is None:
        return None
    cost, base_cost = _cost_value(df, cell.config_hash, cost_metric), _cost_value(df, base.config_hash, cost_metric)
    saved = None if cost is None or not base_cost else 1.0 - cost / base_cost
    return BaselineComparison(base.cell_id, cost_metric, cost, base_cost, saved, _pooled_accuracy(df, cell.config_hash),
                              _pooled_accuracy(df, base.config_hash))


def against_baseline(cell: Cell, cells: list[Cell], df: pd.DataFrame, cost_metric: str) -> str:
    """The recommendation against training alone, in plain words, for the verdict sentence."""
    if cell.baseline == "local-only":
        return "That is training alone (local-only, c = 1): no split setting that saves client compute passes."
    cmp = baseline_comparison(cell, cells, df, cost_metric)
    if cmp is None:
        return "The grid has no local-only baseline (c = 1) to compare it with."
    if cmp.saved_fraction is None:
        return "Its client compute against training alone was not measured."

    def fmt(a: float | None) -> str:
        return "not measured" if a is None else f"{a:.2f}"

    saves = cmp.saved_fraction
    verb = f"saves {saves:.0%}" if saves >= 0 else f"costs {-saves:.0%} more"
    return (f"Against training alone (local-only, c = 1) it {verb} of the client compute "
            f"({cost_metric} {cmp.cost:.3g} vs {cmp.baseline_cost:.3g}); "
            f"sample accuracy {fmt(cmp.accuracy)} vs {fmt(cmp.baseline_accuracy)}.")


def _pooled_utility(df: pd.DataFrame, config_hash: str, name: str) -> tuple[float, float, float] | None:
    sel = df[(df.config_hash == config_hash) & (df.threat == "utility") & (df.target == "pooled") & (df.metric == name)]
    sel = sel[sel["value"].notna()]
    if sel.empty:
        return None
    row = sel.iloc[0]
    lo, hi = row.get("ci_low"), row.get("ci_high")
    return float(row["value"]), (float(lo) if pd.notna(lo) else math.nan), (float(hi) if pd.notna(hi) else math.nan)


def _with_interval(v: tuple[float, float, float]) -> str:
    value, lo, hi = v
    return f"{value:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else "")


def _compare(mine: tuple[float, float, float], theirs: tuple[float, float, float], name: str) -> str:
    """"better", "worse" or "indistinguishable" (the two 95 % intervals overlap); without intervals, by value;
    which way is better comes from the vocabulary."""
    (a, alo, ahi), (b, blo, bhi) = mine, theirs
    if all(math.isfinite(x) for x in (alo, ahi, blo, bhi)) and alo <= bhi and blo <= ahi:
        return "indistinguishable"
    if a == b:
        return "indistinguishable"
    return "worse" if metric(name).is_worse(a, b) else "better"


def utility_sentence(cell: Cell, cells: list[Cell], df: pd.DataFrame) -> str:
    """Every pooled utility metric of ``cell`` with its interval, against local-only (c = 1) and central (c = 0)
    training on the same dataset and seed, saying where the metrics disagree (issue 19: a class-accuracy
    judge alone called saturated noise good). '' when the cell has no utility rows."""
    mine = {m: _pooled_utility(df, cell.config_hash, m) for m in UTILITY_COMPARED}
    mine = {m: v for m, v in mine.items() if v is not None}
    if not mine:
        return ""
    parts = [f"Its samples: {', '.join(f'{m} {_with_interval(v)}' for m, v in mine.items())}."]
    for name in ("local-only", "central"):
        base = _baseline(cell, cells, name)
        if base is None:
            continue
        verdicts: dict[str, list[str]] = {"better": [], "worse": [], "indistinguishable": []}
        shown = []
        for m, v in mine.items():
            other = _pooled_utility(df, base.config_hash, m)
            if other is None:
                continue
            shown.append(f"{m} {_with_interval(other)}")
            verdicts[_compare(v, other, m)].append(m)
        if not shown:
            continue
        said = "; ".join(f"{k} on {', '.join(v)}" for k, v in verdicts.items() if v)
        disagree = " The metrics disagree." if verdicts["better"] and verdicts["worse"] else ""
        parts.append(f"{name.capitalize()} ({', '.join(shown)}): the recommendation is {said}.{disagree}")
    return " ".join(parts)


def verdict(policy: Policy, cells: list[Cell], df: pd.DataFrame) -> tuple[list[CellEvaluation], Verdict]:
    """(evaluations per cell, the verdict with the recommendation)."""
    evaluations = [evaluate_cell(policy, cell, df[df.config_hash == cell.config_hash]) for cell in cells]
    by_hash = {c.config_hash: c for c in cells}
    complete = [e for e in evaluations if e.complete]
    passing = [e for e in complete if e.passed]

    def cost(e: CellEvaluation) -> float:
        value = _cost_value(df, e.config_hash, policy.minimize)
        return value if value is not None else math.inf

    if not passing:
        if not complete:
            text = "FAIL: no setting was audited under every threat of the policy."
        else:
            failed: dict[str, int] = {}
            for e in complete:
                for c in e.checks:
                    if c.passed is False:
                        key = f"{c.threat} {c.metric} {'≤' if c.op == 'max' else '≥'} {c.limit:g}"
                        failed[key] = failed.get(key, 0) + 1
            worst = ", ".join(f"{k} (fails in {n})" for k, n in sorted(failed.items(), key=lambda kv: -kv[1])[:3])
            text = f"FAIL: none of the {len(complete)} fully audited settings meets the policy; most often broken: {worst}."
        return evaluations, Verdict("fail", text, None, ())
    best = min(passing, key=lambda e: (cost(e), by_hash[e.config_hash].cut_ratio))
    cell = by_hash[best.config_hash]
    text = (f"PASS: {len(passing)} of {len(complete)} fully audited settings meet the policy; "
            f"recommended: {_describe(cell)}. {against_baseline(cell, cells, df, policy.minimize)}")
    utility = utility_sentence(cell, cells, df)
    text = f"{text} {utility}" if utility else text
    rec = Recommendation(
        cell=cell.cell_id, config_hash=cell.config_hash, defense=cell.defense, cut_ratio=cell.cut_ratio,
        cost_metric=policy.minimize, cost=cost(best),
        why=f"the least {policy.minimize} ({cost(best):.4g}) among the {len(passing)} complete settings that pass",
        against_local_only=baseline_comparison(cell, cells, df, policy.minimize),
        client_gflops=_cost_value(df, cell.config_hash, "client_gflops_sample"),
    )
    return evaluations, Verdict("pass", text, rec, tuple(e.cell for e in passing))
