"""The membership engine: a loaded run in, a typed :class:`MembershipResult` out (DESIGN.md §4.2, §4.3).

Every caller (``collafuse attack membership``, the audit's cells, :mod:`collafuse.api`)
runs membership inference through :func:`run_membership`. It resolves the targets and
the attacks that apply to each, computes each target's signals once, scores every
attack from them and evaluates the scores (AUC, TPR at low FPR, balanced accuracy with
bootstrap intervals, ε lower bounds, the per-step curve). The JSON report is a
serialisation of the result (:meth:`MembershipResult.to_json`); nothing else builds it.

Leakage against training length: a run trained with ``training.snapshots`` kept its models
after those epochs; the model targets (T2 server, T3 clients: :data:`SNAPSHOT_TARGETS`) are
attacked again on each snapshot (:attr:`MembershipResult.snapshots`), with the same candidates
and noise draws. The payload (T1) and sample (T4) targets are measured on the final models only:
the transcript is the whole training's, and sampling at every snapshot would cost a generation each.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS, NOT_IMPLEMENTED
from collafuse.attacks.membership.dataset_inference import (
    DatasetInference, DatasetInferenceSettings, per_client as dataset_inference_per_client,
)
from collafuse.attacks.membership.controls import (
    BlindComparison, BlindControl, CeilingCheck, HeldOut, above_blind, blind_auc_spread, blind_control,
    ceiling_check, heldout_rates,
)
from collafuse.attacks.membership.epsilon import EpsilonBounds, empirical_epsilon
from collafuse.attacks.membership.one_run import GUESS_FRACTIONS, OneRunAudit, one_run_audit_sizes
from collafuse.attacks.membership.metrics import MembershipMetrics, ScoreError, evaluate, validate_scores
from collafuse.attacks.membership.signals import SignalCache
from collafuse.attacks.membership.targets import TARGETS, AuditContext, Candidates
from collafuse.errors import CollafuseError
from collafuse.streams import STREAM_MEMBERSHIP, stream_seed
from collafuse.threats import THREATS
from collafuse.tradeoff import Ceiling

# The columns of the per-record evidence (scores.parquet) and their types.
SCORE_COLUMNS = {"threat": "string", "target": "string", "attack": "string", "candidate": "int64", "client": "int64",
                 "class": "int64", "member": "bool", "score": "float64"}
SNAPSHOT_TARGETS = ("server", "client")  # target kinds that query one checkpoint: attacked on every snapshot too
SNAPSHOT_NOTE = ("per training.snapshots epoch: the model targets (server T2, clients T3) attacked on that epoch's "
                 "EMA weights with the same candidates and noise; payload (T1) and sample (T4) targets: final models only")
TPR_AT_FPR_DEFINITION = (
    "largest TPR whose FPR <= target on sklearn.metrics.roc_curve; unresolved below 1/target non-members"
)


@dataclass(frozen=True)
class MembershipSettings:
    """Everything that shapes a membership audit besides the run.

    n_boot: bootstrap replicates for the intervals; delta, alpha: the δ and 1 − α
    confidence of the ε lower bounds; n_samples: T4 samples per client (None = as many
    as member candidates); seed: the attacker's randomness (None = the run's seed).
    """

    signals: SignalSettings = field(default_factory=SignalSettings)
    n_boot: int = 200
    delta: float = 1e-5
    alpha: float = 0.05
    n_samples: int | None = None
    seed: int | None = None
    # The one-run audit's guess sizes, fixed in advance: k₊ = k₋ = ⌊f·m⌋ per side for each fraction f, the
    # confidence split between them (DESIGN §4.3).
    one_run_fractions: tuple[float, ...] = GUESS_FRACTIONS
    # Dataset inference per client on the T2–T4 targets (:mod:`~.dataset_inference`): no model query, only
    # the attacks' scores; None: not computed.
    dataset: DatasetInferenceSettings | None = field(default_factory=DatasetInferenceSettings)

    def __post_init__(self) -> None:
        if not self.one_run_fractions or any(not 0 < f <= 0.5 for f in self.one_run_fractions):
            raise ValueError(f"one_run_fractions must each lie in (0, 0.5], got {self.one_run_fractions!r}")


INVERTED_NOTE = "signal found, reversed: AUC significantly below 0.5 (bootstrap upper end < 0.5)"


def inverted(metrics: MembershipMetrics) -> bool:
    """True when the AUC's bootstrap interval lies wholly below 0.5 (no interval: never flagged)."""
    return metrics.auc.high is not None and metrics.auc.high < 0.5


