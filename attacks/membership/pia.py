"""``pia``: proximal initialisation (Kong et al., "An Efficient Membership Inference Attack for the
Diffusion Model by Proximal Initialization", ICLR 2024; §4.2).

ε0 = ε_θ(x, t_first), queried at the model's FIRST TRAINED STEP (1 for a client model; for the
server, its data point a_{t_c} x at t_c + 1, the first step it was trained on), as the authors'
code queries ε_θ(x0, 0) at the first step of their 0-indexed DDPM (``PIA.ddim_reverse`` in
github.com/kong13661/PIA). Per step t, with x_t = a_t x + s_t ε0 (on the model's own schedule),
the paper's statistic is d_t = Σ|ε0 − ε_θ(x_t, t)|^p, p = 4 (``PIA.distance``): small for members,
because a fitted point has a consistent denoising direction along its own trajectory.

The headline is the paper's: the statistic at ONE attack step, t = 200 of T = 1000 (:func:`paper_step`:
0.2 of the model's own chain, clipped to the steps it was trained on — 0.2·T for a client model, which
owns 1..t_c; t_c + 0.2·(T − t_c) for the server, whose data sit at t_c), reported as −log d^{1/p} (a
monotone map of d: its ROC and AUC are the paper's). Beside it, the per-step curve at the quadratic step
grid over the model's own range (:func:`~collafuse.attacks.membership.signals.step_grid`; the authors'
code sweeps t = k·interval), kept as ``AttackScores.per_step``.
HIGHER score = MORE LIKELY MEMBER. Threats T2, T3. Queries per image: 2 + M (ε0 shared with pian).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals

P_NORM = 4.0
PAPER_FRACTION = 0.2  # the paper's attack step, t = 200 of T = 1000, as a fraction of the model's chain


def paper_step(origin: int, t_min: int, t_max: int, T: int) -> int:
    """The paper's single attack step for a model whose data sit at ``origin`` and which was trained on
    ``t_min..t_max`` of a T-step schedule: ``origin + round(0.2·(T − origin))``, clipped to ``t_min..t_max``."""
    return int(min(t_max, max(t_min, origin + round(PAPER_FRACTION * (T - origin)))))


def pia_distance(eps0: np.ndarray, eps_t: np.ndarray, p: float = P_NORM) -> np.ndarray:
    """‖ε0 − ε_t‖_p per (candidate, step): eps0 (N, D), eps_t (N, M, D) → (N, M)."""
    diff = np.abs(np.asarray(eps_t, dtype=np.float64) - np.asarray(eps0, dtype=np.float64)[:, None, :])
    return (diff**p).sum(axis=2) ** (1.0 / p)


def headline_and_curve(eps0: np.ndarray, head_eps: np.ndarray, step_eps: np.ndarray, steps: np.ndarray) -> AttackScores:
    """−log ‖ε0 − ε_θ‖_p at the paper's step (the score) and at every grid step (the curve)."""
    head = -np.log(pia_distance(eps0, np.asarray(head_eps)[:, None, :])[:, 0] + 1e-12)
    per_step = -np.log(pia_distance(eps0, step_eps) + 1e-12)
    return AttackScores(head, per_step, tuple(int(t) for t in steps))


def score(signals: Signals) -> AttackScores:
    """signals: eps_origin (N, D), pia_head_eps (N, D) at the paper's step, pia_eps (N, M, D), steps (M,)
    → scores (N,) at the paper's step, per-step (N, M)."""
    return headline_and_curve(signals["eps_origin"], signals["pia_head_eps"], signals["pia_eps"], signals["steps"])


ATTACK = MembershipAttack(
    name="pia",
    summary="−‖ε0 − ε_θ(a_t x + s_t ε0, t)‖_4 with ε0 = ε_θ(x, first trained step)",
    threats=("T2", "T3"),
    signals=("eps_origin", "pia_head_eps", "pia_eps", "steps"),
    score=score,
    queries_per_image=lambda settings, m: 2 + m,
    reference="Kong et al. 2024, ICLR (PIA); github.com/kong13661/PIA",
)
