"""The report's membership detail (issue 14, items 4 and 5): sections 4a and 4b.

- 4a: per cell and threat, the worst TPR at 0.1 % FPR (with whether the cell had the 1000
  non-members to resolve it), balanced accuracy and Gaussian-DP ε lower bound over every
  attack and target (table ``#membership-detail-table``), and the AUC per query step of the
  (target, attack) with the worst final AUC (``auc_at_t`` rows).
- 4b: leakage against training length (TF Privacy's "vulnerability per epoch"): the worst T2
  and T3 AUC and TPR at 1 % FPR over targets and attacks at each ``training.snapshots`` epoch
  (``*_at_epoch`` rows) and at the final epoch (the cell's own rows), as a figure and the
  table ``#epochs-table``; per cell and threat, whether the worst AUC was still rising at the last epoch
  (the trend test of :mod:`~collafuse.benchmarks.audit.trend`, table ``#trend-table``).
- 4a also holds dataset inference per client (table ``#dataset-inference-table``): each client's p-value and the
  member images needed for p < 0.01, per threat and target.

"Worst" is the largest measured value, ties to the first row, as everywhere in the report.
"""
from __future__ import annotations

import pandas as pd

from collafuse.metrics import at_epoch, metric, names
from collafuse.threats import THREAT_IDS

from collafuse.benchmarks.audit import plots

from .analysis import NOT_MEASURED, format_value, measured
from .document import Figure, Para, Section, Table, count, txt, num

MEMBERSHIP_THREATS = THREAT_IDS
# Names, labels and the resolved flag from the one metric vocabulary (collafuse.metrics).
DETAIL_METRICS = {name: metric(name).label for name in ("tpr_at_01pct_fpr", "balanced_accuracy", "epsilon_gdp")}
RESOLVED = metric("tpr_at_01pct_fpr").resolved_by
SNAPSHOT_THREATS = ("T2", "T3")          # the model targets attacked on every snapshot
EPOCH_METRICS = names("auc", "tpr_at_1pct_fpr")