@dataclass(frozen=True)
class AttackOutcome:
    """One (target, attack) evaluation: the metrics, the ε lower bounds, the per-step curve and the raw scores."""

    name: str
    threats: tuple[str, ...]
    direction: str
    queries_per_image: float
    metrics: MembershipMetrics
    epsilon: EpsilonBounds
    steps: tuple[int, ...]
    step_aucs: tuple[float, ...]
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    # The one-run audit on the run's canaries (:func:`one_run_outcome`); None: the target saw none.
    one_run: OneRunAudit | None = None
    # The controls (DESIGN §4.2; :mod:`~.controls`): thresholds fixed on a calibration half, the comparison
    # with the target's model-blind baseline, the ROC against the formal ceiling (None: not computed / no
    # finite guarantee for this threat).
    heldout: HeldOut | None = None
    blind: BlindComparison | None = None
    ceiling: CeilingCheck | None = None
    # What the attack said about how it scored (AttackScores.details: e.g. the peer models it used).
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def epsilon_lb(self) -> float:
        """The Clopper–Pearson ε lower bound (maximised over thresholds, Bonferroni-corrected)."""
        return self.epsilon.clopper_pearson.epsilon_lb

    @property
    def epsilon_gdp(self) -> float:
        """The Gaussian-DP form of the ε lower bound."""
        return self.epsilon.gaussian_dp.epsilon_lb

    @property
    def inverted(self) -> bool:
        """The AUC lies significantly below 0.5 (its bootstrap interval's upper end < 0.5): a signal
        found, reversed (§4.2 "Direction"). Only flagged: no score is flipped with the labels."""
        return inverted(self.metrics)

    def control_summary(self) -> dict[str, Any]:
        """The controls as flat summary columns (absent where not computed)."""
        out: dict[str, Any] = {}
        if self.heldout is not None:
            r1, r01 = self.heldout.at(0.01), self.heldout.at(0.001)
            out.update({"tpr_at_1pct_fpr_heldout": r1.tpr.value, "fpr_at_1pct_heldout": r1.fpr.value,
                        "tpr_at_01pct_fpr_heldout": r01.tpr.value, "fpr_at_01pct_heldout": r01.fpr.value})
        if self.blind is not None:
            out["above_blind"] = self.blind.above
        if self.ceiling is not None:
            out["roc_above_ceiling"] = self.ceiling.above
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "threats": list(self.threats),
            "direction": self.direction,
            "queries_per_image": self.queries_per_image,
            "inverted": self.inverted,
            **self.metrics.to_json(),
            "epsilon": self.epsilon.to_json(),
            "per_step": [{"t": int(t), "auc": a} for t, a in zip(self.steps, self.step_aucs)],
            **({"one_run": self.one_run.to_json()} if self.one_run is not None else {}),
            **({"heldout": self.heldout.to_json()} if self.heldout is not None else {}),
            **({"against_blind": self.blind.to_json()} if self.blind is not None else {}),
            **({"ceiling": self.ceiling.to_json()} if self.ceiling is not None else {}),
            **({"details": dict(self.details)} if self.details else {}),
        }


