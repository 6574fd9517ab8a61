"""Training N clients and the server together (DESIGN.md §2.2, §2.4).

One epoch = every client walks once through its own data, round-robin over
clients, one minibatch at a time. A *round* is one turn of every client that
still has data: each takes a step on t ∈ {1..t_c} and releases a payload; then
the round's payloads cross to the server (through a relay when a release hook
mixes rounds: :meth:`collafuse.hooks.ReleaseHook.mix_round`), the transcript
records each message and the server takes a step on it. Without a relay every
payload is its own message, in release order. c = 0 (central) and c = 1
(local-only) are the same loop with an empty client side or an empty server side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from collafuse.backends import Denoiser, DiffusersDenoiser, DiffusersSpec
from collafuse.config import DiffusersModelConfig, ModelConfig, RunConfig
from collafuse.data import ImageSet, Splits
from collafuse.errors import ConfigError
from collafuse.hooks import ReleaseHook, TrainingHook, deliver_round
from collafuse.model import UNet, UNetConfig
from collafuse.payload import Payload
from collafuse.protocol import Client, Server
from collafuse.schedule import NoiseSchedule
from collafuse.transcript import TranscriptWriter


def stream_seed(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for one named random stream of a run (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator_for(seed: int, *stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, *stream))


# Stream ids: fixed numbers so adding a stream never shifts the others.
STREAM_SPLIT, STREAM_PARTITION, STREAM_SERVER, STREAM_CLIENT, STREAM_LOADER, STREAM_INIT, STREAM_SAMPLE = range(7)
STREAM_RELAY = 7  # the relay's shuffle of a round (an id-free release); unused without one
STREAM_CANARY = 8  # which held-out images are canaries and which of them go in (canaries.count > 0 only)


CPU = torch.device("cpu")  # the one CPU literal outside the config: the fallback of resolve_device and a safe default
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: "str | torch.device | None") -> torch.device:
    """``auto`` (or None) → CUDA when it is available, else the CPU; ``cpu``/``cuda`` as asked (DESIGN §10).

    Every part resolves its device here (training, sampling, attacks, the audit), so ``auto``
    means the same everywhere; an unavailable CUDA is a :class:`ConfigError` (one line, exit 2)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; valid: {', '.join(DEVICE_CHOICES)}") from None


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


@dataclass(frozen=True)
class Hooks:
    """What the core calls out to; empty = the plain protocol.

    ``built_from`` is the :meth:`fingerprint` of the ``defenses:`` list the hooks were built
    from (``collafuse.defenses.build_hooks`` sets it; None = hand-made hooks). ``create_run``
    compares it with the config's ``defenses:``, so a run folder never claims a defense that
    did not run.
    """

    release: tuple[ReleaseHook, ...] = ()
    training: tuple[TrainingHook, ...] = ()
    built_from: str | None = None

    @staticmethod
    def fingerprint(defenses) -> str:
        """sha256 of the canonical JSON of a ``defenses:`` list (a sequence of mappings)."""
        import hashlib
        import json

        canonical = json.dumps([dict(spec) for spec in defenses], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> list[dict]:
        """Every hook's ``describe()``, release hooks first: what run.json records as ``hooks``."""
        return [h.describe() for h in self.release] + [h.describe() for h in self.training]


@dataclass
class TrainedSystem:
    config: RunConfig
    schedule: NoiseSchedule
    t_c: int
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
    named = [("server", server)] + [(f"client_{k}", c) for k, c in enumerate(clients)]
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
    t_hand = t_c
    for hook in hooks.release:
        t_hand = hook.release_step(t_hand)
    multiplicity = {
        role: max([h.noise_multiplicity(role) for h in hooks.training] + [1]) for role in ("server", "client")
    }
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
    loaders: list[DataLoader] = []
    labels_all = data.labels if data.labels is not None else torch.zeros(len(data), dtype=torch.long)
    for k in range(len(splits.clients)):
        member_idx = splits.training_set(k)  # the canary client also trains on its included canaries
        dataset = TensorDataset(member_idx, data.images[member_idx], labels_all[member_idx])
        loader = DataLoader(
            dataset, batch_size=min(tr.batch_size, len(member_idx)), shuffle=True,
            generator=generator_for(config.seed, STREAM_LOADER, k),
        )
        c_model = c_opt = None
        if t_c > 0:
            c_model = build_model(denoiser_spec(config, "client", num_classes), config.seed, STREAM_CLIENT, k).to(device)
            c_opt = torch.optim.Adam(c_model.parameters(), lr=tr.lr)
        client_averages.append(WeightAverage(c_model, tr.ema_decay) if c_model is not None else None)
        # Wrapped even with no client model: the loader also picks what the server trains on.
        c_model, c_opt, loader = _wrap(hooks, "client", c_model, c_opt, loader)
        loaders.append(loader)
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
        iterators = [iter(loader) for loader in loaders]
        active = list(range(len(clients)))
        while active:
            # One round. The server's side (its idle steps and payloads, in turn order) waits for the
            # round's end, so a relay can mix the round; its numbers do not depend on when it runs.
            released: list[tuple[int, Payload, torch.Tensor]] = []  # (client, payload, member ids)
            turns: list[str] = []
            for k in list(active):
                batch = next(iterators[k], None)
                if batch is None:
                    active.remove(k)
                    continue
                ids, x0, y = batch
                if ids.numel() == 0:
                    # Poisson sampling (DP-SGD) can draw an empty batch; the DP step still
                    # happens (noise only), or the accounting would not hold.
                    clients[k].idle_step()
                    if client_averages[k] is not None:
                        client_averages[k].update()  # the noise-only step moved the weights too
                    turns.append("idle")
                    continue
                x0, y = x0.to(device), (y.to(device) if num_classes > 0 else None)
                loss = clients[k].train_step(x0, y)
                if loss is not None:
                    client_losses[k].append(loss)
                    client_averages[k].update()
                if server is not None:
                    released.append((k, clients[k].release(x0, y, ids, step), ids))
                    turns.append("payload")
                step += 1
            if server is None or not turns:
                continue
            messages, mixed = deliver_round(hooks.release, released, round_index, relay)
            round_index += 1
            if mixed:  # a relay's messages no longer line up with the turns: idle steps first
                turns = ["idle"] * turns.count("idle") + ["payload"] * len(messages)
            pending = iter(messages)
            for turn in turns:
                if turn == "idle":
                    server.idle_step()
                    server_average.update()
                    continue
                payload, ids, sender = next(pending)
                writer.record(payload, ids, client=sender)  # the audit key gets ids and sender; the server only the payload
                server_losses.append(server.receive(payload))  # ← the payload crosses here
                server_average.update()
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
                    entry[f"{hook.name}.{role}{'' if owner is None else owner}.{key}"] = value
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
        t_c=t_hand,
        server_model=server_average.weights if server_average is not None else None,
        client_models=[a.weights if a is not None else None for a in client_averages],
        log=log,
        num_classes=num_classes,
        snapshots=snapshots,
    )
