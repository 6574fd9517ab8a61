"""The audit report (DESIGN.md §7; issue 6 item 5): one self-contained HTML page plus Markdown.

:func:`write_report` reads an audit folder (``results.json``: the tidy rows;
``audit.json``: cells, policy evaluations, verdict, coverage, configuration) and writes
``report.html`` (every image a base64 PNG data URI, inline CSS, no scripts, no external
references: it opens offline) and ``report.md`` (figures under ``figures/``, linked
relatively; reconstructions linked from ``artifacts/``). Both come from one list of
sections, so they say the same thing:

1. the verdict and the recommendation (``#verdict``, ``#recommendation``)
2. leakage vs cut ratio per defense
3. cut × defense heatmaps of worst-case leakage, and the per-cell table ``#leakage-table``
4. membership ROC curves (log–log) from the cells' ``roc.json``
5. the privacy–utility–compute frontier
6. formal vs empirical ε
7. example reconstructions beside the originals
8. the threat × defense coverage map
9. the per-cell policy checks
10. the exact configuration

Conventions the tests rely on:

- *Worst-case leakage* of a (cell, threat) is the largest measured value, over every
  attack and target, of the threat's headline metric: ``reid_pool`` for T1 (``auc`` when a
  cell has no re-identification rows), ``auc`` for T2–T4 (:data:`HEADLINE`). Ties go to the
  first row in ``results.json``.
- Every number is printed with :func:`format_value` (3 decimals, scientific outside
  [1e-3, 1e6)); table cells that hold a number also carry it unrounded in ``data-value``.
- Nothing measured prints as "not measured"; a formal ε that is null or infinite prints "∞".
- Table ids: ``leakage-table`` (one row per cell × threat), ``frontier-table``,
  ``epsilon-table``, ``coverage-table``, ``cells-table`` and ``checks-table`` (policy),
  ``run-table``, ``versions-table``, ``cells-config-table``.

Writing is atomic: everything is rendered in memory first and the files are renamed into
place at the end; on any error the previous report is left as it was.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from collafuse.errors import RunError

from . import plots

THREATS = ("T1", "T2", "T3", "T4")
HEADLINE: dict[str, tuple[str, ...]] = {"T1": ("reid_pool", "auc"), "T2": ("auc",), "T3": ("auc",), "T4": ("auc",)}
FORMAL_FOR_THREAT: dict[str, tuple[str, ...]] = {
    "T1": ("epsilon_payload",),
    "T2": ("epsilon_model_server",),
    "T3": ("epsilon_model_clients",),
    "T4": ("epsilon_model_server", "epsilon_model_clients"),  # samples come from both models: they compose
}
REQUIRED_COLUMNS = ("cell", "kind", "cut_ratio", "defense", "threat", "target", "attack", "metric", "value")
OPTIONAL_COLUMNS = {"config_hash": "", "dataset": "", "t_c": np.nan, "payload_kind": "", "epochs": np.nan,
                    "seed": np.nan, "ci_low": np.nan, "ci_high": np.nan}
NOT_MEASURED = "not measured"
MAX_RECONSTRUCTIONS = 8


# ----------------------------------------------------------------------------- loading

def load_audit(audit_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tidy rows and the metadata of an audit folder; :class:`RunError` if it is not one."""
    audit_dir = Path(audit_dir)
    if not audit_dir.is_dir():
        raise RunError(f"{audit_dir} is not an audit folder: it does not exist")
    rows = _read_json(audit_dir / "results.json", audit_dir)
    meta = _read_json(audit_dir / "audit.json", audit_dir)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RunError(f"{audit_dir / 'results.json'} is corrupt: expected a JSON list of row objects")
    if not isinstance(meta, dict):
        raise RunError(f"{audit_dir / 'audit.json'} is corrupt: expected a JSON object")
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise RunError(f"{audit_dir / 'results.json'} is corrupt: rows lack the column(s) {', '.join(missing)}")
    for column, default in OPTIONAL_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = default
    for column in ("value", "ci_low", "ci_high", "cut_ratio", "seed"):
        frame[column] = frame[column].map(_to_float).astype(float)
    for column in ("cell", "kind", "defense", "threat", "target", "attack", "metric", "dataset", "payload_kind"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame.reset_index(drop=True), meta


def _read_json(path: Path, audit_dir: Path) -> Any:
    if not path.is_file():
        raise RunError(f"{audit_dir} is not an audit folder: {path.name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is corrupt: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def _to_float(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, str):
        s = x.strip().lower()
        if s in ("inf", "+inf", "infinity", "+infinity", "∞"):
            return math.inf
        if s in ("-inf", "-infinity", "-∞"):
            return -math.inf
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- numbers

def format_value(x: Any, *, formal: bool = False) -> str:
    """The report's one rule for printing a number.

    NaN/None → "not measured" ("∞" when ``formal``: a formal ε with no bound); ±inf → "∞"/"-∞";
    0 and 1e-3 ≤ |x| < 1e6 → 3 decimals; anything else → 3 decimals in scientific notation.
    """
    v = _to_float(x)
    if math.isnan(v):
        return "∞" if formal else NOT_MEASURED
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.3f}"
    return f"{v:.3e}"


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["value"].notna()]


def _cell_order(rows: pd.DataFrame, meta: dict) -> list[str]:
    order = [c.get("cell") for c in meta.get("cells") or [] if isinstance(c, dict) and c.get("cell")]
    seen = set(order)
    for cell in rows["cell"]:
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
    return order


def _first(values: Iterable[Any]) -> Any:
    for v in values:
        return v
    return None


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    values = list(dict.fromkeys(v for v in values if v is not None))
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


