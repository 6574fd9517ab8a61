"""Membership-inference metrics shared by every attack and target (DESIGN.md §4.2).

Convention everywhere: label 1 = member, 0 = non-member, and a higher score means
"more likely member". All metrics come from one ``sklearn.metrics.roc_curve``
(``drop_intermediate=False``) so they agree with scikit-learn by construction:

- ROC AUC (equals ``roc_auc_score``);
- TPR at a target FPR: the largest TPR over ROC points whose FPR ≤ target (an FPR
  exactly at the target counts). It is *unresolved* when there are fewer than
  1/target non-members, because then the only achievable FPR ≤ target is 0;
- balanced accuracy at the best threshold: max over thresholds of (TPR + TNR)/2
  (the attacker's best single threshold; optimistic by design, like the AUC);
- bootstrap percentile intervals, members and non-members resampled separately.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import roc_curve

from collafuse.attacks.stats import Interval
from collafuse.errors import CollafuseError

FPR_TARGETS: tuple[float, ...] = (0.01, 0.001)


class ScoreError(CollafuseError):
    """Membership scores or candidate sets that cannot be evaluated (empty, NaN, mismatched)."""


def validate_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Check two 1-D score vectors (members (Nm,), non-members (Nn,)); return them as float64.

    Raises :class:`ScoreError` naming the problem: not 1-D, empty, NaN or infinite.
    """
    out = []
    for name, s in (("member", member_scores), ("non-member", nonmember_scores)):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 1:
            raise ScoreError(f"{what}: {name} scores must be one value per candidate (1-D), got shape {s.shape}")
        if s.size == 0:
            raise ScoreError(f"{what}: no {name} candidates to score")
        bad = int((~np.isfinite(s)).sum())
        if bad:
            raise ScoreError(f"{what}: {bad} of {s.size} {name} scores are NaN or infinite")
        out.append(s)
    return out[0], out[1]


def labels_and_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate to (labels (N,) int, scores (N,) float64), members first."""
    m, n = validate_scores(member_scores, nonmember_scores)
    labels = np.concatenate([np.ones(m.size, dtype=np.int64), np.zeros(n.size, dtype=np.int64)])
    return labels, np.concatenate([m, n])


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of every distinct threshold, from ``sklearn.metrics.roc_curve``."""
    return roc_curve(labels, scores, drop_intermediate=False)


def fast_roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) equal to ``roc_curve(..., drop_intermediate=False)`` without its input checks.

    Used for bootstrap replicates, where scikit-learn's validation would dominate the
    run time; tested against scikit-learn (ties included).
    """
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def tpr_at_fpr_from_roc(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR ≤ ``target`` (the point (0, 0) always qualifies)."""
    ok = fpr <= target + 1e-12  # an FPR equal to the target, up to float rounding, counts
    return float(tpr[ok].max())


def resolvable(n_nonmembers: int, target: float) -> bool:
    """True when there are at least 1/target non-members, so an FPR of ``target`` is reachable."""
    return n_nonmembers >= math.ceil(1.0 / target - 1e-9)


def best_balanced_accuracy_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """max over thresholds of (TPR + 1 − FPR)/2."""
    return float(((tpr + 1.0 - fpr) / 2.0).max())


@dataclass(frozen=True)
class PointMetrics:
    """The four numbers of one evaluation (no intervals)."""

    auc: float
    tpr_at_fpr: dict[float, float]
    balanced_accuracy: float


def point_metrics(
    labels: np.ndarray, scores: np.ndarray, targets: Sequence[float] = FPR_TARGETS, fast: bool = False
) -> PointMetrics:
    """AUC, TPR at each target FPR and best balanced accuracy from one ROC curve
    (scikit-learn's, or :func:`fast_roc` when ``fast``)."""
    fpr, tpr = fast_roc(labels, scores) if fast else roc(labels, scores)[:2]
    return PointMetrics(
        auc=float(_trapezoid_auc(fpr, tpr)),
        tpr_at_fpr={t: tpr_at_fpr_from_roc(fpr, tpr, t) for t in targets},
        balanced_accuracy=best_balanced_accuracy_from_roc(fpr, tpr),
    )


