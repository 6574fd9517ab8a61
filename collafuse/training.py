"""Training N clients and the server together (DESIGN.md §2.2, §2.4).

One epoch = every client walks once through its own data, round-robin over
clients, one minibatch at a time. A *round* is one turn of every client that
still has data: each takes a step on t ∈ {1..t_c} and releases a payload; then
the round's payloads cross to the server (through a relay when a release hook
mixes rounds: :meth:`collafuse.hooks.ReleaseHook.mix_round`), the transcript
records each message and the server takes a step on it. Without a relay every
payload is its own message, in release order. c = 0 (central) and c = 1
(local-only) are the same loop with an empty client side or an empty server side.

The batch schedule and the round itself are :mod:`collafuse.rounds`, the one round
the payload simulation and the attacker's reference trainings play too; this module
builds the models, optimisers and hooks around it and keeps the training log.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from collafuse.backends import Denoiser, DiffusersDenoiser, DiffusersSpec
from collafuse.config import DiffusersModelConfig, ModelConfig, RunConfig
from collafuse.data import ImageSet, Splits
from collafuse.device import CPU, resolve_device
from collafuse.errors import ConfigError
from collafuse.hooks import Hooks, model_name
from collafuse.model import UNet, UNetConfig
from collafuse.protocol import Client, Server
from collafuse.rounds import client_loaders, deliver, epoch_rounds, release_round
from collafuse.schedule import NoiseSchedule
from collafuse.streams import (STREAM_CLIENT, STREAM_INIT, STREAM_RELAY, STREAM_SERVER, generator_for,
                               loader_generators, stream_seed)
from collafuse.transcript import TranscriptWriter


def unet_config(model: ModelConfig, channels: int, num_classes: int) -> UNetConfig:
    """The native UNet's build spec for a ``backend: native`` model section (see :func:`denoiser_spec`)."""
    if not isinstance(model, ModelConfig):
        raise ConfigError(f"unet_config builds native models only; this one is backend {model.backend!r} "
                          "(use collafuse.training.denoiser_spec)")
    return UNetConfig(
        in_channels=channels,
        channels=tuple(model.channels),
        blocks_per_level=model.blocks_per_level,
        time_dim=model.time_dim,
        groups=model.groups,
        num_classes=num_classes,
    )


ModelSpec = Union[UNetConfig, DiffusersSpec]


def model_spec(
    model: "ModelConfig | DiffusersModelConfig", channels: int, image_size: int, num_classes: int,
    alpha_bar: tuple[float, ...] | None = None,
) -> ModelSpec:
    """The build spec of an ε-model section, whichever its backend; ``alpha_bar`` is the schedule the model
    is trained on (only a diffusers model that predicts v or x0 needs it, to convert to ε)."""
    if isinstance(model, ModelConfig):
        return unet_config(model, channels, num_classes)
    return DiffusersSpec(
        in_channels=channels, sample_size=image_size, num_classes=num_classes,
        unet_kwargs=tuple(sorted(model.unet_kwargs.items())), prediction_type=model.prediction_type,
        timestep_offset=1 if model.timesteps == "diffusers" else 0, alpha_bar=alpha_bar,
    )


def denoiser_spec(config: RunConfig, side: str, num_classes: int) -> ModelSpec:
    """The build spec of one side's ε-model ("server" or "client") of a run config (DESIGN §9).

    A diffusers model that predicts v or x0 converts to ε with the schedule it was trained on: the
    full ᾱ for a client, the relative ᾱ' = ᾱ/ᾱ_{t_c} for the server (§2.2 step 3)."""
    if side not in ("server", "client"):
        raise ValueError(f"side must be 'server' or 'client', got {side!r}")
    model = config.server_model if side == "server" else config.client_model
    alpha_bar = None
    if getattr(model, "prediction_type", "epsilon") != "epsilon":
        schedule = NoiseSchedule.from_config(config.diffusion)
        table = schedule.relative(config.t_c) if side == "server" else schedule.alpha_bar
        alpha_bar = tuple(float(v) for v in table)
    return model_spec(model, config.data.channels, config.data.image_size, num_classes, alpha_bar)


