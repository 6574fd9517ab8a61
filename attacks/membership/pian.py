"""``pian``: PIA with a normalised ε0 (Kong et al., "An Efficient Membership Inference Attack for the
Diffusion Model by Proximal Initialization", ICLR 2024, PIAN; §4.2).

ε̃0 = ε0 / mean_i |ε0_i| · √(2/π) (ε0 = ε_θ(x, t_first) as in :mod:`pia`): the mean absolute value
of ε̃0 is E|z| = √(2/π) of standard Gaussian noise, exactly as the authors' ``PIAN.ddim_reverse``
(github.com/kong13661/PIA) normalises it. Then, per step t, x_t = a_t x + s_t ε̃0 and the paper's
statistic is d_t = Σ|ε̃0 − ε_θ(x_t, t)|^4 (``PIAN.distance``).

Headline and curve as :mod:`pia`: the statistic at the paper's single step (:func:`~.pia.paper_step`) as
−log d^{1/4}, the per-step curve beside it. Differences from the authors' code, named: a zero ε0 stays zero
(theirs divides by zero). HIGHER score = MORE LIKELY MEMBER. Threats T2, T3. Queries per image: 2 + M (ε0
shared with pia).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals
from collafuse.attacks.membership.pia import headline_and_curve

SCALE = float(np.sqrt(2.0 / np.pi))  # E|z|, z ~ N(0, 1)


def rescale_rows(eps0: np.ndarray) -> np.ndarray:
    """PIAN's normalisation of each row of (N, D): ε0 / mean|ε0| · √(2/π) (zero rows stay zero)."""
    eps0 = np.asarray(eps0, dtype=np.float64)
    mean_abs = np.abs(eps0).mean(axis=1, keepdims=True)
    return np.where(mean_abs > 0, eps0 / np.maximum(mean_abs, 1e-300) * SCALE, 0.0)


def score(signals: Signals) -> AttackScores:
    """signals: eps_origin (N, D), pian_head_eps (N, D), pian_eps (N, M, D), steps (M,) → scores (N,) at the
    paper's step, per-step (N, M)."""
    return headline_and_curve(rescale_rows(signals["eps_origin"]), signals["pian_head_eps"], signals["pian_eps"],
                              signals["steps"])


ATTACK = MembershipAttack(
    name="pian",
    summary="PIA with ε0 normalised to mean |ε0| = √(2/π), as the paper's PIAN",
    threats=("T2", "T3"),
    signals=("eps_origin", "pian_head_eps", "pian_eps", "steps"),
    score=score,
    queries_per_image=lambda settings, m: 2 + m,
    reference="Kong et al. 2024, ICLR (PIAN); github.com/kong13661/PIA",
)