@dataclass(frozen=True)
class TargetOutcome:
    """One attacked target (a model, the payloads or one client's samples) and the attacks run on it."""

    key: str
    kind: str
    threat: str
    available: bool
    reason: str | None = None                      # why the target does not exist in this run
    info: dict[str, Any] = field(default_factory=dict)
    n_members: int = 0
    n_nonmembers: int = 0
    attacks: dict[str, AttackOutcome] = field(default_factory=dict)
    note: str | None = None
    seconds: float | None = None
    model_queries: int | None = None
    client: int | None = None                      # the client whose model or samples this is (None: server, payloads)
    blind: BlindControl | None = None              # the model-blind baseline on this target's candidates
    candidate_index: np.ndarray | None = None      # (N,) data index of each candidate, members first
    candidate_labels: np.ndarray | None = None     # (N,) class of each candidate (conditional runs)
    # Dataset inference of each client's member images among the candidates (T2: one per client; T3, T4: the
    # target's own client), from every attack's scores (:func:`with_dataset_inference`)
    dataset: tuple[DatasetInference, ...] = ()

    def blind_summary(self) -> dict[str, Any]:
        """The target's blind baseline as flat summary columns (absent where not computed)."""
        if self.blind is None:
            return {}
        return {"blind_auc": self.blind.auc.value, "blind_p_value": self.blind.p_value}

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "threat": self.threat, "threat_model": THREATS[self.threat],
                                 "available": self.available}
        if not self.available:
            entry["reason"] = self.reason
            return entry
        entry.update(self.info)
        entry["n_members"] = self.n_members
        entry["n_nonmembers"] = self.n_nonmembers
        entry["attacks"] = {name: a.to_json() for name, a in self.attacks.items()}
        if self.blind is not None:
            entry["blind_control"] = self.blind.to_json()
        if self.dataset:
            entry["dataset_inference"] = [d.to_json() for d in self.dataset]
        if self.note is not None:
            entry["note"] = self.note
            return entry
        entry["seconds"] = self.seconds
        if self.model_queries is not None:
            entry["model_queries"] = self.model_queries
        return entry


