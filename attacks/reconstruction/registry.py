"""One registry of reconstruction attacks (STYLE.md: no string dispatch scattered around).

Each attack module registers its single entry point at import time under its name,
with the threat model it belongs to and the resources it needs. Registering a name
twice is refused; asking for an unknown name lists the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from collafuse.errors import ConfigError
from collafuse.schedule import NoiseSchedule

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


class Registry:
    """Name → :class:`AttackSpec`, refusing duplicates."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, AttackSpec] = {}

    def register(self, name: str, threat: str, needs: tuple[str, ...] = (), summary: str = "") -> Callable[[AttackFn], AttackFn]:
        def decorator(fn: AttackFn) -> AttackFn:
            if name in self._specs:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._specs[name] = AttackSpec(name, fn, threat, needs, summary)
            return fn

        return decorator

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def get(self, name: str) -> AttackSpec:
        if name not in self._specs:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._specs)}")
        return self._specs[name]

    def parse(self, names: str | None) -> tuple[str, ...]:
        """A comma-separated list (None = all) → validated names, in the order given, no repeats."""
        if names is None:
            return self.names()
        chosen = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
        if not chosen:
            raise ConfigError(f"no {self.kind} named; valid: {', '.join(self._specs)}")
        for n in chosen:
            self.get(n)
        return chosen

    def run(self, name: str, view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
        """Check the inputs (never the audit key), check the attacker has what the attack needs, run it."""
        spec = self.get(name)
        require_attack_inputs(view, schedule, resources)
        missing = [field for field in spec.needs if getattr(resources, field) is None]
        if missing:
            raise ConfigError(f"attack {name!r} needs attacker resources: {', '.join(missing)}")
        out = spec.fn(view, schedule, resources)
        if out.images.shape != view.tensor.shape:
            raise RuntimeError(f"attack {name!r} returned {tuple(out.images.shape)} for a view of {tuple(view.tensor.shape)}")
        return out


RECONSTRUCTION_ATTACKS = Registry("reconstruction attack")
