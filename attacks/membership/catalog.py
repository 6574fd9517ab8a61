"""The membership-attack registry: every attack module registers here, once.

LiRA (shadow models, §4.2 "optional, expensive") is not implemented.
"""
from __future__ import annotations

from collafuse.attacks.membership import loss, nn_distance, payload_lr, pia, pian, secmi, sima
from collafuse.attacks.membership.base import MembershipAttack
from collafuse.registry import Registry

ATTACKS: Registry[MembershipAttack] = Registry("membership attack")
for _module in (loss, sima, pia, pian, secmi, payload_lr, nn_distance):
    ATTACKS.register(_module.ATTACK.name, _module.ATTACK)

NOT_IMPLEMENTED: dict[str, str] = {
    "lira": "LiRA needs shadow models trained with the same recipe; not implemented in this version",
}
