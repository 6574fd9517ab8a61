"""What a membership attack is pointed at, and the candidates it must sort (DESIGN.md §3, §4.2).

Targets (one registry; each names its threat model):

- ``payload`` (T1): the server view (transcript). None when c = 1: nothing crosses.
- ``server``  (T2): the server model, queried at t ∈ (t_c, T]. None when c = 1.
- ``client``  (T3): each client's model, queried at t ≤ t_c; one target per client. None when c = 0.
- ``samples`` (T4): collaborative samples finished by each client; one target per client.
- ``coclient`` (T5): client j's finished hand-offs against every OTHER client's members; one target per
  attacker j (``coclient_<j>``), in :mod:`.coclient_run`.

Candidates: members = images the attacked party trained on (all members for T1/T2, the
client's own for T3/T4), non-members = the held-out split; the larger side is subsampled
(seeded) so both are equally many (§4.2). Labels go with the candidates when the models
are conditional: the attacker is assumed to know each candidate's class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.metrics import ScoreError
from collafuse.attacks.membership.pia import paper_step
from collafuse.attacks.membership.references import server_target_reference_producers, target_reference_producers
from collafuse.attacks.membership.peers import target_peer_producers
from collafuse.attacks.membership.signals import (
    ModelView, SignalCache, model_signal_cache, payload_signal_cache, sample_signal_cache,
)
from collafuse.registry import Registry
from collafuse.device import resolve_device
from collafuse.streams import STREAM_MEMBERSHIP, generator_for, stream_seed



class CandidateError(ScoreError):
    """A candidate set that cannot be attacked: empty, mismatched shapes, non-finite pixels."""


@dataclass(frozen=True)
class Candidates:
    """members (Nm, C, H, W) and nonmembers (Nn, C, H, W) in [-1, 1], labels (N·,) or None. Validated."""

    members: torch.Tensor
    nonmembers: torch.Tensor
    member_labels: torch.Tensor | None = None
    nonmember_labels: torch.Tensor | None = None
    # Each candidate's index in the run's data (members first), for the per-record evidence (scores.parquet);
    # None where the candidates are not rows of the run's data.
    member_index: torch.Tensor | None = None
    nonmember_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, x in (("members", self.members), ("non-members", self.nonmembers)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise CandidateError(f"{name} must be a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
            if x.shape[0] == 0:
                raise CandidateError(f"the {name} candidate set is empty")
            if not torch.isfinite(x).all():
                raise CandidateError(f"{name} contain NaN or infinite pixels")
        if self.members.shape[1:] != self.nonmembers.shape[1:]:
            raise CandidateError(
                f"member and non-member images differ in shape: {tuple(self.members.shape[1:])} vs {tuple(self.nonmembers.shape[1:])}"
            )
        if (self.member_labels is None) != (self.nonmember_labels is None):
            raise CandidateError("labels must be given for both members and non-members, or for neither")
        if self.member_labels is not None:
            for name, x, y in (("members", self.members, self.member_labels), ("non-members", self.nonmembers, self.nonmember_labels)):
                if y.shape != (x.shape[0],):
                    raise CandidateError(f"{name}: labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")

        for name, x, idx in (("members", self.members, self.member_index),
                             ("non-members", self.nonmembers, self.nonmember_index)):
            if idx is not None and tuple(idx.shape) != (x.shape[0],):
                raise CandidateError(f"{name}: data indices must have shape ({x.shape[0]},), got {tuple(idx.shape)}")

    @property
    def n_members(self) -> int:
        return int(self.members.shape[0])

    @property
    def index(self) -> torch.Tensor | None:
        """(Nm + Nn,) data index of every candidate, members first; None where unknown."""
        if self.member_index is None or self.nonmember_index is None:
            return None
        return torch.cat([self.member_index, self.nonmember_index])

    @property
    def images(self) -> torch.Tensor:
        """(Nm + Nn, C, H, W), members first."""
        return torch.cat([self.members, self.nonmembers])

    @property
    def labels(self) -> torch.Tensor | None:
        return None if self.member_labels is None else torch.cat([self.member_labels, self.nonmember_labels])

    def split(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores of all candidates (N,) or (N, S) → (member part, non-member part)."""
        return scores[: self.n_members], scores[self.n_members :]


