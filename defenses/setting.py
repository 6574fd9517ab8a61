"""A whole defense setting as one typed value (DESIGN.md §5–§7): what it changes, guarantees and covers.

Readers (the audit, the run's privacy report) take these values instead of re-deriving a
defense's behaviour from raw config keys:

- :class:`DefenseEffects`: what the setting changes in the protocol, from the config alone
  and cheap: the release step t' (t_c folded through every spec's ``release_step``, as the
  core folds its release hooks), the bytes of one payload row (counted by
  :meth:`collafuse.payload.Payload.row_wire_bytes` on a one-row payload of the wire dtypes the
  specs' ``bytes_per_value`` give), the labels sent (``sends_labels``) and the noise
  multiplicity per role (``noise_multiplicity``, what the core asks the hook);
- :class:`HookRecord`: what one defense does (from its spec) or did (from its run.json
  record): name, parameters, threats covered, the formal ε its own accountant reports;
- :class:`SettingSummary`: the effects, the payload channel's :class:`PayloadGuarantee`,
  the models' formal ε (clients, server), the coverage map and the hook records.

:func:`summarize` builds it from a config (untrained cells); :func:`summary_from_run`
from the hook records a trained run wrote into run.json, ∞ read back by
:func:`~.accounting.from_json_number` (the one inverse of ``as_json_number``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import torch

from collafuse.hooks import ReleaseHook, canonical_model_name
from collafuse.payload import Payload
from collafuse.schedule import NoiseSchedule
from collafuse.tradeoff import Ceiling, tighter

from .accounting import INF, as_json_number, from_json_number
from .coverage import coverage_map, spec_label, uncovered
from .guarantees import PayloadGuarantee, PayloadTerms, payload_guarantee

ROLES: tuple[str, ...] = ("server", "client")
REPORT_NAME = "privacy-report"  # the run.json record that holds the payload channel's guarantee
# The dtype one payload value crosses in, by its wire bytes (float32; minimize fp16; int8 / unpacked k-bit codes).
_WIRE_DTYPES = {4: torch.float32, 2: torch.float16, 1: torch.uint8}
FLOAT32_BYTES = 4  # a payload value's wire bytes unless a spec quantises it
# Keys of a hook's run.json record that are not its parameters.
_RECORD_KEYS = ("name", "threats", "epsilon")


@dataclass(frozen=True)
class DefenseEffects:
    """What a defense setting changes in the protocol (from the config alone; no training)."""

    release_step: int                     # t': where payloads sit and sampling hands off (t_c unless payload noise)
    bytes_per_value: int                  # wire bytes of one payload value: 4, 2 (fp16), 1 (int8, k-bit)
    labels_sent: bool                     # labels cross in the clear (conditional, no ``no-labels``)
    payload_row_bytes: int                # one payload row on the wire, as Payload.row_wire_bytes counts it
    noise_multiplicity: Mapping[str, int]  # role ("server", "client") → noise draws per image per step

    def to_json(self) -> dict[str, Any]:
        return {
            "release_step": self.release_step, "bytes_per_value": self.bytes_per_value,
            "labels_sent": self.labels_sent, "payload_row_bytes": self.payload_row_bytes,
            "noise_multiplicity": dict(self.noise_multiplicity),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DefenseEffects":
        return cls(int(obj["release_step"]), int(obj["bytes_per_value"]), bool(obj["labels_sent"]),
                   int(obj["payload_row_bytes"]), {k: int(v) for k, v in obj["noise_multiplicity"].items()})


@dataclass(frozen=True)
class HookRecord:
    """What one defense does or did: its label, parameters, the threats it covers, its own formal ε.

    ``epsilon``: model ("server", "client_0", …) → ε that this defense's own accountant
    reports (DP-SGD); empty for release-side defenses, whose effect is in the setting's
    payload guarantee. Runs written before the rename spelled clients "client0": read as "client_0". ``parameters``: the spec's fields for a config, the rest of the
    hook's record for a trained run (its own words: ``C``, ``sigma_effective``, ``history`` …).
    """

    name: str
    parameters: Mapping[str, Any]
    threats: tuple[str, ...]
    epsilon: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        """The shape of a hook's run.json record: name, threats, its parameters, epsilon ("inf" for ∞)."""
        out: dict[str, Any] = {"name": self.name, "threats": list(self.threats), **self.parameters}
        if self.epsilon:
            out["epsilon"] = {k: as_json_number(v) for k, v in self.epsilon.items()}
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "HookRecord":
        """A hook's run.json record (``describe()``), or :meth:`to_json`'s output."""
        eps = record.get("epsilon") or {}
        if not isinstance(eps, Mapping):
            raise ValueError(f"hook {record.get('name')!r}: 'epsilon' must map model → ε, got {eps!r}")
        return cls(
            name=str(record["name"]),
            parameters={k: v for k, v in record.items() if k not in _RECORD_KEYS},
            threats=tuple(record.get("threats", ())),
            epsilon={canonical_model_name(str(k)): from_json_number(v) for k, v in eps.items()},
        )

    @classmethod
    def of_spec(cls, spec: Any, config, epsilon: Mapping[str, float] | None = None) -> "HookRecord":
        params = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "name"}
        return cls(spec.label, params, tuple(spec.threats(config.t_c, config.diffusion.T)), dict(epsilon or {}))


