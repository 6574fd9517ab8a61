"""The threat × defense coverage map (DESIGN.md §3, §5).

Every defense spec declares the threats it addresses (its ``threats``). The map
lists, for each threat T1–T4, the configured defenses that address it; a threat
with none is *uncovered*, and ``collafuse train`` warns about it.
"""
from __future__ import annotations

from typing import Any, Iterable

THREATS: dict[str, str] = {
    "T1": "curious server reading the transcript (payloads)",
    "T2": "white-box access to the server model",
    "T3": "white-box access to one client's model",
    "T4": "black-box: generated images only",
}


def spec_label(spec: Any) -> str:
    """How a spec is named in the map: its name, plus the mode for ``minimize``."""
    mode = getattr(spec, "mode", None)
    return f"{spec.name}:{mode}" if mode else spec.name


def spec_threats(spec: Any, t_c: int | None = None, T: int | None = None) -> tuple[str, ...]:
    """The threats a parsed spec addresses (DP-SGD's depend on its target and, for T4, the cut)."""
    if spec.name == "dp-sgd":
        from .dp_sgd import threats_for

        return threats_for(spec.target, t_c, T)
    return tuple(spec.threats)


def coverage_map(specs: Iterable[Any], t_c: int | None = None, T: int | None = None) -> dict[str, list[str]]:
    """Threat → labels of the configured defenses that address it (every threat present, maybe empty)."""
    out: dict[str, list[str]] = {threat: [] for threat in THREATS}
    for spec in specs:
        for threat in spec_threats(spec, t_c, T):
            out[threat].append(spec_label(spec))
    return out


def uncovered(specs: Iterable[Any], t_c: int | None = None, T: int | None = None) -> list[str]:
    """Threats no configured defense addresses, in order T1..T4."""
    return [threat for threat, defenses in coverage_map(specs, t_c, T).items() if not defenses]