def balanced(members: torch.Tensor, nonmembers: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample the larger of two index sets (seeded) so both are equally many; order kept."""
    n = min(len(members), len(nonmembers))

    def take(idx: torch.Tensor) -> torch.Tensor:
        if len(idx) == n:
            return idx
        return idx[torch.randperm(len(idx), generator=generator)[:n].sort().values]

    return take(members), take(nonmembers)


@dataclass
class TargetInstance:
    """One concrete target: ``key`` (e.g. ``client_2``), its threat, and either a reason it does
    not exist or the candidates and a factory for its signal cache."""

    key: str
    kind: str
    threat: str
    available: bool
    reason: str | None = None
    candidates: Candidates | None = None
    make_cache: Callable[[], SignalCache] | None = None
    info: dict = field(default_factory=dict)
    # The one-run audit (run config ``canaries``): IN canaries as members, OUT ones as non-members,
    # and a factory for their signals from the same model (None: this target saw no canaries).
    canaries: Candidates | None = None
    make_canary_cache: Callable[[], SignalCache] | None = None
    client: int | None = None  # the client whose model or samples this target is (None: server, payloads)


def canary_candidates(ctx: "AuditContext") -> Candidates | None:
    """The run's canaries split by inclusion (None without canaries, or when one side is empty)."""
    data, splits = ctx.data()
    if not len(splits.canaries) or splits.canaries_in.all() or not splits.canaries_in.any():
        return None
    idx_in, idx_out = splits.canaries[splits.canaries_in], splits.canaries[~splits.canaries_in]
    labels = data.labels if (ctx.run.num_classes > 0 and data.labels is not None) else None
    return Candidates(data.images[idx_in], data.images[idx_out],
                      None if labels is None else labels[idx_in], None if labels is None else labels[idx_out],
                      idx_in, idx_out)


@dataclass(frozen=True)
class TargetKind:
    name: str
    threat: str
    description: str
    instances: Callable[["AuditContext"], list[TargetInstance]]


@dataclass
class AuditContext:
    """What targets need from a loaded run; ``seed`` drives the attacker's randomness."""

    run: object  # collafuse.runs.Run
    settings: SignalSettings
    seed: int
    n_samples: int | None = None  # T4: samples per client (None = as many as member candidates)
    # T4: samples already drawn with attacker_samples(), client → (N, C, H, W); others are generated here.
    samples: dict[int, torch.Tensor] | None = None
    _data: tuple | None = None

    def data(self):
        if self._data is None:
            self._data = self.run.load_data()
        return self._data

    def candidate_index(self, member_idx: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(member, non-member) indices into the data of :meth:`candidates` (balanced, seeded)."""
        _, splits = self.data()
        if len(splits.nonmembers) == 0:
            raise CandidateError("the non-members candidate set is empty: the run holds out no images (data.n_nonmembers = 0)")
        if len(member_idx) == 0:
            raise CandidateError("the members candidate set is empty")
        return balanced(member_idx, splits.nonmembers, generator_for(self.seed, STREAM_MEMBERSHIP, stream))

    def candidates(self, member_idx: torch.Tensor, stream: int) -> Candidates:
        data, _ = self.data()
        m, n = self.candidate_index(member_idx, stream)
        labels = data.labels if (self.run.num_classes > 0 and data.labels is not None) else None
        return Candidates(
            data.images[m], data.images[n],
            None if labels is None else labels[m], None if labels is None else labels[n], m, n,
        )

    @property
    def device(self) -> torch.device:
        """Where the run's models were loaded (``Run.load(..., device)``), not where they were trained."""
        return getattr(self.run, "device", None) or resolve_device(None)


def _server(ctx: AuditContext) -> list[TargetInstance]:
    run = ctx.run
    if run.server_model is None:
        reason = ("c = 1 (local-only): there is no server model" if run.t_hand >= run.schedule.T
                  else "the server model was not given (an imported deployment without it)")
        return [TargetInstance("server", "server", "T2", False, reason)]
    _, splits = ctx.data()
    cand = ctx.candidates(splits.members, 0)
    member_index, _ = ctx.candidate_index(splits.members, 0)
    view = ModelView.server(run.server_model, run.schedule, run.t_hand, run.num_classes > 0, ctx.device)
    canaries = canary_candidates(ctx)  # they reach the server as the canary client's payloads
    return [
        TargetInstance(
            "server", "server", "T2", True, candidates=cand,
            # lira / rmia: reference server models on simulated payloads, trained only when a signal is read
            make_cache=lambda: _model_cache(view, cand, ctx, 0).with_producers(
                server_target_reference_producers(ctx, view, cand, member_index)),
            info={"query_steps": [view.t_min, view.t_max], "schedule": "relative ᾱ_t/ᾱ_{t_c}", "view": view,
                  "pia_headline_step": paper_step(view.origin, view.t_min, view.t_max, view.schedule.T)},
            canaries=canaries, make_canary_cache=None if canaries is None else lambda: _model_cache(view, canaries, ctx, 50),
        )
    ]


def _model_cache(view: ModelView, cand: Candidates, ctx: AuditContext, stream: int) -> SignalCache:
    return model_signal_cache(view, cand.images, cand.labels, ctx.settings, generator_for(ctx.seed, STREAM_MEMBERSHIP, 100 + stream))


def _clients(ctx: AuditContext) -> list[TargetInstance]:
    run = ctx.run
    if run.t_hand == 0:
        return [TargetInstance("client", "client", "T3", False, "c = 0 (central): clients own no step and have no model")]
    _, splits = ctx.data()
    canaries = canary_candidates(ctx)
    out = []
    for k, model in enumerate(run.client_models):
        if model is None:
            out.append(TargetInstance(f"client_{k}", "client", "T3", False,
                                      f"the client_{k} model was not given (an imported deployment without it)",
                                      client=k))
            continue
        cand = ctx.candidates(splits.clients[k], 1 + k)
        view = ModelView.client(model, run.schedule, run.t_hand, run.num_classes > 0, ctx.device)
        out.append(
            TargetInstance(
                f"client_{k}", "client", "T3", True, candidates=cand,
                # lira / rmia: reference client models, trained only when one of their signals is read
                make_cache=lambda view=view, cand=cand, k=k: _model_cache(view, cand, ctx, 1 + k).with_producers(
                    target_reference_producers(ctx, k, view, cand)).with_producers(
                    target_peer_producers(ctx, k, view, cand)),  # lira-peers / rmia-peers: the other client models
                info={"query_steps": [view.t_min, view.t_max], "schedule": "absolute ᾱ_t", "view": view,
                      "pia_headline_step": paper_step(view.origin, view.t_min, view.t_max, view.schedule.T)},
                canaries=canaries if k == splits.canary_client else None,
                make_canary_cache=None if (canaries is None or k != splits.canary_client)
                else lambda view=view, k=k: _model_cache(view, canaries, ctx, 51 + k),
                client=k,
            )
        )
    return out


def attacker_samples(run, client: int, n: int, seed: int) -> torch.Tensor:
    """The T4 attacker's ``n`` samples finished by ``client``, drawn with the attacker's own sampling
    seed (apart from the run's; generate() adds the client's stream)."""
    from collafuse.runs import generate

    return generate(run, client, n, stream_seed(seed, STREAM_MEMBERSHIP, 200))


def _samples(ctx: AuditContext) -> list[TargetInstance]:
    run = ctx.run
    _, splits = ctx.data()
    out = []
    for k in range(len(run.client_models)):
        missing = [name for name, model, needed in (("server", run.server_model, run.t_hand < run.schedule.T),
                                                    (f"client_{k}", run.client_models[k], run.t_hand > 0))
                   if needed and model is None]
        if missing and (ctx.samples or {}).get(k) is None:
            out.append(TargetInstance(f"samples_{k}", "samples", "T4", False,
                                      f"sampling needs the {missing[0]} model, which was not given", client=k))
            continue
        cand = ctx.candidates(splits.clients[k], 1 + k)
        n = ctx.n_samples or cand.n_members

        def make(k=k, cand=cand, n=n) -> SignalCache:
            given = (ctx.samples or {}).get(k)
            if given is not None and len(given) < n:
                raise CandidateError(f"samples_{k}: {len(given)} samples given, {n} needed")
            samples = given[:n] if given is not None else attacker_samples(run, k, n, ctx.seed)
            return sample_signal_cache(cand.images, samples)

        out.append(
            TargetInstance(
                f"samples_{k}", "samples", "T4", True, candidates=cand, make_cache=make,
                info={"generated": n, "sampler": run.config.sampling.sampler, "sampler_steps": run.config.sampling.steps},
                client=k,
            )
        )
    return out


def _payload(ctx: AuditContext) -> list[TargetInstance]:
    from collafuse.transcript import ServerView

    run = ctx.run
    if run.t_hand >= run.schedule.T:
        return [
            TargetInstance(
                "payload", "payload", "T1", False,
                "c = 1 (local-only): nothing crosses to a server, so there is no T1 target",
            )
        ]
    view = ServerView.open(run.path)
    if len(view) == 0:
        return [TargetInstance("payload", "payload", "T1", False, "the transcript holds no payloads")]
    data, splits = ctx.data()
    cand = ctx.candidates(splits.members, 0)
    refs = data.images[splits.aux]

    def make(images: torch.Tensor) -> SignalCache:
        # E views per member (one per epoch) is public protocol knowledge: payload-lr fuses them.
        return payload_signal_cache(images, view.load(), run.schedule, refs, ctx.settings.n_steps,
                                    views_per_image=run.config.training.epochs)

    # One-run audit of the payload channel: the IN canaries were sent as the canary client's payloads, so
    # a payload attack scores every canary against the same transcript (beside the formal payload ε).
    canaries = canary_candidates(ctx)
    return [
        TargetInstance(
            "payload", "payload", "T1", True, candidates=cand, make_cache=lambda: make(cand.images),
            info={"payload_kind": view.payload_kind, "payloads": len(view), "references": int(len(splits.aux)),
                  "views_per_image": int(run.config.training.epochs)},
            canaries=canaries, make_canary_cache=None if canaries is None else lambda: make(canaries.images),
        )
    ]


TARGETS: Registry[TargetKind] = Registry("membership target")
TARGETS.register("server", TargetKind("server", "T2", "the server model at t in (t_c, T]", _server))
TARGETS.register("client", TargetKind("client", "T3", "each client's model at t <= t_c", _clients))
TARGETS.register("samples", TargetKind("samples", "T4", "generated samples only", _samples))
TARGETS.register("payload", TargetKind("payload", "T1", "the transcript of payloads", _payload))


def _coclient(ctx: AuditContext) -> list[TargetInstance]:
    # T5 lives in its own module, which imports this one (AuditContext, TargetInstance): imported when used.
    from collafuse.attacks.membership.coclient_run import coclient_targets

    return coclient_targets(ctx)


TARGETS.register("coclient", TargetKind("coclient", "T5", "each client's view of the other clients' images through "
                                        "the server's hand-offs", _coclient))
