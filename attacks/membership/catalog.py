"""The membership-attack registry: every attack module registers here, once.

The calibrated attacks (``lira``, ``lira-offline``, ``rmia``, ``rmia-offline``) need reference models
(``needs={"references"}``): each costs R client trainings per target, so they run only when named
(:data:`DEFAULT_ATTACKS` leaves them out).
"""
from __future__ import annotations

from collafuse.attacks.membership import lira, loss, nn_distance, payload_lr, pia, pian, rmia, secmi, sima
from collafuse.attacks.membership.base import MembershipAttack
from collafuse.registry import Registry

ATTACKS: Registry[MembershipAttack] = Registry("membership attack")
for _module in (loss, sima, pia, pian, secmi, payload_lr, nn_distance):
    ATTACKS.register(_module.ATTACK.name, _module.ATTACK)
for _attack in payload_lr.VARIANTS:  # payload-lr's two statistics as sub-results: payload-lr-single, -fused
    ATTACKS.register(_attack.name, _attack)
for _attack in (lira.ATTACK, lira.ATTACK_OFFLINE, rmia.ATTACK, rmia.ATTACK_OFFLINE):
    ATTACKS.register(_attack.name, _attack, needs={"references"})

# What runs when no attack is named: everything but the attacks that train reference models.
DEFAULT_ATTACKS: tuple[str, ...] = tuple(n for n in ATTACKS.names() if n not in ATTACKS.needing("references"))

NOT_IMPLEMENTED: dict[str, str] = {
    "DP-SGD on reference models": "lira / rmia references are plain models: a DP-SGD target then differs from its "
                                  "references, which makes the attack conservative",
}
