"""The controls every membership result carries (DESIGN.md §4.2 "Controls every result carries").

An attack's AUC alone does not say that the MODEL leaks. Three controls say what it means:

- :func:`blind_control`: the model-blind baseline ("Tracing the Roots", NeurIPS 2025; CopyMark,
  Wen et al. 2024). A classifier that sees only the candidate images (no model, no payload, no
  sample) tries to tell members from non-members, cross-validated (:mod:`~collafuse.attacks.two_sample`:
  the out-of-fold scores, their AUC and TPR at 1 % FPR, and an exact permutation p-value). On a fair
  split its AUC is 0.5; when the member and non-member sets differ in distribution (another source,
  brighter images) it is high, and so is every attack's, for a reason that has nothing to do with the
  model. :func:`above_blind` tests, per attack, whether the attack is significantly better than it.
- :func:`heldout_rates`: held-out thresholds (CopyMark §5). A threshold chosen for 1 % FPR on the same
  candidates it is scored on is optimistic; here it is fixed on a random calibration half and TPR and
  the FPR actually reached are measured on the other half, each with a Wilson interval.
- :func:`ceiling_check`: the formal ceiling (:mod:`collafuse.tradeoff`). An ROC above the trade-off
  curve of a known guarantee, beyond its Clopper–Pearson error, is an error of the audit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_curve

from collafuse.attacks.membership.epsilon import clopper_pearson_upper, threshold_grid
from collafuse.attacks.membership.metrics import FPR_TARGETS, MembershipMetrics, resolvable, validate_scores
from collafuse.attacks.stats import Interval, wilson_interval
from collafuse.attacks.two_sample import (bootstrap_out_of_fold_aucs, classifier_two_sample_test, image_features,
                                          rank_auc)
from collafuse.jsonio import encode
from collafuse.tradeoff import Ceiling

BLIND_FEATURES = ("4×4 average-pooled channels and their squares; mean, std, max |x|, kurtosis, "
                  "high-frequency energy, lag-1 correlations (attacks.two_sample.image_features)")
BLIND_PERMUTATIONS = 4999  # p-values down to 2e-4: enough to stay significant after a correction over 50 targets
BLIND_AUC_WARNING = 0.6    # the default policy's blind_auc limit: above it (and significant), a shift is reported
# The blind baseline must also be significant at this level (permutation p; the audit corrects it over a threat's
# targets, Bonferroni) before a shift is declared: the candidate sets are small, and on a fair random split an AUC
# above 0.6 by chance is common (0.62 with p = 0.049 on the quick audit's 64 + 64 candidates).
BLIND_ALPHA = 0.01
ABOVE_BLIND_LEVEL = 0.95   # one-sided: the attack's AUC exceeds the blind AUC at this confidence


# ---------------------------------------------------------------- the model-blind baseline

@dataclass(frozen=True)
class BlindControl:
    """The model-blind classifier on one target's candidates: out-of-fold scores (members first), metrics with
    bootstrap intervals, and the permutation p-value of its AUC (the bootstrap interval holds the fitted
    folds fixed and is too narrow for a cross-validated AUC: the p-value is the test)."""

    metrics: MembershipMetrics
    p_value: float
    permutations: int
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    member_features: np.ndarray      # what the classifier saw, kept so a comparison can refit it per resample
    nonmember_features: np.ndarray
    seed: int

    @property
    def auc(self) -> Interval:
        return self.metrics.auc

    @property
    def tpr_at_1pct(self) -> Interval:
        return self.metrics.at_fpr(0.01).tpr

    def exceeds(self, limit: float, alpha: float = BLIND_ALPHA) -> bool:
        """Members and non-members differ without the model: the AUC is above ``limit`` AND significantly
        above 0.5 (permutation p < α), so a small candidate set's chance excursion is not called a shift."""
        return self.auc.value > limit and self.p_value < alpha

    def to_json(self) -> dict:
        return encode({"auc": self.auc.value, "auc_ci": self.auc.ci(), "tpr_at_1pct_fpr": self.tpr_at_1pct.value,
                       "tpr_at_1pct_fpr_ci": self.tpr_at_1pct.ci(), "p_value": self.p_value,
                       "permutations": self.permutations, "features": BLIND_FEATURES,
                       "classifier": "ridge discriminant, 5 seeded folds, out-of-fold scores"})


def blind_control(members: torch.Tensor, nonmembers: torch.Tensor, seed: int, n_boot: int = 200,
                  permutations: int = BLIND_PERMUTATIONS) -> BlindControl:
    """The model-blind baseline on (Nm, C, H, W) ``members`` and (Nn, C, H, W) ``nonmembers`` (the candidate
    images only): a cross-validated classifier two-sample test with members as the positives."""
    fm, fn = image_features(members), image_features(nonmembers)
    test = classifier_two_sample_test(fm, fn, seed, n_boot=n_boot, permutations=permutations)
    return BlindControl(test.metrics, test.p_value, test.permutations, test.scores_a, test.scores_b, fm, fn, seed)


