"""Section 1a of the report: what every trained system draws, and whether its server's hand-off is a payload.

People look at the samples before they read a number (issue 19: a PASS once recommended a setting whose
samples were saturated noise), so the grids come right after the verdict: one per trained system, the
baselines (central c = 0, local-only c = 1) among them, each captioned with its pooled utility and the
hand-off check of :mod:`collafuse.benchmarks.audit.handoff`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from collafuse.jsonio import decode_number as to_float

from collafuse.benchmarks.audit.handoff import MAX_C2ST_AUC, STD_TOLERANCE
from collafuse.benchmarks.audit.meta import CellEntry

from .analysis import NOT_MEASURED, format_value, measured
from .document import Artifact, Gallery, Para, Section, Table, TableCell, num, read_png, txt

UTILITY_SHOWN = ("accuracy", "fid", "kid", "precision", "recall")


def _value(rows: pd.DataFrame, cell: str, threat: str, target: str, metric: str) -> pd.Series | None:
    sel = measured(rows[(rows["cell"] == cell) & (rows["threat"] == threat) & (rows["target"] == target)
                        & (rows["metric"] == metric)])
    return None if sel.empty else sel.iloc[0]


def _handoff_words(rows: pd.DataFrame, cell: str) -> tuple[str, bool | None]:
    """A phrase on the hand-off check of ``cell`` and whether it flags the system (None: not measured)."""
    flag = _value(rows, cell, "sampling", "handoff", "handoff_off_distribution")
    if flag is None:
        return "no hand-off (one party runs the whole chain)", None
    auc = _value(rows, cell, "sampling", "handoff", "handoff_auc")
    ratio = _value(rows, cell, "sampling", "handoff", "handoff_std_ratio")
    auc_v, ratio_v = to_float(auc["value"] if auc is not None else None), to_float(ratio["value"] if ratio is not None else None)
    facts = f"classifier AUC {format_value(auc_v)} against its payloads, std ratio {format_value(ratio_v)}"
    if not to_float(flag["value"]) > 0:
        return f"hand-off payload-like ({facts})", False
    causes = []
    if abs(ratio_v - 1.0) > STD_TOLERANCE:
        causes.append("its spread is off, the signature of a broken sampler")
    if auc_v > MAX_C2ST_AUC:
        causes.append("a classifier tells hand-offs from payloads (the sampler, or the server model's quality "
                      "where the payload still carries much of the image)")
    return f"hand-off OFF-DISTRIBUTION ({facts}): {'; '.join(causes)}", True


def _caption(rows: pd.DataFrame, cell: str, info: CellEntry) -> str:
    utility = []
    for metric in UTILITY_SHOWN:
        v = _value(rows, cell, "utility", "pooled", metric)
        if v is not None:
            utility.append(f"{metric} {format_value(v['value'])}")
    baseline = f" [{info.baseline} baseline]" if info.baseline else ""
    words, _ = _handoff_words(rows, cell)
    return (f"{cell}{baseline} — one row per client. Pooled: {', '.join(utility) if utility else NOT_MEASURED}. "
            f"{words[0].upper()}{words[1:]}.")


def samples_section(audit_dir: Path, rows: pd.DataFrame, meta_cells: dict[str, CellEntry], cells: list[str]) -> Section:
    s = Section("samples", "1a. Samples of every trained system, and the server's hand-off")
    gallery = Gallery([], "Collaborative samples (labels cycle through the classes, so columns line up by class), "
                          "finished by each client from the server's hand-off.")
    flagged = []
    for cell in cells:
        info = meta_cells.get(cell)
        png = read_png(audit_dir, info.artifacts.samples if info is not None else None)
        if png is None:
            continue
        gallery.items.append(Artifact(str(info.artifacts.samples), png, _caption(rows, cell, info), wide=True))
        if _handoff_words(rows, cell)[1]:
            flagged.append(cell)
    if gallery.items:
        s.blocks.append(gallery)
    else:
        s.blocks.append(Para(f"Samples: {NOT_MEASURED} (no trained system drew any)."))
    table = _handoff_table(rows, cells)
    if table is not None:
        s.blocks.append(table)
        s.blocks.append(Para(
            "Hand-off check (DESIGN §2.3): the server's hand-offs x̂_{t_c} against the payloads it trained on "
            "(its transcript at the hand-off step), by their moments and a classifier two-sample test "
            "(cross-validated AUC of telling them apart, with its permutation p-value), drawn without guidance. "
            f"A system is flagged off-distribution when that AUC exceeds {MAX_C2ST_AUC:g} or the standard "
            f"deviations differ by more than {STD_TOLERANCE:.0%}."))
    for cell in flagged:
        s.blocks.append(Para(f"{cell}: {_handoff_words(rows, cell)[0]}. Its clients finish tensors unlike the payloads "
                             "they were trained against, so its samples, utility and T4 results describe this "
                             "sampling chain as deployed.", "warn"))
    return s


def _handoff_table(rows: pd.DataFrame, cells: list[str]) -> Table | None:
    sub = rows[(rows["threat"] == "sampling") & (rows["target"] == "handoff")]
    if sub.empty:
        return None
    out = []
    for cell in cells:
        mine = sub[sub["cell"] == cell]
        if mine.empty:
            continue
        get = {m: g.iloc[0] for m, g in mine.groupby("metric")}

        def val(metric: str) -> float | None:
            return get[metric]["value"] if metric in get else None

        auc = get.get("handoff_auc")
        flagged = to_float(val("handoff_off_distribution")) > 0
        interval = (f" [{format_value(auc['ci_low'])}, {format_value(auc['ci_high'])}]"
                    if auc is not None and pd.notna(auc.get("ci_low")) else "")
        out.append([txt(cell), num(val("handoff_server_steps")), num(val("handoff_mean")), num(val("payload_mean")),
                    num(val("handoff_std")), num(val("payload_std")),
                    TableCell(format_value(val("handoff_auc")) + interval, to_float(val("handoff_auc")), "num"),
                    num(val("handoff_p_value")),
                    TableCell("off-distribution" if flagged else "payload-like", None, "fail" if flagged else "pass")])
    return Table(["cell", "server steps", "hand-off mean", "payload mean", "hand-off std", "payload std",
                  "classifier AUC [95 %]", "permutation p", "verdict"], out, id="handoff-table")
