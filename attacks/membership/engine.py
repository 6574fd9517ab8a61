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
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS, NOT_IMPLEMENTED
from collafuse.attacks.membership.epsilon import EpsilonBounds, empirical_epsilon
from collafuse.attacks.membership.one_run import OneRunAudit, one_run_audit
from collafuse.attacks.membership.metrics import MembershipMetrics, ScoreError, evaluate, validate_scores
from collafuse.attacks.membership.signals import SignalCache
from collafuse.attacks.membership.targets import TARGETS, AuditContext, Candidates
from collafuse.errors import CollafuseError
from collafuse.threats import THREATS

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
    one_run_fraction: float = 0.1  # the one-run audit guesses this fraction of the canaries IN, and as many OUT

    def __post_init__(self) -> None:
        if not 0 < self.one_run_fraction <= 0.5:
            raise ValueError(f"one_run_fraction must lie in (0, 0.5], got {self.one_run_fraction!r}")


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
                                 "epsilon_lb": a.epsilon_lb, "epsilon_gdp": a.epsilon_gdp})
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
        queries_per_image=attack.queries_per_image(settings.signals, n_query_steps(cache)),
        metrics=evaluate(m_scores, n_scores, settings.n_boot, seed),
        epsilon=empirical_epsilon(m_scores, n_scores, settings.delta, settings.alpha),
        steps=steps, step_aucs=aucs, member_scores=m_scores, nonmember_scores=n_scores,
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
    scores the m canaries, guesses IN for its k₊ highest and OUT for its k₋ lowest (k₊ = k₋ =
    ⌊settings.one_run_fraction · m⌋, fixed in advance) and the correct guesses bound ε at confidence
    1 − α. Attacks whose signals the canaries' cache lacks (reference attacks) keep ``one_run`` None.
    ``formal_epsilon``: the target's formal ε (from the caller, which reads the run's defenses), set beside
    the bound."""
    if not set(attack.signals) <= set(cache.available()):
        return outcome
    scores = np.asarray(attack.score(cache.require(attack.signals)).scores, dtype=np.float64)
    s_in, s_out = validate_scores(*canaries.split(scores), what=f"attack {attack.name} on the canaries")
    m = len(s_in) + len(s_out)
    k = max(1, int(settings.one_run_fraction * m))
    audit = one_run_audit(np.r_[s_in, s_out], np.r_[np.ones(len(s_in), bool), np.zeros(len(s_out), bool)],
                          k, k, settings.delta, settings.alpha)
    if formal_epsilon is not None:
        audit = replace(audit, formal_epsilon=float(formal_epsilon))
    return replace(outcome, one_run=audit)


def _attack_targets(work, settings: MembershipSettings, seed: int, bar,
                    formal: dict[str, float] | None = None) -> dict[str, TargetOutcome]:
    """Every planned (target, attacks) pair evaluated: one :class:`TargetOutcome` per target key.
    ``formal``: threat → formal ε, set beside each one-run bound."""
    targets: dict[str, TargetOutcome] = {}
    for inst, attacks in work:
        if not inst.available:
            targets[inst.key] = TargetOutcome(inst.key, inst.kind, inst.threat, False, reason=inst.reason,
                                              client=inst.client)
            continue
        common = dict(info={k: v for k, v in inst.info.items() if k != "view"}, n_members=inst.candidates.n_members,
                      n_nonmembers=int(inst.candidates.nonmembers.shape[0]), client=inst.client)
        if not attacks:
            targets[inst.key] = TargetOutcome(inst.key, inst.kind, inst.threat, True, **common,
                                              note=f"none of the requested attacks applies to {inst.threat}")
            continue
        started = time.perf_counter()
        cache = inst.make_cache()
        outcomes: dict[str, AttackOutcome] = {}
        for attack in attacks:
            bar.set_postfix(target=inst.key, attack=attack.name)
            outcomes[attack.name] = evaluate_attack(attack, cache, inst.candidates, settings, seed, where=inst.key)
            bar.update(1)
        if inst.canaries is not None:
            canary_cache = inst.make_canary_cache()
            eps = (formal or {}).get(inst.threat)
            outcomes = {name: one_run_outcome(o, ATTACKS.get(name), canary_cache, inst.canaries, settings, eps)
                        for name, o in outcomes.items()}
        view = inst.info.get("view")
        targets[inst.key] = TargetOutcome(
            inst.key, inst.kind, inst.threat, True, **common, attacks=outcomes,
            seconds=round(time.perf_counter() - started, 3),
            model_queries=view.counter.rows if view is not None else None,
        )
    return targets


def run_membership(run, attack_names: tuple[str, ...], target_names: tuple[str, ...],
                   settings: MembershipSettings | None = None, *, explicit_attacks: bool = False,
                   progress: bool = False, samples: dict | None = None,
                   formal: Mapping[str, float] | None = None) -> MembershipResult:
    """Membership inference on a loaded :class:`~collafuse.runs.Run`: every attack on every target, and on
    every ``training.snapshots`` epoch the model targets again (:attr:`MembershipResult.snapshots`).

    ``explicit_attacks``: the caller named the attacks, so one that fits none of the targets is an
    error (not silently skipped). ``samples``: T4 samples per client already drawn with
    :func:`~collafuse.attacks.membership.targets.attacker_samples` (same seed), so a caller that
    also measures their quality generates them once. ``formal``: threat → the run's formal ε, set beside
    each one-run bound; the caller reads it from the run's defenses (attacks never import them).
    """
    settings = settings or MembershipSettings()
    seed = run.config.seed if settings.seed is None else settings.seed
    ctx = AuditContext(run, settings.signals, seed, settings.n_samples, samples)
    work = plan(attack_names, target_names, explicit_attacks, ctx)
    bar = tqdm(total=sum(len(a) for inst, a in work if inst.available), desc="membership", unit="attack",
               disable=not progress)
    targets = _attack_targets(work, settings, seed, bar, formal)
    snapshots: dict[int, dict[str, TargetOutcome]] = {}
    model_targets = tuple(t for t in target_names if t in SNAPSHOT_TARGETS)
    for epoch in run.snapshot_epochs if model_targets and run.snapshot is None else ():
        # The same candidates (same seed and splits: the data is read once) and the same noise draws.
        snap = AuditContext(run.at_snapshot(epoch), settings.signals, seed, settings.n_samples, samples, ctx.data())
        snap_work = plan(attack_names, model_targets, False, snap)
        bar.total += sum(len(a) for inst, a in snap_work if inst.available)
        bar.set_description(f"membership @ epoch {epoch}")
        snapshots[epoch] = _attack_targets(snap_work, settings, seed, bar)
    bar.close()
    return MembershipResult(
        run=str(run.path), t_hand=run.t_hand, T=run.schedule.T, cut_ratio=run.config.diffusion.cut_ratio,
        payload_kind=run.config.training.payload, num_clients=len(run.client_models), settings=settings,
        seed=seed, attack_names=tuple(attack_names), targets=targets, snapshots=snapshots,
    )