@dataclass(frozen=True)
class MembershipResult:
    """Every target of one membership audit of a run."""

    run: str
    t_hand: int                 # the hand-off step: the server is queried above it, the clients at or below
    T: int
    cut_ratio: float
    payload_kind: str
    num_clients: int
    settings: MembershipSettings
    seed: int
    attack_names: tuple[str, ...]
    targets: dict[str, TargetOutcome]
    # training.snapshots epoch → the model targets (SNAPSHOT_TARGETS) attacked on that epoch's weights
    snapshots: dict[int, dict[str, TargetOutcome]] = field(default_factory=dict)
    # threat → the formal guarantee each ROC was checked against (the caller's ``formal``)
    formal: dict[str, Ceiling] = field(default_factory=dict)
    # data index → the client that trained on that image (−1: no client did), for the per-record evidence
    data_owner: np.ndarray | None = None

    def score_frame(self) -> pd.DataFrame:
        """Every membership score of the final models, one row per (target, attack, candidate) (DESIGN §4.2
        "Per-record evidence"): threat, target, attack, candidate (the image's index in the run's data; −1
        where unknown), client (the client that trained on it; −1 for a non-member), class (−1 without
        labels), member (bool), score (higher = more likely member, as the attack scored it)."""
        frames = []
        for target, outcome in self.outcomes():
            scores = np.r_[outcome.member_scores, outcome.nonmember_scores]
            n = scores.size
            member = np.r_[np.ones(outcome.member_scores.size, bool), np.zeros(outcome.nonmember_scores.size, bool)]
            index = (target.candidate_index.astype(np.int64) if target.candidate_index is not None
                     else np.full(n, -1, np.int64))
            owner = (self.data_owner[index] if self.data_owner is not None and target.candidate_index is not None
                     else np.full(n, -1, np.int64))
            labels = (target.candidate_labels.astype(np.int64) if target.candidate_labels is not None
                      else np.full(n, -1, np.int64))
            frames.append(pd.DataFrame({
                "threat": target.threat, "target": target.key, "attack": outcome.name, "candidate": index,
                "client": np.where(member, owner, -1).astype(np.int64), "class": labels, "member": member,
                "score": scores.astype(np.float64)}))
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in SCORE_COLUMNS.items()})
        return pd.concat(frames, ignore_index=True).astype(SCORE_COLUMNS)

    def outcomes(self):
        """(target, attack outcome) for every attack on every available target, in order."""
        for target in self.targets.values():
            for outcome in target.attacks.values():
                yield target, outcome

    def summary_rows(self) -> list[dict[str, Any]]:
        """One flat row per (target, attack), final models first, then per snapshot (with its ``epoch``): AUC,
        TPR at 1 % and 0.1 % FPR (with resolved flags), balanced accuracy, both ε lower bounds; unavailable
        targets with their reason."""
        rows = []
        for epoch, targets in [(None, self.targets), *self.snapshots.items()]:
            at = {} if epoch is None else {"epoch": epoch}
            for key, target in targets.items():
                if not target.available:
                    rows.append({"target": key, "threat": target.threat, **at, "available": False,
                                 "reason": target.reason})
                    continue
                for name, a in target.attacks.items():
                    tpr, tpr01 = a.metrics.at_fpr(0.01), a.metrics.at_fpr(0.001)
                    rows.append({"target": key, "threat": target.threat, **at, "attack": name,
                                 "auc": a.metrics.auc.value,
                                 "tpr_at_1pct_fpr": tpr.tpr.value, "tpr_at_1pct_fpr_resolved": tpr.resolved,
                                 "tpr_at_01pct_fpr": tpr01.tpr.value, "tpr_at_01pct_fpr_resolved": tpr01.resolved,
                                 "balanced_accuracy": a.metrics.balanced_accuracy.value,
                                 "epsilon_lb": a.epsilon_lb, "epsilon_gdp": a.epsilon_gdp,
                                 **a.control_summary(), **target.blind_summary()})
        return rows

    def to_json(self) -> dict[str, Any]:
        """The ``attack membership`` JSON report (the only place it is built)."""
        return {
            "report": "membership",
            "run": self.run,
            "t_hand": self.t_hand,
            "T": self.T,
            "cut_ratio": self.cut_ratio,
            "payload_kind": self.payload_kind,
            "num_clients": self.num_clients,
            "direction": "every score: higher = more likely member",
            "formal": {threat: c.to_json() for threat, c in self.formal.items()},
            "settings": {**asdict(self.settings), "seed": self.seed},
            "balanced_accuracy_definition": "max over thresholds of (TPR + TNR)/2",
            "tpr_at_fpr_definition": TPR_AT_FPR_DEFINITION,
            "inverted_definition": INVERTED_NOTE,
            "attacks": {
                name: {"summary": ATTACKS.get(name).summary, "threats": list(ATTACKS.get(name).threats),
                       "reference": ATTACKS.get(name).reference}
                for name in self.attack_names
            },
            "not_implemented": NOT_IMPLEMENTED,
            "targets": {key: t.to_json() for key, t in self.targets.items()},
            "snapshot_definition": SNAPSHOT_NOTE,
            "snapshots": {str(epoch): {key: t.to_json() for key, t in targets.items()}
                          for epoch, targets in self.snapshots.items()},
            "summary": self.summary_rows(),
        }


def n_query_steps(cache: SignalCache) -> int:
    """M, the number of query steps of a model target (0 for payload / sample targets)."""
    return int(len(cache.get("steps"))) if "steps" in cache.available() else 0


def per_step_auc(result: AttackScores, candidates: Candidates) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """AUC of each per-step column of the scores: the leakage-per-timestep curve."""
    if result.per_step is None:
        return (), ()
    per = np.asarray(result.per_step, dtype=np.float64)
    if per.shape != (candidates.images.shape[0], len(result.steps)):
        raise ScoreError(f"per-step scores have shape {per.shape}, expected ({candidates.images.shape[0]}, {len(result.steps)})")
    labels = np.r_[np.ones(candidates.n_members), np.zeros(per.shape[0] - candidates.n_members)]
    aucs = []
    for j in range(per.shape[1]):
        m, n = validate_scores(*candidates.split(per[:, j]), what=f"step {result.steps[j]}")
        aucs.append(float(roc_auc_score(labels, np.r_[m, n])))
    return tuple(result.steps), tuple(aucs)