# ----------------------------------------------------------------------------- summaries

def worst_leakage(rows: pd.DataFrame, cells: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (cell, threat T1–T4) with the worst value of the threat's headline metric.

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
        for threat in THREATS:
            sub = group[group["threat"] == threat]
            chosen = None
            for metric in HEADLINE[threat]:
                candidates = sub[sub["metric"] == metric]
                measured = _measured(candidates)
                if not measured.empty:
                    chosen = measured.loc[measured["value"].idxmax()]
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
    sub = _measured(rows[(rows["threat"] == threat) & (rows["metric"] == metric)])
    if sub.empty:
        return sub.copy()
    return sub.loc[sub.groupby("cell", sort=False)["value"].idxmax()].reset_index(drop=True)


def _pick(group: pd.DataFrame, metric: str, prefer_target: str = "pooled") -> pd.Series | None:
    sub = _measured(group[group["metric"] == metric])
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
        if group.empty or _first(group["kind"]) != "system":
            continue
        train = _pick(group, "client_gflops_train_per_image_epoch", "clients")
        sample = _pick(group, "client_gflops_sample", "clients")
        pbytes = _pick(group, "payload_bytes_per_image_epoch", "clients")
        acc = _pick(group, "accuracy")
        fid = _pick(group, "fid")
        w = worst[worst["cell"] == cell]
        membership = _measured(group[(group["metric"] == "auc") & group["threat"].isin(THREATS)])
        reid = _measured(w[(w["threat"] == "T1") & (w["metric"] == "reid_pool")])
        cost = _pick(group, cost_metric, "clients")
        evaluation = evaluations.get(cell)
        out.append({
            "cell": cell, "defense": _first(group["defense"]), "cut_ratio": _first(group["cut_ratio"]),
            "gflops_train": train["value"] if train is not None else math.nan,
            "gflops_sample": sample["value"] if sample is not None else math.nan,
            "gflops": cost["value"] if cost is not None else math.nan,
            "payload_bytes": pbytes["value"] if pbytes is not None else math.nan,
            "worst_auc": float(membership["value"].max()) if not membership.empty else math.nan,
            "worst_reid": float(reid["value"].max()) if not reid.empty else math.nan,
            "accuracy": acc["value"] if acc is not None else math.nan,
            "fid": fid["value"] if fid is not None else math.nan,
            "passed": evaluation.get("pass") if isinstance(evaluation, dict) else None,
        })
    columns = ["cell", "defense", "cut_ratio", "gflops_train", "gflops_sample", "gflops", "payload_bytes",
               "worst_auc", "worst_reid", "accuracy", "fid", "passed"]
    return pd.DataFrame(out, columns=columns)


def formal_table(rows: pd.DataFrame, cells: Sequence[str]) -> pd.DataFrame:
    """One row per (cell, threat) with a formal bound or an empirical ε lower bound.

    ``formal_metrics``/``formal_values``: the bounds found (a null value in results → ∞: no bound);
    ``formal``: the one bound to plot (∞ for T4 if either model bound is ∞, NaN otherwise: the two
    model bounds compose and are listed, not summed); ``empirical``: the largest ε_LB of any attack.
    """
    out = []
    for cell in cells:
        group = rows[rows["cell"] == cell]
        if group.empty:
            continue
        formal_rows = group[group["threat"] == "formal"]
        for threat in THREATS:
            bounds = []
            for metric in FORMAL_FOR_THREAT[threat]:
                hit = formal_rows[formal_rows["metric"] == metric]
                if not hit.empty:
                    v = hit["value"].iloc[0]
                    bounds.append((metric, math.inf if math.isnan(v) else float(v)))
            lb = _measured(group[(group["threat"] == threat) & (group["metric"] == "epsilon_lb")])
            lb_row = lb.loc[lb["value"].idxmax()] if not lb.empty else None
            if not bounds and lb_row is None:
                continue
            if len(bounds) == len(FORMAL_FOR_THREAT[threat]) and len(bounds) == 1:
                formal = bounds[0][1]
            elif len(bounds) == 2:
                formal = math.inf if any(math.isinf(b) for _, b in bounds) else math.nan  # composed: shown, not summed
            else:
                formal = math.nan
            out.append({
                "cell": cell, "kind": _first(group["kind"]), "defense": _first(group["defense"]),
                "cut_ratio": _first(group["cut_ratio"]), "threat": threat,
                "formal_metrics": [m for m, _ in bounds], "formal_values": [b for _, b in bounds], "formal": formal,
                "empirical": lb_row["value"] if lb_row is not None else math.nan,
                "attack": lb_row["attack"] if lb_row is not None else "",
                "target": lb_row["target"] if lb_row is not None else "",
            })
    columns = ["cell", "kind", "defense", "cut_ratio", "threat", "formal_metrics", "formal_values", "formal",
               "empirical", "attack", "target"]
    return pd.DataFrame(out, columns=columns)


def coverage_matrix(coverage: Any) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[bool | None, str]]]:
    """Normalise ``audit.json``'s coverage into (defenses, threats, {(defense, threat): (covered, how)}).

    Accepts defense → threat → (list of covering defense labels | reasons | bool | str), or the
    bare :func:`collafuse.defenses.coverage.coverage_map` shape threat → [defense labels].
    """
    if not isinstance(coverage, dict) or not coverage:
        return [], [], {}
    cells: dict[tuple[str, str], tuple[bool | None, str]] = {}
    if all(str(k) in THREATS for k in coverage) and all(isinstance(v, (list, tuple)) for v in coverage.values()):
        defenses = _ordered(str(label) for labels in coverage.values() for label in labels)
        for threat, labels in coverage.items():
            for d in defenses:
                cells[(d, str(threat))] = (d in [str(x) for x in labels], "")
        return defenses, _ordered(map(str, coverage), THREATS), cells
    defenses = [str(d) for d in coverage]
    threats = _ordered((str(t) for m in coverage.values() if isinstance(m, dict) for t in m), THREATS)
    for d, mapping in coverage.items():
        if not isinstance(mapping, dict):
            continue
        for t, v in mapping.items():
            if isinstance(v, bool):
                cells[(str(d), str(t))] = (v, "")
            elif isinstance(v, (list, tuple)):
                how = ", ".join(str(x) for x in v if str(x))
                cells[(str(d), str(t))] = (bool(how), how)
            elif isinstance(v, str):
                cells[(str(d), str(t))] = (bool(v.strip()), v.strip())
            elif v is None:
                cells[(str(d), str(t))] = (False, "")
            else:
                cells[(str(d), str(t))] = (None, str(v))
    return defenses, threats, cells


