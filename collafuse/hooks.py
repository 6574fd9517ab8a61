"""Hook points the core defines and later code (defenses) fills in (DESIGN.md §5).

The core never imports a defense. It calls these hooks in order, and the default
of every method is the identity, so a run without hooks is the plain protocol.

- :class:`ReleaseHook` shapes how a client turns images into a payload: change the
  images before noising (clipping), choose the noise (a per-image seed), or
  transform the finished payload (extra noise, quantisation, dropping labels); and,
  once per round, how the round's payloads reach the server (:meth:`ReleaseHook.mix_round`:
  a mixing relay, for an id-free release). :func:`relay_round` is what the core calls.
- :class:`TrainingHook` wraps a side's model, optimiser and data loader (DP-SGD)
  and reports per-step metrics (ε spent) for the training log.
- :class:`Hooks` is what a run is trained with; :func:`hooks_for` builds it for a config. The
  core cannot build defenses (it never imports them): ``collafuse.defenses`` registers its one
  builder in :data:`HOOK_BUILDERS` when it is imported, and every caller (the API, the command
  line, the audit, the attacker's reference trainings) asks :func:`hooks_for`.
- :func:`model_name`: the one spelling of a model's name ("server", "client_<k>") in checkpoints,
  the training log and hook records; :func:`canonical_model_name` reads older runs' "client<k>".
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from collafuse.errors import ConfigError
from collafuse.payload import Payload
from collafuse.registry import Registry

Role = Literal["server", "client"]


def model_name(role: Role, owner: int | None = None) -> str:
    """The name of one model: ``"server"``, or ``"client_<k>"`` for client ``owner`` = k."""
    if role == "server":
        return "server"
    if role != "client" or owner is None:
        raise ValueError(f"a model is the server or client_<k>, got role {role!r}, owner {owner!r}")
    return f"client_{int(owner)}"


_OLD_CLIENT_NAME = re.compile(r"client(\d+)")


def canonical_model_name(name: str) -> str:
    """A model name as :func:`model_name` spells it; runs written before the rename said ``"client0"``."""
    old = _OLD_CLIENT_NAME.fullmatch(name)
    return f"client_{old.group(1)}" if old else name


@dataclass(frozen=True)
class Delivery:
    """One message the server receives once a round has been relayed.

    ``source``: (B,) int64, for each row of ``payload``, its index into the round's rows
    (the round's payloads concatenated in the order the clients released them). The core
    uses it to write the audit key (true sender, member index); the server never sees it.
    """

    payload: Payload
    source: torch.Tensor

    def __post_init__(self) -> None:
        if self.source.dtype != torch.int64 or self.source.shape != (len(self.payload),):
            raise ValueError(f"Delivery.source must be int64 of shape ({len(self.payload)},), "
                             f"got {self.source.dtype} {tuple(self.source.shape)}")


class ReleaseHook:
    """Client-side release transformation. Subclasses override what they need."""

    name = "identity"

    def describe(self) -> dict[str, Any]:
        """What this hook is and did (name, parameters, threats covered, guarantees); stored in run.json."""
        return {"name": self.name}

    def prepare(self, x0: torch.Tensor, member_ids: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) before noising; ``member_ids`` (B,) identify them on the client only."""
        return x0

    def draw_noise(
        self, x0: torch.Tensor, member_ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor | None:
        """The release noise (B,C,H,W), or None to let the client draw fresh N(0, I)."""
        return None

    def transform(self, payload: Payload, generator: torch.Generator) -> Payload:
        """The finished payload, just before it crosses to the server."""
        return payload

    def mix_round(
        self, payloads: Sequence[Payload], round_index: int, generator: torch.Generator
    ) -> list[Delivery] | None:
        """How one round's payloads (one per client that had a batch, in release order) reach the server.

        None (the default): as they are, one message per payload, in release order. A relay
        returns the messages it delivers instead; together they must carry every row of the
        round exactly once (:func:`relay_round` checks), so the server still trains on every
        payload once per round. ``generator`` is the run's own relay stream.
        """
        return None

    def release_step(self, t: int) -> int:
        """The step a payload released at ``t`` sits at once :meth:`transform` is done.

        Identity unless the hook adds noise (payload noise moves p to a later t'). The
        core then hands off the sampling chain at that step: the server owns (t', T]
        and the client 1..t'.
        """
        return t


class TrainingHook:
    """Wraps one side's training objects; identity by default."""

    name = "identity"

    def describe(self) -> dict[str, Any]:
        """What this hook is and did (name, parameters, threats covered, ε spent); stored in run.json."""
        return {"name": self.name}

    def wrap(
        self,
        role: Role,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        loader: torch.utils.data.DataLoader | None,
    ) -> tuple[nn.Module | None, torch.optim.Optimizer | None, torch.utils.data.DataLoader | None]:
        """Return the (model, optimizer, loader) this side trains with. The server has no loader.

        On the client side ``model`` and ``optimizer`` are None when the client owns no
        step (t_c = 0); its loader still picks the batches the server trains on.
        """
        return model, optimizer, loader

    def noise_multiplicity(self, role: Role) -> int:
        """Noise draws (t, ε) per image in one step, averaged per image before any per-sample clipping."""
        return 1

    def metrics(self, role: Role, owner: int | None) -> dict[str, Any]:
        """Numbers to add to the training log after each epoch (e.g. ε spent)."""
        return {}


def relay_round(
    hooks: Sequence[ReleaseHook], payloads: Sequence[Payload], round_index: int, generator: torch.Generator
) -> list[Delivery] | None:
    """Pass one round's payloads through every hook's :meth:`ReleaseHook.mix_round`, in hook order.

    Returns None when no hook mixed (the plain protocol: each payload is its own message, in
    release order), else the messages to deliver, each row's ``source`` composed through the
    hooks and indexing the round's rows in release order. Refuses a relay that drops,
    duplicates or invents rows.
    """
    n = sum(len(p) for p in payloads)
    current: list[Delivery] | None = None
    for hook in hooks:
        inputs = [d.payload for d in current] if current is not None else list(payloads)
        mixed = hook.mix_round(inputs, round_index, generator)
        if mixed is None:
            continue
        if current is not None:  # compose: a row's source in the previous hook's output → in the round
            previous = torch.cat([d.source for d in current])
            mixed = [Delivery(d.payload, previous[d.source]) for d in mixed]
        current = list(mixed)
        if not current and n == 0:
            continue
        rows = torch.cat([d.source for d in current]) if current else torch.empty(0, dtype=torch.int64)
        if rows.numel() != n or not torch.equal(torch.sort(rows).values, torch.arange(n)):
            raise ValueError(f"release hook {hook.name!r}: a relayed round must deliver each of its {n} rows "
                             f"exactly once, got {rows.numel()} rows")
    return current


def deliver_round(
    hooks: Sequence[ReleaseHook],
    released: Sequence[tuple[int, Payload, torch.Tensor]],
    round_index: int,
    generator: torch.Generator | None,
) -> tuple[list[tuple[Payload, torch.Tensor, int | torch.Tensor]], bool]:
    """What the server receives for one round, with the audit key's truth for each message.

    ``released``: (client, payload, member ids) per payload of the round, in release order.
    Returns ((payload, member ids (B,), true sender: the client, or (B,) int64 per row when
    a relay mixed the round) per message, in delivery order; whether a relay mixed the round).
    Unmixed, the messages are ``released`` itself, unchanged. ``generator``: the run's relay stream
    (None only where no hook can mix, e.g. no hooks at all).
    """
    deliveries = relay_round(hooks, [p for _, p, _ in released], round_index, generator)
    if deliveries is None:
        return [(p, ids, k) for k, p, ids in released], False
    ids = torch.cat([ids.to(torch.int64).cpu() for _, _, ids in released])
    senders = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p, _ in released])
    return [(d.payload, ids[d.source], senders[d.source]) for d in deliveries], True


