"""``nn-distance`` (T4): distance to the nearest generated sample (Carlini et al. 2023; §4.2).

score(x) = −min_j ‖x − g_j‖ over generated samples g_j. A model that memorised x generates
near-copies of it: HIGHER score = MORE LIKELY MEMBER. Threat T4. Model queries per candidate: 0
(the generation cost is reported by the target). It has no timestep axis (the samples are
finished chains, t = 0), so it keeps no per-step scores.

Beside it, :func:`extraction` measures extraction as Carlini et al. 2023 ("Extracting Training Data
from Diffusion Models", USENIX Security, §5.1) define it for pixel-space models: a generated sample ĝ
extracts the training image x nearest to it when ℓ2(ĝ, x) / (α · mean_{y ∈ S_ĝ} ℓ2(ĝ, y)) < 1, S_ĝ the
n = 50 training images nearest to ĝ, α = 0.5, ℓ2 their normalised ‖a − b‖₂/√d on the [0, 1] scale; the
rate is the fraction of the training images some sample extracts. A sample that copies one image is
credited to that image only (its nearest), never to a near-duplicate. The absolute-threshold rate
(the fraction of members whose nearest sample lies within δ = 0.1) is reported beside it as
``extraction_abs``, under its own name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals
from collafuse.attacks.reconstruction.scoring import (CARLINI_ALPHA, CARLINI_NEIGHBOURS, EXTRACTION_DELTA, carlini_ratio,
                                                    extracted, nearest_distances, nearest_index, to_unit)
from collafuse.attacks.stats import Interval, wilson_interval


def score(signals: Signals) -> AttackScores:
    """signals: nn_dist (N,) → scores (N,)."""
    return AttackScores(-np.asarray(signals["nn_dist"], dtype=np.float64))


@dataclass(frozen=True)
class Extraction:
    """Extraction of ``n`` training images by generated samples: ``extracted`` (n,) 0/1 by Carlini et al.'s
    relative criterion and ``rate`` its fraction (Wilson 95 %); ``distance`` (n,) each image's normalised ℓ2 to
    its nearest sample and ``absolute`` the fraction within ``delta`` (the absolute rate, its own name)."""

    extracted: np.ndarray
    rate: Interval
    distance: np.ndarray
    absolute: Interval
    delta: float

    @property
    def value(self) -> float:
        return self.rate.value

    @property
    def n(self) -> int:
        return int(self.extracted.size)

    def to_json(self) -> dict:
        return {**self.rate.to_json(), "neighbours": CARLINI_NEIGHBOURS, "alpha": CARLINI_ALPHA,
                "definition": "fraction of training images x that some generated sample g extracts: x is g's nearest "
                              "training image and l2(g, x) < alpha * mean l2(g, S_g), S_g the 50 training images "
                              "nearest to g, l2 = ||a - b||_2 / sqrt(d) on [0, 1] (Carlini et al. 2023, Sec. 5.1)",
                "absolute": {**self.absolute.to_json(), "delta": self.delta}}


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
    """Extraction of the training images ``members`` (N,C,H,W) by generated ``samples`` (S,C,H,W), both in [-1, 1]:
    Carlini et al.'s relative criterion (each sample against its nearest member and the 50 nearest), and the
    absolute rate at ``delta`` beside it."""
    dist = normalised_nearest_distance(members, samples)
    neighbours = nearest_distances(samples, members)                  # (S, ≤50), ascending: [:, 0] is the nearest
    nearest = torch.as_tensor(nearest_index(to_unit(samples).float(), to_unit(members).float()))
    hit = carlini_ratio(neighbours[:, 0], neighbours) < 1.0
    extracted_members = np.zeros(members.shape[0])
    extracted_members[nearest[hit].numpy()] = 1.0
    close = extracted(dist, delta)
    return Extraction(extracted_members, wilson_interval(int(extracted_members.sum()), extracted_members.size), dist,
                      wilson_interval(int(close.sum()), close.size), float(delta))


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