def evaluate_attack(attack: MembershipAttack, cache: SignalCache, candidates: Candidates,
                    settings: MembershipSettings, seed: int, where: str = "") -> AttackOutcome:
    """Score ``candidates`` with ``attack`` from the shared ``cache`` and compute every metric."""
    result = attack.score(cache.require(attack.signals))
    scores = np.asarray(result.scores, dtype=np.float64)
    n = candidates.images.shape[0]
    if scores.shape != (n,):
        raise ScoreError(f"attack {attack.name} on {where}: expected {n} scores, got shape {scores.shape}")
    m_scores, n_scores = validate_scores(*candidates.split(scores), what=f"attack {attack.name} on {where}")
    steps, aucs = per_step_auc(result, candidates)
    return AttackOutcome(
        name=attack.name,
        threats=tuple(attack.threats),
        direction=attack.direction,
        queries_per_image=(result.queries_per_image if result.queries_per_image is not None
                           else attack.queries_per_image(settings.signals, n_query_steps(cache))),
        metrics=evaluate(m_scores, n_scores, settings.n_boot, seed),
        epsilon=empirical_epsilon(m_scores, n_scores, settings.delta, settings.alpha),
        steps=steps, step_aucs=aucs, member_scores=m_scores, nonmember_scores=n_scores,
        details=dict(result.details),
    )


def plan(attack_names: tuple[str, ...], target_names: tuple[str, ...], explicit_attacks: bool, ctx: AuditContext):
    """Resolve names to target instances and the attacks that apply to each; refuse attacks that fit no target."""
    kinds = [TARGETS.get(t) for t in target_names]
    threats = {k.threat for k in kinds}
    attacks = [ATTACKS.get(a) for a in attack_names]
    if explicit_attacks:
        for a in attacks:
            if not set(a.threats) & threats:
                fits = [k for k in TARGETS.names() if TARGETS.get(k).threat in a.threats]
                raise CollafuseError(
                    f"attack {a.name!r} applies to {'/'.join(a.threats)} ({', '.join(fits)}), "
                    f"not to the requested targets ({', '.join(target_names)})"
                )
    instances = [inst for kind in kinds for inst in kind.instances(ctx)]
    return [(inst, [a for a in attacks if inst.threat in a.threats]) for inst in instances]


def one_run_outcome(outcome: AttackOutcome, attack: MembershipAttack, cache: SignalCache, canaries: Candidates,
                    settings: MembershipSettings, formal_epsilon: float | None = None) -> AttackOutcome:
    """``outcome`` with its one-run audit (§4.3; :mod:`~collafuse.attacks.membership.one_run`): the attack
    scores the m canaries; for each guess size fixed in advance (``settings.one_run_fractions``) it
    guesses IN for its k₊ highest and OUT for its k₋ lowest, abstaining on ties; the correct guesses bound ε
    at confidence 1 − α split over the sizes. Attacks whose signals the canaries' cache lacks (reference
    attacks) keep ``one_run`` None. ``formal_epsilon``: the target's formal ε (from the caller, which reads
    the run's defenses), set beside the bound."""
    if not set(attack.signals) <= set(cache.available()):
        return outcome
    scores = np.asarray(attack.score(cache.require(attack.signals)).scores, dtype=np.float64)
    s_in, s_out = validate_scores(*canaries.split(scores), what=f"attack {attack.name} on the canaries")
    audit = one_run_audit_sizes(np.r_[s_in, s_out], np.r_[np.ones(len(s_in), bool), np.zeros(len(s_out), bool)],
                                settings.delta, settings.alpha, settings.one_run_fractions)
    if formal_epsilon is not None:
        audit = replace(audit, formal_epsilon=float(formal_epsilon))
    return replace(outcome, one_run=audit)


def with_controls(outcome: AttackOutcome, seed: int, blind: BlindControl | None, blind_spread: float | None,
                  ceiling: Ceiling | None, alpha: float) -> AttackOutcome:
    """``outcome`` with its controls (DESIGN §4.2): held-out thresholds, the comparison with the target's blind
    baseline, and the check against the formal ceiling where the threat has a finite one."""
    m, n = outcome.member_scores, outcome.nonmember_scores
    heldout = heldout_rates(m, n, seed) if min(m.size, n.size) >= 2 else None
    versus = above_blind(m, n, blind, seed, blind_spread) if blind is not None and blind_spread is not None else None
    check = ceiling_check(m, n, ceiling, alpha) if ceiling is not None and ceiling.finite else None
    return replace(outcome, heldout=heldout, blind=versus, ceiling=check)


