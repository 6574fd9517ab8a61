"""``lira`` and ``lira-offline``: the likelihood-ratio attack with reference models (Carlini et al. 2022,
"Membership inference attacks from first principles", §IV; for diffusion models Carlini et al. 2023, §5;
DESIGN.md §4.2).

Per candidate x and query step t the statistic is s = −log L(x), L the target's per-pixel denoising
loss at the FIXED (t, noise) draws every model is queried at (:mod:`~collafuse.attacks.membership.references`);
the log makes a positive, skewed loss near-Gaussian (the paper's logit scaling plays this role for
classifiers). Over the R reference models:

- online (``lira``): Gaussians N(μ_in(x), σ_in²) and N(μ_out(x), σ_out²) fitted to the references that
  trained on x and to those that did not; score = log N(s; μ_in, σ_in²) − log N(s; μ_out, σ_out²)
  (the paper's Algorithm 1);
- offline (``lira-offline``): only the OUT references; a one-sided test, score = (s − μ_out(x))/σ_out:
  how far the target fits x better than models that never saw it (the paper's §VI-B).

Variances are global per step (the paper's "fixed variance", used below 64 references, and the
authors' code: the spread of all IN (OUT) values), so K = 2 references already work. The score per
step is averaged over the low-noise half (:func:`~collafuse.attacks.membership.base.low_noise_scores`).
HIGHER = MORE LIKELY MEMBER; the direction is learned from the references (IN vs OUT), never from
the target's labels. Threats T2 (the server model; reference server models trained on simulated
payloads) and T3 (client models). Queries per image: (1 + R)·M·K fixed draws, plus R reference trainings.
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores
from collafuse.attacks.membership.metrics import ScoreError

SIGNALS = ("fixed_loss", "ref_fixed_loss", "ref_in", "steps", "t_range")
LOSS_FLOOR = 1e-12


def statistic(loss: np.ndarray) -> np.ndarray:
    """s = −log L (any shape), the per-example statistic whose distribution over models is fitted."""
    return -np.log(np.maximum(np.asarray(loss, dtype=np.float64), LOSS_FLOOR))


def _side_fit(ref: np.ndarray, side: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """ref (R, N, M), side (R, N) bool → per-candidate mean (N, M) and global std per step (M,)."""
    count = side.sum(0)
    if (count == 0).any():
        raise ScoreError(f"lira: {int((count == 0).sum())} candidate(s) have no {what} reference model; "
                         f"use more references (--references)")
    w = side[:, :, None].astype(np.float64)
    mean = (ref * w).sum(0) / count[:, None]
    values = ref.transpose(2, 0, 1)[:, side]  # (M, number of (r, n) pairs on this side)
    std = np.maximum(values.std(axis=1), 1e-6)
    return mean, std


def _check(signals: Signals) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = statistic(signals["fixed_loss"])
    ref = statistic(signals["ref_fixed_loss"])
    ref_in = np.asarray(signals["ref_in"], dtype=bool)
    if ref.ndim != 3 or ref.shape[1:] != target.shape or ref_in.shape != ref.shape[:2]:
        raise ScoreError(f"lira: reference losses {ref.shape}, target {target.shape} and ref_in {ref_in.shape} do not match")
    return target, ref, ref_in


def log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def score_online(signals: Signals) -> AttackScores:
    """fixed_loss (N, M), ref_fixed_loss (R, N, M), ref_in (R, N) → per-step log-likelihood ratios (N, M)."""
    target, ref, ref_in = _check(signals)
    mu_in, sd_in = _side_fit(ref, ref_in, "IN")
    mu_out, sd_out = _side_fit(ref, ~ref_in, "OUT")
    per_step = log_normal(target, mu_in, sd_in) - log_normal(target, mu_out, sd_out)
    return low_noise_scores(per_step, signals["steps"], signals["t_range"])


def score_offline(signals: Signals) -> AttackScores:
    """The OUT references only: per-step z = (s − μ_out)/σ_out (N, M), one-sided."""
    target, ref, ref_in = _check(signals)
    mu_out, sd_out = _side_fit(ref, ~ref_in, "OUT")
    return low_noise_scores((target - mu_out) / sd_out, signals["steps"], signals["t_range"])


def _queries(settings, m: int) -> int:
    return (1 + settings.references) * m * settings.n_noise


ATTACK = MembershipAttack(
    name="lira",
    summary="online LiRA: Gaussian IN/OUT fits of −log loss over R reference models (client or server), likelihood ratio",
    threats=("T2", "T3"),
    signals=SIGNALS,
    score=score_online,
    queries_per_image=_queries,
    reference="Carlini et al. 2022 (LiRA); Carlini et al. 2023 (diffusion)",
)

ATTACK_OFFLINE = MembershipAttack(
    name="lira-offline",
    summary="offline LiRA: one-sided test against the OUT reference models only",
    threats=("T2", "T3"),
    signals=SIGNALS,
    score=score_offline,
    queries_per_image=_queries,
    reference="Carlini et al. 2022 (LiRA, offline)",
)
