"""One registry per kind of named thing, and the checks every defense spec goes through (STYLE.md).

A :class:`Registry` refuses a second entry under a name it already holds and,
asked for a name it does not know, raises :class:`~collafuse.errors.ConfigError`
listing the valid ones. :func:`check_keys`, :func:`number` and :func:`choice`
turn one bad value of a YAML ``defenses:`` entry into one clear line.
"""
from __future__ import annotations

import math
from typing import Any, Generic, Iterable, Mapping, TypeVar

from collafuse.errors import ConfigError

V = TypeVar("V")


class Registry(Generic[V]):
    """Name → value for one kind (defenses, minimisation modes, …)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, V] = {}

    def register(self, name: str, value: V) -> V:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = value
        return value

    def get(self, name: Any) -> V:
        if not isinstance(name, str) or name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items


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
