"""Peer references: the other clients' models as OUT reference models of client k (T3; DESIGN.md §4.2
"Peer references").

In a split system every client model trains with the same recipe (architecture, steps 1..t_c, epochs, optimiser,
EMA, DP-SGD when the clients use it) on its own share of the members, and no client sees another's images. So for
client k's candidates (its members and the held-out non-members) each of the other N − 1 client models is an OUT
model: trained exactly like the target, on data that does not hold the candidate. The offline forms of LiRA and
RMIA need nothing else (``lira-peers``, ``rmia-peers``): no reference training, and they work where the recipe
cannot be repeated (an imported deployment, ``collafuse import``).

The assumption that makes a peer an OUT model "of the same distribution" is an IID partition. Under a label or
Dirichlet partition (:mod:`collafuse.data`) a peer trained on other classes or proportions, so its loss on client
k's images is high for reasons that have nothing to do with membership; an imported deployment does not declare
its partition at all. The signals carry the partition, and the peer attacks say so in their result.

This module makes the queries (as :mod:`~collafuse.attacks.membership.references` does for trained references);
the scores are pure functions of its signals (:mod:`~collafuse.attacks.membership.lira_peers`,
:mod:`~collafuse.attacks.membership.rmia_peers`). Every model (target and peers) is queried at ONE fixed set of
(t, noise) draws: the draws of the reference attacks for the same target (same seed and streams), so ``lira`` and
``lira-peers`` see the same target losses and differ only in their OUT models.

Signals (N candidates, Z population samples, P peers, M steps):

    peer_target_loss     (N, M)     per-pixel ‖ε − ε_θ(x_t, t)‖² of the target at the fixed draws, mean over K
    peer_loss            (P, N, M)  the same for each peer model
    peer_pop_target_loss (Z, M)     the target's loss on the population samples (the first ≤ 256 auxiliary images)
    peer_pop_loss        (P, Z, M)  each peer's loss on them (no client trained on the auxiliary split)
    peer_clients         (P,)       the peers' client indices
    peer_partition       (1,)       the run's partition: "iid", "label", "dirichlet" or "undeclared" (imported)
    peer_draws           (1,)       K, the noise draws per step (the query count)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from collafuse.attacks.membership.lira_peers import UNDECLARED
from collafuse.attacks.membership.metrics import ScoreError
from collafuse.attacks.membership.references import MAX_POPULATION, fixed_losses
from collafuse.attacks.membership.signals import ModelView, step_grid
from collafuse.streams import STREAM_FIXED_DRAWS, generator_for

PEER_SIGNALS = ("peer_target_loss", "peer_loss", "peer_clients", "peer_partition", "peer_draws")
PEER_POPULATION_SIGNALS = ("peer_pop_target_loss", "peer_pop_loss")


def run_partition(config) -> str:
    """The clients' data partition a run declares: its config's ``data.partition``, or ``undeclared`` for an
    imported deployment (its manifest says which client holds each member, not how they were drawn)."""
    return UNDECLARED if config.data.source == "imported" else str(config.data.partition)


def peer_producers(view: ModelView, peers: list[tuple[int, ModelView]], images: torch.Tensor,
                   labels: torch.Tensor | None, population: torch.Tensor, population_labels: torch.Tensor | None,
                   partition: str, n_steps: int, n_noise: int, batch_size: int, seed: int,
                   stream: int) -> dict[str, Callable]:
    """Signal producers (for :meth:`SignalCache.with_producers`) of one client target ``view`` and its ``peers``
    ((client index, view) each) on candidates ``images`` (N, C, H, W) and ``population`` (Z, C, H, W). The draws
    are those of :func:`~collafuse.attacks.membership.references.reference_producers` for the same ``seed`` and
    ``stream`` (the target's). A target without a peer raises :class:`ScoreError` when a signal is asked for."""
    steps = step_grid(view.t_min, view.t_max, n_steps)
    shape = images.shape[1:]
    ids = np.asarray([k for k, _ in peers], dtype=np.int64)

    def draws(n: int, which: int) -> torch.Tensor:
        g = generator_for(seed, STREAM_FIXED_DRAWS, stream, which)
        return torch.randn((len(steps), n_noise, n, *shape), generator=g)

    def check() -> None:
        if not peers:
            raise ScoreError("the peer attacks need another client's model as an OUT reference: this run has "
                             "no other client model (at least 2 clients with models)")

    def losses(x: torch.Tensor, y: torch.Tensor | None, which: int) -> tuple[np.ndarray, np.ndarray]:
        noise = draws(len(x), which)
        target = fixed_losses(view, x, y, steps, noise, batch_size)
        return target, np.stack([fixed_losses(p, x, y, steps, noise, batch_size) for _, p in peers])

    def p_candidates(cache) -> dict[str, np.ndarray]:
        check()
        target, peer = losses(images, labels, 0)
        return {"peer_target_loss": target, "peer_loss": peer, "peer_clients": ids,
                "peer_partition": np.asarray([partition]), "peer_draws": np.asarray([n_noise], dtype=np.int64)}

    def p_population(cache) -> dict[str, np.ndarray]:
        check()
        target, peer = losses(population, population_labels, 1)
        return {"peer_pop_target_loss": target, "peer_pop_loss": peer}

    return {**{name: p_candidates for name in PEER_SIGNALS}, **{name: p_population for name in PEER_POPULATION_SIGNALS}}


def target_peer_producers(ctx, client: int, view: ModelView, candidates) -> dict[str, Callable]:
    """The peer signals of client ``client``'s T3 target in an
    :class:`~collafuse.attacks.membership.targets.AuditContext`: every other client model the run holds (an
    imported deployment may lack some), on the same schedule and steps; population = the first ≤ 256 auxiliary
    images; the draws of the target's reference attacks (stream 1 + client)."""
    run = ctx.run
    data, splits = ctx.data()
    s = ctx.settings
    peers = [(j, ModelView.client(model, run.schedule, run.t_hand, view.conditional, view.device))
             for j, model in enumerate(run.client_models) if j != client and model is not None]
    pop_idx = splits.aux[:MAX_POPULATION].long()
    pop_labels = None if candidates.labels is None else data.labels[pop_idx]
    return peer_producers(view, peers, candidates.images, candidates.labels, data.images[pop_idx], pop_labels,
                          run_partition(run.config), s.n_steps, s.peer_draws, s.batch_size, ctx.seed, 1 + client)
