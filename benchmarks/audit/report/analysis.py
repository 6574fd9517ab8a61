"""Table analytics of the audit report: worst-case leakage, frontier, formal ε, coverage, number formatting."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from collafuse.jsonio import decode_number as to_float
from collafuse.metrics import formal_metrics, headline_metrics
from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit.verdict import worst_index

# From the one metric vocabulary: each threat's headline metrics (T1: reid_pool, then auc) and the formal ε
# that bounds it (T4 composes the server's and the clients' bounds: both are listed).
HEADLINE: dict[str, tuple[str, ...]] = {t: headline_metrics(t) for t in THREAT_IDS}
FORMAL_FOR_THREAT: dict[str, tuple[str, ...]] = {t: formal_metrics(t) for t in THREAT_IDS}
NOT_MEASURED = "not measured"


# ----------------------------------------------------------------------------- numbers

def format_value(x: Any, *, formal: bool = False) -> str:
    """The report's one rule for printing a number.

    NaN/None → "not measured" ("∞" when ``formal``: a formal ε with no bound); ±inf → "∞"/"-∞";
    0 and 1e-3 ≤ |x| < 1e6 → 3 decimals; anything else → 3 decimals in scientific notation.
    """
    v = to_float(x)
    if math.isnan(v):
        return "∞" if formal else NOT_MEASURED
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.3f}"
    return f"{v:.3e}"


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["value"].notna()]


def cell_order(rows: pd.DataFrame, meta) -> list[str]:
    """Cell ids in the audit's order (``meta``: the :class:`~..meta.AuditMeta`), then any only the rows name."""
    order = [c.cell for c in meta.cells if c.cell]
    seen = set(order)
    for cell in rows["cell"]:
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
    return order


def first(values: Iterable[Any]) -> Any:
    for v in values:
        return v
    return None


def ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    values = list(dict.fromkeys(v for v in values if v is not None))
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


# ----------------------------------------------------------------------------- summaries

