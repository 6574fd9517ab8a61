"""``payload-lr`` (T1): likelihood ratio of a candidate having produced the payloads (§4.2).

For payloads p_j = a_j x0 + s_j ε (a_j, s_j public) and candidate x, the centred log-likelihood
ℓ_j(x) = log N(p_j; a_j x, s_j² I) − E[log N(p_j; a_j x0, s_j² I)] = (D − ‖p_j − a_j x‖²/s_j²)/2
(centred on what p_j's true source achieves, so payloads at different noise levels compare fairly).
Two statistics, each minus the SAME statistic's best value over R, the attacker's known
non-members (the public auxiliary split), which makes it a log-likelihood RATIO (> 0: x explains
the payloads better than any known non-member does):

- single view (``payload-lr-single``): S₁(x) = max_j ℓ_j(x). The likelihood ratio of ONE payload;
  most powerful when the server holds a single view of each image.
- fused (``payload-lr-fused``): with E epochs the server holds E views of each member (fresh noise
  each) but not which payloads belong together. S_F(x) = log Σ_j w_j(x), DESIGN §4.2's
  log Σ_j N(p_j; a_j x, s_j² I) with each payload normalised by how well anything explains it:
  w_j(x) = e^{ℓ_j(x)} / Z_j, Z_j = Σ_{y ∈ pool} e^{ℓ_j(y)} + 1 + K · mean_{r ∈ R} e^{ℓ_j(r)}, the
  posterior weight of x as the source of payload j (pool = the candidates and the references;
  K = P / E, the number of images the payloads come from). Σ_j w_j(x) is the expected number of
  payloads the posterior attributes to x: up to E for a member, about 0 for an image that produced
  none. It uses every view of x, where S₁ uses only the luckiest one; the normaliser keeps payloads
  that fit every image (near the data mean, at high noise) from dominating, lets a member among
  the candidates claim its own payloads from the others, and its background term 1 + K · mean_r
  (the sources the attacker does not hold: p_j's own source fits like a true source, centred
  ℓ ≈ 0, the rest like population samples) stops a payload whose source is not a candidate from
  handing its weight to its best wrong match (:func:`~collafuse.attacks.membership.signals.payload_pool_stats`).
  A candidate's score therefore depends on the other candidates, like the ``oracle``'s
  re-identification over its pool; it never uses labels. Measured on 25 simulated views of
  digits (tests/test_payload_lr_fused.py), AUC single → fused: c = 0.5: 0.64 → 1.00 (every
  sender a candidate) and 0.58 → 0.91 (a quarter of the senders); c = 0.7: 0.58 → 0.89 and
  0.56 → 0.74; c = 0.2: 1.00 for both; at c = 0.9 both are near chance (0.57 / 0.56).
  Neither statistic is Bayes-optimal when there are many views of unknown grouping (that would
  need the posterior over every grouping of all payloads into images); S_F treats the payloads
  as independent, each from one source.

``payload-lr`` is the attack the audit reports: the fused statistic whenever E > 1 (the server
holds several views per image), the single-view one when E = 1. The choice is made from the
protocol alone, never from membership labels; both statistics are also
registered as attacks of their own (they share one signal computation), so every report
carries them as sub-results.
The reference is taken per candidate, not per payload, for the reason given in
:func:`~collafuse.attacks.membership.signals.payload_log_ratio`. Payload step bins
(trajectory payloads mix noise levels) give the per-step columns (each statistic within the bin);
the fused score over all payloads is the log-sum-exp of the bins'. For payloads that carry their noise (``naive``) x0 is
recovered exactly and the score is the s → 0 limit, −min_j ‖x − x̂0_j‖², for both statistics.
HIGHER score = MORE LIKELY MEMBER. Threat T1. Model queries per image: 0 (it reads the transcript only).
"""
from __future__ import annotations

import numpy as np

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals

_STEPS = "payload_lr_steps"


def _scores(signals: Signals, name: str) -> AttackScores:
    return AttackScores(
        np.asarray(signals[name], dtype=np.float64),
        np.asarray(signals[f"{name}_per_step"], dtype=np.float64),
        tuple(int(t) for t in signals[_STEPS]),
    )


def score(signals: Signals) -> AttackScores:
    """signals: payload_lr (N,), payload_lr_per_step (N, B), payload_lr_steps (B,) → scores (N,):
    the fused statistic when the server holds more than one view per image, else the single-view one."""
    return _scores(signals, "payload_lr")


def score_single(signals: Signals) -> AttackScores:
    """signals: payload_lr_single (N,), its per-step (N, B), payload_lr_steps (B,) → the single-view statistic."""
    return _scores(signals, "payload_lr_single")


def score_fused(signals: Signals) -> AttackScores:
    """signals: payload_lr_fused (N,), its per-step (N, B), payload_lr_steps (B,) → the fused statistic."""
    return _scores(signals, "payload_lr_fused")


_REFERENCE = "DESIGN.md §4.2 (Gaussian payload likelihood ratio; fused payload likelihood)"

ATTACK = MembershipAttack(
    name="payload-lr",
    summary="payload log-likelihood ratio: fused over all views (E > 1 epochs), else single-view",
    threats=("T1",),
    signals=("payload_lr", "payload_lr_per_step", _STEPS),
    score=score,
    queries_per_image=lambda settings, m: 0,
    reference=_REFERENCE,
)

SINGLE = MembershipAttack(
    name="payload-lr-single",
    summary="max over payloads of the centred Gaussian log-likelihood, minus the best non-member reference's",
    threats=("T1",),
    signals=("payload_lr_single", "payload_lr_single_per_step", _STEPS),
    score=score_single,
    queries_per_image=lambda settings, m: 0,
    reference=_REFERENCE,
)

FUSED = MembershipAttack(
    name="payload-lr-fused",
    summary="log of the candidate's summed posterior weights as the source of each payload, minus the best reference's",
    threats=("T1",),
    signals=("payload_lr_fused", "payload_lr_fused_per_step", _STEPS),
    score=score_fused,
    queries_per_image=lambda settings, m: 0,
    reference=_REFERENCE,
)

VARIANTS: tuple[MembershipAttack, ...] = (SINGLE, FUSED)  # registered beside ATTACK (catalog.py)
