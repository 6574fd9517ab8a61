"""Dataset inference per client (DESIGN.md §4.2): did this model learn client k's data at all?

Per-image membership attacks on realistic diffusion models sit near chance, yet many weak per-image signals
add up. Dataset inference (Maini, Yaghini & Papernot 2021, "Dataset Inference: Ownership Resolution in
Machine Learning", ICLR; Dubiński et al. 2024, "CDI: Copyrighted Data Identification in Diffusion Models",
arXiv 2411.12858) turns them into one p-value per suspect set:

1. features: each candidate's scores from several membership attacks (the engine keeps every score);
2. a combiner fitted on a disjoint part of both sets: CDI's scoring model, a logistic regression on
   standardised features (suspect = 1, held-out = 0); it also learns each attack's direction, so a reversed
   signal (SecMI on low-noise client models, §4.2 "Direction") counts as evidence;
3. a one-sided Welch t-test on the rest: H1 "the combiner scores the suspect images higher than held-out
   images of the same distribution" (Maini et al.'s ``ttest_ind(..., alternative="greater", equal_var=False)``).

Under the null (the model never saw the suspect set, so suspects and held-out images are exchangeable) the
fitted combiner is independent of the test rows, and the p-value is a Welch test of two samples from one
distribution: valid up to Welch's approximation (tested on untrained models and random scores, with ties
and small samples). The suspect set for a target is client k's member images among its candidates (T3 and
T4: every member is client k's; T2: the server's candidates, split by the client that sent each image), the
held-out set is the target's non-member candidates.

"Members needed" is the power of the same procedure on subsets: for each size m of a doubling grid (4, 8,
16, … and the whole suspect set), :attr:`DatasetInferenceSettings.repeats` seeded draws of m suspect and m
held-out images (fewer held-out where the target has fewer) each run steps 2–3 afresh; the members needed is
the smallest m whose draws reject at ``alpha`` (p < 0.01) in at least half of the draws (the median p-value
is below ``alpha``: an auditor holding m of the client's images shows it more often than not). ∞ where even
the whole suspect set does not. CDI plots the mean p-value over 1000 resamples of the evaluation set against
their number (its ``experiments/cdi_perf.py``), Maini et al. the harmonic mean; a mean of p-values has no
probability meaning, a rejection rate does (it is the test's power at m), hence the median here.

Differences from the authors' code, named: CDI fits its scoring model once on 2,500 + 2,500 images per side
and resamples only the evaluation set; here the combiner is refitted on every draw (the subsets hold few
images, and refitting is what an auditor holding only m images can do), on :attr:`~DatasetInferenceSettings.
fit_fraction` = 0.2 of each side (CDI's 5,000 of 25,000). CDI's features include its hand-crafted gradient
and noise-optimisation features; here the features are the attacks the caller ran (no extra model query).
Maini et al. train a small network on the features; CDI (for diffusion models) a logistic regression, as here.

Everything here is a pure function of score arrays and a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from scipy.special import expit

NAME = "dataset-inference"


@dataclass(frozen=True)
class DatasetInferenceSettings:
    """alpha: the level of "members needed" (p < alpha); fit_fraction: each side's share that fits the
    combiner (CDI: 0.2); repeats: seeded draws per subset size; min_size: the smallest suspect set tested
    (2 fit + 2 test rows per side at the least)."""

    alpha: float = 0.01
    fit_fraction: float = 0.2
    repeats: int = 20
    min_size: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        if not 0 < self.fit_fraction < 1:
            raise ValueError(f"fit_fraction must lie in (0, 1), got {self.fit_fraction!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 4:
            raise ValueError(f"min_size must be an integer >= 4 (2 fit and 2 test rows per side), got {self.min_size!r}")


@dataclass(frozen=True)
class SizePoint:
    """The test on draws of ``members`` suspect and ``heldout`` held-out images: the share of draws with
    p < alpha (the power at this size) and the median p-value."""

    members: int
    heldout: int
    rejection_rate: float
    median_p: float

    def to_json(self) -> dict:
        return {"members": self.members, "heldout": self.heldout, "rejection_rate": self.rejection_rate,
                "median_p": self.median_p}


@dataclass(frozen=True)
class DatasetInference:
    """Dataset inference of one suspect set (client ``client``'s member images) against a target's held-out
    images. ``p_value``: the one-sided Welch test on the whole sets (one seeded fit/test split);
    ``t_statistic`` its statistic; ``weights``: the combiner's coefficients on the standardised features of
    that split, one per feature (sign: which way the attack's score points to membership here);
    ``members_needed``: the smallest size whose draws reject at ``alpha`` in at least half of them (∞: not
    reached with the suspect set available); ``curve``: every size tried."""

    client: int
    features: tuple[str, ...]
    n_members: int
    n_heldout: int
    n_fit: tuple[int, int]          # (suspect, held-out) rows that fitted the combiner of ``p_value``
    t_statistic: float
    p_value: float
    weights: tuple[float, ...]
    members_needed: float
    alpha: float
    curve: tuple[SizePoint, ...]

    def to_json(self) -> dict:
        needed = self.members_needed
        return {"client": self.client, "features": list(self.features), "n_members": self.n_members,
                "n_heldout": self.n_heldout, "n_fit": list(self.n_fit), "t_statistic": _finite_or_text(self.t_statistic),
                "p_value": self.p_value, "weights": dict(zip(self.features, self.weights)),
                "members_needed": "inf" if math.isinf(needed) else int(needed), "alpha": self.alpha,
                "curve": [p.to_json() for p in self.curve],
                "test": "one-sided Welch t-test of the combiner's scores, suspect > held-out (Maini et al. 2021)",
                "combiner": "logistic regression on standardised attack scores, fitted on a disjoint split (CDI)",
                "members_needed_definition": "smallest size of a doubling grid whose seeded draws reject at alpha in "
                                             "at least half of them (median p < alpha); inf: not reached"}


def _finite_or_text(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ---------------------------------------------------------------- the test

def welch_greater(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """One-sided Welch t-test of H1 mean(x) > mean(y): (t, p), x (n1,), y (n2,), n1, n2 ≥ 2.

    t = (x̄ − ȳ)/√(s_x²/n1 + s_y²/n2) with Welch–Satterthwaite degrees of freedom, p = P(T_df ≥ t) (scipy's
    ``ttest_ind(x, y, equal_var=False, alternative="greater")``, which gives NaN on constant samples). Both
    samples constant: no spread to test against, so the exact permutation p-value of the observed order
    stands in: 1 when x̄ ≤ ȳ (no evidence), and 1/C(n1 + n2, n1) when every x exceeds every y (the most
    extreme of the equally likely labellings): valid, never 0.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    n1, n2 = x.size, y.size
    if n1 < 2 or n2 < 2:
        raise ValueError(f"the Welch test needs at least 2 values per side, got {n1} and {n2}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("the Welch test got non-finite values")
    vx, vy = x.var(ddof=1) / n1, y.var(ddof=1) / n2
    diff = float(x.mean() - y.mean())
    se2 = vx + vy
    if se2 == 0.0:
        if diff > 0:
            return math.inf, 1.0 / math.comb(n1 + n2, n1)
        return (-math.inf if diff < 0 else 0.0), 1.0
    t = diff / math.sqrt(se2)
    df = se2 ** 2 / (vx ** 2 / (n1 - 1) + vy ** 2 / (n2 - 1))
    return t, float(sps.t.sf(t, df))


def fit_size(n: int, fraction: float) -> int:
    """Rows of a side of ``n`` that fit the combiner: ``fraction``·n rounded, at least 2, leaving at least 2
    to test (n ≥ 4)."""
    if n < 4:
        raise ValueError(f"a side needs at least 4 rows (2 to fit, 2 to test), got {n}")
    return int(min(max(round(fraction * n), 2), n - 2))


def _log_loss_objective(w: np.ndarray, x: np.ndarray, labels: np.ndarray, penalty: np.ndarray) -> float:
    """½·Σ penalty·w² + Σ log-loss: scikit-learn's L2 logistic objective at C = 1 (the intercept unpenalised)."""
    z = x @ w
    return float(0.5 * np.sum(penalty * w * w) + np.sum(np.logaddexp(0.0, z) - labels * z))


def logistic_fit(x: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Coefficients (intercept first, (F + 1,)) of the L2-penalised logistic regression scikit-learn's
    ``LogisticRegression()`` fits (C = 1, intercept unpenalised), by Newton's method with step halving: the
    objective is strictly convex, so this is its unique minimum (``tests/test_dataset_inference.py`` checks
    it against scikit-learn). Written out because a few Newton steps on F ≤ 10 features cost microseconds,
    where scikit-learn's solver set-up costs milliseconds, and the power curve fits hundreds of times."""
    design = np.column_stack([np.ones(len(x)), x])
    penalty = np.r_[0.0, np.ones(x.shape[1])]
    w = np.zeros(design.shape[1])
    current = _log_loss_objective(w, design, labels, penalty)
    for _ in range(max_iter):
        prob = expit(design @ w)
        grad = design.T @ (prob - labels) + penalty * w
        hess = (design * (prob * (1.0 - prob))[:, None]).T @ design + np.diag(penalty)
        # the unpenalised intercept of a one-class or separable fit keeps the Hessian invertible only through
        # the data; a tiny ridge on it changes nothing else
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(w)), grad)
        size = 1.0
        while size > 1e-8:
            trial = w - size * step
            value = _log_loss_objective(trial, design, labels, penalty)
            if value <= current:
                break
            size *= 0.5
        else:
            break  # no step lowers the objective: at the minimum up to rounding
        w, previous, current = trial, current, value
        if np.max(np.abs(size * step)) < tol or previous - current < tol * max(1.0, abs(current)):
            break
    return w


def fit_combiner(suspect: np.ndarray, heldout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CDI's scoring model: features standardised on the fit rows (mean, std; a constant feature keeps scale
    1, as scikit-learn's ``StandardScaler``), then a logistic regression, suspect = 1 and held-out = 0, with
    scikit-learn's defaults (L2, C = 1) as CDI's config (:func:`logistic_fit`). Inputs (n·, F); returns
    (mean (F,), scale (F,), coefficients (F + 1,), intercept first)."""
    x = np.concatenate([suspect, heldout])
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    labels = np.r_[np.ones(len(suspect)), np.zeros(len(heldout))]
    return mean, scale, logistic_fit((x - mean) / scale, labels)


def member_probability(features: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """The combiner's member probability σ(b + w·(x − mean)/scale) of each row of ``features`` (n, F): CDI's
    ``predict_proba(...)[:, 1]``."""
    z = coef[0] + ((features - mean) / scale) @ coef[1:]
    return expit(z)


def combined_test(suspect: np.ndarray, heldout: np.ndarray, rng: np.random.Generator,
                  fit_fraction: float) -> tuple[float, float, np.ndarray, tuple[int, int]]:
    """Steps 2–3 on one draw: a random fit/test split of each side, the combiner fitted on the fit rows, the
    one-sided Welch test of its member probability on the test rows. suspect (n1, F), heldout (n2, F), both
    ≥ 4 rows. Returns (t, p, the combiner's coefficients (F,), (suspect, held-out) fit rows)."""
    s_order, h_order = rng.permutation(len(suspect)), rng.permutation(len(heldout))
    k1, k2 = fit_size(len(suspect), fit_fraction), fit_size(len(heldout), fit_fraction)
    s_fit, s_test = suspect[s_order[:k1]], suspect[s_order[k1:]]
    h_fit, h_test = heldout[h_order[:k2]], heldout[h_order[k2:]]
    mean, scale, coef = fit_combiner(s_fit, h_fit)
    t, p = welch_greater(member_probability(s_test, mean, scale, coef), member_probability(h_test, mean, scale, coef))
    return t, p, coef[1:].copy(), (k1, k2)


def size_grid(n_members: int, min_size: int) -> tuple[int, ...]:
    """The subset sizes "members needed" tries: min_size, 2·min_size, 4·min_size, … below ``n_members``,
    then ``n_members`` itself."""
    sizes, m = [], min_size
    while m < n_members:
        sizes.append(m)
        m *= 2
    return (*sizes, n_members)


def power_curve(suspect: np.ndarray, heldout: np.ndarray, rng: np.random.Generator,
                settings: DatasetInferenceSettings) -> tuple[SizePoint, ...]:
    """The test's rejection rate at ``settings.alpha`` and median p-value on ``settings.repeats`` seeded draws of
    m suspect and min(m, held-out) held-out rows, for every m of :func:`size_grid` (the draws at the whole
    suspect set differ only in their fit/test split)."""
    points = []
    for m in size_grid(len(suspect), settings.min_size):
        h = min(m, len(heldout))
        p_values = []
        for _ in range(settings.repeats):
            s_rows = rng.choice(len(suspect), m, replace=False)
            h_rows = rng.choice(len(heldout), h, replace=False)
            p_values.append(combined_test(suspect[s_rows], heldout[h_rows], rng, settings.fit_fraction)[1])
        p = np.asarray(p_values)
        points.append(SizePoint(m, h, float(np.mean(p < settings.alpha)), float(np.median(p))))
    return tuple(points)


def members_needed(curve: tuple[SizePoint, ...]) -> float:
    """The smallest size whose draws reject in at least half of them (∞ where none does)."""
    return next((float(p.members) for p in curve if p.rejection_rate >= 0.5), math.inf)


def dataset_inference(suspect: np.ndarray, heldout: np.ndarray, features: tuple[str, ...], client: int, seed: int,
                      settings: DatasetInferenceSettings | None = None) -> DatasetInference:
    """Dataset inference of one suspect set: suspect (n1, F) and heldout (n2, F) hold each image's scores of
    the F attacks named in ``features`` (higher = more likely member as each attack scores, though the
    combiner learns its own sign), n1, n2 ≥ ``settings.min_size``. ``seed``: the split and the draws."""
    settings = settings or DatasetInferenceSettings()
    suspect, heldout = np.asarray(suspect, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    if suspect.ndim != 2 or heldout.ndim != 2 or suspect.shape[1] != heldout.shape[1] or suspect.shape[1] != len(features):
        raise ValueError(f"suspect {suspect.shape} and held-out {heldout.shape} must be (n, F) with F = "
                         f"{len(features)} features ({', '.join(features)})")
    if min(len(suspect), len(heldout)) < settings.min_size:
        raise ValueError(f"dataset inference needs at least {settings.min_size} suspect and held-out images, got "
                         f"{len(suspect)} and {len(heldout)}")
    if not (np.isfinite(suspect).all() and np.isfinite(heldout).all()):
        raise ValueError("dataset inference got non-finite scores")
    t, p, weights, n_fit = combined_test(suspect, heldout, np.random.default_rng([seed, 0]), settings.fit_fraction)
    curve = power_curve(suspect, heldout, np.random.default_rng([seed, 1]), settings)
    return DatasetInference(client, tuple(features), len(suspect), len(heldout), n_fit, float(t), float(p),
                            tuple(float(w) for w in weights), members_needed(curve), settings.alpha, curve)


def per_client(member_features: np.ndarray, owner: np.ndarray, nonmember_features: np.ndarray,
               features: tuple[str, ...], seed: int,
               settings: DatasetInferenceSettings | None = None) -> tuple[DatasetInference, ...]:
    """:func:`dataset_inference` for every client that owns at least ``settings.min_size`` of the member
    candidates: member_features (Nm, F), owner (Nm,) the client of each member (−1: unknown, left out),
    nonmember_features (Nn, F) the held-out set every client is tested against. Client k's draws come from
    ``[seed, k]``."""
    settings = settings or DatasetInferenceSettings()
    owner = np.asarray(owner)
    if owner.shape != (len(member_features),):
        raise ValueError(f"owner must give one client per member, shape ({len(member_features)},), got {owner.shape}")
    if len(nonmember_features) < settings.min_size:
        return ()
    out = []
    for k in sorted(int(c) for c in np.unique(owner) if c >= 0):
        rows = owner == k
        if rows.sum() >= settings.min_size:
            seed_k = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            out.append(dataset_inference(member_features[rows], nonmember_features, features, k, seed_k, settings))
    return tuple(out)