def target_blind_control(candidates: Candidates, seed: int, n_boot: int) -> tuple[BlindControl | None, float | None]:
    """The model-blind baseline of a target's candidates and its refitted spread (None with under 2 per side)."""
    if min(candidates.n_members, candidates.nonmembers.shape[0]) < 2:
        return None, None
    blind = blind_control(candidates.members, candidates.nonmembers, seed, n_boot=n_boot)
    return blind, blind_auc_spread(blind)


def _attack_targets(work, settings: MembershipSettings, seed: int, bar,
                    formal: Mapping[str, Ceiling] | None = None, controls: bool = True) -> dict[str, TargetOutcome]:
    """Every planned (target, attacks) pair evaluated: one :class:`TargetOutcome` per target key.
    ``formal``: threat → the formal guarantee as a trade-off curve: its ε set beside each one-run bound, its
    curve the ceiling each ROC is checked against. ``controls``: compute the blind baseline and the held-out
    thresholds (the snapshot models repeat only the headline metrics)."""
    targets: dict[str, TargetOutcome] = {}
    for inst, attacks in work:
        if not inst.available:
            targets[inst.key] = TargetOutcome(inst.key, inst.kind, inst.threat, False, reason=inst.reason,
                                              client=inst.client)
            continue
        cand = inst.candidates
        common = dict(info={k: v for k, v in inst.info.items() if k != "view"}, n_members=cand.n_members,
                      n_nonmembers=int(cand.nonmembers.shape[0]), client=inst.client,
                      candidate_index=None if cand.index is None else cand.index.cpu().numpy(),
                      candidate_labels=None if cand.labels is None else cand.labels.cpu().numpy())
        if not attacks:
            targets[inst.key] = TargetOutcome(inst.key, inst.kind, inst.threat, True, **common,
                                              note=f"none of the requested attacks applies to {inst.threat}")
            continue
        started = time.perf_counter()
        cache = inst.make_cache()
        ceiling = (formal or {}).get(inst.threat)
        blind, spread = target_blind_control(cand, seed, settings.n_boot) if controls else (None, None)
        outcomes: dict[str, AttackOutcome] = {}
        for attack in attacks:
            bar.set_postfix(target=inst.key, attack=attack.name)
            outcome = evaluate_attack(attack, cache, cand, settings, seed, where=inst.key)
            outcomes[attack.name] = (with_controls(outcome, seed, blind, spread, ceiling, settings.alpha)
                                     if controls else outcome)
            bar.update(1)
        if inst.canaries is not None:
            canary_cache = inst.make_canary_cache()
            eps = None if ceiling is None else ceiling.epsilon
            outcomes = {name: one_run_outcome(o, ATTACKS.get(name), canary_cache, inst.canaries, settings, eps)
                        for name, o in outcomes.items()}
        view = inst.info.get("view")
        targets[inst.key] = TargetOutcome(
            inst.key, inst.kind, inst.threat, True, **common, attacks=outcomes, blind=blind,
            seconds=round(time.perf_counter() - started, 3),
            model_queries=view.counter.rows if view is not None else None,
        )
    return targets