@dataclass(frozen=True)
class SettingSummary:
    """A whole defense setting for one config: effects, formal guarantees, coverage, per-hook records."""

    effects: DefenseEffects
    payload_guarantee: PayloadGuarantee
    model_epsilon: tuple[float, float]      # (clients, server) formal ε of the models, ∞ where no bound exists
    coverage: Mapping[str, tuple[str, ...]]  # threat → labels of the defenses that address it
    hooks: tuple[HookRecord, ...]

    @property
    def release_step(self) -> int:
        return self.effects.release_step

    @property
    def payload_row_bytes(self) -> int:
        return self.effects.payload_row_bytes

    @property
    def noise_multiplicity(self) -> Mapping[str, int]:
        return self.effects.noise_multiplicity

    @property
    def uncovered(self) -> list[str]:
        """Threats no defense of the setting addresses, in order T1..T5."""
        return [threat for threat, labels in self.coverage.items() if not labels]

    def epsilon_by_threat(self) -> dict[str, float]:
        """The formal ε of each model threat (DESIGN §4.3, §5): T1 the payload channel's; T2 the server model's
        (post-processing of the payloads, or DP-SGD's where tighter); T3 the client models'."""
        clients, server = self.model_epsilon
        return {"T1": float(self.payload_guarantee.epsilon), "T2": float(server), "T3": float(clients)}

    def ceilings(self) -> dict[str, Ceiling]:
        """The trade-off curve no membership attack can beat, per threat (DESIGN §4.2 "The ceiling"), at the
        setting's δ (DP-SGD's δ is folded into the payload guarantee's):

        - T1: the payload channel, μ-GDP where the releases of an image compose as Gaussians (μ = μ of one
          release × √releases: exact) and its (ε, δ) in every case;
        - T2: the server model is post-processing of the payloads, so the payload channel's curve, tightened by
          DP-SGD's (ε, δ) on the server where that is smaller;
        - T3: the client models' DP-SGD (ε, δ) (the accountant's; no GDP form is claimed);
        - T4: samples are post-processing of both models, whose guarantees compose: ε_server + ε_clients at 2δ;
        - T5: a co-client's hand-offs are post-processing of the server model, and its own model never saw the other
          clients' images: T2's curve.
        A threat with no finite guarantee gets a ceiling of ∞ (the curve TPR = 1)."""
        clients, server = self.model_epsilon
        g = self.payload_guarantee
        delta = float(g.delta)
        payload = Ceiling(float(g.epsilon), delta, None if g.mu is None else float(g.mu),
                          f"payload channel: {g.releases} release(s)" + (f" at t = {g.t_release}" if g.t_release else ""))
        server_dp = Ceiling(float(server), delta, None, "server model: post-processing of the payloads / DP-SGD")
        return {
            "T1": payload,
            "T2": tighter(payload, server_dp),
            "T3": Ceiling(float(clients), delta, None, "client models: DP-SGD accountant"),
            "T4": Ceiling(float(server) + float(clients), 2 * delta, None,
                          "samples: server and client models composed"),
            "T5": tighter(payload, server_dp),
        }

    def to_json(self) -> dict[str, Any]:
        clients, server = self.model_epsilon
        return {
            "effects": self.effects.to_json(),
            "payload_guarantee": self.payload_guarantee.to_json(),
            "model_epsilon": {"clients": as_json_number(clients), "server": as_json_number(server)},
            "coverage": {k: list(v) for k, v in self.coverage.items()},
            "hooks": [h.to_json() for h in self.hooks],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "SettingSummary":
        eps = obj["model_epsilon"]
        return cls(
            DefenseEffects.from_json(obj["effects"]),
            PayloadGuarantee.from_json(obj["payload_guarantee"]),
            (from_json_number(eps["clients"]), from_json_number(eps["server"])),
            {k: tuple(v) for k, v in obj["coverage"].items()},
            tuple(HookRecord.from_json(h) for h in obj["hooks"]),
        )


# ---------------------------------------------------------------- from a config

def _schedule(config) -> NoiseSchedule:
    return NoiseSchedule.from_config(config.diffusion)


def _release_step(parsed: Sequence[Any], t_c: int, schedule: NoiseSchedule) -> int:
    """t_c folded through every spec's ``release_step`` (the core's rule; only payload noise moves it)."""
    if not 0 < t_c < schedule.T:
        return t_c  # c = 0 sends the images, c = 1 sends nothing: no hand-off to move
    t = t_c
    for spec in parsed:
        t = spec.release_step(t, schedule)
    return t


def _row_wire_bytes(config, bytes_per_value: int, labels_sent: bool) -> int:
    """Bytes of one payload row: a one-row :class:`Payload` in the wire dtypes, measured by the core itself."""
    shape = (1, config.data.channels, config.data.image_size, config.data.image_size)
    dtype = _WIRE_DTYPES[bytes_per_value]
    kind = config.training.payload
    row = Payload(
        client_id=0, step=0, kind=kind, t=torch.zeros(1, dtype=torch.long), tensor=torch.zeros(shape, dtype=dtype),
        label=torch.zeros(1, dtype=torch.long) if labels_sent else None,
        noise=torch.zeros(shape) if kind == "naive" else None,  # only the naive kind sends its (float32) noise
        scale=None if dtype.is_floating_point else 1.0,
    )
    return int(row.row_wire_bytes()[0])


def _labels_sent(parsed: Sequence[Any], config) -> bool:
    """Labels cross in the clear: a conditional run, unless a spec keeps them on the client."""
    sent = bool(config.conditional)
    for spec in parsed:
        sent = spec.sends_labels(sent)
    return sent


def effects_of(parsed: Sequence[Any], config) -> DefenseEffects:
    """:class:`DefenseEffects` of validated specs for a run config."""
    # parse_specs allows one quantiser: the first spec that sets the wire bytes sets them
    bytes_per_value = next((b for s in parsed if (b := s.bytes_per_value()) is not None), FLOAT32_BYTES)
    labels_sent = _labels_sent(parsed, config)
    multiplicity = {role: max([s.noise_multiplicity(role) for s in parsed] + [1]) for role in ROLES}
    return DefenseEffects(
        release_step=_release_step(parsed, config.t_c, _schedule(config)),
        bytes_per_value=bytes_per_value,
        labels_sent=labels_sent,
        payload_row_bytes=_row_wire_bytes(config, bytes_per_value, labels_sent),
        noise_multiplicity=multiplicity,
    )


def guarantee_of(
    parsed: Sequence[Any], config, poisson_rounds: Sequence[tuple[int, float]] | None = None
) -> PayloadGuarantee:
    """The payload channel's formal ε per client image: every spec folds its share into the
    :class:`~.guarantees.PayloadTerms`. ``poisson_rounds``: (rounds, q) per client as the run's DP-SGD
    loaders made them; None takes the IID plan when DP-SGD is configured."""
    rounds = tuple(poisson_rounds) if poisson_rounds is not None else None
    terms = PayloadTerms(poisson_rounds=rounds, labels_sent=bool(config.conditional)).fold(parsed, config)
    d = config.data.channels * config.data.image_size**2
    return payload_guarantee(_schedule(config), config.t_c, config.training.payload, d, config.training.epochs,
                             **terms.keywords())


def model_epsilon(hooks: Iterable[HookRecord], payload_epsilon: float) -> tuple[float, float]:
    """(clients, server) formal ε of the models from the hooks' own accountants.

    Clients: the worst client model's ε, ∞ without one (they train on raw images). The
    server model is trained on payloads only, so it is never worse than the payload
    channel (post-processing), and DP-SGD on the server may bound it further.
    """
    client_eps, server = [], payload_epsilon
    for hook in hooks:
        client_eps += [v for k, v in hook.epsilon.items() if k.startswith("client")]
        if "server" in hook.epsilon:
            server = min(server, hook.epsilon["server"])
    return (max(client_eps) if client_eps else INF), server


def _assemble(parsed, config, effects, guarantee, hooks) -> SettingSummary:
    cov = coverage_map(parsed, config.t_c, config.diffusion.T)
    return SettingSummary(effects, guarantee, model_epsilon(hooks, guarantee.epsilon),
                          {k: tuple(v) for k, v in cov.items()}, tuple(hooks))


def summarize(parsed: Sequence[Any], config) -> SettingSummary:
    """The setting as configured (no training): DP-SGD's ε is its plan (:func:`~.dp_sgd.planned_epsilon`)."""
    hooks = [HookRecord.of_spec(s, config, s.planned_epsilon(config)) for s in parsed]
    return _assemble(parsed, config, effects_of(parsed, config), guarantee_of(parsed, config), hooks)


def summary_from_run(parsed: Sequence[Any], config, records: Iterable[Mapping[str, Any]]) -> SettingSummary:
    """The setting as a trained run recorded it: its hooks' run.json records (``describe()``) give the
    payload guarantee (the privacy report, which knew the real Poisson rounds) and each hook's own
    ε (DP-SGD's accountant); the effects and the coverage follow from the config. A run without a
    privacy report (no defenses) gets the guarantee computed from its config."""
    records = list(records)
    report = next((r for r in records if r.get("name") == REPORT_NAME), None)
    guarantee = (PayloadGuarantee.from_json(report["payload_channel"]) if report is not None
                 else guarantee_of(parsed, config))
    hooks = [HookRecord.from_json(r) for r in records if r.get("name") != REPORT_NAME]
    return _assemble(parsed, config, effects_of(parsed, config), guarantee, hooks)


# ---------------------------------------------------------------- into run.json

class PrivacyReport(ReleaseHook):
    """Changes nothing; its ``describe()`` puts the coverage map and the formal ε into run.json."""

    name = REPORT_NAME

    def __init__(self, parsed: list[Any], config, training_hooks: Sequence[Any] = ()):
        self.parsed = parsed
        self.config = config
        self.training_hooks = tuple(training_hooks)  # built from the specs that act on training (DP-SGD)

    def describe(self) -> dict[str, Any]:
        # The real Poisson rounds of the run's loaders, once training made them (else the plan).
        rounds = next((r for h in self.training_hooks if (r := h.poisson_rounds()) is not None), None)
        guarantee = guarantee_of(self.parsed, self.config, rounds)
        t_c, T = self.config.t_c, self.config.diffusion.T
        return {
            "name": self.name,
            "defenses": [spec_label(s) for s in self.parsed],
            "coverage": coverage_map(self.parsed, t_c, T),
            "uncovered": uncovered(self.parsed, t_c, T),
            "payload_channel": guarantee.to_json(),
            "models": {
                # The server model is trained on the payloads alone: post-processing of that channel.
                "server": {
                    "epsilon_from_payloads": as_json_number(guarantee.epsilon),
                    "dp_sgd": "see the dp-sgd entry" if self.training_hooks else None,
                },
                "clients": "see the dp-sgd entry" if self.training_hooks else "inf (trained on raw images)",
            },
        }