def worst_leakage(rows: pd.DataFrame, cells: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (cell, threat T1–T5) with the worst value of the threat's headline metric.

    The worst is the largest value as measured (an inverted attack's AUC stays below 0.5; it is
    never read as 1 − AUC); ties name a calibrated attack (lira, rmia) first (:func:`worst_index`).

    Columns: cell, kind, defense, cut_ratio, seed, threat, metric, value, ci_low, ci_high,
    attack, target. A (cell, threat) with headline rows that are all null gets value NaN.
    """
    out = []
    cells = list(cells) if cells is not None else list(dict.fromkeys(rows["cell"]))
    by_cell = {cell: group for cell, group in rows.groupby("cell", sort=False)}
    for cell in cells:
        group = by_cell.get(cell)
        if group is None:
            continue
        for threat in THREAT_IDS:
            sub = group[group["threat"] == threat]
            chosen = None
            for metric in HEADLINE[threat]:
                candidates = sub[sub["metric"] == metric]
                hits = measured(candidates)
                if not hits.empty:
                    chosen = hits.loc[worst_index(hits["value"], hits["attack"])]
                    break
                if chosen is None and not candidates.empty:
                    chosen = candidates.iloc[0].copy()
                    chosen["attack"], chosen["target"] = "", ""
            if chosen is not None:
                out.append({k: chosen[k] for k in ("cell", "kind", "defense", "cut_ratio", "seed", "threat", "metric",
                                                    "value", "ci_low", "ci_high", "attack", "target")})
    columns = ["cell", "kind", "defense", "cut_ratio", "seed", "threat", "metric", "value", "ci_low", "ci_high",
               "attack", "target"]
    return pd.DataFrame(out, columns=columns)


def best_per_cell(rows: pd.DataFrame, threat: str, metric: str) -> pd.DataFrame:
    """Per cell, the row with the largest measured ``metric`` under ``threat`` (over attacks and targets)."""
    sub = measured(rows[(rows["threat"] == threat) & (rows["metric"] == metric)])
    if sub.empty:
        return sub.copy()
    return sub.loc[sub.groupby("cell", sort=False)["value"].idxmax()].reset_index(drop=True)


def _pick(group: pd.DataFrame, metric: str, prefer_target: str = "pooled") -> pd.Series | None:
    sub = measured(group[group["metric"] == metric])
    if sub.empty:
        return None
    preferred = sub[sub["target"] == prefer_target]
    return (preferred if not preferred.empty else sub).iloc[0]


def frontier_table(rows: pd.DataFrame, worst: pd.DataFrame, evaluations: dict[str, dict], cells: Sequence[str],
                   cost_metric: str = "client_gflops_sample") -> pd.DataFrame:
    """One row per system cell: client cost, worst leakage, utility and the policy outcome.

    ``cost`` is the policy's ``minimize`` metric, the one the recommendation minimises."""
    out = []
    for cell in cells:
        group = rows[rows["cell"] == cell]
        if group.empty or first(group["kind"]) != "system":
            continue
        train = _pick(group, "client_gflops_train_per_image_epoch", "clients")
        sample = _pick(group, "client_gflops_sample", "clients")
        pbytes = _pick(group, "payload_bytes_per_image_epoch", "clients")
        acc = _pick(group, "accuracy")
        fid = _pick(group, "fid")
        w = worst[worst["cell"] == cell]
        membership = measured(group[(group["metric"] == "auc") & group["threat"].isin(THREAT_IDS)])
        reid = measured(w[(w["threat"] == "T1") & (w["metric"] == "reid_pool")])
        cost = _pick(group, cost_metric, "clients")
        evaluation = evaluations.get(cell)
        out.append({
            "cell": cell, "defense": first(group["defense"]), "cut_ratio": first(group["cut_ratio"]),
            "gflops_train": train["value"] if train is not None else math.nan,
            "gflops_sample": sample["value"] if sample is not None else math.nan,
            "gflops": cost["value"] if cost is not None else math.nan,
            "payload_bytes": pbytes["value"] if pbytes is not None else math.nan,
            "worst_auc": float(membership["value"].max()) if not membership.empty else math.nan,
            "worst_reid": float(reid["value"].max()) if not reid.empty else math.nan,
            "accuracy": acc["value"] if acc is not None else math.nan,
            "fid": fid["value"] if fid is not None else math.nan,
            "passed": evaluation.passed if evaluation is not None else None,
        })
    columns = ["cell", "defense", "cut_ratio", "gflops_train", "gflops_sample", "gflops", "payload_bytes",
               "worst_auc", "worst_reid", "accuracy", "fid", "passed"]
    return pd.DataFrame(out, columns=columns)


def formal_table(rows: pd.DataFrame, cells: Sequence[str]) -> pd.DataFrame:
    """One row per (cell, threat) with a formal bound or an empirical ε lower bound.

    ``formal_metrics``/``formal_values``: the bounds found (a null value in results → ∞: no bound);
    ``formal``: the one bound to plot (∞ for T4 if either model bound is ∞, NaN otherwise: the two
    model bounds compose and are listed, not summed); ``empirical``: the largest ε_LB of any attack;
    ``one_run``: the largest one-run ε_LB (Steinke, Nasr & Jagielski 2023: the run's canaries) of any
    attack, with ``one_run_attack`` / ``one_run_target`` (NaN / "" without canaries).
    """
    out = []
    for cell in cells:
        group = rows[rows["cell"] == cell]
        if group.empty:
            continue
        formal_rows = group[group["threat"] == "formal"]
        for threat in THREAT_IDS:
            bounds = []
            for metric in FORMAL_FOR_THREAT[threat]:
                hit = formal_rows[formal_rows["metric"] == metric]
                if not hit.empty:
                    v = hit["value"].iloc[0]
                    bounds.append((metric, math.inf if math.isnan(v) else float(v)))
            lb = measured(group[(group["threat"] == threat) & (group["metric"] == "epsilon_lb")])
            lb_row = lb.loc[lb["value"].idxmax()] if not lb.empty else None
            one = measured(group[(group["threat"] == threat) & (group["metric"] == "one_run_epsilon_lb")])
            one_row = one.loc[one["value"].idxmax()] if not one.empty else None
            if not bounds and lb_row is None and one_row is None:
                continue
            if len(bounds) == len(FORMAL_FOR_THREAT[threat]) and len(bounds) == 1:
                formal = bounds[0][1]
            elif len(bounds) == 2:
                formal = math.inf if any(math.isinf(b) for _, b in bounds) else math.nan  # composed: shown, not summed
            else:
                formal = math.nan
            out.append({
                "cell": cell, "kind": first(group["kind"]), "defense": first(group["defense"]),
                "cut_ratio": first(group["cut_ratio"]), "threat": threat,
                "formal_metrics": [m for m, _ in bounds], "formal_values": [b for _, b in bounds], "formal": formal,
                "empirical": lb_row["value"] if lb_row is not None else math.nan,
                "attack": lb_row["attack"] if lb_row is not None else "",
                "target": lb_row["target"] if lb_row is not None else "",
                "one_run": one_row["value"] if one_row is not None else math.nan,
                "one_run_attack": one_row["attack"] if one_row is not None else "",
                "one_run_target": one_row["target"] if one_row is not None else "",
            })
    columns = ["cell", "kind", "defense", "cut_ratio", "threat", "formal_metrics", "formal_values", "formal",
               "empirical", "attack", "target", "one_run", "one_run_attack", "one_run_target"]
    return pd.DataFrame(out, columns=columns)


def coverage_matrix(coverage: Mapping[str, Mapping[str, Sequence[str]]]) -> tuple[
        list[str], list[str], dict[tuple[str, str], tuple[bool, str]]]:
    """audit.json's coverage (defense setting → threat → labels of the defenses that address it) as
    (defenses, threats in order, {(defense, threat): (covered, how)})."""
    defenses = list(coverage)
    threats = ordered((t for m in coverage.values() for t in m), THREAT_IDS)
    cells = {(d, t): (bool(labels), ", ".join(labels)) for d, m in coverage.items() for t, labels in m.items()}
    return defenses, threats, cells
