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
from dataclasses import dataclass, replace
from typing import Any, Mapping

import pandas as pd

from collafuse.jsonio import decode_number, encode_number
from collafuse.attacks.membership.controls import BLIND_ALPHA
from collafuse.metrics import metric
from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit.grid import Cell
from collafuse.benchmarks.audit.policy import MEMBERSHIP_METRICS, Limit, Policy, calibrated_attacks

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
    # The model-blind control says members and non-members differ without the model (DESIGN §4.2, §7): the
    # measured value is kept, but it decides nothing (``passed`` None).
    inconclusive: bool = False

    @property
    def status(self) -> str:
        """"pass", "fail", "inconclusive" or "not measured"."""
        if self.inconclusive:
            return "inconclusive"
        return {True: "pass", False: "fail"}.get(self.passed, "not measured")

    def to_json(self) -> dict[str, Any]:
        return {"threat": self.threat, "metric": self.metric, "op": self.op, "limit": encode_number(self.limit),
                "observed": encode_number(self.observed), "attack": self.attack, "target": self.target,
                "pass": self.passed, "note": self.note, "inconclusive": self.inconclusive}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Check":
        observed = d.get("observed")
        passed = d.get("pass")
        return cls(str(d.get("threat", "")), str(d.get("metric", "")), str(d.get("op", "")),
                   decode_number(d.get("limit")), None if observed is None else decode_number(observed),
                   _text_or_none(d.get("attack")), _text_or_none(d.get("target")),
                   passed if isinstance(passed, bool) else None, str(d.get("note") or ""),
                   d.get("inconclusive") is True)


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

    @property
    def inconclusive(self) -> bool:
        """Measured under every threat, nothing failed, but a blind control left some check undecided."""
        return (self.complete and not self.passed and any(c.inconclusive for c in self.checks)
                and not any(c.passed is False for c in self.checks))

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


STATUSES = ("pass", "fail", "inconclusive")


@dataclass(frozen=True)
class ThreatVerdict:
    """One threat's verdict over the audit (DESIGN §7): PASS where some complete setting meets every limit of
    the threat, INCONCLUSIVE where none fails it but a blind control left it undecided, FAIL otherwise; with the
    cell and the check (attack, target, worst value) that decided it."""

    threat: str
    status: str
    cell: str | None = None
    metric: str | None = None
    observed: float | None = None
    attack: str | None = None
    target: str | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"threat": self.threat, "status": self.status, "cell": self.cell, "metric": self.metric,
                "observed": encode_number(self.observed), "attack": self.attack, "target": self.target,
                "note": self.note}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ThreatVerdict":
        status = str(d.get("status", "")).lower()
        observed = d.get("observed")
        return cls(str(d.get("threat", "")), status if status in STATUSES else "unknown", _text_or_none(d.get("cell")),
                   _text_or_none(d.get("metric")), None if observed is None else decode_number(observed),
                   _text_or_none(d.get("attack")), _text_or_none(d.get("target")), str(d.get("note") or ""))


@dataclass(frozen=True)
class Verdict:
    """The audit's answer: ``status`` "pass" (some complete setting meets the policy), "inconclusive" (none
    fails, but a blind control leaves some undecided) or "fail"; the verdict of each threat; and the errors
    of the audit itself (an ROC above its formal ceiling), which are never leakage."""

    status: str
    text: str
    recommendation: Recommendation | None
    passing_cells: tuple[str, ...]
    threats: tuple[ThreatVerdict, ...] = ()
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "text": self.text,
                "recommendation": None if self.recommendation is None else self.recommendation.to_json(),
                "passing_cells": list(self.passing_cells), "threats": [t.to_json() for t in self.threats],
                "errors": list(self.errors)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Verdict":
        rec = d.get("recommendation")
        status = str(d.get("status", "unknown")).lower()
        threats = d.get("threats") or ()
        return cls(status if status in STATUSES else "unknown", str(d.get("text") or ""),
                   Recommendation.from_json(rec) if isinstance(rec, Mapping) else None,
                   tuple(str(c) for c in d.get("passing_cells") or ()),
                   tuple(ThreatVerdict.from_json(t) for t in threats if isinstance(t, Mapping)),
                   tuple(str(e) for e in d.get("errors") or ()))


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
        if threat == "T5" and cell.t_c >= T:
            return "no server hands anything off (c = 1)"
        if threat == "T5" and cell.run_config.data.num_clients < 2:
            return "a single client has no co-client"
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


