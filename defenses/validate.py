"""The checks every defense spec goes through: one bad value of a YAML ``defenses:`` entry → one clear line.

:func:`check_keys`, :func:`number` and :func:`choice` raise
:class:`~collafuse.errors.ConfigError` naming the entry, the key and the value
(STYLE.md: clear errors over silent repair). Named defenses and modes live in the core
:class:`~collafuse.registry.Registry`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

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
