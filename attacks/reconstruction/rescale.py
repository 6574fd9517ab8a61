"""``rescale`` (T1, DESIGN.md §4.1): x̂ = p / a_t — the weakest attack, no model, no data.

When the view carries the noise (``naive`` payloads, §2.2) the same arithmetic with
the noise removed, x̂ = (p − s ε)/a, is exact.
"""
from __future__ import annotations

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, rescaled, require_attack_inputs,
)

NAME = "rescale"


@reconstruction_attack(NAME, threat="T1", summary="x̂ = p / a")
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Rows (N,C,H,W) of the view → x̂ (N,C,H,W) = p/a_t per row (exact x0 when the noise is known)."""
    require_attack_inputs(view, schedule, resources)
    y, var = rescaled(view, schedule)
    return Reconstruction(NAME, y.float(), noise_var=var)
