"""``pia``: proximal initialisation (Kong et al., "An Efficient Membership Inference Attack for the
Diffusion Model by Proximal Initialization", ICLR 2024; §4.2).

ε0 = ε_θ(x, t_first), queried at the model's FIRST TRAINED STEP (1 for a client model; for the
server, its data point a_{t_c} x at t_c + 1, the first step it was trained on), as the authors'
code queries ε_θ(x0, 0) at the first step of their 0-indexed DDPM (``PIA.ddim_reverse`` in
github.com/kong13661/PIA). Per step t, with x_t = a_t x + s_t ε0 (on the model's own schedule),
the paper's statistic is d_t = Σ|ε0 − ε_θ(x_t, t)|^p, p = 4 (``PIA.distance``): small for members,
because a fitted point has a consistent denoising direction along its own trajectory.

Differences from the authors' code, named: per step we report −log d_t^{1/p} = −log ‖ε0 − ε_θ(x_t, t)‖_p
(a monotone map of d_t: each step's ROC / AUC is the paper's) at the quadratic step grid over the
model's own range (:func:`~collafuse.attacks.membership.signals.step_grid`), where the authors' code
uses t = k·interval; the authors report each step on its own, and as one number we take the mean of these per-step scores over the low-noise half of the
model's range (:func:`~collafuse.attacks.membership.base.low_noise_mean`; the log puts every
step on one scale). The per-step scores are kept (``AttackScores.per_step``).
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
    summary="−‖ε0 − ε_θ(a_t x + s_t ε0, t)‖_4 with ε0 = ε_θ(x, first trained step)",
    threats=("T2", "T3"),
    signals=("eps_origin", "pia_eps", "steps", "t_range"),
    score=score,
    queries_per_image=lambda settings, m: 1 + m,
    reference="Kong et al. 2024, ICLR (PIA); github.com/kong13661/PIA",
)
