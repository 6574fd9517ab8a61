"""``nn-distance`` (T4): distance to the nearest generated sample (Carlini et al. 2023; §4.2).

score(x) = −min_j ‖x − g_j‖ over generated samples g_j. A model that memorised x generates
near-copies of it: HIGHER score = MORE LIKELY MEMBER. Threat T4. Model queries per candidate: 0
(the generation cost is reported by the target).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals


def score(signals: Signals) -> AttackScores:
    """signals: nn_dist (N,) → scores (N,)."""
    return AttackScores(-np.asarray(signals["nn_dist"], dtype=np.float64))


ATTACK = MembershipAttack(
    name="nn-distance",
    summary="negative distance to the nearest generated sample",
    threats=("T4",),
    signals=("nn_dist",),
    score=score,
    queries_per_image=lambda settings, m: 0,
    reference="Carlini et al. 2023",
)