def _worst(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group of ``keys``, the row with the largest measured value (ties: the first)."""
    sub = measured(frame)
    if sub.empty:
        return sub.copy()
    return sub.loc[sub.groupby(keys, sort=False)["value"].idxmax()]


def membership_detail_table(rows: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """One row per (cell, threat T1–T5) that has any of :data:`DETAIL_METRICS`: each one's worst value and the
    attack/target that reached it; ``resolved`` (True/False/None) is the flag of the worst TPR@0.1 % row's target."""
    mine = rows[rows["threat"].isin(MEMBERSHIP_THREATS)]
    out = []
    for cell in cells:
        group = mine[mine["cell"] == cell]
        for threat in MEMBERSHIP_THREATS:
            sub = group[group["threat"] == threat]
            if not sub["metric"].isin(list(DETAIL_METRICS)).any():
                continue
            first = sub.iloc[0]
            entry = {"cell": cell, "defense": first["defense"], "cut_ratio": first["cut_ratio"], "threat": threat}
            for metric in DETAIL_METRICS:
                hits = measured(sub[sub["metric"] == metric])
                best = hits.loc[hits["value"].idxmax()] if not hits.empty else None
                entry[metric] = best["value"] if best is not None else float("nan")
                entry[f"{metric}_by"] = f"{best['attack']} / {best['target']}" if best is not None else ""
                if metric == "tpr_at_01pct_fpr":
                    flag = sub[(sub["metric"] == RESOLVED) & (sub["target"] == (best["target"] if best is not None else None))
                               & (sub["attack"] == (best["attack"] if best is not None else None))]["value"]
                    entry["resolved"] = None if flag.empty or pd.isna(flag.iloc[0]) else bool(flag.iloc[0])
            out.append(entry)
    columns = ["cell", "defense", "cut_ratio", "threat", "resolved",
               *(c for m in DETAIL_METRICS for c in (m, f"{m}_by"))]
    return pd.DataFrame(out, columns=columns)


def per_step_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The ``auc_at_t`` rows of the (target, attack) with the worst final AUC of each (cell, threat)."""
    curves = rows[rows["metric"] == "auc_at_t"]
    if curves.empty:
        return curves.copy()
    worst = _worst(rows[(rows["metric"] == "auc") & rows["threat"].isin(MEMBERSHIP_THREATS)], ["cell", "threat"])
    keep = set(zip(worst["cell"], worst["threat"], worst["target"], worst["attack"]))
    return curves[[k in keep for k in zip(curves["cell"], curves["threat"], curves["target"], curves["attack"])]]


def epochs_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, threat T2/T3, epoch, metric auc / tpr_at_1pct_fpr): the worst value over targets and attacks
    and the one that reached it, at every snapshot epoch and at the final epoch (the cell's ``epochs``), for
    cells with snapshot rows. A snapshot at the final epoch is the final model: it is shown once."""
    snapshot_names = {at_epoch(m): m for m in EPOCH_METRICS}
    snap = rows[rows["metric"].isin(list(snapshot_names)) & rows["threat"].isin(SNAPSHOT_THREATS)].copy()
    columns = ["cell", "defense", "cut_ratio", "threat", "epoch", "metric", "value", "attack", "target"]
    if snap.empty:
        return pd.DataFrame(columns=columns)
    snap["metric"] = snap["metric"].map(snapshot_names)
    final = rows[rows["cell"].isin(set(snap["cell"])) & rows["metric"].isin(EPOCH_METRICS)
                 & rows["threat"].isin(SNAPSHOT_THREATS)].copy()
    final["epoch"] = pd.to_numeric(final["epochs"], errors="coerce")
    both = pd.concat([snap, final[~final.set_index(["cell", "epoch"]).index.isin(snap.set_index(["cell", "epoch"]).index)]])
    worst = _worst(both, ["cell", "threat", "epoch", "metric"])
    return worst[columns].sort_values(["cell", "threat", "metric", "epoch"], kind="stable").reset_index(drop=True)


def membership_detail_section(rows: pd.DataFrame, cells: list[str], defenses: list[str]) -> Section:
    s = Section("membership-detail", "4a. Membership at low FPR, balanced accuracy, Gaussian-DP ε, per query step")
    table = membership_detail_table(rows, cells)
    if table.empty:
        s.blocks.append(Para(f"TPR at 0.1 % FPR, balanced accuracy and ε_GDP: {NOT_MEASURED} (no membership rows)."))
    else:
        body = []
        for _, r in table.iterrows():
            resolved = {True: txt("yes"), False: txt("no: TPR at FPR 0", "warn"), None: txt("—")}[r["resolved"]]
            body.append([txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]),
                         num(r["tpr_at_01pct_fpr"]), resolved, txt(r["tpr_at_01pct_fpr_by"] or "—"),
                         num(r["balanced_accuracy"]), txt(r["balanced_accuracy_by"] or "—"),
                         num(r["epsilon_gdp"]), txt(r["epsilon_gdp_by"] or "—")])
        s.blocks.append(Table(["cell", "defense", "cut ratio", "threat", "TPR at 0.1 % FPR", "resolved",
                               "TPR@0.1% by", "balanced accuracy", "balanced accuracy by", "ε_GDP lower bound",
                               "ε_GDP by"], body, id="membership-detail-table"))
        s.blocks.append(Para("Per cell and threat, the worst value of each metric over every attack and target (attack / "
                             "target). TPR at 0.1 % FPR is the largest TPR whose FPR ≤ 0.001; with fewer than 1000 "
                             "non-members it is unresolved and is the TPR at FPR 0 (a lower bound). Balanced accuracy: "
                             "the best threshold's (TPR + TNR)/2. ε_GDP: the Gaussian-DP form of the empirical lower "
                             "bound (DESIGN.md §4.3), beside the Clopper–Pearson ε_LB of section 6."))
    s.blocks.extend(dataset_inference_blocks(rows, cells))
    png = plots.auc_per_step(per_step_frame(rows), defenses)
    if png is None:
        s.blocks.append(Para(f"AUC per query step: {NOT_MEASURED} (no auc_at_t rows)."))
    else:
        s.blocks.append(Figure("auc_per_step.png", png,
                               "Membership AUC at each query step t of the (target, attack) with the worst final AUC, "
                               "one line per cell (colour: defense): where in the chain a model leaks (rows "
                               "auc_at_t, the step in column t)."))
    return s


