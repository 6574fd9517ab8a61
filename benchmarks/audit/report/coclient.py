"""The report's T5 section (issue 22): what a curious co-client learns about the other clients' images.

One row per system cell with T5 rows (table ``#coclient-table``): the worst extraction rate of another client's
images over every co-client, victim and finisher (Carlini et al. 2023's relative criterion, DESIGN §4.1) and
who reached it, its absolute-threshold rate beside it, how many hand-offs each co-client drew, and the worst T5
membership AUC with its attack and target. "Worst" is the largest measured value, ties to the first row, as
everywhere in the report.
"""
from __future__ import annotations

import pandas as pd

from .analysis import NOT_MEASURED, measured
from .document import Para, Section, Table, count, num, txt

THREAT = "T5"
COLUMNS = ["cell", "defense", "cut_ratio", "handoffs", "extraction", "extraction_by", "extraction_abs",
           "extraction_abs_by", "auc", "auc_by"]


def _worst(sub: pd.DataFrame, metric: str) -> tuple[float, str]:
    hits = measured(sub[sub["metric"] == metric])
    if hits.empty:
        return float("nan"), ""
    best = hits.loc[hits["value"].idxmax()]
    return float(best["value"]), f"{best['attack']} / {best['target']}"


def coclient_table(rows: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """One row per cell that has T5 rows: worst extraction, absolute extraction and AUC (each with the attack /
    target that reached it) and the hand-offs each co-client drew (the largest count)."""
    mine = rows[rows["threat"] == THREAT]
    out = []
    for cell in cells:
        sub = mine[mine["cell"] == cell]
        if sub.empty:
            continue
        first = sub.iloc[0]
        handoffs = measured(sub[sub["metric"] == "handoffs_drawn"])["value"]
        entry = {"cell": cell, "defense": first["defense"], "cut_ratio": first["cut_ratio"],
                 "handoffs": float(handoffs.max()) if not handoffs.empty else float("nan")}
        for metric in ("extraction", "extraction_abs", "auc"):
            entry[metric], entry[f"{metric}_by"] = _worst(sub, metric)
        out.append(entry)
    return pd.DataFrame(out, columns=COLUMNS)


def coclient_section(rows: pd.DataFrame, cells: list[str]) -> Section:
    s = Section("coclient", "4e. T5: the curious co-client")
    table = coclient_table(rows, cells)
    if table.empty:
        s.blocks.append(Para(f"T5: {NOT_MEASURED} (no system cell with T5 attacks, or none with a server and two "
                             "clients)."))
        return s
    body = [[txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), count(r["handoffs"]), num(r["extraction"]),
             txt(r["extraction_by"] or "—"), num(r["extraction_abs"]), txt(r["extraction_abs_by"] or "—"),
             num(r["auc"]), txt(r["auc_by"] or "—")] for _, r in table.iterrows()]
    s.blocks.append(Table(["cell", "defense", "cut ratio", "hand-offs per co-client", "worst extraction",
                           "finisher / co-client:victim", "absolute-threshold rate", "finisher / target",
                           "worst T5 AUC", "attack / target"], body, id="coclient-table"))
    s.blocks.append(Para(
        "An honest-but-curious client j receives as many server hand-offs as it asks for (never a payload, the "
        "server's weights or another client's model) and targets every other client's member images. Extraction: "
        "the share of a victim's images that one of j's finished hand-offs extracts by Carlini et al. 2023's "
        "relative criterion (50 nearest training images, α = 0.5) against the server's whole training set; "
        "handoff-chain finishes the hand-offs with j's own client chain, handoff-tweedie with one Tweedie step of "
        "the attacker's denoiser (trained on the public auxiliary split). Targets coclient_<j> pool every victim, "
        "coclient_<j>:client_<k> is one victim. Membership: handoff-nn (distance to the nearest finished hand-off) "
        "and handoff-lr (the likelihood of the raw hand-offs), other clients' members against held-out images."))
    return s
