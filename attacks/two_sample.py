"""Classifier two-sample tests (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests", ICLR).

A classifier is trained to tell sample A from sample B; its cross-validated AUC is 0.5 in expectation
when both come from one distribution and grows as they differ. It serves two checks:

- the server's hand-off against real payloads (DESIGN §2.3; the audit's hand-off check), and
- the model-blind control of every membership result (DESIGN §4.2): members against non-members with
  only the images, no model.

The classifier is a ridge-regression discriminant on standardised, fixed features, fitted fold by
fold; every row is scored by the fold that did not see it (out-of-fold scores), so the AUC of those
scores is an honest held-out estimate. Its significance is a permutation test (the whole procedure on
relabelled rows, exact under the null). Folds are seeded and independent of the labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse.attacks.membership.metrics import MembershipMetrics, evaluate

FOLDS = 5


def image_features(images: torch.Tensor, pool: int = 4) -> np.ndarray:
    """Fixed features of (N, C, H, W) images for a two-sample classifier: (N, D) float64.

    - the low-frequency content: each channel average-pooled to ``pool``×``pool``, and its square
      (a linear classifier on squares sees differences of variance, not only of mean);
    - per image: mean, standard deviation, largest |x|, kurtosis E[x⁴]/E[x²]², the energy left after
      removing a 2×2 local mean (high-frequency content), and the lag-1 correlation of neighbouring
      pixels along each axis (how smooth the image is: white noise 0, images close to 1).
    Images whose signal is buried in noise (a payload at a high cut ratio) differ from a broken hand-off
    in these statistics, not pixel by pixel.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().cpu().double()
    n = x.shape[0]
    size = min(pool, x.shape[2], x.shape[3])
    low = torch.nn.functional.adaptive_avg_pool2d(x, size).reshape(n, -1)
    flat = x.reshape(n, -1)
    centred = flat - flat.mean(1, keepdim=True)
    var = centred.pow(2).mean(1).clamp_min(1e-12)
    local_mean = torch.nn.functional.avg_pool2d(x, 2, stride=1, padding=0)
    high = (x[..., 1:, 1:] - local_mean).reshape(n, -1).pow(2).mean(1)

    def lag1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.reshape(n, -1), b.reshape(n, -1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).mean(1) / (a.pow(2).mean(1).sqrt() * b.pow(2).mean(1).sqrt()).clamp_min(1e-12)

    stats = torch.stack([
        flat.mean(1), var.sqrt(), flat.abs().amax(1), centred.pow(4).mean(1) / var.pow(2), high,
        lag1(x[..., :, 1:], x[..., :, :-1]), lag1(x[..., 1:, :], x[..., :-1, :]),
    ], 1)
    return torch.cat([low, low.pow(2), stats], 1).numpy()


