"""The membership-attack registry: every attack module registers here, once.

The calibrated attacks (``lira``, ``lira-offline``, ``rmia``, ``rmia-offline``) need reference models
(``needs={"references"}``): each costs R client trainings per target, so they run only when named
(:data:`DEFAULT_ATTACKS` leaves them out).
"""
from __future__ import annotations

from collafuse.attacks.membership import lira, loss, nn_distance, payload_lr, pia, pian, rmia, secmi, sima
from collafuse.attacks.membership import coclient
from collafuse.attacks.membership import aggregation, fremia, lira_peers, rmia_peers
from collafuse.attacks.membership.base import MembershipAttack
from collafuse.registry import Registry

ATTACKS: Registry[MembershipAttack] = Registry("membership attack")
for _module in (loss, sima, pia, pian, secmi, payload_lr, nn_distance):
    ATTACKS.register(_module.ATTACK.name, _module.ATTACK)
for _attack in payload_lr.VARIANTS:  # payload-lr's two statistics as sub-results: payload-lr-single, -fused
    ATTACKS.register(_attack.name, _attack)
for _attack in (lira.ATTACK, lira.ATTACK_OFFLINE, rmia.ATTACK, rmia.ATTACK_OFFLINE):
    ATTACKS.register(_attack.name, _attack, needs={"references"})
for _attack in coclient.ATTACKS:  # T5, the curious co-client: handoff-nn, handoff-lr
    ATTACKS.register(_attack.name, _attack)
# Issue 25 (DESIGN §4.2): FreMIA's filtered residuals (loss-hf, pia-hf, pian-hf, secmi-hf: no extra query), small-noise
# aggregation (5 queries), and the peer attacks (the other clients' models as OUT references: no training, but
# N − 1 more models queried and at least 2 clients needed, so like the reference attacks they run only when named).
for _attack in (*fremia.VARIANTS, aggregation.ATTACK):
    ATTACKS.register(_attack.name, _attack)
for _attack in (lira_peers.ATTACK, rmia_peers.ATTACK):
    ATTACKS.register(_attack.name, _attack, needs={"peers"})

# What runs when no attack is named: everything but the attacks that train reference models or query peer models.
DEFAULT_ATTACKS: tuple[str, ...] = tuple(n for n in ATTACKS.names()
                                         if n not in ATTACKS.needing("references") + ATTACKS.needing("peers"))

NOT_IMPLEMENTED: dict[str, str] = {
    "DP-SGD on reference models": "lira / rmia references are plain models: a DP-SGD target then differs from its "
                                  "references, which makes the attack conservative",
}
