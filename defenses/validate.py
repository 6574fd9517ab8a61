"""What every defense spec is: the checks its YAML goes through, and the questions it answers.

:func:`check_keys`, :func:`number` and :func:`choice` raise
:class:`~collafuse.errors.ConfigError` naming the entry, the key and the value
(STYLE.md: clear errors over silent repair). Named defenses and modes live in the core
:class:`~collafuse.registry.Registry`.

:class:`DefenseSpec` is the base of every parsed spec: what the spec does to the protocol
(the release step, the wire bytes, the labels, the noise multiplicity), its share of the payload
channel's guarantee, the threats it covers and its label. Each defense answers in its own module,
so the setting (:mod:`.setting`), the coverage map (:mod:`.coverage`) and the hook builder ask the
specs and never switch on a spec's class or name.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from collafuse.errors import ConfigError


def check_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse keys a spec does not know (a typo must never silently weaken a defense)."""
    allowed = tuple(allowed)
    for key in raw:
        if key != "name" and key not in allowed:
            valid = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"{where}: unknown key {key!r}; valid: {valid}")


def number(
    raw: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: float | None = None,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
) -> float | int | None:
    """A finite number from a spec, checked against its bounds; ``default`` when the key is absent."""
    if key not in raw:
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if integer and (not isinstance(value, int) and not float(value).is_integer()):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{where}: {key} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: {key} must be >= {minimum:g}, got {value!r}")
    if exclusive_minimum is not None and value <= exclusive_minimum:
        raise ConfigError(f"{where}: {key} must be > {exclusive_minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: {key} must be <= {maximum:g}, got {value!r}")
    return int(value) if integer else float(value)


def choice(raw: Mapping[str, Any], key: str, options: Iterable[str], where: str, default: str) -> str:
    """One of ``options`` (a string), ``default`` when absent."""
    options = tuple(options)
    value = raw.get(key, default)
    if value not in options:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(options)}, got {value!r}")
    return value


class DefenseSpec:
    """The questions every parsed defense spec answers; the defaults are "changes nothing".

    Subclasses are frozen dataclasses with a ``name`` field and a ``COVERS`` tuple (the threats
    they address); they override what their defense changes.
    """

    name: str
    COVERS: ClassVar[tuple[str, ...]] = ()
    acts_on_training: ClassVar[bool] = False  # True: a training hook (DP-SGD); False: it acts on payloads
    adds_noise_per_release: ClassVar[bool] = False  # fresh noise on every release (payload noise)
    ORDER: ClassVar[int] = 0  # where its release hook runs (see :attr:`order`)

    @property
    def label(self) -> str:
        """How the spec is named in the coverage map and the report."""
        return self.name

    @property
    def unique_key(self) -> str:
        """What must not appear twice in one ``defenses:`` list."""
        return self.name

    def twice(self) -> str:
        """The words of the error for a second entry with the same :attr:`unique_key`."""
        return f"{self.label!r} twice"

    @property
    def order(self) -> int:
        """Where its release hook runs: clip → noise draw → extra noise → labels → sender → quantise."""
        return self.ORDER

    def threats(self, t_c: int | None = None, T: int | None = None) -> tuple[str, ...]:
        """The threats this spec addresses (for some, depending on the cut step t_c of T)."""
        return tuple(self.COVERS)

    def check_setting(self, parsed: Sequence["DefenseSpec"]) -> None:
        """Refuse a setting (every parsed spec) this spec cannot be part of; one ConfigError line."""

    def release_step(self, t: int, schedule) -> int:
        """The step a payload released at ``t`` sits at after this defense (a ConfigError past T − 1)."""
        return t

    def bytes_per_value(self) -> int | None:
        """Wire bytes of one payload value when this spec sets them (a quantiser), else None."""
        return None

    def sends_labels(self, sent: bool) -> bool:
        """Whether labels still cross after this spec, given whether they would without it."""
        return sent

    def noise_multiplicity(self, role: str) -> int:
        """Noise draws per image per step on this side ("server" or "client")."""
        return 1

    def payload_terms(self, terms, config):
        """``terms`` (:class:`~.guarantees.PayloadTerms`) with this spec's share of the payload guarantee."""
        return terms

    def planned_epsilon(self, config) -> dict[str, float]:
        """Model name → ε this spec's own accountant will report after training (DP-SGD's plan)."""
        return {}
