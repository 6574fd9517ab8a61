"""The five threat models of DESIGN.md §3: the one list every attack, defense and report reads."""
from __future__ import annotations

THREATS: dict[str, str] = {
    "T1": "curious server reading the transcript (payloads)",
    "T2": "white-box access to the server model",
    "T3": "white-box access to one client's model",
    "T4": "black-box: generated images only",
    "T5": "curious co-client: the server's hand-offs, targeting the other clients' images",
}
"""Threat id → one-line description, in order T1..T5."""

THREAT_IDS: tuple[str, ...] = tuple(THREATS)


def check_threats(threats, where: str) -> tuple[str, ...]:
    """``threats`` as a tuple, refusing an empty one or any id outside T1..T5 (a programming error)."""
    out = tuple(threats)
    unknown = [t for t in out if t not in THREATS]
    if not out or unknown:
        raise ValueError(f"{where}: threats must be a non-empty subset of {', '.join(THREAT_IDS)}, got {out}")
    return out
