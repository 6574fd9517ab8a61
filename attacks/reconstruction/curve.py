"""The payload-only leakage curve (DESIGN.md §7; issue 3 item 3).

Every T1 metric for a grid of cut ratios from a dataset, a schedule and the
defense-free protocol alone — no CollaFuse system is trained. For each cut ratio
the payloads are simulated by the core's own round (:mod:`collafuse.rounds`), the one
:func:`collafuse.training.train_system` plays: the clients' loaders as training builds
them, one minibatch per client and round, each client's step (model-less clients that
still take every draw of a training step) and payload
(:meth:`collafuse.protocol.Client.release`), the round's payloads through the release
hooks' relay (:func:`collafuse.hooks.deliver_round`: an id-free release mixes them).
For the same config and hooks the simulated server view is therefore the trained run's
transcript, row for row and value for value (``tests/test_protocol_twin.py``). The data
splits (members, non-members, aux, client partition) are the ones a trained run with the
same config would use (:func:`collafuse.runs.prepare_data`).

The attacker's denoiser is trained once on the aux split (cached) and serves
every cut ratio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from collafuse.config import RunConfig
from collafuse.data import ImageSet, Splits
from collafuse.errors import ConfigError
from collafuse.hooks import Hooks, ReleaseHook
from collafuse.protocol import Client
from collafuse.rounds import client_loaders, deliver, epoch_rounds, release_round
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule, cut_step
from collafuse.device import resolve_device
from collafuse.streams import STREAM_CLIENT, STREAM_RELAY, generator_for, loader_generators

from collafuse.attacks.reconstruction.denoiser import AttackerDenoiser, DenoiserConfig, load_or_train
from collafuse.attacks.reconstruction.evaluate import ViewEvaluation, evaluate_view
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.scoring import Truth
from collafuse.attacks.reconstruction.view import AttackerResources, ViewArrays

CURVE_ATTACKS: tuple[str, ...] = ("rescale", "tweedie", "ddim", "multiview", "oracle")
POOL_DESCRIPTION = "all member and non-member images of the data split (the population the clients' data is drawn from)"


@dataclass(frozen=True)
class SimulatedView:
    """A simulated server view and its own audit key: ``member`` (N,) source index and
    ``sender`` (N,) true client of every row (scoring only; the view may hide the sender)."""

    view: ViewArrays
    member: torch.Tensor
    sender: torch.Tensor


@dataclass(frozen=True)
class SimulationSpec:
    """What a simulated server view plays (DESIGN §7): ``epochs`` epochs of the protocol at cut step ``t_c``
    on ``data`` split by ``splits``, with the payload kind, batch size, seed and label sending of a run, its
    release hooks (the release-side defenses, exactly as a trained run's clients apply them; none: the
    plain protocol), its label dropout and its clients' noise multiplicity (draws a training step takes).
    :meth:`from_config` makes the twin of the run a config trains."""

    data: ImageSet
    splits: Splits
    schedule: NoiseSchedule
    t_c: int
    epochs: int
    payload_kind: str = "cut"
    batch_size: int = 64
    seed: int = 0
    send_labels: bool = False
    release_hooks: tuple[ReleaseHook, ...] = ()
    label_dropout: float = 0.0
    noise_multiplicity: int = 1

    @classmethod
    def from_config(cls, config: RunConfig, hooks: Hooks, data: ImageSet, splits: Splits,
                    epochs: int | None = None) -> "SimulationSpec":
        """The protocol ``config`` trains with ``hooks``, for ``epochs`` epochs (default: the config's). The
        simulated view is then the transcript such a run writes (bar a training hook's own loader)."""
        return cls(data, splits, NoiseSchedule.from_config(config.diffusion), config.t_c,
                   config.training.epochs if epochs is None else epochs, config.training.payload,
                   config.training.batch_size, config.seed, bool(config.conditional) and data.labels is not None,
                   tuple(hooks.release), config.training.label_dropout, hooks.noise_multiplicity("client"))


def simulate_view(spec: SimulationSpec) -> tuple[ViewArrays, torch.Tensor]:
    """The server view of ``spec``: (view with N = epochs · n_members rows in crossing order, member (N,) source
    index of each row — the simulation's own audit key, for scoring only). :func:`simulate_rounds` also
    returns each row's true sender (needed when a release hides it)."""
    sim = simulate_rounds(spec)
    return sim.view, sim.member


def _check_epochs(epochs: int) -> None:
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")


def _messages(spec: SimulationSpec):
    """Every message that reaches the server, in crossing order: (payload, member ids (B,), true
    sender (B,) int64). A generator, so a reader can stream the view (DESIGN §10); every draw comes
    from generators seeded here, so each call replays exactly the same messages.

    The round is the core's own (:mod:`collafuse.rounds`): the clients' loaders as training builds them,
    one turn per client and round, the payloads through the release hooks' relay. The clients hold no
    model but take every draw a client's training step takes (``label_dropout``: the run's label
    dropout; ``noise_multiplicity``: its clients' draws per image, DP-SGD's), so each payload is the one
    the trained client released at that point of its random stream. Not simulated: a training hook's
    loader (DP-SGD's Poisson sampling); the clients walk the shuffled loaders of the plain protocol."""
    _check_epochs(spec.epochs)
    hooks = Hooks(release=tuple(spec.release_hooks))
    n = len(spec.splits.clients)
    clients = [
        Client(k, None, None, spec.schedule, spec.t_c, spec.payload_kind, generator_for(spec.seed, STREAM_CLIENT, k),
               release_hooks=hooks.release, label_dropout=spec.label_dropout, send_labels=spec.send_labels,
               train_t_max=hooks.release_step(spec.t_c), noise_multiplicity=spec.noise_multiplicity, replay_draws=True)
        for k in range(n)
    ]
    loaders = client_loaders(spec.data, spec.splits, spec.batch_size, loader_generators(spec.seed, n))
    step = 0
    relay, round_index = generator_for(spec.seed, STREAM_RELAY), 0
    for _ in range(spec.epochs):
        for turns in epoch_rounds(loaders):
            released = release_round(clients, turns, step, labels=spec.send_labels)  # exactly what the clients send
            step = released.step
            for message in deliver(hooks.release, released, round_index, relay):  # what reaches the server
                if message is not None:
                    yield message
            round_index += 1


def _message_rows(payload, with_tensors: bool) -> dict[str, torch.Tensor]:
    """The view fields of one message's rows (``with_tensors`` False: the metadata only, no payload values)."""
    n_rows = len(payload)
    rows = {"t": payload.t.long(),
            "client": torch.full((n_rows,), payload.client_id, dtype=torch.long),  # what the server sees
            "step": torch.full((n_rows,), payload.step, dtype=torch.long),
            "wire_bytes": payload.row_wire_bytes().long()}
    if payload.label is not None:
        rows["label"] = payload.label.long()
    if with_tensors:
        rows["tensor"] = payload.values().float()
        if payload.noise is not None:
            rows["noise"] = payload.noise
    return rows


def _view_of(parts: list[dict[str, torch.Tensor]], first_seq: int, metadata_only: bool = False) -> ViewArrays:
    """Rows ``parts`` (dicts of :func:`_message_rows`) as one :class:`ViewArrays`, ``seq`` from ``first_seq``.
    ``metadata_only``: a view without payload values, whose tensor is (N, 0, 1, 1)."""
    def cat(key: str) -> torch.Tensor | None:
        return torch.cat([p[key] for p in parts]) if parts and key in parts[0] else None

    n = sum(p["t"].shape[0] for p in parts)
    tensor = torch.empty((n, 0, 1, 1)) if metadata_only else cat("tensor")
    return ViewArrays(tensor=tensor, t=cat("t"), client=cat("client"), step=cat("step"),
                      seq=torch.arange(first_seq, first_seq + n), label=cat("label"), noise=cat("noise"),
                      wire_bytes=cat("wire_bytes"))


def simulate_rounds(spec: SimulationSpec) -> SimulatedView:
    """:func:`simulate_view` with the true sender of every row (see :class:`SimulatedView`)."""
    parts, members, senders = [], [], []
    for payload, ids, sender in _messages(spec):
        parts.append(_message_rows(payload, True))
        members.append(ids)
        senders.append(sender)
    return SimulatedView(_view_of(parts, 0), torch.cat(members), torch.cat(senders).long())


def simulated_metadata(spec: SimulationSpec) -> SimulatedView:
    """:func:`simulate_rounds` without the payload values: every field but ``tensor`` and ``noise``, whose
    tensor is (N, 0, 1, 1). What a streamed evaluation needs up front (steps, senders, message order),
    in memory that grows by a few integers per row only."""
    parts, members, senders = [], [], []
    for payload, ids, sender in _messages(spec):
        parts.append(_message_rows(payload, False))
        members.append(ids)
        senders.append(sender)
    return SimulatedView(_view_of(parts, 0, metadata_only=True), torch.cat(members), torch.cat(senders).long())


def simulated_shards(spec: SimulationSpec, shard_rows: int = 4096):
    """The rows of :func:`simulate_rounds`, ``shard_rows`` at a time (the last shard may be shorter):
    (first row index, :class:`SimulatedView` of the shard). The same rows, values and ``seq`` as the
    whole simulated view, which is never held (DESIGN §10); each call replays the simulation."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    parts, members, senders, held, start = [], [], [], 0, 0

    def flush(k: int) -> SimulatedView:
        nonlocal parts, members, senders, held
        pend, mem, snd = parts, torch.cat(members), torch.cat(senders)
        # Split every field of the pending rows at k: the first k rows leave as a shard.
        whole = {key: torch.cat([p[key] for p in pend]) for key in pend[0]}
        parts = [{key: v[k:] for key, v in whole.items()}] if held > k else []
        members, senders = ([mem[k:]], [snd[k:]]) if held > k else ([], [])
        held -= k
        return SimulatedView(_view_of([{key: v[:k] for key, v in whole.items()}], start), mem[:k], snd[:k])

    for payload, ids, sender in _messages(spec):
        parts.append(_message_rows(payload, True))
        members.append(ids)
        senders.append(sender)
        held += len(payload)
        while held >= shard_rows:
            shard = flush(shard_rows)
            yield start, shard
            start += shard_rows
    if held:
        yield start, flush(held)


def truth_for(member: torch.Tensor, view: ViewArrays, data: ImageSet, splits: Splits,
              sender: torch.Tensor | None = None) -> Truth:
    """Scorer-side ground truth for simulated (or audit-key-resolved) rows.

    ``sender``: (N,) true client of each row; by default the view's own sender field, which
    must then name a client (an id-free view hides it: pass the simulation's ``sender``).
    """
    if sender is None:
        if len(view) and int(view.client.min()) < 0:
            raise ValueError("truth_for: the view hides the sender (an id-free release); pass sender=")
        sender = view.client
    return Truth(
        member=member,
        client=sender,
        source=data.images,
        source_labels=data.labels,
        client_data={k: idx for k, idx in enumerate(splits.clients)},
        pool=torch.cat([splits.members, splits.nonmembers]),
        pool_description=POOL_DESCRIPTION,
    )


@dataclass
class CurveResult:
    """Tidy rows (one per cut ratio × attack × scope × metric) and the evaluations behind them."""

    rows: list[dict]
    evaluations: dict[float, ViewEvaluation] = field(default_factory=dict)
    seconds: float = 0.0
    denoiser_cache: str | None = None


def tidy_rows(ev: ViewEvaluation, cut_ratio: float, t_c: int, epochs: int, seed: int, per_client: bool = False) -> list[dict]:
    out = []
    base = {"cut_ratio": cut_ratio, "t_c": t_c, "epochs": epochs, "seed": seed}
    for attack, sc in ev.scores.items():
        scopes = {"pooled": sc.summary_json(seed=seed)}
        if per_client:
            scopes.update({f"client_{k}": v for k, v in sc.by_client(seed).items()})
        for scope, summary in scopes.items():
            for metric, iv in summary.items():
                out.append({**base, "attack": attack, "scope": scope, "metric": metric, **iv})
        for key, value in ev.extra.get(attack, {}).items():
            out.append({**base, "attack": attack, "scope": "pooled", "metric": key, "value": value})
    lab = ev.payload_label_summary(seed=seed)
    if lab is not None:
        out.append({**base, "attack": "payload", "scope": "pooled", "metric": "label", **lab.to_json()})
    return out


def payload_curve(
    config: RunConfig,
    cut_ratios: tuple[float, ...],
    epochs: int = 1,
    attacks: tuple[str, ...] = CURVE_ATTACKS,
    denoiser_config: DenoiserConfig | None = None,
    cache_dir: Path | None = None,
    ddim_steps: int = 4,
    inversion_steps: int = 300,
    data: tuple[ImageSet, Splits] | None = None,
    denoiser: AttackerDenoiser | None = None,
    keep_evaluations: bool = True,
    progress: bool = False,
) -> CurveResult:
    """Every T1 metric for each cut ratio, from ``config``'s data, schedule and payload kind alone.

    ``config`` supplies the data source and splits, the schedule, T, the payload kind, the batch
    size and the seed (its cut ratio and models are ignored). ``data`` skips loading when given;
    ``denoiser`` skips the cache (an attacker denoiser already trained on this aux split).
    """
    for name in attacks:
        RECONSTRUCTION_ATTACKS.get(name)
    started = time.perf_counter()
    images, splits = data if data is not None else prepare_data(config)
    schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
    aux = images.subset(splits.aux)
    send_labels = config.conditional and images.labels is not None
    cache = None
    # The config's device (auto: CUDA when available); a denoiser handed in stays where it is.
    device = resolve_device(config.device) if denoiser is None else next(denoiser.parameters()).device
    if denoiser is None and RECONSTRUCTION_ATTACKS.needing("denoiser", attacks):
        if len(aux) < 2:
            raise ConfigError("tweedie/ddim need the attacker's aux split: set data.n_aux >= 2")
        dcfg = denoiser_config or DenoiserConfig(seed=config.seed)
        denoiser, path, _ = load_or_train(aux.images, schedule, dcfg, cache_dir, progress=progress, device=device)
        cache = str(path)
    pool = torch.cat([splits.members, splits.nonmembers])
    resources = AttackerResources(
        aux=aux if len(aux) else None, denoiser=denoiser, candidates=images.images[pool], epochs=epochs,
        ddim_steps=ddim_steps, inversion_steps=inversion_steps, seed=config.seed, device=device,
    )
    rows: list[dict] = []
    evaluations: dict[float, ViewEvaluation] = {}
    for c in tqdm(cut_ratios, desc="cut ratios", disable=not progress):
        t_c = cut_step(c, schedule.T)
        if t_c >= schedule.T:
            rows.append({"cut_ratio": c, "t_c": t_c, "epochs": epochs, "seed": config.seed, "attack": None,
                         "scope": "pooled", "metric": "nothing_to_attack", "value": True})
            continue
        view, member = simulate_view(SimulationSpec(images, splits, schedule, t_c, epochs, config.training.payload,
                                                    config.training.batch_size, config.seed, send_labels,
                                                    label_dropout=config.training.label_dropout))
        ev = evaluate_view(view, schedule, truth_for(member, view, images, splits), resources, attacks, images.num_classes)
        rows.extend(tidy_rows(ev, c, t_c, epochs, config.seed))
        if keep_evaluations:
            evaluations[c] = ev
    return CurveResult(rows, evaluations, time.perf_counter() - started, cache)
