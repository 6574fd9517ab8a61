"""The reconstruction attacks' registry (core :class:`~collafuse.registry.Registry`) and the one way to run one.

Each attack module registers its single entry point at import time with
:func:`reconstruction_attack`, naming the threat model it belongs to and the
:class:`AttackerResources` fields it needs (``needs``, e.g. ``("denoiser",)``), so that
callers ask ``RECONSTRUCTION_ATTACKS.needing("denoiser", names)`` instead of testing names.
Registering a name twice is refused; asking for an unknown name lists the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from collafuse.errors import ConfigError
from collafuse.registry import Registry
from collafuse.schedule import NoiseSchedule
from collafuse.threats import check_threats

from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, require_attack_inputs,
)

AttackFn = Callable[[ViewArrays, NoiseSchedule, AttackerResources], Reconstruction]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its entry point, threat model (§3) and what it needs from the attacker."""

    name: str
    fn: AttackFn
    threat: str
    needs: tuple[str, ...]  # AttackerResources fields that must not be None
    summary: str

    def __post_init__(self) -> None:
        check_threats((self.threat,), f"reconstruction attack {self.name!r}")


RECONSTRUCTION_ATTACKS: Registry[AttackSpec] = Registry("reconstruction attack")


def reconstruction_attack(
    name: str, *, threat: str, needs: Iterable[str] = (), summary: str = "",
) -> Callable[[AttackFn], AttackFn]:
    """``@reconstruction_attack(name, threat=..., needs=(...))``: register the decorated entry point."""
    needs = tuple(needs)
    return RECONSTRUCTION_ATTACKS.decorator(name, lambda fn: AttackSpec(name, fn, threat, needs, summary), needs)


def run_attack(name: str, view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Check the inputs (never the audit key), check the attacker has what the attack needs, run it."""
    spec = RECONSTRUCTION_ATTACKS.get(name)
    require_attack_inputs(view, schedule, resources)
    missing = [field for field in spec.needs if getattr(resources, field) is None]
    if missing:
        raise ConfigError(f"attack {name!r} needs attacker resources: {', '.join(missing)}")
    out = spec.fn(view, schedule, resources)
    if out.images.shape != view.tensor.shape:
        raise RuntimeError(f"attack {name!r} returned {tuple(out.images.shape)} for a view of {tuple(view.tensor.shape)}")
    return out
