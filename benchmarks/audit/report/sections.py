"""The report's content: :func:`build_sections` turns the audit's rows and metadata into the ten sections
(and 4a / 4b, the membership detail of :mod:`.membership`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from collafuse.jsonio import decode_number as to_float
from collafuse.threats import THREAT_IDS
from collafuse.tradeoff import Ceiling

from collafuse.benchmarks.audit import plots
from collafuse.benchmarks.audit.meta import AuditMeta, CellEntry
from collafuse.benchmarks.audit.verdict import Recommendation

from .analysis import (FORMAL_FOR_THREAT, HEADLINE, NOT_MEASURED, best_per_cell, cell_order, coverage_matrix,
                       format_value, formal_table, frontier_table, measured, ordered, worst_leakage)
from .document import (Artifact, Figure, Gallery, Para, Pre, Section, Table, TableCell, VerdictBox, num, read_png,
                       status_cell, txt, verdict_cell)
from .controls import controls_section, per_class_section
from .membership import membership_detail_section, training_length_section
from .samples import samples_section
from .coclient import coclient_section

MAX_RECONSTRUCTIONS = 8
# The threats whose headline is a model's membership AUC (T1 is judged by re-identification first).
MODEL_THREATS = tuple(t for t in THREAT_IDS if t != "T1")
TITLE = "collafuse audit report"


def _verdict_section(meta: AuditMeta, total: int) -> Section:
    v = meta.verdict
    blocks: list = [VerdictBox(v.status, v.text or "The audit recorded no verdict.", list(v.passing_cells), total,
                               v.recommendation)]
    for error in v.errors:
        blocks.append(Para(error, "warn"))
    if v.threats:
        body = [[txt(t.threat), status_cell(t.status), txt(t.cell or "—"), txt(t.metric or "—"), num(t.observed),
                 txt(f"{t.attack} / {t.target}" if t.attack else "—"), txt(t.note or "")] for t in v.threats]
        blocks.append(Table(["threat", "verdict", "decided in cell", "metric", "worst value", "attack / target", "note"],
                            body, id="threat-verdicts-table"))
        blocks.append(Para("Per threat: PASS where some fully audited setting meets every limit of the threat (the "
                           "recommended one first), INCONCLUSIVE where none fails them but the model-blind control "
                           "tells members from non-members without the model (its AUC above the policy's blind_auc, "
                           "p < 0.01 over the threat's targets: the attacks' numbers are then not evidence about the model), FAIL otherwise. "
                           "The attack and target named reached the worst value in that cell."))
    if meta.quick:
        blocks.append(Para("Quick audit: a tiny recipe for CI and a first look; its numbers are not the default grid's.", "warn"))
    return Section("summary", "1. Verdict", blocks)


def _leakage_curve_section(rows: pd.DataFrame, worst: pd.DataFrame, defenses: list[str]) -> Section:
    s = Section("leakage-vs-cut", "2. Leakage vs cut ratio, per defense")
    reid = best_per_cell(rows, "T1", "reid_pool")
    psnr = best_per_cell(rows, "T1", "psnr")
    member = worst[(worst["kind"] == "system") & worst["threat"].isin(MODEL_THREATS) & (worst["metric"] == "auc")]
    member = measured(member)
    if not member.empty:
        member = member.loc[member.groupby("cell", sort=False)["value"].idxmax()]
    png = plots.leakage_vs_cut(reid, psnr, member, defenses)
    if png is None:
        s.blocks.append(Para(f"Leakage vs cut ratio: {NOT_MEASURED} (no T1 reconstruction or membership rows)."))
        return s
    s.blocks.append(Figure("leakage_vs_cut.png", png,
                           "T1 re-identification (within the candidate pool) and PSNR of the best reconstruction attack "
                           "of each cell, and the worst membership AUC of T2–T5 for trained systems, against the cut "
                           "ratio. Solid: trained systems; dashed: payload-only cells. Bands: the rows' intervals "
                           "(or the spread over seeds)."))
    return s


def _inverted_lines(rows: pd.DataFrame) -> list[str]:
    """One line per (cell, target, attack) flagged ``inverted`` (AUC significantly below 0.5)."""
    if "metric" not in rows or "attack" not in rows:
        return []
    flagged = rows[(rows["metric"] == "inverted") & (rows["value"] == 1.0)]
    lines = []
    for _, r in flagged.iterrows():
        auc = rows[(rows["cell"] == r["cell"]) & (rows["target"] == r["target"]) & (rows["attack"] == r["attack"])
                   & (rows["metric"] == "auc")]
        shown = format_value(auc["value"].iloc[0]) if not auc.empty else NOT_MEASURED
        lines.append(f"{r['cell']}: {r['threat']} {r['target']}/{r['attack']} — signal found, reversed (AUC {shown}, "
                     "significantly below 0.5). The worst case above does not flip it with the labels; a calibrated "
                     "attack (lira, rmia) learns the direction from its reference models.")
    return lines


def _heatmap_section(worst: pd.DataFrame, defenses: list[str], rows_all: pd.DataFrame | None = None) -> Section:
    s = Section("heatmaps", "3. Worst-case leakage: cut ratio × defense")
    gallery = Gallery([], "Each panel: the largest value of the threat's headline metric over every attack, target, "
                          "seed and cell kind, per cut ratio and defense (blank: not measured).")
    for threat in THREAT_IDS:
        sub = measured(worst[worst["threat"] == threat])
        if sub.empty:
            continue
        metric = sub["metric"].iloc[0] if sub["metric"].nunique() == 1 else "/".join(ordered(sub["metric"], HEADLINE[threat]))
        table = sub.pivot_table(index="defense", columns="cut_ratio", values="value", aggfunc="max")
        table = table.reindex([d for d in defenses if d in table.index])
        png = plots.heatmap(table, f"{threat}: worst {metric}", metric)
        if png is not None:
            gallery.items.append(Figure(f"heatmap_{threat}.png", png, f"{threat}: worst {metric} per cut ratio and defense"))
    if gallery.items:
        s.blocks.append(gallery)
    else:
        s.blocks.append(Para(f"Heatmaps: {NOT_MEASURED} (no T1–T5 leakage rows)."))
    rows = []
    for _, r in worst.iterrows():
        rows.append([txt(r["cell"]), txt(r["kind"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]),
                     txt(r["metric"]), num(r["value"]),
                     txt(f"[{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]" if pd.notna(r["ci_low"])
                         or pd.notna(r["ci_high"]) else "—"),
                     txt(r["attack"] or "—"), txt(r["target"] or "—")])
    s.blocks.append(Para("Worst-case leakage per cell and threat: the largest value of the threat's headline metric "
                         "(T1: reid_pool, or auc where a cell has no re-identification; T2–T5: auc) over every attack "
                         "and target, with the attack and target that reached it."))
    if rows:
        s.blocks.append(Table(["cell", "kind", "defense", "cut ratio", "threat", "metric", "worst value", "interval",
                               "attack", "target"], rows, id="leakage-table"))
    else:
        s.blocks.append(Table(["cell", "threat", "worst value"], [[txt("—"), txt("—"), TableCell(NOT_MEASURED, None, "nm")]],
                              id="leakage-table"))
    if rows_all is not None:
        s.blocks.extend(Para(line) for line in _inverted_lines(rows_all))
    return s


def _roc_section(audit_dir: Path, rows: pd.DataFrame, worst: pd.DataFrame, meta_cells: dict[str, CellEntry],
                 cells: list[str]) -> Section:
    s = Section("roc", "4. Membership ROC curves")
    candidates, unreadable = [], []
    for cell in cells:
        info = meta_cells.get(cell)
        rel = info.artifacts.roc if info is not None else None
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
        # roc.json: {"targets": target → attack → curve, "ceilings": threat → guarantee}; older audits: the targets alone
        ceilings = _read_ceilings(data.get("ceilings")) if "targets" in data else []
        data = data.get("targets") if "targets" in data else data
        if not isinstance(data, dict):
            unreadable.append(cell)
            continue
        for target, by_attack in data.items():
            if not isinstance(by_attack, dict):
                continue
            for attack, curve in by_attack.items():
                if not isinstance(curve, dict) or not curve.get("fpr") or not curve.get("tpr"):
                    continue
                hit = measured(group[(group["target"] == str(target)) & (group["attack"] == str(attack))])
                auc = hit["value"].iloc[0] if not hit.empty else to_float(curve.get("auc"))
                fpr = [to_float(x) for x in curve["fpr"]]
                tpr = [to_float(x) for x in curve["tpr"]]
                if len(fpr) != len(tpr):
                    continue
                curves.append((f"{target}/{attack} (AUC {format_value(auc)})", fpr, tpr, -auc if not math.isnan(auc) else 0.0))
        if curves:
            curves.sort(key=lambda c: c[3])
            w = measured(worst[worst["cell"] == cell])
            candidates.append({"cell": cell, "defense": info.defense, "score": float(w["value"].max()) if not w.empty else 0.0,
                               "title": cell, "curves": [c[:3] for c in curves], "ceilings": ceilings})
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
                               f"strongest first. Black dash-dot: the formal ceiling of each threat with a finite "
                               f"guarantee, TPR ≤ Φ(Φ⁻¹(FPR) + μ) for the payload channel's Gaussian μ and the (ε, δ) "
                               f"region for DP-SGD's accountant; no attack can lie above it, and one that does beyond "
                               f"its error is flagged as an error of the audit (roc_above_ceiling).{more}"))
    return s


def _read_ceilings(raw) -> list[tuple[str, Ceiling]]:
    """(label, ceiling) for each threat's finite guarantee in a cell's roc.json (malformed entries are skipped)."""
    out = []
    for threat, c in (raw or {}).items() if isinstance(raw, dict) else ():
        if not isinstance(c, dict):
            continue
        eps, delta, mu = to_float(c.get("epsilon")), to_float(c.get("delta")), c.get("mu")
        mu = None if mu is None else to_float(mu)
        if math.isnan(eps) or math.isnan(delta) or (mu is not None and math.isnan(mu)):
            continue
        ceiling = Ceiling(eps, delta, mu)
        if ceiling.finite:
            out.append((f"ceiling {threat} (ε {format_value(eps)}" + (f", μ {format_value(mu)})" if mu is not None else ")"),
                        ceiling))
    return out


def _frontier_section(front: pd.DataFrame, rec: Recommendation | None, cost_metric: str = "client_gflops_sample",
                      meta_cells: dict[str, CellEntry] | None = None) -> Section:
    s = Section("frontier", "5. Privacy–utility–compute frontier")
    if front.empty:
        s.blocks.append(Para(f"Frontier: {NOT_MEASURED} (no trained system cells)."))
        return s
    png = plots.frontier(front, rec.cell if rec else None, xlabel=f"client cost: {cost_metric} (what the recommendation minimises)")
    if png is not None:
        s.blocks.append(Figure("frontier.png", png,
                               "Each trained system: client compute (x) against its worst leakage (y); colour is the "
                               "utility (classifier accuracy on generated samples, or FID); ● passes the policy, ✕ fails; "
                               "the recommended setting is ringed in red."))
    else:
        s.blocks.append(Para(f"Frontier plot: {NOT_MEASURED} (no cell has both a client cost and a leakage value)."))
    baselines = {cell: info.baseline or "" for cell, info in (meta_cells or {}).items()}
    rows = [[txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(baselines.get(r["cell"], "")),
             num(r["gflops_train"]), num(r["gflops_sample"]),
             num(r["payload_bytes"]), num(r["worst_auc"]), num(r["worst_reid"]), num(r["accuracy"]), num(r["fid"]),
             verdict_cell(r["passed"])] for _, r in front.iterrows()]
    s.blocks.append(Table(["cell", "defense", "cut ratio", "baseline", "client GFLOPs train / image·epoch",
                           "client GFLOPs sampling", "payload bytes / image·epoch", "worst membership AUC",
                           "worst T1 reid_pool", "accuracy", "FID", "policy"], rows, id="frontier-table"))
    if any(baselines.values()):
        s.blocks.append(Para("Baselines (DESIGN §2.4): local-only = every client trains alone (c = 1, nothing crosses "
                             "to a server); central = the server trains on the raw images (c = 0). The verdict compares "
                             "the recommended setting with local-only training."))
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
        # Both lower bounds (threshold ε_LB and one-run ε_LB) must lie below the formal ε.
        lower = max((v for v in (r["empirical"], r["one_run"]) if not math.isnan(v)), default=math.nan)
        if math.isnan(lower) or len(r["formal_metrics"]) != len(FORMAL_FOR_THREAT[r["threat"]]):
            check = "—"
        elif len(r["formal_values"]) == 1:
            check = "consistent" if lower <= r["formal_values"][0] else "VIOLATED: lower bound above the formal ε"
        elif any(math.isinf(v) for v in r["formal_values"]):
            check = "consistent"
        else:
            check = "consistent" if lower <= sum(r["formal_values"]) else "VIOLATED: above the composed bound"
        one_run = (f"{format_value(r['one_run'])} ({r['one_run_target']}/{r['one_run_attack']})"
                   if not math.isnan(r["one_run"]) else "—")
        rows.append([txt(r["cell"]), txt(r["defense"]), num(r["cut_ratio"]), txt(r["threat"]),
                     TableCell(formal_text, r["formal_values"][0] if len(r["formal_values"]) == 1 else None,
                          "nm" if formal_text == NOT_MEASURED else ""),
                     num(r["empirical"]), txt(r["attack"] or "—"), txt(r["target"] or "—"),
                     TableCell(one_run, None if math.isnan(r["one_run"]) else float(r["one_run"]), ""),
                     txt(check, "fail" if check.startswith("VIOLATED") else "")])
    s.blocks.append(Table(["cell", "defense", "cut ratio", "threat", "formal ε (upper bound)", "largest empirical ε_LB",
                           "attack", "target", "one-run ε_LB (target/attack)", "check"], rows, id="epsilon-table"))
    s.blocks.append(Para("∞: no formal bound exists for this channel (e.g. no DP-SGD on that model, or payloads without "
                         "noise or clipping). Empirical ε_LB values are Clopper–Pearson lower bounds maximised over "
                         "thresholds (multiple testing makes them slightly optimistic). One-run ε_LB: the audit of Steinke, Nasr & "
                         "Jagielski (2023, arXiv 2305.08846) on the run's canaries (run config canaries: {count: M}), "
                         "at 95 % confidence; — where the run has no canaries."))
    return s


def _reconstruction_section(audit_dir: Path, rows: pd.DataFrame, meta_cells: dict[str, CellEntry], cells: list[str],
                            defenses: list[str]) -> Section:
    s = Section("reconstructions", "7. Example reconstructions beside the originals")
    candidates = []
    for cell in cells:
        info = meta_cells.get(cell)
        png = read_png(audit_dir, info.artifacts.reconstructions if info is not None else None)
        if png is not None:
            candidates.append((cell, info, info.artifacts.reconstructions, png, list(info.artifacts.reconstruction_rows)))
    if not candidates:
        s.blocks.append(Para(f"Reconstructions: {NOT_MEASURED} (no reconstruction artifacts)."))
        return s
    chosen = []
    by_defense: dict[str, list] = {}
    for c in candidates:
        by_defense.setdefault(c[1].defense, []).append(c)
    for d in ordered(by_defense, defenses):   # per defense: the leakiest (lowest cut) and the safest cell
        group = sorted(by_defense[d], key=lambda c: (c[1].cut_ratio, c[1].kind))
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


SENDER_ID = "sender-id"  # collafuse.attacks.linkage.sender.NAME (the report reads rows, not the attack)


def _sender_lines(rows: pd.DataFrame) -> list[str]:
    """One plain sentence per defense setting: does the server know who sent each payload? (the worst cell)"""
    sub = rows[(rows["attack"] == SENDER_ID) & (rows["threat"] == "T1")] if len(rows) else rows
    lines = []
    for defense in ordered(str(d) for d in sub["defense"]):
        mine = sub[sub["defense"].astype(str) == defense]
        acc = measured(mine[mine["metric"] == "sender_accuracy"])
        if acc.empty:
            continue
        worst = acc.loc[acc["value"].idxmax()]
        chance = mine[(mine["metric"] == "sender_chance") & (mine["cell"] == worst["cell"])]["value"]
        if chance.empty:
            continue
        p, lo, hi, c = (float(worst["value"]), to_float(worst["ci_low"]), to_float(worst["ci_high"]),
                        float(chance.iloc[0]))
        bounded = not (math.isnan(lo) or math.isnan(hi))
        at_chance = bounded and lo <= c <= hi
        if at_chance:
            what = "at chance: the server cannot tell which client sent a payload"
        elif p >= 0.99:
            what = "the server knows who sent every payload"
        else:
            what = "the payloads reveal their sender (above chance)"
        interval = f" [{lo:.2f}, {hi:.2f}]" if bounded else ""
        lines.append(f"Sender identification ({defense}): accuracy {p:.2f}{interval} (chance {c:.2f}): {what}.")
    if lines:
        lines.append("Sender identification reads every field of the server view and the order of arrival; accuracy "
                     "is scored under the best relabelling of predicted senders to clients (Hungarian), with a 95 % "
                     "Wilson interval. minimize:id-free is credited for T1 only where it is at chance.")
    return lines


def _coverage_section(meta: AuditMeta, results: pd.DataFrame | None = None) -> Section:
    s = Section("coverage", "8. Threat × defense coverage")
    defenses, threats, cells = coverage_matrix(meta.coverage)
    if not defenses:
        s.blocks.append(Para(f"Coverage map: {NOT_MEASURED} (audit.json has none)."))
    else:
        rows = []
        for d in defenses:
            row = [txt(d)]
            for t in threats:
                covered, how = cells.get((d, t), (False, ""))
                if covered:
                    row.append(TableCell("covered" + (f": {how}" if how else ""), None, "pass"))
                else:
                    row.append(TableCell("uncovered", None, "fail"))
            rows.append(row)
        s.blocks.append(Table(["defense setting", *threats], rows, id="coverage-table"))
    notes = ["T1: curious server reading the payloads; T2: white-box server model; T3: white-box client model; "
             "T4: generated images only; T5: curious co-client (the server's hand-offs, against the other clients' "
             "images).",
             # Said whatever the grid holds (the report does not branch on defense names): it is what a reader
             # most often gets wrong about DP-SGD in split learning.
             "DP-SGD protects the trained models (T2, T3; T4 only when every model in the sampling chain is "
             "private; T5 when it is on the server), not the payloads: it never covers T1.",
             "T5 is covered by what changes what the server learns (DP-SGD on the server, payload noise, payload "
             "clipping), never by what only changes what crosses (minimize)."]
    if results is not None and "attack" in results:
        notes.extend(_sender_lines(results))
    s.blocks.extend(Para(n) for n in notes)
    return s


def _checks_section(meta: AuditMeta) -> Section:
    s = Section("checks", "9. Policy checks per cell")
    if not meta.evaluations:
        s.blocks.append(Para(f"Policy checks: {NOT_MEASURED} (audit.json has no evaluations)."))
        return s
    summary, detail = [], []
    for e in meta.evaluations:
        failed = sum(1 for c in e.checks if c.passed is False)
        unmeasured = sum(1 for c in e.checks if c.passed is None and not c.inconclusive)
        summary.append([txt(e.cell), status_cell("inconclusive") if e.inconclusive else verdict_cell(e.passed),
                        txt("yes" if e.complete else "no", "" if e.complete else "warn"),
                        TableCell(str(len(e.checks)), float(len(e.checks)), "num"),
                        TableCell(str(failed), float(failed), "num"),
                        TableCell(str(unmeasured), float(unmeasured), "num")])
        for c in e.checks:
            op = {"max": "≤", "min": "≥"}.get(c.op, c.op)
            detail.append([txt(e.cell), txt(c.threat), txt(c.metric),
                           TableCell(f"{op} {format_value(c.limit)}", c.limit, "num"),
                           num(c.observed), txt(c.attack or "—"), txt(c.target or "—"), status_cell(c.status)])
    s.blocks.append(Table(["cell", "pass", "complete", "checks", "failed", "not measured"], summary, id="cells-table"))
    if detail:
        s.blocks.append(Table(["cell", "threat", "metric", "limit", "observed (worst)", "attack", "target", "pass"],
                              detail, id="checks-table"))
    return s


def sweep_text(meta: AuditMeta) -> str:
    if meta.sweep.computed is None:
        return "cells: not recorded"
    return f"{meta.sweep.computed} cells computed, {meta.sweep.reused} reused from an earlier sweep"


def _config_section(meta: AuditMeta) -> Section:
    s = Section("configuration", "10. Exact configuration")
    facts = [
        ["collafuse version", txt(meta.collafuse_version)],
        ["started", txt(meta.started)],
        ["wall time of this invocation (s)", num(meta.wall_seconds)],
        ["cell compute time, summed over cells (s)", num(meta.compute_seconds)],
        ["cells computed / reused", txt(sweep_text(meta))],
        ["quick", txt("yes" if meta.quick else "no")],
    ]
    s.blocks.append(Table(["", "value"], [[txt(k), v] for k, v in facts], id="run-table"))
    if meta.versions:
        s.blocks.append(Table(["package", "version"], [[txt(k), txt(v)] for k, v in sorted(meta.versions.items())],
                              id="versions-table"))
    if meta.cells:
        rows = [[txt(c.cell), txt(c.config_hash), txt(c.kind), txt(c.dataset), num(c.cut_ratio), txt(c.t_c),
                 txt(c.defense), txt(c.payload_kind), txt(c.epochs), txt(c.seed), num(c.seconds)] for c in meta.cells]
        s.blocks.append(Table(["cell", "config hash", "kind", "dataset", "cut ratio", "t_c", "defense", "payload kind",
                               "epochs", "seed", "seconds"], rows, id="cells-config-table"))
    s.blocks.append(Para("Grid (grid_yaml):"))
    s.blocks.append(Pre(meta.grid_yaml or "(not recorded)", "yaml"))
    s.blocks.append(Para("Policy (policy_yaml):"))
    s.blocks.append(Pre(meta.policy_yaml or "(not recorded)", "yaml"))
    return s


def build_sections(audit_dir: Path, rows: pd.DataFrame, meta: AuditMeta) -> list[Section]:
    """The report's content, in order, independent of the output format."""
    cells = cell_order(rows, meta)
    meta_cells = {c.cell: c for c in meta.cells if c.cell}
    defenses = [str(d) for d in ordered([*(c.defense for c in meta_cells.values()), *rows["defense"]])]
    worst = worst_leakage(rows, cells)
    evaluations = {e.cell: e for e in meta.evaluations}
    rec = meta.verdict.recommendation
    return [
        _verdict_section(meta, len(cells)),
        samples_section(audit_dir, rows, meta_cells, cells),
        _leakage_curve_section(rows, worst, defenses),
        _heatmap_section(worst, defenses, rows),
        _roc_section(audit_dir, rows, worst, meta_cells, cells),
        membership_detail_section(rows, cells, defenses),
        training_length_section(rows),
        controls_section(rows, cells),
        per_class_section(audit_dir, rows, meta, cells),
        coclient_section(rows, cells),
        _frontier_section(frontier_table(rows, worst, evaluations, cells, meta.cost_metric), rec, meta.cost_metric,
                          meta_cells),
        _formal_section(formal_table(rows, cells)),
        _reconstruction_section(audit_dir, rows, meta_cells, cells, defenses),
        _coverage_section(meta, rows),
        _checks_section(meta),
        _config_section(meta),
    ]


def subtitle(meta: AuditMeta) -> str:
    """The line under the page title: version, start, wall time, cells computed/reused, quick."""
    return (f"collafuse {meta.collafuse_version} · started {meta.started} · "
            f"wall time {format_value(meta.wall_seconds)} s ({sweep_text(meta)})" + (" · quick" if meta.quick else ""))