def bootstrap_metrics(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    targets: Sequence[float] = FPR_TARGETS,
) -> list[PointMetrics]:
    """``n_boot`` stratified bootstrap replicates (members and non-members resampled separately)."""
    m, n = validate_scores(member_scores, nonmember_scores)
    labels = np.concatenate([np.ones(m.size, dtype=np.int64), np.zeros(n.size, dtype=np.int64)])
    out = []
    for _ in range(n_boot):
        s = np.concatenate([m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)]])
        out.append(point_metrics(labels, s, targets, fast=True))
    return out


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap replicates."""
    lo = (1.0 - confidence) / 2.0
    v = np.asarray(values, dtype=np.float64)
    return float(np.quantile(v, lo)), float(np.quantile(v, 1.0 - lo))


@dataclass(frozen=True)
class RateAtFpr:
    """TPR at one target FPR; ``resolved`` is False when too few non-members make the target reachable."""

    target: float
    tpr: Interval
    resolved: bool
    note: str | None = None


@dataclass(frozen=True)
class MembershipMetrics:
    """Every membership metric of one (target, attack) evaluation, with bootstrap intervals."""

    n_members: int
    n_nonmembers: int
    auc: Interval
    tpr_at_fpr: tuple[RateAtFpr, ...]
    balanced_accuracy: Interval
    confidence: float
    bootstrap: int

    def at_fpr(self, target: float) -> RateAtFpr:
        for r in self.tpr_at_fpr:
            if r.target == target:
                return r
        raise KeyError(f"TPR at FPR {target:g} was not computed; computed: {[r.target for r in self.tpr_at_fpr]}")

    def to_json(self) -> dict:
        return {
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "auc": self.auc.value,
            "auc_ci": self.auc.ci(),
            "tpr_at_fpr": {
                f"{r.target:g}": {"tpr": r.tpr.value, "ci": r.tpr.ci(), "resolved": r.resolved,
                                  **({} if r.note is None else {"note": r.note})}
                for r in self.tpr_at_fpr
            },
            "balanced_accuracy": self.balanced_accuracy.value,
            "balanced_accuracy_ci": self.balanced_accuracy.ci(),
            "confidence": self.confidence,
            "bootstrap": self.bootstrap,
        }


def evaluate(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    targets: Sequence[float] = FPR_TARGETS,
) -> MembershipMetrics:
    """Every metric with its bootstrap interval.

    ``member_scores`` (Nm,), ``nonmember_scores`` (Nn,); higher = more likely member.
    """
    m, n = validate_scores(member_scores, nonmember_scores)
    labels = np.concatenate([np.ones(m.size, dtype=np.int64), np.zeros(n.size, dtype=np.int64)])
    point = point_metrics(labels, np.concatenate([m, n]), targets)
    boots = bootstrap_metrics(m, n, n_boot, np.random.default_rng(seed), targets) if n_boot > 0 else []

    def interval(value: float, getter) -> Interval:
        if not boots:
            return Interval(value)
        lo, hi = percentile_interval([getter(b) for b in boots], confidence)
        return Interval(value, lo, hi)

    def rate(t: float) -> RateAtFpr:
        ok = resolvable(int(n.size), t)
        note = None if ok else (
            f"only {n.size} non-members: FPR {t:g} needs at least {math.ceil(1 / t)}; this is TPR at FPR 0")
        return RateAtFpr(t, interval(point.tpr_at_fpr[t], lambda b, t=t: b.tpr_at_fpr[t]), ok, note)

    return MembershipMetrics(
        n_members=int(m.size),
        n_nonmembers=int(n.size),
        auc=interval(point.auc, lambda b: b.auc),
        tpr_at_fpr=tuple(rate(t) for t in targets),
        balanced_accuracy=interval(point.balanced_accuracy, lambda b: b.balanced_accuracy),
        confidence=confidence,
        bootstrap=n_boot,
    )


def save_roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str,
                 ceiling=None) -> None:
    """ROC curves (name → (member scores, non-member scores)) on log–log axes, written atomically; with
    ``ceiling`` (a :class:`~collafuse.tradeoff.Ceiling`), the curve no attack can beat under the formal
    guarantee, drawn black and dashed.

    Zero rates cannot be drawn on a log axis; they are clipped to half the smallest
    resolvable rate so the low-FPR region stays visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    floor = 1.0
    for name, (m, n) in curves.items():
        labels, scores = labels_and_scores(m, n)
        fpr, tpr, _ = roc(labels, scores)
        lo = 0.5 / max(len(m), len(n))
        floor = min(floor, lo)
        a = float(_trapezoid_auc(fpr, tpr))
        ax.plot(np.maximum(fpr, lo), np.maximum(tpr, lo), label=f"{name} (AUC {a:.3f})", lw=1.2)
    draw_ceiling(ax, ceiling, floor)
    finish_log_roc_axes(ax, floor, title, title_size=9)
    _save_atomically(fig, path)


def draw_ceiling(ax, ceiling, floor: float) -> None:
    """The formal ceiling's trade-off curve on a log–log ROC axis (nothing for None or an infinite guarantee)."""
    if ceiling is None or not ceiling.finite:
        return
    fpr = np.logspace(np.log10(max(floor, 1e-12)), 0.0, 200)
    label = f"formal ceiling (ε {ceiling.epsilon:.3g}" + (f", μ {ceiling.mu:.3g})" if ceiling.mu is not None else ")")
    bound = ceiling.tpr_bound(fpr)
    if bound.min() > 0.99:  # drawn along the top edge: say so, or it looks absent
        label += ": ≥ 0.99 at every FPR shown"
    ax.plot(fpr, np.maximum(bound, floor), color="black", ls="-.", lw=1.0, label=label)


def finish_log_roc_axes(ax, floor: float, title: str, title_size: int = 9) -> None:
    """Chance diagonal, log–log axes from ``floor`` to 1 (the low-FPR region is what matters), labels, legend."""
    ax.plot([floor, 1], [floor, 1], ls="--", color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=title_size)
    ax.legend(fontsize=7, loc="lower right")


def _save_atomically(fig, path: Path) -> None:
    """Write a figure to a hidden temp file, then rename it into place; always close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def save_curve_png(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str) -> None:
    """Leakage per timestep: AUC against t, one line per attack, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=110)
    for name, (steps, aucs) in curves.items():
        ax.plot(list(steps), list(aucs), marker="o", ms=3, lw=1.2, label=name)
    ax.axhline(0.5, ls="--", color="grey", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("ROC AUC")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save_atomically(fig, path)