# ----------------------------------------------------------------------------- document model

@dataclass
class Cell:
    text: str
    value: float | None = None   # unrounded number, written as data-value in HTML
    cls: str = ""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    id: str | None = None
    caption: str = ""


@dataclass
class Para:
    text: str
    cls: str = ""


@dataclass
class Figure:
    name: str            # file name under figures/ in the Markdown version
    png: bytes
    caption: str


@dataclass
class Artifact:
    relpath: str         # relative to the audit folder
    png: bytes
    caption: str


@dataclass
class Gallery:
    items: list          # Figures (no caption of their own) and Artifacts, side by side
    caption: str = ""


@dataclass
class Pre:
    text: str
    lang: str = ""


@dataclass
class Verdict:
    status: str          # "pass" | "fail" | "unknown"
    text: str
    passing: list[str]
    total: int
    recommendation: dict | None


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def num(x: Any, *, formal: bool = False) -> Cell:
    v = _to_float(x)
    text = format_value(v, formal=formal)
    cls = "nm" if text == NOT_MEASURED else "num"
    return Cell(text, None if math.isnan(v) else v, cls)


def txt(x: Any, cls: str = "") -> Cell:
    return Cell("" if x is None else str(x), None, cls)


def verdict_cell(passed: Any) -> Cell:
    if passed is True:
        return Cell("pass", None, "pass")
    if passed is False:
        return Cell("fail", None, "fail")
    return Cell(NOT_MEASURED, None, "nm")


# ----------------------------------------------------------------------------- sections

def _verdict_section(meta: dict, total: int) -> Section:
    v = meta.get("verdict") if isinstance(meta.get("verdict"), dict) else {}
    status = str(v.get("status", "unknown")).lower()
    rec = v.get("recommendation") if isinstance(v.get("recommendation"), dict) else None
    passing = [str(c) for c in v.get("passing_cells") or []]
    blocks: list = [Verdict(status if status in ("pass", "fail") else "unknown",
                            str(v.get("text") or "The audit recorded no verdict."), passing, total, rec)]
    if meta.get("quick"):
        blocks.append(Para("Quick audit: a tiny recipe for CI and a first look; its numbers are not the default grid's.", "warn"))
    return Section("summary", "1. Verdict", blocks)


def _leakage_curve_section(rows: pd.DataFrame, worst: pd.DataFrame, defenses: list[str]) -> Section:
    s = Section("leakage-vs-cut", "2. Leakage vs cut ratio, per defense")
    reid = best_per_cell(rows, "T1", "reid_pool")
    psnr = best_per_cell(rows, "T1", "psnr")
    member = worst[(worst["kind"] == "system") & worst["threat"].isin(("T2", "T3", "T4")) & (worst["metric"] == "auc")]
    member = _measured(member)
    if not member.empty:
        member = member.loc[member.groupby("cell", sort=False)["value"].idxmax()]
    png = plots.leakage_vs_cut(reid, psnr, member, defenses)
    if png is None:
        s.blocks.append(Para(f"Leakage vs cut ratio: {NOT_MEASURED} (no T1 reconstruction or membership rows)."))
        return s
    s.blocks.append(Figure("leakage_vs_cut.png", png,
                           "T1 re-identification (within the candidate pool) and PSNR of the best reconstruction attack "
                           "of each cell, and the worst membership AUC of T2–T4 for trained systems, against the cut "
                           "ratio. Solid: trained systems; dashed: payload-only cells. Bands: the rows' intervals "
                           "(or the spread over seeds)."))
    return s


def _heatmap_section(worst: pd.DataFrame, defenses: list[str]) -> Section:
    s = Section("heatmaps", "3. Worst-case leakage: cut ratio × defense")
    gallery = Gallery([], "Each panel: the largest value of the threat's headline metric over every attack, target, "
                          "seed and cell kind, per cut ratio and defense (blank: not measured).")
    for threat in THREATS:
        sub = _measured(worst[worst["threat"] == threat])
        if sub.empty:
            continue
        metric = sub["metric"].iloc[0] if sub["metric"].nunique() == 1 else "/".join(_ordered(sub["metric"], HEADLINE[threat]))
        table = sub.pivot_table(index="defense", columns="cut_ratio", values="value", aggfunc="max")
        table = table.reindex([d for d in defenses if d in table.index])
        png = plots.heatmap(table, f"{threat}: worst {metric}", metric)
        if png is not None:
            gallery.items.append(Figure(f"heatmap_{threat}.png", png, f"{threat}: worst {metric} per cut ratio and defense"))
    if gallery.items:
        s.blocks.append(gallery)
    else:
        s.blocks.append(Para(f"Heatmaps: {NOT_MEASURED} (no T1–T4 leakage rows)."))
    rows = []
    for _, r in worst.iterrows():
        rows.append([txt(r["cell"]), txt(r["kind"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]),
                     txt(r["metric"]), num(r["value"]),
                     txt(f"[{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]" if pd.notna(r["ci_low"])
                         or pd.notna(r["ci_high"]) else "—"),
                     txt(r["attack"] or "—"), txt(r["target"] or "—")])
    s.blocks.append(Para("Worst-case leakage per cell and threat: the largest value of the threat's headline metric "
                         "(T1: reid_pool, or auc where a cell has no re-identification; T2–T4: auc) over every attack "
                         "and target, with the attack and target that reached it."))
    if rows:
        s.blocks.append(Table(["cell", "kind", "defense", "cut ratio", "threat", "metric", "worst value", "interval",
                               "attack", "target"], rows, id="leakage-table"))
    else:
        s.blocks.append(Table(["cell", "threat", "worst value"], [[txt("—"), txt("—"), Cell(NOT_MEASURED, None, "nm")]],
                              id="leakage-table"))
    return s


