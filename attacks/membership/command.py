"""``collafuse attack membership``: every requested attack on every requested target (§4.2, §4.3, §8).

Writes one JSON report (atomically: temp file + rename) with, per target and attack,
ROC AUC, TPR at 1 % and 0.1 % FPR, balanced accuracy (bootstrap intervals), empirical ε
lower bounds and the leakage-per-timestep curve; beside it, per target, a log–log ROC PNG
and a per-timestep AUC PNG. Targets that do not exist in the run (no server at c = 1, no
client models at c = 0) are listed with the reason. Bad input raises
:class:`~collafuse.errors.CollafuseError` (the CLI prints one line and exits 2).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from collafuse.attacks.membership.base import THREATS, AttackScores, MembershipAttack, SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS, NOT_IMPLEMENTED
from collafuse.attacks.membership.epsilon import empirical_epsilon
from collafuse.attacks.membership.metrics import ScoreError, evaluate, save_curve_png, save_roc_png, validate_scores
from collafuse.attacks.membership.signals import SignalCache
from collafuse.attacks.membership.targets import TARGETS, AuditContext, Candidates
from collafuse.errors import CollafuseError


@dataclass(frozen=True)
class AuditSettings:
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


@dataclass
class AttackResult:
    """One (target, attack) evaluation: the JSON entry and the raw scores (for plots)."""

    report: dict
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    curve: tuple[tuple[int, ...], tuple[float, ...]]


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


def evaluate_attack(
    attack: MembershipAttack,
    cache: SignalCache,
    candidates: Candidates,
    settings: AuditSettings,
    seed: int,
    where: str = "",
) -> AttackResult:
    """Score ``candidates`` with ``attack`` from the shared ``cache`` and compute every metric."""
    result = attack.score(cache.require(attack.signals))
    scores = np.asarray(result.scores, dtype=np.float64)
    n = candidates.images.shape[0]
    if scores.shape != (n,):
        raise ScoreError(f"attack {attack.name} on {where}: expected {n} scores, got shape {scores.shape}")
    m_scores, n_scores = validate_scores(*candidates.split(scores), what=f"attack {attack.name} on {where}")
    steps, aucs = per_step_auc(result, candidates)
    report = {
        "threats": list(attack.threats),
        "direction": attack.direction,
        "queries_per_image": attack.queries_per_image(settings.signals, n_query_steps(cache)),
        **evaluate(m_scores, n_scores, settings.n_boot, seed),
        "epsilon": empirical_epsilon(m_scores, n_scores, settings.delta, settings.alpha),
        "per_step": [{"t": int(t), "auc": a} for t, a in zip(steps, aucs)],
    }
    return AttackResult(report, m_scores, n_scores, (steps, aucs))


def plan(run, attack_names: tuple[str, ...], target_names: tuple[str, ...], explicit_attacks: bool, ctx: AuditContext):
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


def run_audit(run, attack_names: tuple[str, ...], target_names: tuple[str, ...], settings: AuditSettings,
              explicit_attacks: bool = False, progress: bool = False,
              samples: dict | None = None) -> tuple[dict, dict[str, dict[str, AttackResult]]]:
    """Run the audit on a loaded :class:`~collafuse.runs.Run`. Returns (JSON report, raw results per target).

    ``samples``: T4 samples per client already drawn with
    :func:`~collafuse.attacks.membership.targets.attacker_samples` (same seed), so a caller that
    also measures their quality generates them once."""
    seed = run.config.seed if settings.seed is None else settings.seed
    ctx = AuditContext(run, settings.signals, seed, settings.n_samples, samples)
    work = plan(run, attack_names, target_names, explicit_attacks, ctx)
    targets: dict[str, dict] = {}
    raw: dict[str, dict[str, AttackResult]] = {}
    total = sum(len(a) for inst, a in work if inst.available)
    bar = tqdm(total=total, desc="membership", unit="attack", disable=not progress)
    for inst, attacks in work:
        entry: dict = {"kind": inst.kind, "threat": inst.threat, "threat_model": THREATS[inst.threat], "available": inst.available}
        if not inst.available:
            entry["reason"] = inst.reason
            targets[inst.key] = entry
            continue
        entry.update({k: v for k, v in inst.info.items() if k != "view"})
        entry["n_members"] = inst.candidates.n_members
        entry["n_nonmembers"] = int(inst.candidates.nonmembers.shape[0])
        if not attacks:
            entry["attacks"] = {}
            entry["note"] = f"none of the requested attacks applies to {inst.threat}"
            targets[inst.key] = entry
            continue
        started = time.perf_counter()
        cache = inst.make_cache()
        entry["attacks"] = {}
        raw[inst.key] = {}
        for attack in attacks:
            bar.set_postfix(target=inst.key, attack=attack.name)
            res = evaluate_attack(attack, cache, inst.candidates, settings, seed, where=inst.key)
            entry["attacks"][attack.name] = res.report
            raw[inst.key][attack.name] = res
            bar.update(1)
        entry["seconds"] = round(time.perf_counter() - started, 3)
        view = inst.info.get("view")
        if view is not None:
            entry["model_queries"] = view.counter.rows
        targets[inst.key] = entry
    bar.close()
    report = {
        "report": "membership",
        "run": str(run.path),
        "t_c": run.t_c,
        "T": run.schedule.T,
        "cut_ratio": run.config.diffusion.cut_ratio,
        "payload_kind": run.config.training.payload,
        "num_clients": len(run.client_models),
        "direction": "every score: higher = more likely member",
        "settings": {**asdict(settings), "seed": seed},
        "balanced_accuracy_definition": "max over thresholds of (TPR + TNR)/2",
        "tpr_at_fpr_definition": "largest TPR whose FPR <= target on sklearn.metrics.roc_curve; unresolved below 1/target non-members",
        "attacks": {
            name: {
                "summary": ATTACKS.get(name).summary,
                "threats": list(ATTACKS.get(name).threats),
                "reference": ATTACKS.get(name).reference,
            }
            for name in attack_names
        },
        "not_implemented": NOT_IMPLEMENTED,
        "targets": targets,
        "summary": summary_rows(targets),
    }
    return report, raw


def summary_rows(targets: dict[str, dict]) -> list[dict]:
    """One flat row per (target, attack): AUC, TPR@1%FPR, ε lower bound; unavailable targets with their reason."""
    rows = []
    for key, entry in targets.items():
        if not entry["available"]:
            rows.append({"target": key, "threat": entry["threat"], "available": False, "reason": entry["reason"]})
            continue
        for name, r in entry.get("attacks", {}).items():
            rows.append(
                {
                    "target": key,
                    "threat": entry["threat"],
                    "attack": name,
                    "auc": r["auc"],
                    "tpr_at_1pct_fpr": r["tpr_at_fpr"]["0.01"]["tpr"],
                    "tpr_at_1pct_fpr_resolved": r["tpr_at_fpr"]["0.01"]["resolved"],
                    "epsilon_lb": r["epsilon"]["clopper_pearson"]["epsilon_lb"],
                }
            )
    return rows


def _resolve_out(run_dir: Path, out: str | None) -> Path:
    path = Path(out) if out is not None else run_dir.parent / f"{run_dir.name}-membership.json"
    if path.suffix.lower() != ".json":
        raise CollafuseError(f"--out must end in .json, got {path.name!r}")
    if path.exists():
        raise CollafuseError(f"{path} already exists; choose a new file")
    return path


def write_report(report: dict, raw: dict[str, dict[str, AttackResult]], out: Path) -> list[Path]:
    """PNGs beside ``out`` then the JSON, each atomically; on failure nothing is left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        for key, results in raw.items():
            roc_path = out.with_name(f"{out.stem}_roc_{key}.png")
            save_roc_png(
                {name: (r.member_scores, r.nonmember_scores) for name, r in results.items()},
                roc_path, f"membership ROC, {key} ({report['targets'][key]['threat']})",
            )
            written.append(roc_path)
            report["targets"][key]["roc_png"] = roc_path.name
            curves = {name: r.curve for name, r in results.items() if r.curve[0]}
            if curves:
                curve_path = out.with_name(f"{out.stem}_steps_{key}.png")
                save_curve_png(curves, curve_path, f"leakage per timestep, {key}")
                written.append(curve_path)
                report["targets"][key]["steps_png"] = curve_path.name
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return [out, *written]


def run_command(run_dir: Path, attacks: str | None, targets: str | None, out: str | None, progress: bool) -> int:
    """The CLI entry point: parse names, load the run, audit, write. Returns the exit code."""
    from collafuse.runs import Run

    attack_names = ATTACKS.parse(attacks)
    target_names = TARGETS.parse(targets)
    run_dir = Path(run_dir)
    out_path = _resolve_out(run_dir, out)
    run = Run.load(run_dir)
    report, raw = run_audit(run, attack_names, target_names, AuditSettings(), explicit_attacks=attacks is not None, progress=progress)
    write_report(report, raw, out_path)
    if progress:
        for row in report["summary"]:
            if row.get("available", True):
                print(
                    f"{row['target']:>10} {row['threat']} {row['attack']:>12}  AUC {row['auc']:.3f}  "
                    f"TPR@1%FPR {row['tpr_at_1pct_fpr']:.3f}{'' if row['tpr_at_1pct_fpr_resolved'] else ' (unresolved)'}  "
                    f"eps_LB {row['epsilon_lb']:.2f}"
                )
            else:
                print(f"{row['target']:>10} {row['threat']}  not applicable: {row['reason']}")
    print(f"membership report written to {out_path}")
    return 0
