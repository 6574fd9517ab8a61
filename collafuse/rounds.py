"""One protocol round (DESIGN.md §2.2): the batch schedule and the release of a round.

Everything that plays the protocol calls these functions: training
(:func:`collafuse.training.train_system`), the payload simulation of the attacks
(:mod:`collafuse.attacks.reconstruction.curve`: model-less clients) and the attacker's
reference trainings (:mod:`collafuse.attacks.membership.references`). What crosses, and in
which order, therefore cannot differ between a trained run and its simulation
(``tests/test_protocol_twin.py`` checks it row for row).

**The batch schedule.** Each client walks its own training set once per epoch through
:func:`client_loader`: a ``DataLoader`` over (member ids, images, labels) with batch size
min(batch_size, n), shuffled by the client's own loader generator. A seeded ``DataLoader``
draws a base seed from that generator at the start of each epoch, then its permutation, then
(when the epoch ends) a second, unused one: the order is not a bare ``randperm`` of the ids,
which is why nothing re-derives it. A training hook may replace a loader (DP-SGD: Poisson
sampling, which can draw empty batches). :func:`epoch_rounds` turns the loaders into one
epoch's rounds: a turn of every client that still has a batch, in client order.

**The release of a round.** :func:`release_round`: in turn order, a client with an empty batch
takes an idle step (a DP optimiser still adds its noise); any other client takes its step
(:meth:`~collafuse.protocol.Client.train_step`) and, when a server takes part, releases its payload
(:meth:`~collafuse.protocol.Client.release`); the global step counts the non-empty turns.
:func:`deliver` then passes the round's payloads through the release hooks' relay
(:func:`collafuse.hooks.deliver_round`; an ``id-free`` release mixes them) and lines the
messages up with the server's turns: an idle server step per idle turn, a server step per message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from collafuse.data import ImageSet, Splits
from collafuse.hooks import ReleaseHook, deliver_round
from collafuse.payload import Payload
from collafuse.protocol import Client

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # member ids (B,), images (B,C,H,W), labels (B,)
Turn = tuple[int, Batch]                                 # (client, its batch of the round)


# ---------------------------------------------------------------- the batch schedule

def client_loader(
    member_ids: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> DataLoader:
    """One client's loader: (member ids, images, labels) in batches of min(batch_size, n), shuffled by ``generator``."""
    return DataLoader(TensorDataset(member_ids, images, labels), batch_size=min(batch_size, len(member_ids)),
                      shuffle=True, generator=generator)


def client_loaders(
    data: ImageSet, splits: Splits, batch_size: int, generators: Sequence[torch.Generator]
) -> list[DataLoader]:
    """Every client's loader over its training set (:meth:`Splits.training_set`: its members and, for the
    canary client, its included canaries), client k shuffled by ``generators[k]``. Unlabelled data gets
    label 0 (never sent: the clients of an unconditional run pass no labels)."""
    if len(generators) != len(splits.clients):
        raise ValueError(f"one loader generator per client: {len(splits.clients)} clients, {len(generators)} generators")
    labels = data.labels if data.labels is not None else torch.zeros(len(data), dtype=torch.long)
    loaders = []
    for k, generator in enumerate(generators):
        idx = splits.training_set(k)
        loaders.append(client_loader(idx, data.images[idx], labels[idx], batch_size, generator))
    return loaders


def epoch_rounds(loaders: Sequence[DataLoader]) -> Iterator[list[Turn]]:
    """One epoch of the round-robin: per round, (client, batch) for every client that still has a batch,
    in client order; a client leaves once its loader is exhausted; the epoch ends when none is left."""
    iterators = [iter(loader) for loader in loaders]
    active = list(range(len(loaders)))
    while active:
        turns: list[Turn] = []
        for k in list(active):
            batch = next(iterators[k], None)
            if batch is None:
                active.remove(k)
                continue
            turns.append((k, batch))
        if turns:
            yield turns


# ---------------------------------------------------------------- the release of a round

IDLE, PAYLOAD = "idle", "payload"


@dataclass
class ReleasedRound:
    """The clients' side of one round.

    ``released``: (client, payload, member ids) per payload, in release order; ``turns``: per turn,
    IDLE (an empty batch) or PAYLOAD (a payload was released), in turn order (non-empty turns of a
    round without a server are not listed: nothing reaches a server); ``losses``: (client, loss)
    per client step that trained a model; ``idle``: the clients that took an idle step; ``step``:
    the global step after the round.
    """

    released: list[tuple[int, Payload, torch.Tensor]] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    idle: list[int] = field(default_factory=list)
    step: int = 0


def release_round(
    clients: Sequence[Client], turns: Sequence[Turn], step: int, *, labels: bool, send: bool = True,
    device: torch.device | None = None,
) -> ReleasedRound:
    """Every client's turn of one round (see the module doc). ``step``: the global step before the round;
    ``labels``: the clients pass their labels (a conditional run); ``send``: a server takes part (False:
    c = 1, the clients only train); ``device``: where the clients' models run (None: where the batch is)."""
    out = ReleasedRound(step=step)
    for k, (ids, x0, y) in turns:
        if ids.numel() == 0:
            # Poisson sampling (DP-SGD) can draw an empty batch; the DP step still
            # happens (noise only), or the accounting would not hold.
            clients[k].idle_step()
            out.idle.append(k)
            out.turns.append(IDLE)
            continue
        if device is not None:
            x0 = x0.to(device)
        y = (y.to(x0.device) if labels else None)
        loss = clients[k].train_step(x0, y)
        if loss is not None:
            out.losses.append((k, loss))
        if send:
            out.released.append((k, clients[k].release(x0, y, ids, out.step), ids))
            out.turns.append(PAYLOAD)
        out.step += 1
    return out


class Message(NamedTuple):
    """One message the server receives, with the audit key's truth: ``member_ids`` (B,) and the true
    ``sender`` (B,) int64 of each row (the payload itself may hide it)."""

    payload: Payload
    member_ids: torch.Tensor
    sender: torch.Tensor


def deliver(
    release_hooks: Sequence[ReleaseHook], released: ReleasedRound, round_index: int,
    relay: torch.Generator | None,
) -> list[Message | None]:
    """The server's side of one round, in order: a :class:`Message` per server step on a payload, None per
    idle server step. The payloads go through the hooks' relay (``relay``: the run's relay stream; a relay
    that mixes the round delivers its messages after the round's idle steps)."""
    messages, mixed = deliver_round(release_hooks, released.released, round_index, relay)
    turns = released.turns
    if mixed:  # a relay's messages no longer line up with the turns: idle steps first
        turns = [IDLE] * turns.count(IDLE) + [PAYLOAD] * len(messages)
    pending = iter(messages)
    out: list[Message | None] = []
    for turn in turns:
        if turn == IDLE:
            out.append(None)
            continue
        payload, ids, sender = next(pending)
        if not isinstance(sender, torch.Tensor):
            sender = torch.full((len(payload),), int(sender), dtype=torch.int64)
        out.append(Message(payload, ids, sender.to(torch.int64)))
    return out
