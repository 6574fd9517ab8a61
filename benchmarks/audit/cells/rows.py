"""Result rows of a cell: one small adapter per typed result (DESIGN §7's tidy table).

A row is ``(threat, target, attack, metric, value, ci_low, ci_high)`` (plus ``t`` / ``epoch`` on curve
points). Every metric name is checked against the one vocabulary (:mod:`collafuse.metrics`): an unknown
name, or a metric under a group it does not belong to, raises at once. Numbers are stored as JSON holds
them later (:mod:`collafuse.jsonio`): a value of ±∞ stays ∞ (ε with no bound); an interval end that is
not finite, or absent, is None (no finite interval was computed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from sklearn.metrics import roc_curve

from collafuse.metrics import at_epoch, metric

from collafuse.attacks.linkage.sender import NAME as SENDER_ID, SenderIdentification
from collafuse.attacks.membership.controls import BLIND_AUC_WARNING, BlindControl
from collafuse.attacks.membership.dataset_inference import NAME as DATASET_INFERENCE, DatasetInference
from collafuse.attacks.membership.engine import AttackOutcome, MembershipResult
from collafuse.attacks.membership.source import NAME as SOURCE_INFERENCE, SourceInference
from collafuse.attacks.membership.nn_distance import Extraction
from collafuse.attacks.membership.coclient import CoClientExtraction
from collafuse.attacks.reconstruction.evaluate import ViewEvaluation
from collafuse.attacks.stats import Interval

from collafuse.benchmarks.audit.handoff import HandoffCheck
from collafuse.benchmarks.audit.trend import Trend

ROC_POINTS = 200  # ROC curves are thinned to about this many points for the report
BLIND = "blind"   # the attack column of the model-blind baseline's rows


@dataclass
class CellOutput:
    rows: list[dict[str, Any]]
    artifacts: dict[str, bytes] = field(default_factory=dict)   # file name → content (written by the runner)
    info: dict[str, Any] = field(default_factory=dict)          # not part of the results table (timings, paths)


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def row(threat: str, target: str, attack: str, name: str, value: Any, low: Any = None, high: Any = None,
        **axis: int) -> dict[str, Any]:
    """One results row; ``name`` must be a metric of group ``threat`` in the vocabulary, and ``axis`` its curve
    column (``t`` or ``epoch``) when it has one."""
    spec = metric(name)
    if threat not in spec.groups:
        raise ValueError(f"metric {name!r} does not belong to {threat!r} (it is a metric of {', '.join(spec.groups)})")
    if set(axis) != ({spec.axis} if spec.axis else set()):
        raise ValueError(f"metric {name!r} needs the axis {spec.axis!r}, got {sorted(axis)}")
    out = {"threat": threat, "target": target, "attack": attack, "metric": name,
           "value": _number(value), "ci_low": _number(low), "ci_high": _number(high)}
    out.update({k: int(v) for k, v in axis.items()})
    return out


def interval_row(threat: str, target: str, attack: str, name: str, iv: Interval) -> dict[str, Any]:
    """A row from an :class:`~collafuse.attacks.stats.Interval` (its non-finite ends stored as None)."""
    return row(threat, target, attack, name, iv.value, *iv.finite_bounds())


# -- T1 --------------------------------------------------------------------------------------

def reconstruction_rows(ev: ViewEvaluation, seed: int) -> list[dict[str, Any]]:
    """Pooled metrics of every attack (and the scorer-side upper bounds) of one evaluated view."""
    rows = []
    for attack, sc in ev.scores.items():
        for name, iv in sc.summary(seed=seed).items():
            rows.append(interval_row("T1", "payload", attack, name, iv))
        linkage = ev.extra.get(attack, {}).get("linkage_accuracy")
        if linkage is not None:
            rows.append(row("T1", "payload", attack, "linkage_accuracy", linkage))
    label = ev.payload_label_summary(seed=seed)
    if label is not None:
        rows.append(interval_row("T1", "payload", "payload-label", "label", label))
    return rows


def sender_rows(score: SenderIdentification) -> list[dict[str, Any]]:
    """T1 sender identification (DESIGN §5 (d)): accuracy (Wilson 95 %, best relabelling) and chance = 1/N."""
    return [interval_row("T1", "payload", SENDER_ID, "sender_accuracy", score.accuracy),
            row("T1", "payload", SENDER_ID, "sender_chance", score.chance)]


def payload_count_row(n: int) -> dict[str, Any]:
    return row("T1", "payload", "count", "payload_rows", n)


# -- cost, formal ε, hand-off, utility ------------------------------------------------------

def cost_rows(costs: Mapping[str, float]) -> list[dict[str, Any]]:
    return [row("cost", "clients", "count", name, value) for name, value in costs.items()]


def formal_rows(eps_payload: float, eps_clients: float | None, eps_server: float | None) -> list[dict[str, Any]]:
    rows = [row("formal", "payload", "accountant", "epsilon_payload", eps_payload)]
    if eps_clients is not None:
        rows.append(row("formal", "clients", "accountant", "epsilon_model_clients", eps_clients))
    if eps_server is not None:
        rows.append(row("formal", "server", "accountant", "epsilon_model_server", eps_server))
    return rows


def handoff_rows(check: HandoffCheck | None) -> list[dict[str, Any]]:
    """The hand-off check as rows (group ``sampling``, target ``handoff``)."""
    if check is None:
        return []
    return [
        row("sampling", "handoff", "c2st", "handoff_auc", check.c2st_auc, check.c2st_low, check.c2st_high),
        row("sampling", "handoff", "c2st", "handoff_p_value", check.c2st_p_value),
        row("sampling", "handoff", "moments", "handoff_mean", check.mean),
        row("sampling", "handoff", "moments", "payload_mean", check.payload_mean),
        row("sampling", "handoff", "moments", "handoff_std", check.std),
        row("sampling", "handoff", "moments", "payload_std", check.payload_std),
        row("sampling", "handoff", "moments", "handoff_std_ratio", check.std_ratio),
        row("sampling", "handoff", "moments", "handoff_std_error", check.std_error),
        row("sampling", "handoff", "check", "handoff_off_distribution", float(check.off_distribution)),
        row("sampling", "handoff", "check", "handoff_server_steps", float(check.server_steps)),
    ]


def utility_rows(target: str, scores: Mapping[str, Interval]) -> list[dict[str, Any]]:
    """Sample quality of one target (``samples_<k>`` or ``pooled``) in the evaluation classifier's features."""
    return [interval_row("utility", target, "classifier-features", name, iv) for name, iv in scores.items()]