def _roc_section(audit_dir: Path, rows: pd.DataFrame, worst: pd.DataFrame, meta_cells: dict, cells: list[str]) -> Section:
    s = Section("roc", "4. Membership ROC curves")
    candidates, unreadable = [], []
    for cell in cells:
        info = meta_cells.get(cell, {})
        rel = ((info.get("artifacts") or {}).get("roc")) if isinstance(info, dict) else None
        if not rel:
            continue
        try:
            data = json.loads((audit_dir / rel).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            unreadable.append(cell)
            continue
        group = rows[(rows["cell"] == cell) & (rows["metric"] == "auc")]
        curves = []
        for target, by_attack in data.items():
            if not isinstance(by_attack, dict):
                continue
            for attack, curve in by_attack.items():
                if not isinstance(curve, dict) or not curve.get("fpr") or not curve.get("tpr"):
                    continue
                hit = _measured(group[(group["target"] == str(target)) & (group["attack"] == str(attack))])
                auc = hit["value"].iloc[0] if not hit.empty else _to_float(curve.get("auc"))
                fpr = [_to_float(x) for x in curve["fpr"]]
                tpr = [_to_float(x) for x in curve["tpr"]]
                if len(fpr) != len(tpr):
                    continue
                curves.append((f"{target}/{attack} (AUC {format_value(auc)})", fpr, tpr, -auc if not math.isnan(auc) else 0.0))
        if curves:
            curves.sort(key=lambda c: c[3])
            w = _measured(worst[worst["cell"] == cell])
            candidates.append({"cell": cell, "defense": info.get("defense", ""), "score": float(w["value"].max()) if not w.empty else 0.0,
                               "title": cell, "curves": [c[:3] for c in curves]})
    if unreadable:
        s.blocks.append(Para(f"ROC data could not be read for: {', '.join(unreadable)}.", "warn"))
    if not candidates:
        s.blocks.append(Para(f"ROC curves: {NOT_MEASURED} (no system cell with a roc.json artifact)."))
        return s
    chosen = candidates
    if len(candidates) > plots.MAX_ROC_PANELS:
        chosen, seen = [], set()
        for c in sorted(candidates, key=lambda c: -c["score"]):  # the leakiest cell of each defense first
            if c["defense"] not in seen and len(chosen) < plots.MAX_ROC_PANELS:
                seen.add(c["defense"])
                chosen.append(c)
        for c in sorted(candidates, key=lambda c: -c["score"]):
            if c not in chosen and len(chosen) < plots.MAX_ROC_PANELS:
                chosen.append(c)
        chosen.sort(key=lambda c: cells.index(c["cell"]))
    png = plots.roc_panels(chosen)
    if png is not None:
        more = f" {len(candidates) - len(chosen)} more cells are omitted." if len(candidates) > len(chosen) else ""
        s.blocks.append(Figure("roc.png", png,
                               f"Membership ROC curves on log–log axes (the low-FPR region is what matters), one panel "
                               f"per system cell, at most {plots.MAX_ROC_CURVES} attack/target curves each, the "
                               f"strongest first.{more}"))
    return s


def _cost_metric(meta: dict) -> str:
    policy = meta.get("policy") if isinstance(meta.get("policy"), dict) else {}
    return str(policy.get("minimize") or "client_gflops_sample")


def _frontier_section(front: pd.DataFrame, rec: dict | None, cost_metric: str = "client_gflops_sample") -> Section:
    s = Section("frontier", "5. Privacy–utility–compute frontier")
    if front.empty:
        s.blocks.append(Para(f"Frontier: {NOT_MEASURED} (no trained system cells)."))
        return s
    png = plots.frontier(front, rec.get("cell") if rec else None, xlabel=f"client cost: {cost_metric} (what the recommendation minimises)")
    if png is not None:
        s.blocks.append(Figure("frontier.png", png,
                               "Each trained system: client compute (x) against its worst leakage (y); colour is the "
                               "utility (classifier accuracy on generated samples, or FID); ● passes the policy, ✕ fails; "
                               "the recommended setting is ringed in red."))
    else:
        s.blocks.append(Para(f"Frontier plot: {NOT_MEASURED} (no cell has both a client cost and a leakage value)."))
    rows = [[txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), num(r["gflops_train"]), num(r["gflops_sample"]),
             num(r["payload_bytes"]), num(r["worst_auc"]), num(r["worst_reid"]), num(r["accuracy"]), num(r["fid"]),
             verdict_cell(r["passed"])] for _, r in front.iterrows()]
    s.blocks.append(Table(["cell", "defense", "cut ratio", "client GFLOPs train / image·epoch", "client GFLOPs sampling",
                           "payload bytes / image·epoch", "worst membership AUC", "worst T1 reid_pool", "accuracy", "FID",
                           "policy"], rows, id="frontier-table"))
    s.blocks.append(Para("FID, KID, precision/recall and accuracy are measured in the feature space of a small "
                         "classifier trained inside the project on the dataset (offline), not Inception features; "
                         "compare them across cells of this audit, not with published numbers."))
    return s