def build_model(config: ModelSpec, seed: int, *stream: int) -> "Denoiser":
    """A freshly initialised ε-model (native UNet or diffusers) whose weights depend only on (seed, stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, STREAM_INIT, *stream))
        if isinstance(config, DiffusersSpec):
            return DiffusersDenoiser(config)
        return UNet(config)


@dataclass
class TrainedSystem:
    config: RunConfig
    schedule: NoiseSchedule
    t_hand: int  # the hand-off step (config.t_c, or later when payload noise moves the payloads)
    server_model: Denoiser | None
    client_models: list[Denoiser | None]
    log: list[dict] = field(default_factory=list)
    num_classes: int = 0
    # training.snapshots: epoch → model name ("server", "client_<k>") → its EMA weights after that epoch (CPU copies)
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


class WeightAverage:
    """Exponential moving average of a model's weights (what the run publishes and samples with).

    ``decay = 0`` keeps the raw weights. Averaging happens after the optimiser step, so
    it is post-processing: it changes no privacy accounting.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None
        self.model = model

    def update(self) -> None:
        if self.average is not None:
            self.average.update_parameters(self.model)

    @property
    def weights(self) -> torch.nn.Module:
        return self.average.module if self.average is not None else self.model


def weights_snapshot(server: WeightAverage | None, clients: list[WeightAverage | None]) -> dict[str, dict[str, torch.Tensor]]:
    """A CPU copy of every model's published (EMA) weights now, by model name: one training.snapshots entry."""
    named = [("server", server)] + [(model_name("client", k), c) for k, c in enumerate(clients)]
    return {name: {key: value.detach().to(CPU, copy=True).contiguous() for key, value in avg.weights.state_dict().items()}
            for name, avg in named if avg is not None}


def _wrap(hooks: Hooks, role: str, model, optimizer, loader):
    for hook in hooks.training:
        model, optimizer, loader = hook.wrap(role, model, optimizer, loader)
    return model, optimizer, loader


