"""``nn-distance`` (T4): distance to the nearest generated sample (Carlini et al. 2023; §4.2).

score(x) = −min_j ‖x − g_j‖ over generated samples g_j. A model that memorised x generates
near-copies of it: HIGHER score = MORE LIKELY MEMBER. Threat T4. Model queries per candidate: 0
(the generation cost is reported by the target). It has no timestep axis (the samples are
finished chains, t = 0), so it keeps no per-step scores.

Beside it, :func:`extraction` measures (ℓ2, δ)-extraction (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models", USENIX Security, Definition 1): the fraction of members
whose nearest generated sample lies within δ of them in the normalised ℓ2 ‖a − b‖₂/√d on the
[0, 1] scale (δ = 0.1 by default, :data:`~collafuse.attacks.reconstruction.scoring.EXTRACTION_DELTA`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals
from collafuse.attacks.reconstruction.scoring import EXTRACTION_DELTA, extracted, to_unit
from collafuse.attacks.stats import Interval, wilson_interval


def score(signals: Signals) -> AttackScores:
    """signals: nn_dist (N,) → scores (N,)."""
    return AttackScores(-np.asarray(signals["nn_dist"], dtype=np.float64))


@dataclass(frozen=True)
class Extraction:
    """(ℓ2, δ)-extraction of ``n`` members: ``distance`` (n,) each member's normalised ℓ2 to its nearest
    sample, ``extracted`` (n,) 0/1, ``rate`` the fraction with its Wilson 95 % interval."""

    delta: float
    distance: np.ndarray
    extracted: np.ndarray
    rate: Interval

    @property
    def value(self) -> float:
        return self.rate.value

    @property
    def n(self) -> int:
        return int(self.extracted.size)

    def to_json(self) -> dict:
        return {**self.rate.to_json(), "delta": self.delta,
                "definition": "fraction of members whose nearest generated sample g has ||x - g||_2 / sqrt(d) <= delta "
                              "on the [0, 1] scale (Carlini et al. 2023)"}


def normalised_nearest_distance(members: torch.Tensor, samples: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """min_j ‖u(x) − u(g_j)‖₂/√d with u the [0, 1] map of :func:`~collafuse.attacks.reconstruction.scoring.to_unit`
    (samples clipped to the valid range, as any attacker may): members (N,C,H,W), samples (S,C,H,W) → (N,)."""
    if samples.shape[1:] != members.shape[1:]:
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])}, members {tuple(members.shape[1:])}")
    if samples.shape[0] == 0:
        raise ValueError("extraction needs at least one generated sample")
    d = members[0].numel()
    m = to_unit(members).reshape(members.shape[0], -1)
    g = to_unit(samples).reshape(samples.shape[0], -1)
    best = torch.full((m.shape[0],), torch.inf, dtype=torch.float64)
    for i in range(0, g.shape[0], chunk):  # float64 and blocked over samples: exact near the δ boundary, bounded memory
        best = torch.minimum(best, torch.cdist(m, g[i : i + chunk]).min(1).values)
    return (best / np.sqrt(d)).numpy()


def extraction(members: torch.Tensor, samples: torch.Tensor, delta: float = EXTRACTION_DELTA) -> Extraction:
    """(ℓ2, δ)-extraction rate of ``members`` (N,C,H,W) by generated ``samples`` (S,C,H,W), both in [-1, 1]."""
    dist = normalised_nearest_distance(members, samples)
    hit = extracted(dist, delta)
    return Extraction(float(delta), dist, hit, wilson_interval(int(hit.sum()), int(hit.size)))


def client_extraction(run, client: int, samples: torch.Tensor, delta: float = EXTRACTION_DELTA) -> Extraction:
    """T4 extraction of ALL of ``client``'s training images of a loaded run by its generated ``samples``."""
    data, splits = run.load_data()
    return extraction(data.images[splits.clients[client]], samples, delta)


ATTACK = MembershipAttack(
    name="nn-distance",
    summary="negative distance to the nearest generated sample",
    threats=("T4",),
    signals=("nn_dist",),
    score=score,
    queries_per_image=lambda settings, m: 0,
    reference="Carlini et al. 2023",
)