def _formal_section(formal: pd.DataFrame) -> Section:
    s = Section("epsilon", "6. Formal vs empirical ε")
    if formal.empty:
        s.blocks.append(Para(f"Formal and empirical ε: {NOT_MEASURED}."))
        return s
    png = plots.formal_vs_empirical(formal[formal["threat"] != "T4"])
    if png is not None:
        s.blocks.append(Figure("epsilon.png", png,
                               "The largest empirical ε lower bound of any attack (y) against the formal upper bound "
                               "(x) per cell and threat; a point above the diagonal would contradict the accounting. "
                               "T4 is left out of the plot: its bound composes the server's and the clients' (table)."))
    rows = []
    for _, r in formal.iterrows():
        if r["formal_metrics"]:
            formal_text = "; ".join(f"{m} {format_value(v, formal=True)}" for m, v in zip(r["formal_metrics"], r["formal_values"]))
        else:
            formal_text = NOT_MEASURED
        if math.isnan(r["empirical"]) or len(r["formal_metrics"]) != len(FORMAL_FOR_THREAT[r["threat"]]):
            check = "—"
        elif len(r["formal_values"]) == 1:
            check = "consistent" if r["empirical"] <= r["formal_values"][0] else "VIOLATED: lower bound above the formal ε"
        elif any(math.isinf(v) for v in r["formal_values"]):
            check = "consistent"
        else:
            check = "consistent" if r["empirical"] <= sum(r["formal_values"]) else "VIOLATED: above the composed bound"
        rows.append([txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]),
                     Cell(formal_text, r["formal_values"][0] if len(r["formal_values"]) == 1 else None,
                          "nm" if formal_text == NOT_MEASURED else ""),
                     num(r["empirical"]), txt(r["attack"] or "—"), txt(r["target"] or "—"),
                     txt(check, "fail" if check.startswith("VIOLATED") else "")])
    s.blocks.append(Table(["cell", "defense", "cut ratio", "threat", "formal ε (upper bound)", "largest empirical ε_LB",
                           "attack", "target", "check"], rows, id="epsilon-table"))
    s.blocks.append(Para("∞: no formal bound exists for this channel (e.g. no DP-SGD on that model, or payloads without "
                         "noise or clipping). Empirical ε_LB values are Clopper–Pearson lower bounds maximised over "
                         "thresholds (multiple testing makes them slightly optimistic)."))
    return s


def _reconstruction_section(audit_dir: Path, rows: pd.DataFrame, meta_cells: dict, cells: list[str], defenses: list[str]) -> Section:
    s = Section("reconstructions", "7. Example reconstructions beside the originals")
    candidates = []
    for cell in cells:
        info = meta_cells.get(cell)
        arts = (info.get("artifacts") or {}) if isinstance(info, dict) else {}
        rel = arts.get("reconstructions")
        if not rel:
            continue
        path = audit_dir / rel
        try:
            png = path.read_bytes()
        except OSError:
            continue
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            continue
        candidates.append((cell, info, str(rel), png, [str(r) for r in arts.get("reconstruction_rows") or []]))
    if not candidates:
        s.blocks.append(Para(f"Reconstructions: {NOT_MEASURED} (no reconstruction artifacts)."))
        return s
    chosen = []
    by_defense: dict[str, list] = {}
    for c in candidates:
        by_defense.setdefault(str(c[1].get("defense", "")), []).append(c)
    for d in _ordered(by_defense, defenses):   # per defense: the leakiest (lowest cut) and the safest cell
        group = sorted(by_defense[d], key=lambda c: (_to_float(c[1].get("cut_ratio")), str(c[1].get("kind"))))
        for c in (group[0], group[-1]):
            if c not in chosen:
                chosen.append(c)
    for c in candidates:
        if c not in chosen:
            chosen.append(c)
    chosen = sorted(chosen[:MAX_RECONSTRUCTIONS], key=lambda c: cells.index(c[0]))
    gallery = Gallery([], "Each image: the originals in the first row, then one row per attack's reconstruction "
                          "from what the server saw.")
    for cell, info, rel, png, labels in chosen:
        best = best_per_cell(rows[rows["cell"] == cell], "T1", "psnr")
        psnr = f"; best PSNR {format_value(best['value'].iloc[0])} dB ({best['attack'].iloc[0]})" if not best.empty else ""
        row_text = ", ".join(labels) if labels else "not listed"
        gallery.items.append(Artifact(rel, png, f"{cell} — rows, top to bottom: {row_text}{psnr}."))
    s.blocks.append(gallery)
    if len(candidates) > len(chosen):
        s.blocks.append(Para(f"{len(candidates) - len(chosen)} more cells have reconstructions under artifacts/."))
    return s


