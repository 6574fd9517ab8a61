"""The threat × defense coverage map (DESIGN.md §3, §5).

Every defense spec declares the threats it addresses (its ``threats``). The map
lists, for each threat T1–T4, the configured defenses that address it; a threat
with none is *uncovered*, and ``collafuse train`` warns about it.
"""
from __future__ import annotations

from typing import Any, Iterable

from collafuse.threats import THREATS


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


# The defense whose T1 credit is measured, not declared (DESIGN.md §5 (d)): an id-free release
# covers sender linkage only where a sender-identification attack that reads every field and
# the order of arrival is at chance.
MEASURED_CREDIT: dict[str, str] = {"minimize:id-free": "T1"}


def credit_measured(coverage: dict[str, list[str]], sender_at_chance: bool | None) -> dict[str, list[str]]:
    """The map with every measured credit (:data:`MEASURED_CREDIT`) applied.

    ``sender_at_chance``: the sender-identification attack's outcome for this setting (at chance
    in every cell that measured it), False (above chance in some cell: the credit is dropped),
    or None (not measured, e.g. no payload crossed: the declared map stands).
    """
    out = {threat: list(labels) for threat, labels in coverage.items()}
    if sender_at_chance is False:
        for label, threat in MEASURED_CREDIT.items():
            if label in out.get(threat, []):
                out[threat].remove(label)
    return out