def blind_shift(policy: Policy, rows: pd.DataFrame, threat: str) -> str | None:
    """Why ``threat``'s membership results in this cell are INCONCLUSIVE, or None: some target's model-blind
    baseline (rows ``blind_auc`` and ``blind_p_value``, attack ``blind``) tells members from non-members with
    an AUC above the policy's ``blind_auc`` and a permutation p-value below :data:`BLIND_ALPHA` divided by the
    number of the threat's targets (Bonferroni: each client's candidates are one more chance of a spurious
    excursion)."""
    sel = rows[rows.threat == threat]
    aucs = sel[sel.metric == "blind_auc"]
    if aucs.empty:
        return None
    p_values = {t: v for t, v in zip(sel[sel.metric == "blind_p_value"]["target"],
                                     sel[sel.metric == "blind_p_value"]["value"])}
    level = BLIND_ALPHA / len(aucs)
    for target, auc in zip(aucs["target"], aucs["value"]):
        p = p_values.get(target, 0.0)
        if pd.notna(auc) and auc > policy.blind_auc and pd.notna(p) and p < level:
            return (f"INCONCLUSIVE: members and non-members differ without the model (model-blind AUC {auc:.3f} on "
                    f"{target} > blind_auc {policy.blind_auc:g}, p = {p:.3g}); the attacks' numbers are not evidence "
                    "about the model")
    return None


def _check(policy: Policy, limit: Limit, cell: Cell, rows: pd.DataFrame) -> tuple[Check, bool]:
    """One limit on one cell: (the check, whether the cell stays complete)."""
    blank = Check(limit.threat, limit.metric, limit.op, limit.bound)
    if not _applies(cell, limit.threat):
        return Check(**{**blank.__dict__, "note": "not measured in a payload-only cell"}), False
    check, complete = _measured_check(policy, limit, cell, rows)
    if limit.threat in THREAT_IDS and limit.metric in MEMBERSHIP_METRICS and check.observed is not None:
        shift = blind_shift(policy, rows, limit.threat)
        if shift is not None:  # measured, but it decides nothing
            return Check(**{**check.__dict__, "passed": None, "inconclusive": True, "note": shift}), complete
    return check, complete


def _measured_check(policy: Policy, limit: Limit, cell: Cell, rows: pd.DataFrame) -> tuple[Check, bool]:
    """The limit against the cell's worst measured value (no blind control yet)."""
    blank = Check(limit.threat, limit.metric, limit.op, limit.bound)
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


def threat_verdicts(policy: Policy, evaluations: list[CellEvaluation], recommended: str | None) -> tuple[ThreatVerdict, ...]:
    """Each threat of the policy over the audit: PASS where a complete cell passes all its checks (the
    recommended cell first), INCONCLUSIVE where none fails them but some are inconclusive, FAIL otherwise
    (the deciding check: the first failing one). The check shown is the threat's worst one in that cell."""
    threats = list(dict.fromkeys(l.threat for l in policy.limits if l.threat in THREAT_IDS))
    complete = sorted((e for e in evaluations if e.complete), key=lambda e: e.cell != recommended)
    out = []
    for threat in threats:
        def mine(e: CellEvaluation) -> list[Check]:
            return [c for c in e.checks if c.threat == threat]

        def decided(status: str, e: CellEvaluation, checks: list[Check]) -> ThreatVerdict:
            c = next((c for c in checks if c.status == status), checks[0])
            return ThreatVerdict(threat, status, e.cell, c.metric, c.observed, c.attack, c.target, c.note)

        passing = next((e for e in complete if mine(e) and all(c.passed for c in mine(e))), None)
        if passing is not None:
            out.append(decided("pass", passing, mine(passing)))
            continue
        undecided = next((e for e in complete if mine(e) and not any(c.passed is False for c in mine(e))
                          and any(c.inconclusive for c in mine(e))), None)
        if undecided is not None:
            out.append(decided("inconclusive", undecided, mine(undecided)))
            continue
        failing = next((e for e in complete if any(c.passed is False for c in mine(e))), None)
        if failing is not None:
            out.append(decided("fail", failing, mine(failing)))
        else:
            out.append(ThreatVerdict(threat, "fail", note="no fully audited setting measured it"))
    return tuple(out)