# -- membership (T1–T4) ---------------------------------------------------------------------

def _headline(outcome: AttackOutcome) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, low, high) of every headline membership metric of one (target, attack) outcome."""
    m = outcome.metrics
    tpr, tpr01 = m.at_fpr(0.01).tpr, m.at_fpr(0.001).tpr
    return [("auc", m.auc.value, m.auc.low, m.auc.high), ("tpr_at_1pct_fpr", tpr.value, tpr.low, tpr.high),
            ("tpr_at_01pct_fpr", tpr01.value, tpr01.low, tpr01.high),
            ("balanced_accuracy", m.balanced_accuracy.value, m.balanced_accuracy.low, m.balanced_accuracy.high),
            ("epsilon_lb", outcome.epsilon_lb, None, None), ("epsilon_gdp", outcome.epsilon_gdp, None, None)]


def outcome_rows(threat: str, key: str, outcome: AttackOutcome) -> list[dict[str, Any]]:
    """Every row of one (target, attack) outcome on the final models, in the table's order: AUC, TPR at 1 %
    FPR, ε_LB, TPR at 0.1 % FPR and whether it was resolved, balanced accuracy, ε_GDP, the ``inverted`` flag
    (AUC significantly below 0.5: flagged, never flipped), the one-run ε_LB where the run has canaries, and
    the AUC per query step."""
    values = {name: (v, lo, hi) for name, v, lo, hi in _headline(outcome)}
    name = outcome.name
    rows = [row(threat, key, name, m, *values[m]) for m in ("auc", "tpr_at_1pct_fpr", "epsilon_lb", "tpr_at_01pct_fpr")]
    rows.append(row(threat, key, name, "tpr_at_01pct_fpr_resolved", float(outcome.metrics.at_fpr(0.001).resolved)))
    rows += [row(threat, key, name, m, *values[m]) for m in ("balanced_accuracy", "epsilon_gdp")]
    rows.append(row(threat, key, name, "inverted", float(outcome.inverted)))
    if outcome.one_run is not None:  # the run config's canaries: the one-run audit's ε lower bound (§4.3)
        rows.append(row(threat, key, name, "one_run_epsilon_lb", outcome.one_run.epsilon_lb))
    rows += control_rows(threat, key, outcome)
    rows += peer_rows(threat, key, outcome)
    rows += [row(threat, key, name, "auc_at_t", auc, t=t) for t, auc in zip(outcome.steps, outcome.step_aucs)]
    return rows


def control_rows(threat: str, key: str, outcome: AttackOutcome) -> list[dict[str, Any]]:
    """The controls of one (target, attack) outcome (DESIGN §4.2): held-out TPR and the FPR reached at the
    thresholds fixed on the calibration half, whether the attack is above the model-blind baseline, and
    whether its ROC lies above the formal ceiling."""
    name, rows = outcome.name, []
    if outcome.heldout is not None:
        for pct, target in (("1pct", 0.01), ("01pct", 0.001)):
            r = outcome.heldout.at(target)
            rows += [interval_row(threat, key, name, f"tpr_at_{pct}_fpr_heldout", r.tpr),
                     interval_row(threat, key, name, f"fpr_at_{pct}_heldout", r.fpr),
                     row(threat, key, name, f"tpr_at_{pct}_fpr_heldout_resolved", float(r.resolved))]
    if outcome.blind is not None:
        rows.append(row(threat, key, name, "above_blind", float(outcome.blind.above)))
    if outcome.ceiling is not None:
        rows.append(row(threat, key, name, "roc_above_ceiling", float(outcome.ceiling.above)))
    return rows


def blind_rows(threat: str, key: str, blind: BlindControl) -> list[dict[str, Any]]:
    """The model-blind baseline of one target's candidates (attack ``blind``): AUC and TPR at 1 % FPR with
    intervals, the permutation p-value of its AUC, and whether it tells the sets apart (:data:`BLIND_AUC_WARNING`)."""
    return [interval_row(threat, key, BLIND, "blind_auc", blind.auc),
            interval_row(threat, key, BLIND, "blind_tpr_at_1pct_fpr", blind.tpr_at_1pct),
            row(threat, key, BLIND, "blind_p_value", blind.p_value),
            row(threat, key, BLIND, "blind_differs", float(blind.exceeds(BLIND_AUC_WARNING)))]


def dataset_rows(threat: str, key: str, own_client: int | None,
                 results: tuple[DatasetInference, ...]) -> list[dict[str, Any]]:
    """Dataset inference of every suspect client of one target (attack ``dataset-inference``, DESIGN §4.2): the
    one-sided p-value, the member images needed for p < 0.01 (∞: not reached) and the sizes tested. The target
    column names the suspect set: the target itself where it is that client's (T3 ``client_k``, T4
    ``samples_k``), else ``<target>/client_<k>`` (T2: the server tested on each client's images)."""
    rows = []
    for d in results:
        target = key if own_client == d.client else f"{key}/client_{d.client}"
        rows += [row(threat, target, DATASET_INFERENCE, "dataset_p", d.p_value),
                 row(threat, target, DATASET_INFERENCE, "dataset_members_needed", d.members_needed),
                 row(threat, target, DATASET_INFERENCE, "dataset_members", d.n_members),
                 row(threat, target, DATASET_INFERENCE, "dataset_heldout", d.n_heldout)]
    return rows


def trend_rows(trends: tuple[Trend, ...]) -> list[dict[str, Any]]:
    """Leakage against training length per threat (:mod:`~collafuse.benchmarks.audit.trend`): the slope of the worst
    AUC per epoch between the last two measured epochs with its 95 % interval, the earlier epoch, and whether it
    was still rising at the last epoch; target and attack: the worst at the last epoch."""
    rows = []
    for t in trends:
        where = (t.threat, t.end.target, t.end.attack)
        rows += [row(*where, "auc_epoch_slope", t.slope, t.low, t.high),
                 row(*where, "auc_trend_start_epoch", t.start.epoch),
                 row(*where, "auc_still_rising", float(t.rising))]
    return rows


def snapshot_rows(threat: str, key: str, outcome: AttackOutcome, epoch: int) -> list[dict[str, Any]]:
    """Every headline metric of one attack on a snapshot model: ``<metric>_at_epoch`` with its epoch (apart from
    the final models' rows, so a policy and the worst-case tables judge the released models)."""
    return [row(threat, key, outcome.name, at_epoch(name), v, lo, hi, epoch=epoch)
            for name, v, lo, hi in _headline(outcome)]


def extraction_rows(key: str, ext: Extraction) -> list[dict[str, Any]]:
    """Extraction of a client's images by its samples, beside nn-distance (T4): Carlini et al. 2023's relative
    criterion (``extraction``) and the absolute-threshold rate under its own name (``extraction_abs``)."""
    return [interval_row("T4", key, "nn-distance", "extraction", ext.rate),
            interval_row("T4", key, "nn-distance", "extraction_abs", ext.absolute)]


def thin_roc(fpr: np.ndarray, tpr: np.ndarray) -> tuple[list[float], list[float]]:
    """An ROC curve thinned to about :data:`ROC_POINTS` points for the report."""
    if fpr.size > ROC_POINTS:
        keep = np.unique(np.r_[0, np.linspace(0, fpr.size - 1, ROC_POINTS).round().astype(int), fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(x), 6) for x in fpr], [round(float(x), 6) for x in tpr]


def roc_curves(result: MembershipResult) -> dict[str, dict[str, dict[str, Any]]]:
    """target → attack → thinned ROC curve and AUC, for every target with attack outcomes."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in result.targets.items():
        if not entry.available or not entry.attacks:
            continue
        out[key] = {}
        for name, outcome in entry.attacks.items():
            labels = np.r_[np.ones(outcome.member_scores.size), np.zeros(outcome.nonmember_scores.size)]
            fpr, tpr, _ = roc_curve(labels, np.r_[outcome.member_scores, outcome.nonmember_scores])
            f, t = thin_roc(fpr, tpr)
            out[key][name] = {"fpr": f, "tpr": t, "auc": outcome.metrics.auc.value, "threat": entry.threat}
    return out


# -- T5 ---------------------------------------------------------------------------------------

def coclient_rows(ext: CoClientExtraction) -> list[dict[str, Any]]:
    """T5 extraction by one co-client's finished hand-offs (attack ``handoff-<finisher>``, DESIGN §4.1's criterion):
    ``extraction`` and ``extraction_abs`` per victim (target ``coclient_<j>:client_<k>``) and pooled over every
    victim (target ``coclient_<j>``)."""
    attack, key = f"handoff-{ext.finisher}", f"coclient_{ext.attacker}"
    rows = []
    for target, e in [(key, ext.others), *((f"{key}:client_{k}", v) for k, v in ext.victims.items())]:
        rows += [interval_row("T5", target, attack, "extraction", e.rate),
                 interval_row("T5", target, attack, "extraction_abs", e.absolute)]
    return rows


def handoffs_row(attacker: int, n: int) -> dict[str, Any]:
    """How many hand-offs co-client ``attacker`` drew (its extraction and membership rows used them)."""
    return row("T5", f"coclient_{attacker}", "count", "handoffs_drawn", n)


# -- issue 25: peer references and source inference (T3) -------------------------------------

def peer_rows(threat: str, key: str, outcome: AttackOutcome) -> list[dict[str, Any]]:
    """What a peer attack (``lira-peers``, ``rmia-peers``) used, from its outcome's details: how many other clients'
    models served as OUT references, and whether the partition is IID (0: label / Dirichlet, or undeclared by an
    imported deployment: the peers then come from another distribution). No row for other attacks."""
    details = outcome.details
    if "peer_models" not in details:
        return []
    return [row(threat, key, outcome.name, "peer_models", details["peer_models"]),
            row(threat, key, outcome.name, "peer_partition_iid", float(bool(details["partition_iid"])))]


def source_rows(score: SourceInference) -> list[dict[str, Any]]:
    """T3 source inference (DESIGN §4.2): accuracy (Wilson 95 %) and chance = 1/N, beside T1's sender identification."""
    return [interval_row("T3", "clients", SOURCE_INFERENCE, "source_accuracy", score.accuracy),
            row("T3", "clients", SOURCE_INFERENCE, "source_chance", score.chance)]
