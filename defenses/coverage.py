"""The threat × defense coverage map (DESIGN.md §3, §5).

Every defense spec declares the threats it addresses (its ``threats(t_c, T)``). The map
lists, for each threat T1–T5, the configured defenses that address it; a threat
with none is *uncovered*, and ``collafuse train`` warns about it.

T5, the curious co-client, sees only the server's hand-offs: what the server LEARNED from the payloads.
A defense covers it when it changes what the server learns (DP-SGD on the server; payload noise and payload
clipping, of which the server model is post-processing), not when it only changes what crosses
(``minimize``: a single release, quantised codes, labels or sender withheld).
"""
from __future__ import annotations

from typing import Any, Iterable

from collafuse.threats import THREATS

from .minimize import MEASURED_CREDIT as _minimize_credit


def spec_label(spec: Any) -> str:
    """How a spec is named in the map (its own ``label``: the name, plus the mode for ``minimize``)."""
    return spec.label


def spec_threats(spec: Any, t_c: int | None = None, T: int | None = None) -> tuple[str, ...]:
    """The threats a parsed spec addresses (its own ``threats``: DP-SGD's depend on its target and the cut)."""
    return tuple(spec.threats(t_c, T))


def coverage_map(specs: Iterable[Any], t_c: int | None = None, T: int | None = None) -> dict[str, list[str]]:
    """Threat → labels of the configured defenses that address it (every threat present, maybe empty)."""
    out: dict[str, list[str]] = {threat: [] for threat in THREATS}
    for spec in specs:
        for threat in spec_threats(spec, t_c, T):
            out[threat].append(spec_label(spec))
    return out


def uncovered(specs: Iterable[Any], t_c: int | None = None, T: int | None = None) -> list[str]:
    """Threats no configured defense addresses, in order T1..T5."""
    return [threat for threat, defenses in coverage_map(specs, t_c, T).items() if not defenses]


# The credits that are measured, not declared (DESIGN.md §5 (d)): label → threat. Each defense
# declares its own (``minimize:id-free`` for T1: see :data:`.minimize.MEASURED_CREDIT`).
MEASURED_CREDIT: dict[str, str] = dict(_minimize_credit)


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