def train_system(
    config: RunConfig,
    data: ImageSet,
    splits: Splits,
    out_dir: Path,
    hooks: Hooks = Hooks(),
    progress: bool = True,
    log_line: Callable[[dict], None] | None = None,
) -> TrainedSystem:
    """Train every client and the server; write the transcript and audit key under ``out_dir``."""
    device = resolve_device(config.device)
    schedule = NoiseSchedule.from_config(config.diffusion)
    t_c = config.t_c
    T = schedule.T
    # A release hook may move where payloads sit (payload noise: t_c → t'); the server
    # then owns (t', T] and the client 1..t', and the sampling chain hands off at t'.
    t_hand = hooks.release_step(t_c)
    multiplicity = {role: hooks.noise_multiplicity(role) for role in ("server", "client")}
    num_classes = data.num_classes if config.conditional else 0
    if config.conditional and data.labels is None:
        raise ConfigError(f"conditional: true needs labelled data; source {config.data.source!r} has no labels")
    tr = config.training

    server: Server | None = None
    server_average: WeightAverage | None = None
    client_averages: list[WeightAverage | None] = []
    if t_c < T:
        s_model = build_model(denoiser_spec(config, "server", num_classes), config.seed, STREAM_SERVER).to(device)
        s_opt = torch.optim.Adam(s_model.parameters(), lr=tr.lr)
        # The average copies the model before any hook wraps it (a wrapper's hooks must not be copied).
        server_average = WeightAverage(s_model, tr.ema_decay)
        s_model, s_opt, _ = _wrap(hooks, "server", s_model, s_opt, None)
        server = Server(
            s_model, s_opt, schedule, t_hand, generator_for(config.seed, STREAM_SERVER), device, tr.label_dropout,
            noise_multiplicity=multiplicity["server"],
        )

    clients: list[Client] = []
    # The one batch schedule (collafuse.rounds), each loader wrapped by the training hooks below.
    loaders = client_loaders(data, splits, tr.batch_size, loader_generators(config.seed, len(splits.clients)))
    for k in range(len(splits.clients)):
        c_model = c_opt = None
        if t_c > 0:
            c_model = build_model(denoiser_spec(config, "client", num_classes), config.seed, STREAM_CLIENT, k).to(device)
            c_opt = torch.optim.Adam(c_model.parameters(), lr=tr.lr)
        client_averages.append(WeightAverage(c_model, tr.ema_decay) if c_model is not None else None)
        # Wrapped even with no client model: the loader also picks what the server trains on.
        c_model, c_opt, loaders[k] = _wrap(hooks, "client", c_model, c_opt, loaders[k])
        clients.append(
            Client(
                k, c_model, c_opt, schedule, t_c, tr.payload, generator_for(config.seed, STREAM_CLIENT, k),
                release_hooks=hooks.release, label_dropout=tr.label_dropout, send_labels=num_classes > 0,
                train_t_max=t_hand, noise_multiplicity=multiplicity["client"],
            )
        )

    # Always written, so c = 1 leaves an explicit, empty server view rather than none at all.
    writer = TranscriptWriter(out_dir, tr.payload, tr.shard_rows)
    log: list[dict] = []
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    step = 0
    relay = generator_for(config.seed, STREAM_RELAY)
    round_index = 0
    bar = tqdm(range(1, tr.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        started = time.perf_counter()
        client_losses: list[list[float]] = [[] for _ in clients]
        server_losses: list[float] = []
        for turns in epoch_rounds(loaders):
            # One round (collafuse.rounds): the clients' turns, then the server's side (its idle steps and
            # payloads, in turn order) at the round's end, so a relay can mix the round.
            released = release_round(clients, turns, step, labels=num_classes > 0, send=server is not None,
                                     device=device)
            step = released.step
            for k in released.idle:
                if client_averages[k] is not None:
                    client_averages[k].update()  # the noise-only step moved the weights too
            for k, loss in released.losses:
                client_losses[k].append(loss)
                client_averages[k].update()
            if server is None:
                continue
            for message in deliver(hooks.release, released, round_index, relay):
                if message is None:
                    server.idle_step()
                    server_average.update()
                    continue
                # The audit key gets ids and sender; the server only the payload.
                writer.record(message.payload, message.member_ids, client=message.sender)
                server_losses.append(server.receive(message.payload))  # ← the payload crosses here
                server_average.update()
            round_index += 1
        entry = {
            "epoch": epoch,
            "steps": step,
            "seconds": round(time.perf_counter() - started, 4),
            "server_loss": float(np.mean(server_losses)) if server_losses else None,
            "client_loss": [float(np.mean(l)) if l else None for l in client_losses],
        }
        for hook in hooks.training:
            for role, owner in [("server", None)] + [("client", k) for k in range(len(clients))]:
                for key, value in hook.metrics(role, owner).items():
                    entry[f"{hook.name}.{model_name(role, owner)}.{key}"] = value
        log.append(entry)
        if epoch in tr.snapshots:
            snapshots[epoch] = weights_snapshot(server_average, client_averages)
        if log_line is not None:
            log_line(entry)
        if entry["server_loss"] is not None:
            bar.set_postfix(server=f"{entry['server_loss']:.3f}")
    writer.close()
    return TrainedSystem(
        config=config,
        schedule=schedule,
        t_hand=t_hand,
        server_model=server_average.weights if server_average is not None else None,
        client_models=[a.weights if a is not None else None for a in client_averages],
        log=log,
        num_classes=num_classes,
        snapshots=snapshots,
    )