def _coverage_section(meta: dict) -> Section:
    s = Section("coverage", "8. Threat × defense coverage")
    defenses, threats, cells = coverage_matrix(meta.get("coverage"))
    if not defenses:
        s.blocks.append(Para(f"Coverage map: {NOT_MEASURED} (audit.json has none)."))
    else:
        rows = []
        for d in defenses:
            row = [txt(d)]
            for t in threats:
                covered, how = cells.get((d, t), (False, ""))
                if covered is True:
                    row.append(Cell("covered" + (f": {how}" if how else ""), None, "pass"))
                elif covered is False:
                    row.append(Cell("uncovered", None, "fail"))
                else:
                    row.append(Cell(how or "?", None, ""))
            rows.append(row)
        s.blocks.append(Table(["defense setting", *threats], rows, id="coverage-table"))
    from_labels = " ".join(defenses).lower()
    notes = ["T1: curious server reading the payloads; T2: white-box server model; T3: white-box client model; "
             "T4: generated images only."]
    if "dp-sgd" in from_labels or "dp_sgd" in from_labels or not defenses:
        notes.append("DP-SGD protects the trained models (T2, T3; T4 only when every model in the sampling chain is "
                     "private), not the payloads: it never covers T1.")
    s.blocks.extend(Para(n) for n in notes)
    return s


def _checks_section(meta: dict) -> Section:
    s = Section("checks", "9. Policy checks per cell")
    evaluations = [e for e in meta.get("evaluations") or [] if isinstance(e, dict)]
    if not evaluations:
        s.blocks.append(Para(f"Policy checks: {NOT_MEASURED} (audit.json has no evaluations)."))
        return s
    summary, detail = [], []
    for e in evaluations:
        checks = [c for c in e.get("checks") or [] if isinstance(c, dict)]
        failed = sum(1 for c in checks if c.get("pass") is False)
        unmeasured = sum(1 for c in checks if c.get("pass") is None)
        summary.append([txt(e.get("cell")), verdict_cell(e.get("pass")),
                        txt("yes" if e.get("complete") else "no", "" if e.get("complete") else "warn"),
                        Cell(str(len(checks)), float(len(checks)), "num"), Cell(str(failed), float(failed), "num"),
                        Cell(str(unmeasured), float(unmeasured), "num")])
        for c in checks:
            op = {"max": "≤", "min": "≥"}.get(str(c.get("op")), str(c.get("op")))
            detail.append([txt(e.get("cell")), txt(c.get("threat")), txt(c.get("metric")),
                           Cell(f"{op} {format_value(c.get('limit'))}", _to_float(c.get("limit")), "num"),
                           num(c.get("observed")), txt(c.get("attack") or "—"), txt(c.get("target") or "—"),
                           verdict_cell(c.get("pass"))])
    s.blocks.append(Table(["cell", "pass", "complete", "checks", "failed", "not measured"], summary, id="cells-table"))
    if detail:
        s.blocks.append(Table(["cell", "threat", "metric", "limit", "observed (worst)", "attack", "target", "pass"],
                              detail, id="checks-table"))
    return s


def _sweep_text(meta: dict) -> str:
    sweep = meta.get("sweep") if isinstance(meta.get("sweep"), dict) else {}
    if "computed" not in sweep:
        return "cells: not recorded"
    return f"{sweep.get('computed')} cells computed, {sweep.get('reused')} reused from an earlier sweep"


def _config_section(meta: dict) -> Section:
    s = Section("configuration", "10. Exact configuration")
    facts = [
        ["collafuse version", txt(meta.get("collafuse_version", "—"))],
        ["started", txt(meta.get("started", "—"))],
        ["wall time of this invocation (s)", num(meta.get("wall_seconds"))],
        ["cell compute time, summed over cells (s)", num(meta.get("compute_seconds"))],
        ["cells computed / reused", txt(_sweep_text(meta))],
        ["quick", txt({True: "yes", False: "no"}.get(meta.get("quick"), "—"))],
    ]
    s.blocks.append(Table(["", "value"], [[txt(k), v] for k, v in facts], id="run-table"))
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    if versions:
        s.blocks.append(Table(["package", "version"], [[txt(k), txt(v)] for k, v in sorted(versions.items())],
                              id="versions-table"))
    cells = [c for c in meta.get("cells") or [] if isinstance(c, dict)]
    if cells:
        rows = [[txt(c.get("cell")), txt(c.get("config_hash")), txt(c.get("kind")), txt(c.get("dataset")),
                 num(c.get("cut_ratio")), txt(c.get("t_c")), txt(c.get("defense")), txt(c.get("payload_kind")),
                 txt(c.get("epochs")), txt(c.get("seed")), num(c.get("seconds"))] for c in cells]
        s.blocks.append(Table(["cell", "config hash", "kind", "dataset", "cut ratio", "t_c", "defense", "payload kind",
                               "epochs", "seed", "seconds"], rows, id="cells-config-table"))
    s.blocks.append(Para("Grid (grid_yaml):"))
    s.blocks.append(Pre(str(meta.get("grid_yaml") or "(not recorded)"), "yaml"))
    s.blocks.append(Para("Policy (policy_yaml):"))
    s.blocks.append(Pre(str(meta.get("policy_yaml") or "(not recorded)"), "yaml"))
    return s