def training_length_section(rows: pd.DataFrame) -> Section:
    s = Section("leakage-vs-epochs", "4b. Leakage against training length")
    frame = epochs_frame(rows)
    if frame.empty:
        s.blocks.append(Para(f"Leakage against training length: {NOT_MEASURED} (no system block of the grid sets "
                             "snapshots: [epochs…])."))
        return s
    png = plots.leakage_vs_epochs(frame)
    if png is not None:
        s.blocks.append(Figure("leakage_vs_epochs.png", png,
                               "Worst T2 (server) and T3 (client) membership AUC and TPR at 1 % FPR over targets and "
                               "attacks, on the models kept after each training.snapshots epoch and on the final "
                               "models (TF Privacy's vulnerability per epoch). One line per cell and threat."))
    body = [[txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]), txt(int(r["epoch"])),
             txt(r["metric"]), num(r["value"]), txt(f"{r['attack']} / {r['target']}")] for _, r in frame.iterrows()]
    s.blocks.append(Table(["cell", "defense", "cut ratio", "threat", "epoch", "metric", "worst value", "attack / target"],
                          body, id="epochs-table"))
    s.blocks.append(Para("Payload (T1), sample (T4) and co-client (T5) targets are measured on the final models only. Snapshot rows "
                         "are metric <name>_at_epoch with the epoch in column epoch; the policy judges the final "
                         "models."))
    s.blocks.extend(trend_blocks(rows))
    return s


# ---------------------------------------------------------------- dataset inference per client (4a)

DATASET_THREATS = ("T2", "T3", "T4")
DATASET_METRICS = {name: metric(name).label for name in
                   ("dataset_p", "dataset_members_needed", "dataset_members", "dataset_heldout")}


def dataset_inference_frame(rows: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """One row per (cell, threat, suspect target) with dataset-inference rows: the p-value, the member images
    needed for p < 0.01 (∞: not reached), the sizes tested and the attacks whose scores were combined (those
    with an ``auc`` row on the attacked target: ``server`` for ``server/client_k``), in the audit's cell order."""
    sel = rows[rows["metric"].isin(list(DATASET_METRICS)) & rows["threat"].isin(DATASET_THREATS)]
    columns = ["cell", "defense", "cut_ratio", "threat", "target", *DATASET_METRICS, "combined"]
    out = []
    for cell in cells:
        mine = sel[sel["cell"] == cell]
        for (threat, target), group in mine.groupby(["threat", "target"], sort=False):
            values = dict(zip(group["metric"], group["value"]))
            attacked = str(target).split("/")[0]
            aucs = rows[(rows["cell"] == cell) & (rows["threat"] == threat) & (rows["target"] == attacked)
                        & (rows["metric"] == "auc")]
            first = group.iloc[0]
            out.append({"cell": cell, "defense": first["defense"], "cut_ratio": first["cut_ratio"], "threat": threat,
                        "target": target, **{m: values.get(m, float("nan")) for m in DATASET_METRICS},
                        "combined": ", ".join(dict.fromkeys(aucs["attack"]))})
    return pd.DataFrame(out, columns=columns)


def dataset_inference_blocks(rows: pd.DataFrame, cells: list[str]) -> list:
    frame = dataset_inference_frame(rows, cells)
    if frame.empty:
        return [Para(f"Dataset inference per client: {NOT_MEASURED} (no T2–T4 attack scores).")]
    body = [[txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]), txt(r["target"]),
             num(r["dataset_p"]), count(r["dataset_members_needed"]), count(r["dataset_members"]),
             count(r["dataset_heldout"]), txt(r["combined"] or "—")] for _, r in frame.iterrows()]
    return [Table(["cell", "defense", "cut ratio", "threat", "suspect set", "p-value", "members needed for p < 0.01",
                   "members tested", "held-out tested", "attacks combined"], body, id="dataset-inference-table"),
            Para("Dataset inference per client (Maini et al. 2021; CDI, Dubiński et al. 2024): did the model learn this "
                 "client's images at all? The attacks' per-image scores are the features of a logistic regression fitted "
                 "on 20 % of the client's member images and of the held-out images; a one-sided Welch t-test compares "
                 "its scores on the remaining members with those on the remaining held-out images. Suspect set "
                 "server/client_k: the server's member candidates that client k sent. Members needed: the smallest of "
                 "4, 8, 16, … and all of them whose 20 random draws (with as many held-out images) reach p < 0.01 at "
                 "least half of the time (∞: not even all of them). No model query beyond the attacks'. A policy limit "
                 "on dataset_p judges the smallest p-value over the clients and targets of a threat, with no correction "
                 "for their number: it errs towards FAIL.")]