RIDGE = 1.0  # the ridge penalty on standardised features (a handful of features, hundreds of rows)


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` rows: a seeded shuffle cut into ``folds`` near-equal parts, independent of the labels
    (so that a permutation of the labels meets the same folds: the permutation test stays exact)."""
    order = np.random.default_rng(seed).permutation(n)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.arange(n) % folds
    return ids


def out_of_fold_scores(
    a: np.ndarray, b: np.ndarray, seed: int, folds: int = FOLDS, permutations: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cross-validated scores "this row is from A" for the rows of (Na, D) ``a`` and (Nb, D) ``b``.

    Each row's score comes from a ridge-regression classifier (labels ±1 on standardised features,
    penalty :data:`RIDGE`) fitted on the other folds. The fit is linear in the labels, so the scores
    the same procedure gives for ``permutations`` random relabellings of the rows come from the same
    matrices at no extra fitting cost. Returns (scores of A (Na,), scores of B (Nb,), permuted
    scores (permutations, Na + Nb) with their labels in the second element of :func:`permutation_labels`,
    or None).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    folds = min(folds, a.shape[0] + b.shape[0])
    if min(a.shape[0], b.shape[0]) < 2 or folds < 2:
        raise ValueError(f"a two-sample test needs at least 2 rows per sample, got {a.shape[0]} and {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    x = np.concatenate([a, b])
    y = permutation_labels(a.shape[0], b.shape[0], seed, permutations)  # (1 + K, N): row 0 the true labels
    targets = (2.0 * y - 1.0).T                                         # (N, 1 + K), ±1
    fold = _fold_ids(x.shape[0], folds, seed)
    scores = np.empty_like(targets)
    for f in range(folds):
        train, test = fold != f, fold == f
        mu, sd = x[train].mean(0), x[train].std(0)
        sd[sd == 0] = 1.0
        xt, xs = (x[train] - mu) / sd, (x[test] - mu) / sd
        gram = xt.T @ xt + RIDGE * np.eye(x.shape[1])
        weights = np.linalg.solve(gram, xt.T @ (targets[train] - targets[train].mean(0)))  # (D, 1 + K)
        # No intercept in the score: each fold's intercept is its training share of A, which is lowest
        # exactly where the test fold holds most of A, and would bias the pooled AUC below 0.5 under the null.
        scores[test] = xs @ weights
    true = scores[:, 0]
    perm = scores[:, 1:].T if permutations else None
    return true[: a.shape[0]], true[a.shape[0]:], perm


def bootstrap_out_of_fold_aucs(
    a: np.ndarray, b: np.ndarray, seed: int, rows_a: np.ndarray, rows_b: np.ndarray, folds: int = FOLDS,
) -> np.ndarray:
    """The AUC of the whole cross-validated procedure on each bootstrap resample: (B,) for (B, Na) ``rows_a``
    and (B, Nb) ``rows_b`` indices into ``a`` and ``b``.

    Each replicate refits the folds on its resampled rows, so its spread includes the classifier's own
    variability (a bootstrap of fixed out-of-fold scores misses it and is too narrow). A resampled row keeps
    the fold of the row it copies, so copies of one row never sit on both sides of a fold: no leakage."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x = np.concatenate([a, b])
    fold_of = _fold_ids(x.shape[0], min(folds, x.shape[0]), seed)
    labels = np.r_[np.ones(rows_a.shape[1]), np.zeros(rows_b.shape[1])]
    aucs = np.empty(rows_a.shape[0])
    for r in range(rows_a.shape[0]):
        idx = np.r_[rows_a[r], a.shape[0] + rows_b[r]]
        xr, fr, yr = x[idx], fold_of[idx], 2.0 * labels - 1.0
        scores = np.zeros(idx.size)
        for f in np.unique(fr):
            train, test = fr != f, fr == f
            mu, sd = xr[train].mean(0), xr[train].std(0)
            sd[sd == 0] = 1.0
            xt = (xr[train] - mu) / sd
            w = np.linalg.solve(xt.T @ xt + RIDGE * np.eye(x.shape[1]), xt.T @ (yr[train] - yr[train].mean()))
            scores[test] = ((xr[test] - mu) / sd) @ w
        aucs[r] = rank_auc(labels[None], scores[None])[0]
    return aucs


def permutation_labels(na: int, nb: int, seed: int, permutations: int) -> np.ndarray:
    """(1 + permutations, na + nb) labels: the true ones (1 for A's rows, first) and seeded random relabellings."""
    y = np.r_[np.ones(na), np.zeros(nb)]
    rng = np.random.default_rng([seed, 1])
    return np.stack([y] + [rng.permutation(y) for _ in range(permutations)])


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of (K, N) ``scores`` against the matching row of (K, N) 0/1 ``labels``
    (Mann–Whitney with mid-ranks: ties count one half, as ``roc_auc_score``)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    return ((ranks * labels).sum(1) - pos * (pos + 1) / 2.0) / (pos * neg)


@dataclass(frozen=True)
class TwoSampleResult:
    """A classifier two-sample test: the out-of-fold scores, their AUC and TPR at low FPR (bootstrap intervals
    over the fixed scores), and the permutation p-value of the AUC.

    The bootstrap interval holds the fitted classifiers fixed and so is too narrow for a cross-validated
    AUC (under the null its lower end exceeds 0.5 in about a fifth of the runs: docs/PERFORMANCE.md);
    significance is the permutation p-value, which is exact: the same folds and fits on relabelled rows."""

    scores_a: np.ndarray
    scores_b: np.ndarray
    metrics: MembershipMetrics
    p_value: float
    permutations: int


def classifier_two_sample_test(
    a: np.ndarray, b: np.ndarray, seed: int, n_boot: int = 200, permutations: int = 999,
) -> TwoSampleResult:
    """:func:`out_of_fold_scores` of features ``a`` against ``b`` (sample A as the positives): the metrics
    with bootstrap intervals, and p = (1 + #{permuted AUC ≥ AUC}) / (1 + permutations)."""
    sa, sb, perm = out_of_fold_scores(a, b, seed, permutations=permutations)
    metrics = evaluate(sa, sb, n_boot=n_boot, seed=seed)
    p_value = 1.0
    if permutations:
        labels = permutation_labels(len(sa), len(sb), seed, permutations)[1:]
        null = rank_auc(labels, perm)
        p_value = float((1 + np.count_nonzero(null >= metrics.auc.value - 1e-12)) / (1 + permutations))
    return TwoSampleResult(sa, sb, metrics, p_value, permutations)