@dataclass(frozen=True)
class BlindComparison:
    """An attack against the blind baseline on the same candidates: the AUC difference, its one-sided lower
    confidence bound, and whether the attack is significantly above the baseline."""

    difference: float
    lower: float
    above: bool

    def to_json(self) -> dict:
        return encode({"auc_minus_blind": self.difference, "lower_bound": self.lower, "level": ABOVE_BLIND_LEVEL,
                       "significantly_above_blind": self.above})


ABOVE_BLIND_BOOT = 200


def blind_auc_spread(blind: BlindControl, n_boot: int = ABOVE_BLIND_BOOT) -> float:
    """The standard deviation of the blind baseline's cross-validated AUC: the whole procedure refitted on
    ``n_boot`` stratified bootstrap resamples (:func:`~collafuse.attacks.two_sample.bootstrap_out_of_fold_aucs`;
    a bootstrap of its fixed out-of-fold scores misses the classifier's own variability and is too narrow).
    Only the spread is used: a refit on a resample with repeated rows is biased low."""
    rng = np.random.default_rng([blind.seed, 7])
    nm, nn = blind.member_features.shape[0], blind.nonmember_features.shape[0]
    rows_m, rows_n = rng.integers(0, nm, size=(n_boot, nm)), rng.integers(0, nn, size=(n_boot, nn))
    return float(bootstrap_out_of_fold_aucs(blind.member_features, blind.nonmember_features, blind.seed,
                                            rows_m, rows_n).std(ddof=1))


def above_blind(member_scores: np.ndarray, nonmember_scores: np.ndarray, blind: BlindControl, seed: int,
                blind_spread: float, n_boot: int = ABOVE_BLIND_BOOT) -> BlindComparison:
    """Whether an attack's AUC is significantly above the blind baseline's on the same candidates: a one-sided
    z-test of AUC_attack − AUC_blind > 0 at :data:`ABOVE_BLIND_LEVEL` with the two spreads added as if
    independent (the attack's from a stratified bootstrap of its scores, the baseline's ``blind_spread`` from
    :func:`blind_auc_spread`). Where both see the same distribution shift their estimates are positively
    correlated and the true spread of the difference is smaller, so the test is conservative: an attack that
    only re-discovers the shift is not called above the baseline."""
    m, n = validate_scores(member_scores, nonmember_scores)
    if m.size != blind.member_scores.size or n.size != blind.nonmember_scores.size:
        raise ValueError(f"the attack scored {m.size}+{n.size} candidates, the blind control {blind.member_scores.size}"
                         f"+{blind.nonmember_scores.size}: they must score the same ones")
    rng = np.random.default_rng([seed, 8])
    rows_m, rows_n = rng.integers(0, m.size, size=(n_boot, m.size)), rng.integers(0, n.size, size=(n_boot, n.size))
    labels = np.broadcast_to(np.r_[np.ones(m.size), np.zeros(n.size)], (n_boot, m.size + n.size))
    attack_spread = float(rank_auc(labels, np.concatenate([m[rows_m], n[rows_n]], 1)).std(ddof=1))
    full = np.r_[np.ones(m.size), np.zeros(n.size)][None]
    diff = float(rank_auc(full, np.r_[m, n][None])[0]) - blind.auc.value
    z = float(norm.ppf(ABOVE_BLIND_LEVEL))
    lower = diff - z * math.hypot(attack_spread, blind_spread)
    return BlindComparison(diff, lower, lower > 0.0)


# ---------------------------------------------------------------- held-out thresholds

@dataclass(frozen=True)
class HeldOutRate:
    """One nominal FPR: the threshold fixed on the calibration half, and TPR and the FPR it reaches on the test
    half (Wilson intervals). ``resolved`` False: the calibration half had fewer than 1/target non-members, so
    the threshold is the one of FPR 0 there."""

    target: float
    threshold: float
    tpr: Interval
    fpr: Interval
    resolved: bool

    def to_json(self) -> dict:
        return encode({"target_fpr": self.target, "threshold": self.threshold, "tpr": self.tpr.value,
                       "tpr_ci": self.tpr.ci(), "fpr": self.fpr.value, "fpr_ci": self.fpr.ci(),
                       "resolved": self.resolved})


@dataclass(frozen=True)
class HeldOut:
    """Held-out thresholds of one attack: the split sizes and one :class:`HeldOutRate` per nominal FPR."""

    n_calibration: tuple[int, int]   # (members, non-members) the thresholds were fixed on
    n_test: tuple[int, int]          # (members, non-members) TPR and FPR were measured on
    rates: tuple[HeldOutRate, ...]

    def at(self, target: float) -> HeldOutRate:
        for r in self.rates:
            if r.target == target:
                return r
        raise KeyError(f"no held-out rate at FPR {target:g}; computed: {[r.target for r in self.rates]}")

    def to_json(self) -> dict:
        return {"n_calibration": list(self.n_calibration), "n_test": list(self.n_test),
                "split": "random halves of members and of non-members (seeded)",
                "rates": {f"{r.target:g}": r.to_json() for r in self.rates}}