def audit_errors(df: pd.DataFrame) -> tuple[str, ...]:
    """Errors of the audit itself (DESIGN §4.2 "The ceiling"): every (cell, threat, target, attack) whose ROC lies
    above its formal ceiling beyond its error. A correct guarantee cannot be beaten: such a row means the
    guarantee or the measurement is wrong, and it is reported as such, never as leakage."""
    sel = df[(df.metric == "roc_above_ceiling") & (df.value == 1)]
    return tuple(f"AUDIT ERROR: in {r.cell}, {r.threat} {r.attack} on {r.target}: the ROC lies above the formal "
                 "ceiling beyond its error (the stated guarantee or the measurement is wrong)"
                 for r in sel.itertuples())


def _cell_rows(df: pd.DataFrame, evaluations: list[CellEvaluation], cell_id: str | None) -> pd.DataFrame:
    """The rows of the evaluated cell ``cell_id`` (none where it is unknown)."""
    config_hash = next((e.config_hash for e in evaluations if e.cell == cell_id), None)
    return df[df.config_hash == config_hash] if config_hash is not None else df.iloc[0:0]


def _one(rows: pd.DataFrame, **match: str) -> pd.Series | None:
    """The first row whose columns equal ``match`` (None without one)."""
    sel = rows
    for column, value in match.items():
        sel = sel[sel[column] == value]
    return None if sel.empty else sel.iloc[0]


def _end(r: pd.Series, column: str) -> float | None:
    x = r.get(column)
    return None if x is None or pd.isna(x) else float(x)


def still_rising(rows: pd.DataFrame, threat: str) -> str | None:
    """Why ``threat``'s leakage was still rising at the last epoch in this cell's rows (``auc_still_rising`` = 1,
    :mod:`~collafuse.benchmarks.audit.trend`), or None."""
    flag = rows[(rows.threat == threat) & (rows.metric == "auc_still_rising") & (rows.value == 1)]
    if flag.empty:
        return None
    where = flag.iloc[0]
    slope = _one(rows, threat=threat, metric="auc_epoch_slope", target=where["target"], attack=where["attack"])
    start = _one(rows, threat=threat, metric="auc_trend_start_epoch", target=where["target"], attack=where["attack"])
    said = ""
    if slope is not None:
        lo, hi = _end(slope, "ci_low"), _end(slope, "ci_high")
        said = f" (worst AUC {float(slope['value']):+.2g} per epoch" + (
            f" [{lo:+.2g}, {hi:+.2g}]" if lo is not None and hi is not None else "")
        if start is not None and "epochs" in rows.columns and pd.notna(where.get("epochs")):
            said += f" from epoch {int(start['value'])} to {int(where['epochs'])}"
        said += f", {where['attack']} on {where['target']})"
    return (f"{threat} leakage was still rising at the last epoch{said}: this PASS holds for the audited training "
            "length, not for longer training")


def not_robust(rows: pd.DataFrame, check: Check) -> str | None:
    """Why a passing ``check`` is not robust: the 95 % interval of the value that decided it (its row in this cell)
    reaches past the limit (``max``: its upper end above it; ``min``: its lower end below it). None otherwise."""
    if check.passed is not True or check.attack is None:
        return None
    r = _one(rows, threat=check.threat, metric=check.metric, attack=check.attack, target=check.target)
    if r is None:
        return None
    lo, hi = _end(r, "ci_low"), _end(r, "ci_high")
    crosses = (hi is not None and hi > check.limit) if check.op == "max" else (lo is not None and lo < check.limit)
    if not crosses:
        return None
    return (f"{check.threat} {check.metric} {float(r['value']):.3g} [{lo:.3g}, {hi:.3g}] ({check.attack} on "
            f"{check.target}) against the limit {'≤' if check.op == 'max' else '≥'} {check.limit:g}: its 95 % "
            "interval crosses the limit, so this PASS is not robust at that confidence")