def build_sections(audit_dir: Path, rows: pd.DataFrame, meta: dict) -> list[Section]:
    """The report's content, in order, independent of the output format."""
    cells = _cell_order(rows, meta)
    meta_cells = {c["cell"]: c for c in meta.get("cells") or [] if isinstance(c, dict) and c.get("cell")}
    defenses = _ordered([*(c.get("defense") for c in meta_cells.values()), *rows["defense"]])
    defenses = [str(d) for d in defenses]
    worst = worst_leakage(rows, cells)
    evaluations = {e.get("cell"): e for e in meta.get("evaluations") or [] if isinstance(e, dict)}
    verdict = meta.get("verdict") if isinstance(meta.get("verdict"), dict) else {}
    rec = verdict.get("recommendation") if isinstance(verdict.get("recommendation"), dict) else None
    return [
        _verdict_section(meta, len(cells)),
        _leakage_curve_section(rows, worst, defenses),
        _heatmap_section(worst, defenses),
        _roc_section(audit_dir, rows, worst, meta_cells, cells),
        _frontier_section(frontier_table(rows, worst, evaluations, cells, _cost_metric(meta)), rec, _cost_metric(meta)),
        _formal_section(formal_table(rows, cells)),
        _reconstruction_section(audit_dir, rows, meta_cells, cells, defenses),
        _coverage_section(meta),
        _checks_section(meta),
        _config_section(meta),
    ]


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d232a;background:#fafbfc}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:1.6em;margin:.3em 0 .1em}h2{font-size:1.25em;border-bottom:2px solid #dde3ea;padding-bottom:4px;margin-top:2em}
.meta{color:#5b6670;font-size:.9em;margin:0 0 14px}
#verdict{border-radius:10px;padding:18px 24px;margin:10px 0 14px;color:#fff}
#verdict.pass{background:#1e7d3a}#verdict.fail{background:#b3261e}#verdict.unknown{background:#6b7580}
#verdict .status{font-size:2.6em;font-weight:800;letter-spacing:.06em;line-height:1.1}
#verdict .text{font-size:1.2em;margin-top:6px}#verdict .count{font-size:.95em;opacity:.9;margin-top:6px}
#recommendation{border:2px solid #1e7d3a;background:#eef8f0;border-radius:8px;padding:12px 18px;margin-bottom:10px}
#recommendation.none{border-color:#b3261e;background:#fbeeed}
#recommendation h3{margin:0 0 6px;font-size:1.05em}#recommendation dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:0}
#recommendation dt{font-weight:600;color:#3b454f}#recommendation dd{margin:0}
.scroll{overflow-x:auto;margin:8px 0 14px}
table{border-collapse:collapse;font-size:.82em;background:#fff}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.nm{color:#8a939b;font-style:italic}
td.pass{color:#1e7d3a;font-weight:600}td.fail{color:#b3261e;font-weight:600}td.warn{color:#9a6700}
p.warn{background:#fff4d6;border-left:4px solid #d4a017;padding:6px 10px}
figure{margin:10px 0 18px;display:inline-block;max-width:100%;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #e1e5e9;background:#fff}
.gallery{display:flex;flex-wrap:wrap;gap:14px 18px;align-items:flex-start;margin:8px 0 4px}
.gallery figure{margin:0}
.gallery figure.art{width:300px}.gallery figure.art img{width:100%;image-rendering:pixelated}
p.caption{font-size:.85em;color:#4a545e;margin-top:2px}
figcaption{font-size:.85em;color:#4a545e;max-width:900px;margin-top:4px}
pre{background:#f1f3f5;border:1px solid #dde3ea;padding:10px 12px;overflow-x:auto;font-size:.82em;white-space:pre}
nav{font-size:.85em;margin-bottom:6px}nav a{margin-right:12px;color:#2457a6}
"""


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        tds = []
        for c in row:
            attrs = f' class="{c.cls}"' if c.cls else ""
            if c.value is not None and not math.isnan(c.value):
                attrs += f' data-value="{_esc(repr(float(c.value)))}"'
            tds.append(f"<td{attrs}>{_esc(c.text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    tid = f' id="{_esc(t.id)}"' if t.id else ""
    cap = f"<caption>{_esc(t.caption)}</caption>" if t.caption else ""
    return f'<div class="scroll"><table{tid}>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_verdict(v: Verdict) -> str:
    label = {"pass": "PASS", "fail": "FAIL"}.get(v.status, "NO VERDICT")
    count = f"{len(v.passing)} of {v.total} cells pass the policy." if v.total else "No cells were measured."
    out = [f'<div id="verdict" class="{v.status}"><div class="status">{label}</div>'
           f'<div class="text">{_esc(v.text)}</div><div class="count">{_esc(count)}</div></div>']
    r = v.recommendation
    if r:
        items = [("setting", r.get("defense")), ("cut ratio", format_value(r.get("cut_ratio"))),
                 ("client GFLOPs", format_value(r.get("client_gflops"))), ("cell", r.get("cell")), ("why", r.get("why"))]
        dl = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(val)}</dd>" for k, val in items)
        out.append(f'<div id="recommendation"><h3>Recommendation: {_esc(r.get("defense"))} at cut ratio '
                   f'{_esc(format_value(r.get("cut_ratio")))}</h3><dl>{dl}</dl></div>')
    else:
        out.append('<div id="recommendation" class="none"><h3>Recommendation: none</h3>'
                   '<p>No setting in the grid passes the policy; there is nothing to recommend.</p></div>')
    return "".join(out)


def render_html(sections: list[Section], meta: dict) -> str:
    parts = []
    for s in sections:
        body = []
        for b in s.blocks:
            if isinstance(b, Verdict):
                body.append(_html_verdict(b))
            elif isinstance(b, Para):
                body.append(f'<p class="{b.cls}">{_esc(b.text)}</p>' if b.cls else f"<p>{_esc(b.text)}</p>")
            elif isinstance(b, Table):
                body.append(_html_table(b))
            elif isinstance(b, Figure):
                body.append(f'<figure><img src="{_data_uri(b.png)}" alt="{_esc(b.caption)}">'
                            f"<figcaption>{_esc(b.caption)}</figcaption></figure>")
            elif isinstance(b, Artifact):
                body.append(f'<figure class="art"><img src="{_data_uri(b.png)}" alt="{_esc(b.caption)}">'
                            f"<figcaption>{_esc(b.caption)}</figcaption></figure>")
            elif isinstance(b, Gallery):
                items = []
                for item in b.items:
                    if isinstance(item, Artifact):
                        items.append(f'<figure class="art"><img src="{_data_uri(item.png)}" alt="{_esc(item.caption)}">'
                                     f"<figcaption>{_esc(item.caption)}</figcaption></figure>")
                    else:
                        items.append(f'<figure><img src="{_data_uri(item.png)}" alt="{_esc(item.caption)}"></figure>')
                body.append(f'<div class="gallery">{"".join(items)}</div>')
                if b.caption:
                    body.append(f'<p class="caption">{_esc(b.caption)}</p>')
            elif isinstance(b, Pre):
                body.append(f"<pre>{_esc(b.text)}</pre>")
        parts.append(f'<section id="{_esc(s.id)}"><h2>{_esc(s.title)}</h2>{"".join(body)}</section>')
    nav = "".join(f'<a href="#{_esc(s.id)}">{_esc(s.title.split(". ", 1)[-1])}</a>' for s in sections[1:])
    title = "collafuse audit report"
    sub = (f"collafuse {meta.get('collafuse_version', '?')} · started {meta.get('started', '?')} · "
           f"wall time {format_value(meta.get('wall_seconds'))} s ({_sweep_text(meta)})" + (" · quick" if meta.get("quick") else ""))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
            f'<h1>{_esc(title)}</h1><p class="meta">{_esc(sub)}</p><nav>{nav}</nav>'
            f'{"".join(parts)}</main></body></html>\n')


# ----------------------------------------------------------------------------- Markdown

def _md(text: Any) -> str:
    return str("" if text is None else text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md(c) or " " for c in t.columns) + " |", "|" + "---|" * len(t.columns)]
    for row in t.rows:
        lines.append("| " + " | ".join(_md(c.text) for c in row) + " |")
    return "\n".join(lines)


def render_markdown(sections: list[Section], meta: dict) -> str:
    out = ["# collafuse audit report", "",
           f"collafuse {meta.get('collafuse_version', '?')} · started {meta.get('started', '?')} · "
           f"wall time {format_value(meta.get('wall_seconds'))} s ({_sweep_text(meta)})" + (" · quick" if meta.get("quick") else ""), ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Verdict):
                label = {"pass": "PASS", "fail": "FAIL"}.get(b.status, "NO VERDICT")
                out += [f"### Verdict: **{label}**", "", b.text, "",
                        f"{len(b.passing)} of {b.total} cells pass the policy." if b.total else "No cells were measured.", ""]
                r = b.recommendation
                if r:
                    out += [f"**Recommendation:** {r.get('defense')} at cut ratio {format_value(r.get('cut_ratio'))}", "",
                            f"- cell: `{r.get('cell')}`", f"- client GFLOPs: {format_value(r.get('client_gflops'))}",
                            f"- why: {r.get('why')}", ""]
                else:
                    out += ["**Recommendation:** none: no setting in the grid passes the policy.", ""]
            elif isinstance(b, Para):
                out += [("> " if b.cls == "warn" else "") + b.text, ""]
            elif isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Figure):
                out += [f"![{_md(b.caption)}](figures/{b.name})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Artifact):
                out += [f"![{_md(b.caption)}]({b.relpath})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Gallery):
                for item in b.items:
                    if isinstance(item, Artifact):
                        out += [f"![{_md(item.caption)}]({item.relpath})", "", f"*{item.caption}*", ""]
                    else:
                        out += [f"![{_md(item.caption)}](figures/{item.name})", ""]
                if b.caption:
                    out += [f"*{b.caption}*", ""]
            elif isinstance(b, Pre):
                fence = "~~~~" if "```" in b.text else "```"
                out += [f"{fence}{b.lang}", b.text.rstrip("\n"), fence, ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- writing

def write_report(audit_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and ``figures/``) into ``audit_dir``; return their paths.

    Raises :class:`RunError` if ``audit_dir`` is not an audit (missing or corrupt
    ``results.json``/``audit.json``). Nothing is replaced until everything is rendered.
    """
    audit_dir = Path(audit_dir)
    rows, meta = load_audit(audit_dir)
    sections = build_sections(audit_dir, rows, meta)
    html_text = render_html(sections, meta)
    md_text = render_markdown(sections, meta)
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    figures += [i for s in sections for b in s.blocks if isinstance(b, Gallery) for i in b.items if isinstance(i, Figure)]

    tag = f"{os.getpid()}"
    html_path, md_path, fig_dir = audit_dir / "report.html", audit_dir / "report.md", audit_dir / "figures"
    tmp_html = audit_dir / f".report.html.partial-{tag}"
    tmp_md = audit_dir / f".report.md.partial-{tag}"
    tmp_figs = audit_dir / f".figures.partial-{tag}"
    old_figs = audit_dir / f".figures.old-{tag}"
    try:
        shutil.rmtree(tmp_figs, ignore_errors=True)
        tmp_figs.mkdir()
        for f in figures:
            (tmp_figs / f.name).write_bytes(f.png)
        tmp_html.write_text(html_text, encoding="utf-8")
        tmp_md.write_text(md_text, encoding="utf-8")
        moved = fig_dir.exists()
        if moved:
            fig_dir.rename(old_figs)
        try:
            tmp_figs.rename(fig_dir)
        except OSError:
            if moved:
                old_figs.rename(fig_dir)
            raise
        os.replace(tmp_md, md_path)
        os.replace(tmp_html, html_path)
    finally:
        tmp_html.unlink(missing_ok=True)
        tmp_md.unlink(missing_ok=True)
        shutil.rmtree(tmp_figs, ignore_errors=True)
        shutil.rmtree(old_figs, ignore_errors=True)
    return html_path, md_path
