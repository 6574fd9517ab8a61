"""``rmia-peers``: offline RMIA with the other clients' models as its OUT references (T3; Zarifzadeh, Liu,
Mahloujifar & Shokri 2024, "Low-cost high-power membership inference attacks", ICML, §3 offline; DESIGN.md §4.2
"Peer references").

For client k's candidates the P = N − 1 peer client models are OUT models trained with the target's recipe
(:mod:`~collafuse.attacks.membership.peers`). The score is :mod:`rmia`'s offline score, formula unchanged:
Pr(x|θ) = exp(−L(x)/2) at the fixed draws, Pr(x) = ½((1 + a)·mean over the peers of Pr(x|θ_peer) + (1 − a)) with
a = 0.3 (the paper's offline approximation of the missing IN models; ML Privacy Meter's default), the same for
the population samples z (the first ≤ 256 auxiliary images: no client trained on them, so every peer is OUT for
them too), and score(x) = Pr_z(LR(x, z) > γ), γ = 1. No reference training.

The result's ``details`` name the peers used and say when the partition is not IID (:func:`lira_peers.peer_details`).
HIGHER = MORE LIKELY MEMBER. Threat T3. Queries per image: (1 + P)·M·K (and as many per population sample).
"""
from __future__ import annotations

from collafuse.attacks.membership import rmia
from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals
from collafuse.attacks.membership.lira_peers import SIGNALS as LIRA_SIGNALS, peer_queries, reference_signals, with_peers

SIGNALS = (*LIRA_SIGNALS, "peer_pop_target_loss", "peer_pop_loss")


def score(signals: Signals) -> AttackScores:
    """Offline RMIA (:func:`rmia.score_offline`, a = 0.3, γ = 1) with the peers as OUT references."""
    return with_peers(rmia.score_offline(reference_signals(signals, population=True)), signals)


ATTACK = MembershipAttack(
    name="rmia-peers",
    summary="offline RMIA (a = 0.3, γ = 1) with the other clients' models as OUT references and auxiliary "
            "population samples (no reference training)",
    threats=("T3",),
    signals=SIGNALS,
    score=score,
    queries_per_image=lambda settings, m: peer_queries(m, settings.peer_draws, 1),
    reference="Zarifzadeh et al. 2024 (RMIA, ICML, offline); peers as references: DESIGN.md §4.2",
)
