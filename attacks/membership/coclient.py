"""T5, the curious co-client (DESIGN.md §3 T5, §4.1, §4.2; issue 22).

An honest-but-curious client j knows the protocol, its own data and model and the public auxiliary data,
and receives as many server hand-offs x̂_{t_c} (with their labels when sampling is conditional) as it asks
for. It never sees a payload, the server's weights or another client's model. Its targets: every OTHER
client's member images. The server trained on every client's payloads, so what it memorised it hands to
every participant, a noisy copy a·x + s·ε at a time.

This module is what client j computes from what it holds, and nothing else: its inputs are the hand-offs
(:class:`Handoffs`, tensors only: a payload, a server view or an audit key is refused with
:class:`HandoffLeak`), its own chain (:class:`OwnChain`: its model and the protocol's public sampler
settings) and, for the one-step finisher, the attacker denoiser it trained on the public auxiliary split
(:mod:`collafuse.attacks.reconstruction.denoiser`). Drawing hand-offs from the server, building the
candidates and scoring against ground truth is the caller's side (:mod:`.coclient_run`).

Finishing a hand-off (:func:`finish`):

- ``chain``: client j's own reverse chain t_c → 0, exactly as it finishes every sample it generates;
- ``tweedie``: one step, Tweedie's posterior mean E[x0 | x̂_{t_c}] from the attacker's denoiser
  (x̂ = (x̂_{t_c} − s ε̂)/a, DESIGN §4.1 ``tweedie``), clipped to the data range.

Extraction (:func:`extraction_by_victim`) is Carlini et al. 2023's relative criterion (§5.1, as
:func:`~collafuse.attacks.membership.nn_distance.extraction` implements it: a finished hand-off extracts its
nearest training image x when ℓ2(x̂, x) < α · mean ℓ2 to its n = 50 nearest training images, α = 0.5), with
the server's whole training set as the training set (every client's images: a finished hand-off that copies
client j's own image is credited to that image, never to a victim's look-alike), reported per victim client
k ≠ j and pooled over all of them, beside the number of hand-offs drawn.

Membership (higher score = more likely member; candidates: other clients' members vs held-out images):

- ``handoff-nn``: −min_i ‖x − f_i‖ over the hand-offs f_i finished by client j's own chain: T4's
  nn-distance (Carlini et al. 2023), restricted to what client j can draw.
- ``handoff-lr``: the likelihood of the raw hand-offs. A server that memorised its training images
  x_1..x_K hands off exactly the mixture (1/K) Σ_i N(a x_i, s² I) (a, s of the hand-off step: public), so
  candidate x is tested as a mixture component: the statistic is log Σ_j w_j(x), w_j(x) the posterior weight
  of x as the source of hand-off j (the fused statistic of DESIGN §4.2's ``payload-lr``, computed by
  :func:`~collafuse.attacks.membership.signals.payload_pool_stats`), minus the best value of the public
  auxiliary images (known non-members), so > 0 means x explains the hand-offs better than any known
  non-member. The pool that explains the hand-offs away holds the candidates, client j's own training images
  (it knows the server trained on them) and the references; K is the size of the server's training set (the
  participants' declared data sizes: protocol knowledge). Finishing only post-processes a hand-off, so the
  likelihood of the raw hand-off uses everything finishing could. Where the hand-off is noise-free (c = 0: the
  hand-off is the finished sample) the Gaussian likelihood degenerates and its s → 0 limit, −min_j ‖x − h_j‖²,
  is used. The mixture is exact for a memorising server whose hand-off is a sample of its payload model (the
  audit's hand-off check, DESIGN §2.3); for a server that generalises it is the attacker's model, calibrated
  against the references. Labels are not used (a class-matched pool would need the candidates' labels to
  match the sampling labels, which guidance tilts).

Model queries per candidate: 0 (the cost is the hand-offs the target draws).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from collafuse.attacks.membership.base import AttackScores, MembershipAttack, Signals
from collafuse.attacks.membership.nn_distance import Extraction, extraction
from collafuse.attacks.membership.signals import SignalCache, nearest_distance, payload_pool_stats
from collafuse.attacks.stats import wilson_interval
from collafuse.device import CPU
from collafuse.sampling import reverse_chain
from collafuse.schedule import NoiseSchedule

THREAT = "T5"
FINISHERS: tuple[str, ...] = ("chain", "tweedie")  # client j's own chain; one Tweedie step of the attacker's denoiser
DATA_BOUND = 1.0  # images lie in [-1, 1]: both finishers clip to it, as the sampler does


class HandoffLeak(TypeError):
    """A T5 attack was handed something client j never receives (a payload, a server view, the audit key):
    a bug, never user input. T5 holds the server's hand-offs as plain tensors and its own chain only."""