def calibration_split(n: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) indices of ``n`` rows: a seeded random half (the larger half is the test)."""
    order = np.random.default_rng([seed, 11, stream]).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def threshold_at(member_scores: np.ndarray, nonmember_scores: np.ndarray, target: float) -> float:
    """The threshold (member iff score ≥ it) of the largest TPR whose FPR ≤ ``target`` on these scores
    (sklearn's ROC, as the in-sample TPR@FPR); +∞ when only the empty decision keeps the FPR."""
    labels = np.r_[np.ones(member_scores.size), np.zeros(nonmember_scores.size)]
    fpr, tpr, thr = roc_curve(labels, np.r_[member_scores, nonmember_scores], drop_intermediate=False)
    ok = np.flatnonzero(fpr <= target + 1e-12)
    best = ok[np.argmax(tpr[ok])]
    return float(thr[best])


def heldout_rates(member_scores: np.ndarray, nonmember_scores: np.ndarray, seed: int,
                  targets: tuple[float, ...] = FPR_TARGETS) -> HeldOut:
    """TPR and realised FPR at thresholds fixed on a random calibration half (CopyMark §5)."""
    m, n = validate_scores(member_scores, nonmember_scores)
    if m.size < 2 or n.size < 2:
        raise ValueError(f"held-out thresholds need at least 2 members and 2 non-members, got {m.size} and {n.size}")
    cal_m, test_m = calibration_split(m.size, seed, 0)
    cal_n, test_n = calibration_split(n.size, seed, 1)
    rates = []
    for target in targets:
        thr = threshold_at(m[cal_m], n[cal_n], target)
        tp = int(np.count_nonzero(m[test_m] >= thr))
        fp = int(np.count_nonzero(n[test_n] >= thr))
        rates.append(HeldOutRate(target, thr, wilson_interval(tp, test_m.size), wilson_interval(fp, test_n.size),
                                 resolvable(cal_n.size, target)))
    return HeldOut((cal_m.size, cal_n.size), (test_m.size, test_n.size), tuple(rates))


# ---------------------------------------------------------------- the ceiling

@dataclass(frozen=True)
class CeilingCheck:
    """An ROC against its formal ceiling. ``above``: at some threshold the Clopper–Pearson lower bound of the
    TPR exceeds the ceiling at the FPR's upper bound (Bonferroni over the thresholds, confidence 1 − α): an
    error of the audit. ``gap``: the largest (TPR lower bound − ceiling) over the thresholds."""

    ceiling: Ceiling
    above: bool
    gap: float
    fpr: float                 # the FPR upper bound where the gap is largest
    tpr: float                 # the TPR lower bound there
    confidence: float

    def to_json(self) -> dict:
        return encode({"ceiling": self.ceiling.to_json(), "roc_above_ceiling": self.above, "gap": self.gap,
                       "at_fpr_upper": self.fpr, "tpr_lower": self.tpr, "confidence": self.confidence,
                       "rule": "TPR lower bound > ceiling(FPR upper bound) at some threshold (Clopper-Pearson, "
                               "Bonferroni over the thresholds)"})


def ceiling_check(member_scores: np.ndarray, nonmember_scores: np.ndarray, ceiling: Ceiling, alpha: float = 0.05,
                  n_thresholds: int = 64) -> CeilingCheck:
    """Whether the empirical ROC of these scores lies above ``ceiling`` beyond its error.

    The thresholds are label-free quantiles of the pooled scores (as the ε lower bound's); at each, one-sided
    Clopper–Pearson bounds FPR̄ and FNR̄ at level α/(2·thresholds) hold all at once with probability ≥ 1 − α,
    so a correct guarantee is flagged with probability ≤ α."""
    m, n = validate_scores(member_scores, nonmember_scores)
    thr = threshold_grid(np.r_[m, n], n_thresholds)
    fp = (n[None, :] >= thr[:, None]).sum(1)
    fn = (m[None, :] < thr[:, None]).sum(1)
    level = alpha / (2.0 * thr.size)
    fpr_hi = clopper_pearson_upper(fp, n.size, level)
    tpr_lo = 1.0 - clopper_pearson_upper(fn, m.size, level)
    gap = tpr_lo - ceiling.tpr_bound(fpr_hi)
    i = int(np.argmax(gap))
    return CeilingCheck(ceiling, bool(gap[i] > 1e-12), float(gap[i]), float(fpr_hi[i]), float(tpr_lo[i]), 1.0 - alpha)


def ceiling_curve(ceiling: Ceiling, floor: float, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR bound) on a log grid from ``floor`` to 1, for drawing the ceiling on a log–log ROC."""
    fpr = np.logspace(math.log10(max(floor, 1e-12)), 0.0, points)
    return fpr, ceiling.tpr_bound(fpr)
