"""``pia``: proximal initialisation (Kong et al. 2024, §4.2).

ε0 = ε_θ(x, 0) (for the server: ε_θ(a_{t_c} x, t_c), its own "step 0"); then
score(x) = −mean_{t ∈ low half} log ‖ε0 − ε_θ(a_t x + s_t ε0, t)‖_p with p = 4 (the log puts every
step on one scale; per step it is PIA's statistic). A fitted point has a consistent
denoising direction along its own trajectory, so the distance is small for members:
HIGHER score = MORE LIKELY MEMBER. Threats T2, T3. Queries per image: 1 + M (ε0 shared with pian).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals, low_noise_scores

P_NORM = 4.0


def pia_distance(eps0: np.ndarray, eps_t: np.ndarray, p: float = P_NORM) -> np.ndarray:
    """‖ε0 − ε_t‖_p per (candidate, step): eps0 (N, D), eps_t (N, M, D) → (N, M)."""
    diff = np.abs(np.asarray(eps_t, dtype=np.float64) - np.asarray(eps0, dtype=np.float64)[:, None, :])
    return (diff**p).sum(axis=2) ** (1.0 / p)


def score(signals: Signals) -> AttackScores:
    """signals: eps_origin (N, D), pia_eps (N, M, D), steps (M,), t_range (2,) → scores (N,), per-step (N, M)."""
    per_step = -np.log(pia_distance(signals["eps_origin"], signals["pia_eps"]) + 1e-12)
    return low_noise_scores(per_step, signals["steps"], signals["t_range"])


ATTACK = MembershipAttack(
    name="pia",
    summary="−‖ε0 − ε_θ(a_t x + s_t ε0, t)‖_4 with ε0 = ε_θ(x, 0)",
    threats=("T2", "T3"),
    signals=("eps_origin", "pia_eps", "steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: 1 + m,
    reference="Kong et al. 2024 (PIA)",
)