def with_caveats(threats: tuple[ThreatVerdict, ...], evaluations: list[CellEvaluation],
                 df: pd.DataFrame) -> tuple[tuple[ThreatVerdict, ...], list[str]]:
    """Each PASS threat's caveats in the cell that decided it (issue 25 item 6): leakage still rising at the last
    epoch (:func:`still_rising`) and passing checks whose interval crosses the limit (:func:`not_robust`). Returns
    the verdicts with the caveats added to their notes, and the caveats as sentences."""
    checks = {e.cell: e.checks for e in evaluations}
    out, said = [], []
    for t in threats:
        caveats: list[str] = []
        if t.status == "pass" and t.cell is not None:
            rows = _cell_rows(df, evaluations, t.cell)
            rising = still_rising(rows, t.threat)
            caveats += [rising] if rising else []
            caveats += [c for c in (not_robust(rows, ch) for ch in checks.get(t.cell, ()) if ch.threat == t.threat) if c]
        said += caveats
        note = "; ".join([t.note, *caveats] if t.note else caveats)
        out.append(replace(t, note=note))
    return tuple(out), said


def deciders_sentence(threats: tuple[ThreatVerdict, ...]) -> str:
    """Which attack (on which target, in which cell) decided each threat's verdict, as one sentence."""
    parts = [f"{t.threat} {t.status.upper()} by {t.attack} on {t.target} ({t.metric} {t.observed:.3g} in {t.cell})"
             for t in threats if t.attack is not None and t.observed is not None]
    return f"Decided by: {'; '.join(parts)}." if parts else ""


def verdict(policy: Policy, cells: list[Cell], df: pd.DataFrame) -> tuple[list[CellEvaluation], Verdict]:
    """(evaluations per cell, the verdict with the recommendation, the threats' verdicts and the audit's errors)."""
    evaluations = [evaluate_cell(policy, cell, df[df.config_hash == cell.config_hash]) for cell in cells]
    by_hash = {c.config_hash: c for c in cells}
    complete = [e for e in evaluations if e.complete]
    passing = [e for e in complete if e.passed]
    errors = audit_errors(df)
    suffix = (f" {len(errors)} AUDIT ERROR(S): an ROC lies above its formal ceiling beyond its error (the stated "
              "guarantee or the measurement is wrong; see the report)." if errors else "")

    def cost(e: CellEvaluation) -> float:
        value = _cost_value(df, e.config_hash, policy.minimize)
        return value if value is not None else math.inf

    if not passing:
        undecided = [e for e in complete if e.inconclusive]
        if not complete:
            status, text = "fail", "FAIL: no setting was audited under every threat of the policy."
        elif undecided:
            status = "inconclusive"
            reasons = sorted({c.threat for e in undecided for c in e.checks if c.inconclusive})
            text = (f"INCONCLUSIVE: no setting fails the policy outright, but in {len(undecided)} of {len(complete)} "
                    f"fully audited settings the model-blind control tells members from non-members without the model "
                    f"({', '.join(reasons)}): those membership numbers cannot be judged. Fix the member / non-member "
                    "sets (same distribution) and audit again.")
        else:
            status = "fail"
            failed: dict[str, int] = {}
            for e in complete:
                for c in e.checks:
                    if c.passed is False:
                        key = f"{c.threat} {c.metric} {'≤' if c.op == 'max' else '≥'} {c.limit:g}"
                        failed[key] = failed.get(key, 0) + 1
            worst = ", ".join(f"{k} (fails in {n})" for k, n in sorted(failed.items(), key=lambda kv: -kv[1])[:3])
            text = f"FAIL: none of the {len(complete)} fully audited settings meets the policy; most often broken: {worst}."
        threats = threat_verdicts(policy, evaluations, None)
        deciders = deciders_sentence(threats)
        text = f"{text} {deciders}" if deciders else text
        return evaluations, Verdict(status, text + suffix, None, (), threats, errors)
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
    threats, caveats = with_caveats(threat_verdicts(policy, evaluations, cell.cell_id), evaluations, df)
    deciders = deciders_sentence(threats)
    text = f"{text} {deciders}" if deciders else text
    if caveats:  # a PASS that holds only for this training length, or only at the point estimate, says so
        text = f"{text} Caveats: {'. '.join(c[0].upper() + c[1:] for c in caveats)}."
    return evaluations, Verdict("pass", text + suffix, rec, tuple(e.cell for e in passing), threats, errors)
