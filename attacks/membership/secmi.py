"""``secmi``: step-wise error comparison (Duan et al. 2023, SecMI-stat; §4.2).

The candidate is inverted deterministically (DDIM, η = 0) along the step grid; at each
probe step t, one step forward t → t+k (the inversion step) and one reverse DDIM step back
give x̂_t; score(x) = −mean_{t ∈ low half} log ‖x̃_t − x̂_t‖² (the log puts every step on one scale). A fitted point's trajectory is reversible, so
the error is small for members: HIGHER score = MORE LIKELY MEMBER. Threats T2, T3.
Queries per image: M + 1 (the reverse query at each step is the next inversion query).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores


def score(signals: Signals) -> AttackScores:
    """signals: secmi_inv, secmi_rec (N, M, D), secmi_steps (M,), t_range (2,) → scores (N,), per-step (N, M)."""
    err = ((np.asarray(signals["secmi_inv"], np.float64) - np.asarray(signals["secmi_rec"], np.float64)) ** 2).sum(axis=2)
    per_step = -np.log(err + 1e-12)
    return low_noise_scores(per_step, signals["secmi_steps"], signals["t_range"])


ATTACK = MembershipAttack(
    name="secmi",
    summary="−‖x̃_t − x̂_t‖² after DDIM inversion and one step t → t+k → t",
    threats=("T2", "T3"),
    signals=("secmi_inv", "secmi_rec", "secmi_steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: m + 1,
    reference="Duan et al. 2023 (SecMI)",
)
