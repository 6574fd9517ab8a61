"""Source inference on client models: which client's model holds an image? (T3; Hu, Salcic, Dobbie, Chen, Sun &
Zhang, "Source Inference Attacks: Beyond Membership Inference Attacks in Federated Learning", arXiv 2310.00222;
DESIGN.md §4.2 "Source inference").

Threat model: T3, white-box access to the client models (each is a released or stolen model, as for membership on
one client); the attacker holds an image it knows was trained on by SOME client and asks which. Hu et al. attribute
a training record to the client whose local model gives it the smallest loss (their Bayes-optimal rule under a
posterior that falls with the loss); here, adapted from classifiers to denoisers, the loss is the per-pixel
denoising loss ‖ε − ε_θ(a_t x + s_t ε, t)‖² at ONE fixed set of (t, noise) draws shared by every model (the draws
of the reference and peer attacks for the image's client, so a model's loss here is the one ``lira-peers`` sees),
averaged over the low-noise steps as the ``loss`` attack averages it:

    source(x) = argmin_k L_k(x)                (:func:`predict_sources`; ties → the lowest client index)

Scored (:func:`score_source_inference`) like T1's sender identification (:mod:`collafuse.attacks.linkage.sender`):
accuracy with a 95 % Wilson interval over the images against chance 1/N, at chance when 1/N lies inside it. Unlike
sender identification the ids are not relabelled: the attacker holds the client models themselves, so it knows
which model is client k's. The images are the members among each client's membership candidates (the same images
its T3 target is attacked on), N the clients whose models the run holds (an imported deployment may lack some:
their members are left out). Queries per image: N·M·K.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse.attacks.membership.base import low_noise_mean
from collafuse.attacks.membership.references import fixed_losses
from collafuse.attacks.membership.signals import ModelView, step_grid
from collafuse.attacks.stats import Interval, wilson_interval
from collafuse.streams import STREAM_FIXED_DRAWS, generator_for

NAME = "source-inference"
THREAT = "T3"


@dataclass(frozen=True)
class SourceInference:
    """The score: ``accuracy`` (Wilson interval over ``n_images``), ``chance`` = 1/N, ``at_chance`` (1/N inside
    the interval), ``clients``: the N clients whose models were compared, ``per_client``: each client's members
    attributed to it (correct, of how many)."""

    accuracy: Interval
    chance: float
    at_chance: bool
    n_images: int
    clients: tuple[int, ...]
    per_client: dict[int, tuple[int, int]]

    def to_dict(self) -> dict:
        return {"attack": NAME, "threat": THREAT, "accuracy": self.accuracy.to_json(), "chance": self.chance,
                "at_chance": self.at_chance, "n_images": self.n_images, "clients": list(self.clients),
                "per_client": {str(k): {"correct": c, "images": n} for k, (c, n) in self.per_client.items()},
                "rule": "argmin over client models of the denoising loss at shared fixed draws (Hu et al. 2023)"}


def predict_sources(losses: np.ndarray) -> np.ndarray:
    """(K, n) losses of K models on n images → (n,) int64, the index of the model with the lowest loss (ties: the
    lowest index)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] < 1:
        raise ValueError(f"predict_sources needs (models, images) losses, got shape {losses.shape}")
    if not np.isfinite(losses).all():
        raise ValueError("predict_sources: the losses hold NaN or infinite values")
    return np.argmin(losses, axis=0).astype(np.int64)


def score_source_inference(predicted: np.ndarray, truth: np.ndarray, clients: tuple[int, ...],
                           level: float = 0.95) -> SourceInference:
    """Accuracy of ``predicted`` against ``truth`` (n,) (both client indices from ``clients``), Wilson interval,
    chance 1/len(clients)."""
    predicted, truth = np.asarray(predicted, dtype=np.int64), np.asarray(truth, dtype=np.int64)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} must be (n,) and of one shape")
    if len(clients) < 2:
        raise ValueError(f"source inference needs at least 2 client models, got {len(clients)}")
    known = set(clients)
    for name, a in (("predicted", predicted), ("truth", truth)):
        if not set(a.tolist()) <= known:
            raise ValueError(f"{name} names clients outside {sorted(known)}: {sorted(set(a.tolist()) - known)[:8]}")
    correct = predicted == truth
    accuracy = wilson_interval(int(correct.sum()), int(predicted.size), level)
    chance = 1.0 / len(clients)
    at_chance = bool(predicted.size) and accuracy.low <= chance <= accuracy.high
    per_client = {int(k): (int(correct[truth == k].sum()), int((truth == k).sum())) for k in clients}
    return SourceInference(accuracy, chance, bool(at_chance), int(predicted.size), tuple(int(k) for k in clients),
                           per_client)


def model_losses(views: list[ModelView], images: torch.Tensor, labels: torch.Tensor | None, steps: list[int],
                 noise: torch.Tensor, batch_size: int) -> np.ndarray:
    """(K, n): each model's per-pixel denoising loss on ``images`` (n, C, H, W) at the fixed draws ``noise``
    (M, K_draws, n, C, H, W) of ``steps`` (M,), averaged over the low-noise steps
    (:func:`~collafuse.attacks.membership.base.low_noise_mean`)."""
    first = views[0]
    t_range = np.asarray([first.origin, first.t_max])
    return np.stack([low_noise_mean(fixed_losses(v, images, labels, steps, noise, batch_size), np.asarray(steps),
                                    t_range) for v in views])


def infer_sources(ctx, level: float = 0.95) -> SourceInference | None:
    """Source inference on a run in an :class:`~collafuse.attacks.membership.targets.AuditContext`: every client
    model the run holds scores the members among every such client's membership candidates; None where fewer than
    2 client models exist (c = 0, one client, or an imported deployment without them)."""
    run = ctx.run
    if run.t_hand == 0:
        return None
    _, splits = ctx.data()
    clients = [k for k, model in enumerate(run.client_models) if model is not None]
    if len(clients) < 2:
        return None
    conditional = run.num_classes > 0
    views = [ModelView.client(run.client_models[k], run.schedule, run.t_hand, conditional, ctx.device) for k in clients]
    predicted, truth = [], []
    s = ctx.settings
    steps = step_grid(views[0].t_min, views[0].t_max, s.n_steps)
    for k in clients:
        cand = ctx.candidates(splits.clients[k], 1 + k)
        # The draws of client k's candidate set (members first), as the peer attacks draw them for
        # that target; only its members are attributed, so only they are queried.
        g = generator_for(ctx.seed, STREAM_FIXED_DRAWS, 1 + k, 0)
        noise = torch.randn((len(steps), s.peer_draws, len(cand.images), *cand.images.shape[1:]), generator=g)
        nm = cand.n_members
        labels = None if cand.labels is None else cand.labels[:nm]
        losses = model_losses(views, cand.images[:nm], labels, steps, noise[:, :, :nm], s.batch_size)
        predicted.append(np.asarray(clients)[predict_sources(losses)])
        truth.append(np.full(cand.n_members, k, dtype=np.int64))
    return score_source_inference(np.concatenate(predicted), np.concatenate(truth), tuple(clients), level)
