"""``lira-peers``: offline LiRA with the other clients' models as its OUT references (T3; Carlini et al. 2022,
"Membership inference attacks from first principles", §VI-B offline; DESIGN.md §4.2 "Peer references").

For client k's candidates the P = N − 1 peer client models are OUT models trained with the target's recipe
(:mod:`~collafuse.attacks.membership.peers`: why, and the signals). The score is :mod:`lira`'s offline score,
formula unchanged: per candidate and step the statistic s = −log L at the fixed draws (the log plays the
paper's logit scaling for a positive, skewed loss), a Gaussian fitted to the OUT models' values (per-candidate
mean, the paper's global "fixed variance" per step), score = (s − μ_out)/σ_out, one-sided; averaged over the
low-noise steps. Peers are never IN: every candidate is OUT for every peer (disjoint client data, held-out
non-members). No reference training.

The result's ``details`` name the peers used and the run's partition; where the partition is not IID (or an
imported deployment does not declare it) they say that the peers are OUT models of another distribution.
HIGHER = MORE LIKELY MEMBER. Threat T3. Queries per image: (1 + P)·M·K (the target and each peer at the M·K
fixed draws); the registry states P = 1 (two clients, the least a peer attack needs), each result its own P.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from collafuse.attacks.membership import lira
from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals

IID = "iid"
UNDECLARED = "undeclared"   # an imported deployment: its manifest does not say how the clients' data were drawn
SIGNALS = ("peer_target_loss", "peer_loss", "peer_clients", "peer_partition", "peer_draws", "steps", "t_range")


def peer_details(signals: Signals) -> dict[str, Any]:
    """What a peer attack used: the number of peer models, their client indices, the partition, whether it is IID,
    and a warning where it is not."""
    clients = [int(k) for k in np.asarray(signals["peer_clients"]).ravel()]
    partition = str(np.asarray(signals["peer_partition"]).ravel()[0])
    out: dict[str, Any] = {"peer_models": len(clients), "peer_clients": clients, "partition": partition,
                           "partition_iid": partition == IID}
    if partition == UNDECLARED:
        out["warning"] = ("the deployment does not declare its clients' partition: the peers are OUT models of the "
                          "target's distribution only if the clients' data are IID")
    elif partition != IID:
        out["warning"] = (f"the clients' data are partitioned by {partition!r}, not IID: the peers trained on "
                          "another distribution than the target, so a high score may reflect the distribution "
                          "shift, not membership")
    return out


def peer_queries(m: int, n_noise: int, peers: int) -> int:
    """(1 + P)·M·K: the target and every peer at the M steps × K fixed draws, per candidate."""
    return (1 + peers) * m * n_noise


def reference_signals(signals: Signals, population: bool = False) -> dict[str, np.ndarray]:
    """The peer signals in the names :mod:`lira` / :mod:`rmia` read: peers as references, none of them IN."""
    peer = np.asarray(signals["peer_loss"], dtype=np.float64)
    out = {"fixed_loss": signals["peer_target_loss"], "ref_fixed_loss": peer,
           "ref_in": np.zeros(peer.shape[:2], dtype=bool), "steps": signals["steps"], "t_range": signals["t_range"]}
    if population:
        out.update(pop_fixed_loss=signals["peer_pop_target_loss"], ref_pop_fixed_loss=signals["peer_pop_loss"])
    return out


def with_peers(base: AttackScores, signals: Signals) -> AttackScores:
    """``base`` (scored from the peers) with the peer details and the query count of this target."""
    details = peer_details(signals)
    queries = peer_queries(len(signals["steps"]), int(np.asarray(signals["peer_draws"]).ravel()[0]),
                           details["peer_models"])
    return AttackScores(base.scores, base.per_step, base.steps, details, queries)


def score(signals: Signals) -> AttackScores:
    """Offline LiRA (:func:`lira.score_offline`) with the peers as OUT references."""
    return with_peers(lira.score_offline(reference_signals(signals)), signals)


ATTACK = MembershipAttack(
    name="lira-peers",
    summary="offline LiRA with the other clients' models as OUT references (no reference training)",
    threats=("T3",),
    signals=SIGNALS,
    score=score,
    queries_per_image=lambda settings, m: peer_queries(m, settings.peer_draws, 1),
    reference="Carlini et al. 2022 (LiRA, offline); peers as references: DESIGN.md §4.2",
)
