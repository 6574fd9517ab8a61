"""``payload-lr`` (T1): likelihood ratio of a candidate having produced a payload (§4.2).

For payloads p_j = a_j x0 + s_j ε (a_j, s_j public) and candidate x, with
ℓ_j(x) = log N(p_j; a_j x, s_j² I) − E[log N(p_j; a_j x0, s_j² I)] = (D − ‖p_j − a_j x‖²/s_j²)/2
(the log-likelihood, centred on what p_j's true source achieves, so payloads at different
noise levels compare fairly):
score(x) = max_j ℓ_j(x) − max_{r ∈ R} max_j ℓ_j(r),
R = the attacker's known non-members (the public auxiliary split). The payload channel is
Gaussian, so the likelihood of x having produced a payload is the Bayes-optimal statistic;
the reference makes it a log-likelihood RATIO (> 0: x explains some payload better than any
known non-member does). The reference is taken per candidate, not per payload, for the
reason given in :func:`~collafuse.attacks.membership.signals.payload_log_ratio`.
HIGHER score = MORE LIKELY MEMBER. For payloads that carry their noise
(``naive``) x0 is recovered exactly and the score is the s → 0 limit, −min_j ‖x − x̂0_j‖².
Threat T1. Model queries per image: 0 (it reads the transcript only).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals


def score(signals: Signals) -> AttackScores:
    """signals: payload_lr (N,), payload_lr_per_step (N, B), payload_lr_steps (B,) → scores (N,)."""
    return AttackScores(
        np.asarray(signals["payload_lr"], dtype=np.float64),
        np.asarray(signals["payload_lr_per_step"], dtype=np.float64),
        tuple(int(t) for t in signals["payload_lr_steps"]),
    )


ATTACK = MembershipAttack(
    name="payload-lr",
    summary="max over payloads of the centred Gaussian log-likelihood, minus the best non-member reference's",
    threats=("T1",),
    signals=("payload_lr", "payload_lr_per_step", "payload_lr_steps"),
    score=score,
    queries_per_image=lambda settings, m: 0,
    reference="DESIGN.md §4.2 (Bayes-optimal for the Gaussian payload channel)",
)
