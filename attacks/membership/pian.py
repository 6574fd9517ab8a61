"""``pian``: PIA with ε0 rescaled to the norm of a Gaussian vector (Kong et al. 2024, §4.2).

ε̃0 = √D·ε0/‖ε0‖ (ε0 as in pia); score(x) = −mean_{t ∈ low half} log ‖ε̃0 − ε_θ(a_t x + s_t ε̃0, t)‖_4: the query
sits on the typical shell of Gaussian noise, whatever the norm of the model's ε0. HIGHER score = MORE LIKELY MEMBER. Threats T2, T3.
Queries per image: 1 + M (ε0 shared with pia).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores
from collafuse.attacks.membership.pia import pia_distance


def rescale_rows(eps0: np.ndarray) -> np.ndarray:
    """Each row of (N, D) rescaled to L2 norm √D (zero rows stay zero)."""
    eps0 = np.asarray(eps0, dtype=np.float64)
    norm = np.linalg.norm(eps0, axis=1, keepdims=True)
    return np.where(norm > 0, eps0 / np.maximum(norm, 1e-12) * np.sqrt(eps0.shape[1]), 0.0)


def score(signals: Signals) -> AttackScores:
    """signals: eps_origin (N, D), pian_eps (N, M, D), steps (M,), t_range (2,) → scores (N,), per-step (N, M)."""
    per_step = -np.log(pia_distance(rescale_rows(signals["eps_origin"]), signals["pian_eps"]) + 1e-12)
    return low_noise_scores(per_step, signals["steps"], signals["t_range"])


ATTACK = MembershipAttack(
    name="pian",
    summary="PIA with ε0 rescaled to norm √D",
    threats=("T2", "T3"),
    signals=("eps_origin", "pian_eps", "steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: 1 + m,
    reference="Kong et al. 2024 (PIAN)",
)
