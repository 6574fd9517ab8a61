"""Reconstruction attacks on the server's view, scored per cut point (DESIGN.md §3 T1, §4.1).

Importing this package registers every attack in :data:`RECONSTRUCTION_ATTACKS`:
``rescale``, ``tweedie``, ``ddim``, ``inversion``, ``multiview``, ``oracle`` (weakest to
the ceiling). Attacks receive :class:`ViewArrays` and :class:`AttackerResources` only;
scoring (:mod:`.scoring`) is the only place that uses ground truth.
"""
# Import order = registration order = the order of §4.1 (weakest to the ceiling).
from collafuse.attacks.reconstruction import rescale  # noqa: F401, I001
from collafuse.attacks.reconstruction import tweedie  # noqa: F401
from collafuse.attacks.reconstruction import ddim  # noqa: F401
from collafuse.attacks.reconstruction import inversion  # noqa: F401
from collafuse.attacks.reconstruction import multiview  # noqa: F401
from collafuse.attacks.reconstruction import oracle  # noqa: F401
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS, AttackSpec, reconstruction_attack, run_attack
from collafuse.attacks.reconstruction.view import AttackerResources, AuditKeyLeak, Reconstruction, ViewArrays

__all__ = [
    "RECONSTRUCTION_ATTACKS", "AttackSpec", "reconstruction_attack", "run_attack",
    "AttackerResources", "AuditKeyLeak", "Reconstruction", "ViewArrays",
]