def _tensor(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise HandoffLeak(f"{where}: the co-client (T5) receives only the server's hand-offs as tensors, "
                          f"got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Handoffs:
    """What client j received from the server: ``tensor`` (M, C, H, W) the hand-offs x̂_t, ``t`` the hand-off
    step (public protocol), ``labels`` (M,) the classes it asked for (conditional sampling) or None."""

    tensor: torch.Tensor
    t: int
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        x = _tensor(self.tensor, "Handoffs.tensor")
        if self.labels is not None:
            _tensor(self.labels, "Handoffs.labels")
        if isinstance(self.t, bool) or not isinstance(self.t, int) or self.t < 0:
            raise ValueError(f"Handoffs.t must be a step >= 0, got {self.t!r}")
        if x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"Handoffs.tensor must be a non-empty (M, C, H, W) tensor, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("Handoffs.tensor holds NaN or infinite values")
        if self.labels is not None and tuple(self.labels.shape) != (x.shape[0],):
            raise ValueError(f"Handoffs.labels must have shape ({x.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.tensor.shape[0])


@dataclass(frozen=True)
class OwnChain:
    """Client j's own chain t → 0: its ``model`` (None where it owns no step, c = 0) and the protocol's public
    sampler settings (``steps``: the client's share of the DDIM steps)."""

    model: nn.Module | None
    schedule: NoiseSchedule
    sampler: str
    steps: int
    guidance: float = 0.0

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, nn.Module):
            raise HandoffLeak(f"OwnChain.model: the co-client's own denoiser, got {type(self.model).__name__}")


def finish_chain(handoffs: Handoffs, chain: OwnChain, generator: torch.Generator,
                 device: torch.device | str = CPU) -> torch.Tensor:
    """The hand-offs finished by client j's own reverse chain t → 0 (M, C, H, W) on the CPU; the hand-offs
    themselves where the client owns no step (t = 0)."""
    if handoffs.t == 0:
        return handoffs.tensor.float().clone()
    if chain.model is None:
        raise ValueError(f"finishing hand-offs at t = {handoffs.t} needs the co-client's own model")
    y = handoffs.labels.to(device) if handoffs.labels is not None else None
    out = reverse_chain(chain.model, chain.schedule.alpha_bar, handoffs.t, 0, handoffs.tensor.float().to(device),
                        generator, y, chain.sampler, chain.steps, chain.guidance if y is not None else 0.0,
                        clip_x0=DATA_BOUND)
    return out.cpu()


@torch.no_grad()
def finish_tweedie(handoffs: Handoffs, denoiser: nn.Module, batch: int = 512) -> torch.Tensor:
    """One Tweedie step E[x0 | x̂_t] from the attacker's denoiser (its ``x0(p, t)``), clipped to the data range
    (M, C, H, W) on the CPU; the hand-offs themselves at t = 0 (nothing to denoise)."""
    x = handoffs.tensor.float()
    if handoffs.t == 0:
        return x.clone()
    device = next(denoiser.parameters()).device
    out = []
    for i in range(0, x.shape[0], batch):
        p = x[i : i + batch].to(device)
        t = torch.full((p.shape[0],), handoffs.t, dtype=torch.long, device=device)
        out.append(denoiser.x0(p, t).clamp(-DATA_BOUND, DATA_BOUND).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Finished:
    """Client j's hand-offs and what it made of them: ``chain`` (M, C, H, W) finished by its own chain and
    ``tweedie`` (M, C, H, W) by one Tweedie step (None without the attacker's denoiser)."""

    attacker: int
    handoffs: Handoffs
    chain: torch.Tensor
    tweedie: torch.Tensor | None = None

    def by_finisher(self) -> dict[str, torch.Tensor]:
        """finisher name → finished images, for the finishers computed."""
        out = {"chain": self.chain}
        if self.tweedie is not None:
            out["tweedie"] = self.tweedie
        return out


# ---------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class CoClientExtraction:
    """Extraction of other clients' images by client j's finished hand-offs: per ``finisher``, per victim client
    k ≠ j (:class:`~collafuse.attacks.membership.nn_distance.Extraction`) and ``others`` pooled over every
    victim; ``handoffs``: how many hand-offs client j drew."""

    attacker: int
    finisher: str
    handoffs: int
    victims: dict[int, Extraction]
    others: Extraction

    def to_json(self) -> dict:
        return {"attacker": self.attacker, "finisher": self.finisher, "handoffs": self.handoffs,
                "others": self.others.to_json(), "victims": {f"client_{k}": e.to_json() for k, e in self.victims.items()}}


def _subset(ext: Extraction, rows: np.ndarray) -> Extraction:
    """The extraction of the training images at ``rows`` only (their 0/1 flags and distances, rates re-counted)."""
    hit, close = ext.extracted[rows], (ext.distance[rows] <= ext.delta)
    return Extraction(hit, wilson_interval(int(hit.sum()), int(hit.size)), ext.distance[rows],
                      wilson_interval(int(close.sum()), int(close.size)), ext.delta)


def extraction_by_victim(train_images: torch.Tensor, owner: np.ndarray, finished: Finished) -> list[CoClientExtraction]:
    """Carlini et al.'s extraction of the server's training images ``train_images`` (K, C, H, W), owned by the
    clients ``owner`` (K,), by each finisher's images; reported per victim (every owner but the attacker) and
    pooled over the victims. Scorer side: ``owner`` is ground truth."""
    owner = np.asarray(owner)
    if owner.shape != (train_images.shape[0],):
        raise ValueError(f"owner must have shape ({train_images.shape[0]},), got {owner.shape}")
    victims = sorted(int(k) for k in np.unique(owner) if k != finished.attacker)
    if not victims:
        raise ValueError("T5 extraction needs another client's images: the attacker is the only client")
    out = []
    for name, images in finished.by_finisher().items():
        ext = extraction(train_images, images)  # against the server's whole training set
        out.append(CoClientExtraction(
            finished.attacker, name, len(finished.handoffs),
            {k: _subset(ext, np.flatnonzero(owner == k)) for k in victims},
            _subset(ext, np.flatnonzero(owner != finished.attacker))))
    return out


# ---------------------------------------------------------------------------------------------- membership


def handoff_log_ratio(candidates: np.ndarray, handoffs: np.ndarray, a: float, s: float, known: np.ndarray,
                      references: np.ndarray, sources: float) -> np.ndarray:
    """The ``handoff-lr`` statistic of each candidate (N, D) against hand-offs (P, D) at the public (a, s):
    log Σ_j w_j(x) with the pool candidates + ``known`` (K0, D: the attacker's own training images) +
    ``references`` (R, D: known non-members), K = ``sources`` images behind the hand-offs, minus the best
    reference's value; −min_j ‖x − h_j‖² where s = 0. (N,) float64."""
    n = candidates.shape[0]
    if s == 0.0:
        return -nearest_distance(candidates, handoffs) ** 2
    pool = np.concatenate([candidates, known, references]).astype(np.float64)
    p = handoffs.shape[0]
    _, fused = payload_pool_stats(pool, handoffs, np.full(p, a), np.full(p, s), n_references=len(references),
                                  sources=sources)
    return fused[:n] - (fused[n + len(known):].max() if len(references) else 0.0)


def coclient_signal_cache(candidates: torch.Tensor, finished: Finished, schedule: NoiseSchedule, known: torch.Tensor,
                          references: torch.Tensor, sources: float) -> SignalCache:
    """T5 signals of candidates (N, C, H, W) from client j's hand-offs: ``handoff_nn_dist`` (N,) to the nearest
    hand-off finished by its own chain, ``handoff_lr`` (N,) the hand-off likelihood (:func:`handoff_log_ratio`).
    ``known``: client j's own training images; ``references``: the public auxiliary images; ``sources``: the
    size of the server's training set."""
    if finished.chain.shape[1:] != candidates.shape[1:]:
        raise ValueError(f"hand-offs have shape {tuple(finished.chain.shape[1:])}, candidates {tuple(candidates.shape[1:])}")

    d = int(np.prod(candidates.shape[1:]))

    def flat(x: torch.Tensor) -> np.ndarray:  # (N, D); an empty set (no auxiliary split) stays (0, D)
        return x.detach().cpu().float().reshape(x.shape[0], d).numpy()

    cand = flat(candidates)
    ab = float(schedule.alpha_bar[finished.handoffs.t])
    return SignalCache({
        "handoff_nn_dist": lambda cache: {"handoff_nn_dist": nearest_distance(cand, flat(finished.chain))},
        "handoff_lr": lambda cache: {"handoff_lr": handoff_log_ratio(
            cand, flat(finished.handoffs.tensor), float(np.sqrt(ab)), float(np.sqrt(max(0.0, 1.0 - ab))),
            flat(known), flat(references), sources)},
    })


def score_nn(signals: Signals) -> AttackScores:
    """signals: handoff_nn_dist (N,) → scores (N,): the nearer a finished hand-off, the more likely a member."""
    return AttackScores(-np.asarray(signals["handoff_nn_dist"], dtype=np.float64))


def score_lr(signals: Signals) -> AttackScores:
    """signals: handoff_lr (N,) → scores (N,) (already a log-likelihood ratio: higher = member)."""
    return AttackScores(np.asarray(signals["handoff_lr"], dtype=np.float64))


NN = MembershipAttack(
    name="handoff-nn",
    summary="negative distance to the nearest hand-off finished by the co-client's own chain",
    threats=(THREAT,),
    signals=("handoff_nn_dist",),
    score=score_nn,
    queries_per_image=lambda settings, m: 0,
    reference="Carlini et al. 2023 (nn-distance), on what a co-client can draw (DESIGN §3 T5)",
)

LR = MembershipAttack(
    name="handoff-lr",
    summary="hand-off log-likelihood ratio: the candidate as a component of the server's hand-off mixture",
    threats=(THREAT,),
    signals=("handoff_lr",),
    score=score_lr,
    queries_per_image=lambda settings, m: 0,
    reference="DESIGN §4.2 (fused Gaussian likelihood, payload-lr) applied to the hand-offs",
)

ATTACKS: tuple[MembershipAttack, ...] = (NN, LR)  # registered in catalog.py
