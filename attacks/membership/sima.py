"""``sima``: the norm of the noise predicted for the noise-free candidate (Rao, Qu & Moyer 2025,
"Score-based Membership Inference on Diffusion Models", arXiv 2509.25003; §4.2).

score(x) = −mean_{t ∈ low half} log ‖ε_θ(a_t x, t)‖₂ (the log puts every step on one scale). A model that fitted x treats a_t·x as a likely clean point
and predicts little noise for it (the paper: the expected denoiser output points to a kernel-weighted
local mean of nearby training points, so its norm encodes proximity to the training set).
The paper's attack is one query at one step; we report every step (``AttackScores.per_step``) and,
as one number, the mean over the low-noise half of the model's range.
HIGHER score = MORE LIKELY MEMBER. Threats T2, T3.
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
    reference="Rao, Qu & Moyer 2025, arXiv 2509.25003 (SimA)",
)