def run_membership(run, attack_names: tuple[str, ...], target_names: tuple[str, ...],
                   settings: MembershipSettings | None = None, *, explicit_attacks: bool = False,
                   progress: bool = False, samples: dict | None = None,
                   formal: Mapping[str, Ceiling] | None = None) -> MembershipResult:
    """Membership inference on a loaded :class:`~collafuse.runs.Run`: every attack on every target, and on
    every ``training.snapshots`` epoch the model targets again (:attr:`MembershipResult.snapshots`).

    ``explicit_attacks``: the caller named the attacks, so one that fits none of the targets is an
    error (not silently skipped). ``samples``: T4 samples per client already drawn with
    :func:`~collafuse.attacks.membership.targets.attacker_samples` (same seed), so a caller that
    also measures their quality generates them once. ``formal``: threat → the run's formal guarantee as a
    :class:`~collafuse.tradeoff.Ceiling` (its ε beside each one-run bound, its curve the ceiling of every
    ROC); the caller reads it from the run's defenses (attacks never import them).
    """
    settings = settings or MembershipSettings()
    seed = run.config.seed if settings.seed is None else settings.seed
    ctx = AuditContext(run, settings.signals, seed, settings.n_samples, samples)
    work = plan(attack_names, target_names, explicit_attacks, ctx)
    bar = tqdm(total=sum(len(a) for inst, a in work if inst.available), desc="membership", unit="attack",
               disable=not progress)
    targets = _attack_targets(work, settings, seed, bar, formal)
    owner = data_owner(ctx)
    if settings.dataset is not None:
        targets = {key: with_dataset_inference(t, owner, settings.dataset, seed) for key, t in targets.items()}
    snapshots: dict[int, dict[str, TargetOutcome]] = {}
    model_targets = tuple(t for t in target_names if t in SNAPSHOT_TARGETS)
    for epoch in run.snapshot_epochs if model_targets and run.snapshot is None else ():
        # The same candidates (same seed and splits: the data is read once) and the same noise draws.
        snap = AuditContext(run.at_snapshot(epoch), settings.signals, seed, settings.n_samples, samples, ctx.data())
        snap_work = plan(attack_names, model_targets, False, snap)
        bar.total += sum(len(a) for inst, a in snap_work if inst.available)
        bar.set_description(f"membership @ epoch {epoch}")
        snapshots[epoch] = _attack_targets(snap_work, settings, seed, bar, controls=False)
    bar.close()
    return MembershipResult(
        run=str(run.path), t_hand=run.t_hand, T=run.schedule.T, cut_ratio=run.config.diffusion.cut_ratio,
        payload_kind=run.config.training.payload, num_clients=len(run.client_models), settings=settings,
        seed=seed, attack_names=tuple(attack_names), targets=targets, snapshots=snapshots,
        formal=dict(formal or {}), data_owner=owner,
    )


def data_owner(ctx: AuditContext) -> np.ndarray:
    """(N_data,) the client that trained on each image of the run's data (−1: none did)."""
    data, splits = ctx.data()
    owner = np.full(int(data.images.shape[0]), -1, np.int64)
    for k in range(len(splits.clients)):
        owner[splits.training_set(k).cpu().numpy()] = k
    return owner


DATASET_THREATS = ("T2", "T3", "T4")  # the model and sample targets: dataset inference per client (DESIGN §4.2)
DATASET_STREAM = 400                  # the membership stream's sub-index of dataset inference's draws


def with_dataset_inference(target: TargetOutcome, owner: np.ndarray, settings: DatasetInferenceSettings,
                           seed: int) -> TargetOutcome:
    """``target`` with its dataset inference per client (:func:`~.dataset_inference.per_client`): the features
    are every attack's scores of the target's candidates (no model query), the suspect set of client k its
    member candidates that client k trained on (``owner``: the run's data index → client, −1 for none), the
    held-out set the target's non-member candidates. Clients with fewer than ``settings.min_size`` member
    candidates, and targets without attacks or candidate indices, are left without one."""
    if (not target.available or not target.attacks or target.threat not in DATASET_THREATS
            or target.candidate_index is None):
        return target
    names = tuple(target.attacks)
    members = np.column_stack([target.attacks[a].member_scores for a in names])
    heldout = np.column_stack([target.attacks[a].nonmember_scores for a in names])
    clients = owner[target.candidate_index[: target.n_members].astype(np.int64)]
    stream = stream_seed(seed, STREAM_MEMBERSHIP, DATASET_STREAM, list(TARGETS.names()).index(target.kind))
    return replace(target, dataset=dataset_inference_per_client(members, clients, heldout, names, stream, settings))