@dataclass(frozen=True)
class Hooks:
    """What the core calls out to; empty = the plain protocol.

    ``built_from`` is the :meth:`fingerprint` of the ``defenses:`` list the hooks were built
    from (the registered builder, :func:`hooks_for`, sets it; None = hand-made hooks).
    ``create_run`` compares it with the config's ``defenses:``, so a run folder never claims a
    defense that did not run.
    """

    release: tuple[ReleaseHook, ...] = ()
    training: tuple[TrainingHook, ...] = ()
    built_from: str | None = None

    @staticmethod
    def fingerprint(defenses) -> str:
        """sha256 of the canonical JSON of a ``defenses:`` list (a sequence of mappings)."""
        canonical = json.dumps([dict(spec) for spec in defenses], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> list[dict]:
        """Every hook's ``describe()``, release hooks first: what run.json records as ``hooks``."""
        return [h.describe() for h in self.release] + [h.describe() for h in self.training]

    def release_step(self, t_c: int) -> int:
        """Where payloads released at ``t_c`` sit once every release hook is done (:meth:`ReleaseHook.release_step`)."""
        for hook in self.release:
            t_c = hook.release_step(t_c)
        return t_c

    def noise_multiplicity(self, role: Role) -> int:
        """Noise draws per image per step on one side: the largest any training hook asks for (1 without one)."""
        return max([h.noise_multiplicity(role) for h in self.training] + [1])


HookBuilder = Callable[[Sequence[Mapping[str, Any]], Any], Hooks]
# The one builder of hooks from a config's ``defenses:`` list, under the name "defenses":
# ``collafuse.defenses`` registers its ``build_hooks`` here when it is imported.
HOOK_BUILDERS: Registry[HookBuilder] = Registry("hook builder")
BUILDER_NAME = "defenses"


def register_hook_builder(builder: HookBuilder) -> None:
    """Make ``builder(defenses, config) → Hooks`` the one hook builder (idempotent for the same builder)."""
    if BUILDER_NAME in HOOK_BUILDERS:
        if HOOK_BUILDERS.get(BUILDER_NAME) is builder:
            return
        raise ValueError("a hook builder is already registered; there is one (collafuse.defenses.build_hooks)")
    HOOK_BUILDERS.register(BUILDER_NAME, builder)


def hooks_for(config) -> Hooks:
    """The hooks a run config is trained with: the plain protocol without ``defenses:``, else the
    registered builder's (``collafuse.defenses``, validated there). The one way hooks are built."""
    if not config.defenses:
        return Hooks()
    if BUILDER_NAME not in HOOK_BUILDERS:
        names = ", ".join(str(d.get("name")) if isinstance(d, Mapping) else repr(d) for d in config.defenses)
        raise ConfigError(f"the config lists defenses ({names}) but no hook builder is registered: "
                          "import collafuse.defenses first (collafuse.api and the command line do)")
    return HOOK_BUILDERS.get(BUILDER_NAME)(config.defenses, config)