# ---------------------------------------------------------------- the trend at the last epoch (4b)

def trend_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, threat) with trend rows: the slope of the worst AUC per epoch between the last two measured epochs
    (with its 95 % interval), those epochs, whether it was still rising, and who was worst at the last epoch."""
    columns = ["cell", "defense", "cut_ratio", "threat", "start", "end", "slope", "low", "high", "rising", "attack",
               "target"]
    out = []
    for _, flag in rows[rows["metric"] == "auc_still_rising"].iterrows():
        same = rows[(rows["cell"] == flag["cell"]) & (rows["threat"] == flag["threat"])
                    & (rows["target"] == flag["target"]) & (rows["attack"] == flag["attack"])]
        slope = same[same["metric"] == "auc_epoch_slope"]
        start = same[same["metric"] == "auc_trend_start_epoch"]["value"]
        nan = float("nan")
        out.append({"cell": flag["cell"], "defense": flag["defense"], "cut_ratio": flag["cut_ratio"],
                    "threat": flag["threat"], "start": start.iloc[0] if len(start) else nan, "end": flag.get("epochs", nan),
                    "slope": slope["value"].iloc[0] if len(slope) else nan,
                    "low": slope["ci_low"].iloc[0] if len(slope) else nan,
                    "high": slope["ci_high"].iloc[0] if len(slope) else nan,
                    "rising": bool(flag["value"] == 1), "attack": flag["attack"], "target": flag["target"]})
    return pd.DataFrame(out, columns=columns)


def trend_blocks(rows: pd.DataFrame) -> list:
    """A statement per (cell, threat) whether leakage was still rising at the last epoch, and the table of slopes."""
    frame = trend_frame(rows)
    if frame.empty:
        return []
    blocks: list = []
    body = []
    for _, r in frame.iterrows():
        said = "still rising at the last epoch" if r["rising"] else "not shown to be rising at the last epoch"
        blocks.append(Para(f"{r['cell']}, {r['threat']}: leakage {said} (worst AUC slope {format_value(r['slope'])} per "
                           f"epoch, 95 % interval [{format_value(r['low'])}, {format_value(r['high'])}], epoch "
                           f"{format_value(r['start'])} → {format_value(r['end'])}; {r['attack']} / {r['target']} at "
                           "the last).", "warn" if r["rising"] else ""))
        body.append([txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]), num(r["start"]),
                     num(r["end"]), num(r["slope"]), num(r["low"]), num(r["high"]),
                     txt("yes" if r["rising"] else "no", "warn" if r["rising"] else ""),
                     txt(f"{r['attack']} / {r['target']}")])
    blocks.append(Table(["cell", "defense", "cut ratio", "threat", "from epoch", "to epoch", "AUC slope per epoch",
                         "95 % low", "95 % high", "still rising", "worst at the last epoch"], body, id="trend-table"))
    blocks.append(Para("The trend test (benchmarks/audit/trend.py): at each measured epoch the threat's worst AUC over "
                       "its targets and attacks; the slope between the last two measured epochs, its 95 % interval from "
                       "the two AUCs' bootstrap intervals taken as independent (they share their candidates, so the test "
                       "is conservative). Still rising: the interval lies above 0. A PASS in that state says so in the "
                       "verdict: longer training would leak more."))
    return blocks
