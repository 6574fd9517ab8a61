"""``noise-agg``: small-noise aggregation (Li, Chen & Fan 2025, "Noise Aggregation Analysis Driven by Small-Noise
Injection: Efficient Membership Inference for Diffusion Models", arXiv 2510.21783; DESIGN.md §4.2).

The attack: inject ONE small noise draw into the candidate, x_s = √ᾱ_s x + √(1−ᾱ_s) ε with s ≈ 0.08·T, then
walk 5 deterministic DDIM steps of stride ≈ 0.01·T down from s, querying the model at each: ε̂_1 .. ε̂_5
(5 queries). A member sits near a mode the model fitted, so the noise it predicts along that short
trajectory stays together ("aggregated"); a non-member's predictions scatter. The score is

    score(x) = −log( mean_{i<j} ‖ε̂_i − ε̂_j‖² + δ ),   δ = 1e-12 (a floor for identical predictions)

HIGHER = MORE LIKELY MEMBER. Threats T2 (on the server's relative schedule, its data point a_{t_c} x as
every white-box attack here queries it) and T3. Queries per image: 5.

Constants and where they come from. The paper's CIFAR-10 DDPM has T = 1000: injection at t = 80, stride 10,
5 queries (the issue's and DESIGN §4.2's statement of the paper: AUC 0.957 with 5 queries). We could not
check them against the full text or the authors' code: the stored corpus holds the abstract and summaries
only (which confirm the mechanism: single-step low-intensity noise injection, noise predicted at
consecutive timesteps, the aggregation degree of those predictions as the score; no code was found). The
pairwise form and δ are that statement's; the step scaling below is ours.

Scaling to this project's chains (:func:`aggregation_steps`): a model owns the steps origin+1 .. t_max of a
chain of length L = T − origin (origin 0 for a client, t_c for the server, whose data sit at t_c). The
start is origin + round(0.08·L) and the stride max(1, round(0.01·L)): at T = 1000 exactly the paper's
80, 70, 60, 50, 40. The start is then raised to leave room for 5 distinct steps above the model's first
trained step (T = 50: stride 1, start 5: steps 5, 4, 3, 2, 1) and lowered to the model's last trained step
(a client at a small cut); where the range holds fewer than 5 steps the stride shrinks to 1 and every step
of the range is used (fewer queries: the result's per-image count is then the number of steps).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals

QUERIES = 5               # the paper's query budget: one noise draw, 5 DDIM steps
START_FRACTION = 0.08     # t = 80 of T = 1000
STRIDE_FRACTION = 0.01    # stride 10 of T = 1000
DELTA = 1e-12             # δ inside the log


def aggregation_steps(origin: int, t_min: int, t_max: int, T: int, n: int = QUERIES) -> list[int]:
    """The query steps, from the start down (see the module doc): ``n`` distinct steps in t_min..t_max of the
    model's chain (origin, T], or all of them when the range holds fewer."""
    if not origin <= t_min <= t_max <= T or n < 1:
        raise ValueError(f"aggregation_steps needs origin <= t_min <= t_max <= T and n >= 1, got "
                         f"{origin}, {t_min}, {t_max}, {T}, {n}")
    length = T - origin
    stride = max(1, int(round(STRIDE_FRACTION * length)))
    if t_max - t_min < (n - 1) * stride:  # the range is too short for this stride
        stride = max(1, (t_max - t_min) // max(1, n - 1))
    start = origin + int(round(START_FRACTION * length))
    start = min(t_max, max(start, t_min + (n - 1) * stride))
    return [t for t in (start - i * stride for i in range(n)) if t >= t_min]


def pairwise_spread(eps: np.ndarray) -> np.ndarray:
    """mean_{i<j} ‖ε̂_i − ε̂_j‖² per candidate: eps (N, S, D), S ≥ 2 → (N,) float64.

    Uses Σ_{i<j} ‖a_i − a_j‖² = S·Σ_i ‖a_i − ā‖² (the pairwise sum through the spread about the mean)."""
    eps = np.asarray(eps, dtype=np.float64)
    if eps.ndim != 3 or eps.shape[1] < 2:
        raise ValueError(f"pairwise_spread needs (N, S >= 2, D) predictions, got shape {eps.shape}")
    s = eps.shape[1]
    centred = eps - eps.mean(axis=1, keepdims=True)
    pair_sum = s * (centred**2).sum(axis=(1, 2))
    return pair_sum / (s * (s - 1) / 2)


def score(signals: Signals) -> AttackScores:
    """signals: agg_eps (N, S, D), the predictions along the DDIM walk → −log(mean pairwise ‖ε̂_i − ε̂_j‖² + δ)."""
    eps = np.asarray(signals["agg_eps"])
    return AttackScores(-np.log(pairwise_spread(eps) + DELTA), queries_per_image=int(eps.shape[1]))


ATTACK = MembershipAttack(
    name="noise-agg",
    summary="small-noise aggregation: one small noise draw, 5 DDIM steps of stride 0.01·T from 0.08·T, "
            "−log of the mean pairwise distance of the 5 predicted noises",
    threats=("T2", "T3"),
    signals=("agg_eps",),
    score=score,
    queries_per_image=lambda settings, m: QUERIES,
    reference="Li, Chen & Fan 2025, arXiv 2510.21783 (noise aggregation)",
)
