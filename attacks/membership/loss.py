"""``loss``: the denoising loss of the candidate (Matsumoto et al. 2023; Carlini et al. 2023, §4.2).

score(x) = −mean_{t ∈ low half, k} ‖η*_k − ε_θ(x_t, t)‖² with x_t = a_t x + s_t ε_k, K noise draws at each of
M steps; η* is the model's regression target (ε for a client, its posterior mean for the
server: see :mod:`~collafuse.attacks.membership.signals`). Members were fitted, so their
loss is lower: HIGHER score = MORE LIKELY MEMBER. Threats T2, T3. Queries per image: M·K.
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores


def score(signals: Signals) -> AttackScores:
    """signals: loss_sq (N, M, K), steps (M,), t_range (2,) → scores (N,), per-step scores (N, M)."""
    per_step = -np.asarray(signals["loss_sq"], dtype=np.float64).mean(axis=2)
    return low_noise_scores(per_step, signals["steps"], signals["t_range"])


ATTACK = MembershipAttack(
    name="loss",
    summary="negative denoising loss, averaged over K noise draws and M steps",
    threats=("T2", "T3"),
    signals=("loss_sq", "steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: m * settings.n_noise,
    reference="Matsumoto et al. 2023; Carlini et al. 2023",
)
