"""The report's controls and per-record evidence (DESIGN §4.2): sections 4c and 4d.

- 4c: per cell and threat, the model-blind baseline (the worst target's AUC, its permutation p-value), the
  attacks that are not significantly above it, and for the threat's strongest attack its in-sample TPR at
  1 % FPR beside the held-out one (threshold fixed on a calibration half) with the FPR that threshold really
  reached, and where its ROC stands against the formal ceiling (table ``#controls-table``).
- 4d: per-class leakage of each threat's worst attack, from the audit's ``scores.parquet``: the AUC of the
  members and non-members of each class alone (table ``#per-class-table`` and a heatmap).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit import plots
from collafuse.benchmarks.audit.meta import AuditMeta
from collafuse.benchmarks.audit.results import read_scores

from .analysis import NOT_MEASURED, format_value, measured
from .document import Figure, Para, Section, Table, TableCell, num, txt

MAX_CLASSES = 20        # per-class columns shown; more classes are summarised by their worst ones
MIN_PER_SIDE = 2        # members and non-members a class needs for its AUC


def _value(sub: pd.DataFrame, metric: str, target: str | None = None, attack: str | None = None) -> pd.Series | None:
    sel = sub[sub["metric"] == metric]
    if target is not None:
        sel = sel[sel["target"] == target]
    if attack is not None:
        sel = sel[sel["attack"] == attack]
    sel = measured(sel)
    return None if sel.empty else sel.iloc[0]


def _interval(r: pd.Series | None) -> str:
    if r is None:
        return NOT_MEASURED
    lo, hi = r.get("ci_low"), r.get("ci_high")
    text = format_value(r["value"])
    return text + (f" [{format_value(lo)}, {format_value(hi)}]" if pd.notna(lo) and pd.notna(hi) else "")


def controls_table(rows: pd.DataFrame, cells: list[str]) -> list[list[TableCell]]:
    """One row per (cell, threat) with a membership AUC."""
    body = []
    for cell in cells:
        group = rows[(rows["cell"] == cell) & rows["threat"].isin(THREAT_IDS)]
        for threat in THREAT_IDS:
            sub = group[group["threat"] == threat]
            aucs = measured(sub[(sub["metric"] == "auc") & (sub["attack"] != "blind")])
            if aucs.empty:
                continue
            worst = aucs.loc[aucs["value"].idxmax()]
            target, attack = worst["target"], worst["attack"]
            blind = measured(sub[sub["metric"] == "blind_auc"])
            blind_row = blind.loc[blind["value"].idxmax()] if not blind.empty else None
            p = _value(sub, "blind_p_value", blind_row["target"]) if blind_row is not None else None
            below = sub[(sub["metric"] == "above_blind") & (sub["value"] == 0)]
            not_above = sorted(set(below["attack"]))
            ceiling = _value(sub, "roc_above_ceiling", target, attack)
            any_above = sub[(sub["metric"] == "roc_above_ceiling") & (sub["value"] == 1)]
            if not any_above.empty:
                ceiling_text = TableCell("ABOVE: audit error (" + ", ".join(
                    f"{a}/{t}" for a, t in zip(any_above["attack"], any_above["target"])) + ")", None, "fail")
            elif ceiling is None:
                ceiling_text = txt("no finite guarantee")
            else:
                ceiling_text = TableCell("below", None, "pass")
            body.append([
                txt(cell), txt(threat),
                txt(_interval(blind_row) + (f" on {blind_row['target']}" if blind_row is not None else "")),
                num(p["value"] if p is not None else None),
                TableCell(", ".join(not_above) if not_above else "none", None, "warn" if not_above else ""),
                txt(f"{attack} / {target}"), num(worst["value"]),
                txt(_interval(_value(sub, "tpr_at_1pct_fpr", target, attack))),
                txt(_interval(_value(sub, "tpr_at_1pct_fpr_heldout", target, attack))),
                txt(_interval(_value(sub, "fpr_at_1pct_heldout", target, attack))),
                ceiling_text,
            ])
    return body


def controls_section(rows: pd.DataFrame, cells: list[str]) -> Section:
    s = Section("controls", "4c. Controls: model-blind baseline, held-out thresholds, formal ceiling")
    body = controls_table(rows, cells)
    if not body:
        s.blocks.append(Para(f"Controls: {NOT_MEASURED} (no membership rows)."))
        return s
    s.blocks.append(Table(["cell", "threat", "blind AUC [95 %] (worst target)", "blind p-value",
                           "attacks not above blind", "strongest attack / target", "its AUC", "TPR@1% in-sample",
                           "TPR@1% held-out", "FPR reached (nominal 1 %)", "ROC vs formal ceiling"],
                          body, id="controls-table"))
    s.blocks.append(Para(
        "Model-blind baseline: a cross-validated classifier that sees only the candidate images (no model, no payload, "
        "no sample) tells members from non-members; its AUC is 0.5 when the two sets come from one distribution. "
        "Where it exceeds the policy's blind_auc (default 0.6) with permutation p < 0.01 (Bonferroni over the threat's targets), the threat's verdict is "
        "INCONCLUSIVE. An attack not significantly above it (one-sided 95 %) is listed. Held-out thresholds "
        "(CopyMark): the threshold for 1 % FPR is fixed on a random half of the candidates, and TPR and the FPR it "
        "actually reaches are measured on the other half (Wilson intervals). Formal ceiling: the ROC's "
        "Clopper–Pearson band against the trade-off curve of the cell's guarantee for that threat."))
    return s


def per_class_frame(scores: pd.DataFrame, rows: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """Per (cell, threat): the worst (target, attack) by AUC, and the AUC of its scores restricted to each class
    (members and non-members of that class, at least :data:`MIN_PER_SIDE` of each)."""
    out = []
    for cell in cells:
        group = rows[(rows["cell"] == cell) & (rows["metric"] == "auc") & rows["threat"].isin(THREAT_IDS)]
        mine = scores[scores["cell"] == cell]
        for threat in THREAT_IDS:
            aucs = measured(group[group["threat"] == threat])
            if aucs.empty:
                continue
            worst = aucs.loc[aucs["value"].idxmax()]
            sel = mine[(mine["threat"] == threat) & (mine["target"] == worst["target"])
                       & (mine["attack"] == worst["attack"]) & (mine["class"] >= 0)]
            for cls, part in sel.groupby("class", sort=True):
                m, n = part[part["member"]], part[~part["member"]]
                if len(m) < MIN_PER_SIDE or len(n) < MIN_PER_SIDE:
                    continue
                auc = roc_auc_score(part["member"].astype(int), part["score"])
                out.append({"cell": cell, "threat": threat, "attack": worst["attack"], "target": worst["target"],
                            "class": int(cls), "auc": float(auc), "members": len(m), "nonmembers": len(n)})
    return pd.DataFrame(out, columns=["cell", "threat", "attack", "target", "class", "auc", "members", "nonmembers"])


def per_class_section(audit_dir: Path, rows: pd.DataFrame, meta: AuditMeta, cells: list[str]) -> Section:
    s = Section("per-class", "4d. Per-class leakage of each threat's worst attack")
    scores = read_scores(audit_dir, meta.scores_sha256)
    if scores is None:
        s.blocks.append(Para(f"Per-class leakage: {NOT_MEASURED} (the audit kept no membership scores)."))
        return s
    frame = per_class_frame(scores, rows, cells)
    if frame.empty:
        s.blocks.append(Para(f"Per-class leakage: {NOT_MEASURED} (no class labels, or too few candidates per class)."))
        return s
    classes = sorted(frame["class"].unique())
    shown = classes[:MAX_CLASSES]
    body = []
    for (cell, threat), part in frame.groupby(["cell", "threat"], sort=False):
        by_class = dict(zip(part["class"], part["auc"]))
        worst = part.loc[part["auc"].idxmax()]
        body.append([txt(cell), txt(threat), txt(f"{part['attack'].iloc[0]} / {part['target'].iloc[0]}"),
                     txt(f"{int(worst['class'])} ({format_value(worst['auc'])})"),
                     txt(f"{int(part['members'].sum())} / {int(part['nonmembers'].sum())}"),
                     *(num(by_class.get(c)) for c in shown)])
    s.blocks.append(Table(["cell", "threat", "worst attack / target", "leakiest class (AUC)", "members / non-members",
                           *(f"class {c}" for c in shown)], body, id="per-class-table"))
    more = f" Only the first {MAX_CLASSES} of {len(classes)} classes are shown as columns." if len(classes) > MAX_CLASSES else ""
    s.blocks.append(Para(
        "Per (cell, threat), the (target, attack) with the worst AUC, re-scored class by class: the AUC of its scores "
        "for the members and non-members of one class alone (classes with fewer than "
        f"{MIN_PER_SIDE} of either are left blank). Classes hold few candidates, so these AUCs are noisy; a class far "
        f"above the rest says which records leak. Every score is in scores.parquet.{more}"))
    table = frame.assign(row=frame["cell"] + " · " + frame["threat"]).pivot_table(
        index="row", columns="class", values="auc", sort=False)
    png = plots.class_heatmap(table)
    if png is not None:
        s.blocks.append(Figure("per_class_auc.png", png,
                               "Membership AUC per class of each threat's worst attack (rows: cell · threat)."))
    return s


__all__ = ["controls_section", "per_class_section", "per_class_frame", "controls_table"]
