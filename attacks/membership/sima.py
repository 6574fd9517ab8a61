"""``sima``: the norm of the noise predicted for the noise-free candidate (Zhai et al. 2024, §4.2).

score(x) = −mean_{t ∈ low half} log ‖ε_θ(a_t x, t)‖₂ (the log puts every step on one scale). A model that fitted x treats a_t·x as a likely clean point
and predicts little noise for it: HIGHER score = MORE LIKELY MEMBER. Threats T2, T3.
Queries per image: M.
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores


def score(signals: Signals) -> AttackScores:
    """signals: sima_eps (N, M, D), steps (M,), t_range (2,) → scores (N,), per-step (N, M)."""
    per_step = -np.log(np.linalg.norm(np.asarray(signals["sima_eps"], dtype=np.float64), axis=2) + 1e-12)
    return low_noise_scores(per_step, signals["steps"], signals["t_range"])


ATTACK = MembershipAttack(
    name="sima",
    summary="negative norm of ε_θ(a_t x, t) (noise-free query)",
    threats=("T2", "T3"),
    signals=("sima_eps", "steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: m,
    reference="Zhai et al. 2024 (SIMA)",
)
