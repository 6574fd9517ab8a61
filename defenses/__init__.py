"""collafuse.defenses: what restores privacy, what it costs, which threat it covers (DESIGN.md §5).

A run config's ``defenses:`` list, e.g.::

    defenses:
      - {name: payload-clip, C: 6.0, center: -1.0}
      - {name: payload-noise, sigma: 0.5}
      - {name: minimize, mode: int8}
      - {name: dp-sgd, target: both, C: 1.0, epsilon: 8, multiplicity: 2}

is validated here (unknown names, unknown keys, σ < 0, C ≤ 0, an unreachable
target ε, impossible combinations: one line, :class:`~collafuse.errors.ConfigError`)
and turned into the core's hooks by :func:`build_hooks`. The core never imports
this package; the command line joins them.

Modules: one per defense (:mod:`.dp_sgd`, :mod:`.payload_noise`, :mod:`.payload_clip`,
:mod:`.minimize`), the pure math (:mod:`.accounting`), the payload channel's ε for a
whole setting (:mod:`.guarantees`) and the threat coverage map (:mod:`.coverage`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from collafuse.errors import ConfigError
from collafuse.hooks import ReleaseHook

from . import dp_sgd, minimize, payload_clip, payload_noise
from .coverage import THREATS, coverage_map, spec_label, uncovered
from .guarantees import DEFAULT_DELTA, PayloadGuarantee, payload_guarantee
from .registry import Registry

__all__ = [
    "DEFENSES", "THREATS", "build_hooks", "parse_specs", "uncovered_threats", "coverage", "payload_epsilon",
    "PrivacyReport",
]


@dataclass(frozen=True)
class DefenseKind:
    """How one defense name is parsed from YAML and built into hooks."""

    parse: Callable[[Mapping[str, Any], str], Any]
    build: Callable[[Any, Any], Any]
    order: int  # where its release hook runs: clip → noise draw → extra noise → labels → sender → quantise


DEFENSES: Registry[DefenseKind] = Registry("defense")
DEFENSES.register("payload-clip", DefenseKind(payload_clip.PayloadClipSpec.parse, payload_clip.build, 0))
DEFENSES.register("payload-noise", DefenseKind(payload_noise.PayloadNoiseSpec.parse, payload_noise.build, 2))
DEFENSES.register("minimize", DefenseKind(minimize.MinimizeSpec.parse, minimize.build, 1))
DEFENSES.register("dp-sgd", DefenseKind(dp_sgd.DPSGDSpec.parse, dp_sgd.build, 9))

_MINIMIZE_ORDER = {"single-release": 1, "no-labels": 3, "id-free": 4, "quantize": 5}


def _order(spec: Any) -> int:
    if spec.name == "minimize":
        return _MINIMIZE_ORDER[spec.key]
    return DEFENSES.get(spec.name).order


def parse_specs(specs: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Validate every entry of ``defenses:`` (no run config needed) and refuse duplicates."""
    parsed, seen = [], {}
    for i, raw in enumerate(specs):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"defenses[{i}] must be a mapping with a 'name', got {raw!r}")
        kind = DEFENSES.get(raw.get("name"))
        where = f"defenses[{i}] ({raw['name']})"
        spec = kind.parse(raw, where)
        key = f"minimize:{spec.key}" if spec.name == "minimize" else spec.name
        if key in seen:
            what = "a second quantiser" if key == "minimize:quantize" else f"{spec_label(spec)!r} twice"
            raise ConfigError(f"defenses[{i}]: {what} (first at defenses[{seen[key]}])")
        seen[key] = i
        parsed.append(spec)
    modes = {getattr(s, "mode", None) for s in parsed}
    names = {s.name for s in parsed}
    if "single-release" in modes and "payload-noise" in names:
        raise ConfigError(
            "defenses: minimize single-release cannot be combined with payload-noise (the extra noise would be "
            "fresh every epoch and average out); use a larger cut_ratio instead"
        )
    return parsed


def _schedule_and_d(config):
    from collafuse.schedule import NoiseSchedule

    schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
    d = config.data.channels * config.data.image_size**2
    return schedule, d


def _guarantee(parsed: list[Any], config, poisson_rounds=None) -> PayloadGuarantee:
    schedule, d = _schedule_and_d(config)
    clip = next((s for s in parsed if s.name == "payload-clip"), None)
    noise = next((s for s in parsed if s.name == "payload-noise"), None)
    dp = next((s for s in parsed if s.name == "dp-sgd"), None)
    modes = {getattr(s, "mode", None) for s in parsed}
    if poisson_rounds is None and dp is not None:
        poisson_rounds = [(config.training.epochs * b, 1.0 / b) for _, b in dp_sgd.iid_client_batches(config)]
    return payload_guarantee(
        schedule, config.t_c, config.training.payload, d, config.training.epochs,
        delta=dp.delta if dp is not None else DEFAULT_DELTA,
        clip_norm=clip.clip_norm if clip is not None else None,
        noise_sigma=noise.sigma if noise is not None else 0.0,
        single_release="single-release" in modes,
        poisson_rounds=poisson_rounds,
        labels_sent=bool(config.conditional) and "no-labels" not in modes,
    )


class PrivacyReport(ReleaseHook):
    """Changes nothing; its ``describe()`` puts the coverage map and the formal ε into run.json."""

    name = "privacy-report"

    def __init__(self, parsed: list[Any], config, dp_hook: "dp_sgd.DPSGD | None" = None):
        self.parsed = parsed
        self.config = config
        self.dp_hook = dp_hook

    def describe(self) -> dict[str, Any]:
        t_c, T = self.config.t_c, self.config.diffusion.T
        rounds = None
        if self.dp_hook is not None and self.dp_hook.client_batches:
            epochs = self.config.training.epochs
            rounds = [(epochs * b, 1.0 / b) for b in self.dp_hook.client_batches.values()]
        guarantee = _guarantee(self.parsed, self.config, rounds)
        return {
            "name": self.name,
            "defenses": [spec_label(s) for s in self.parsed],
            "coverage": coverage_map(self.parsed, t_c, T),
            "uncovered": uncovered(self.parsed, t_c, T),
            "payload_channel": guarantee.to_json(),
            "models": {
                # The server model is trained on the payloads alone: post-processing of that channel.
                "server": {
                    "epsilon_from_payloads": guarantee.to_json()["epsilon"],
                    "dp_sgd": "see the dp-sgd entry" if self.dp_hook is not None else None,
                },
                "clients": "see the dp-sgd entry" if self.dp_hook is not None else "inf (trained on raw images)",
            },
        }


def build_hooks(specs: Iterable[Mapping[str, Any]], config):
    """The core's :class:`~collafuse.training.Hooks` for a config's ``defenses:`` (validated first)."""
    from collafuse.training import Hooks

    parsed = parse_specs(specs)
    release: list[tuple[int, ReleaseHook]] = []
    training = []
    dp_hook = None
    for spec in parsed:
        hook = DEFENSES.get(spec.name).build(spec, config)
        if spec.name == "dp-sgd":
            dp_hook = hook
            training.append(hook)
        else:
            release.append((_order(spec), hook))
    release.sort(key=lambda pair: pair[0])
    report = PrivacyReport(parsed, config, dp_hook)
    return Hooks(release=tuple(h for _, h in release) + (report,), training=tuple(training))


def uncovered_threats(specs: Iterable[Mapping[str, Any]], config=None) -> list[str]:
    """Threats (T1..T4) that no configured defense addresses; ``config`` refines DP-SGD's T4 by the cut."""
    parsed = parse_specs(specs)
    if config is None:
        return uncovered(parsed)
    return uncovered(parsed, config.t_c, config.diffusion.T)


def coverage(specs: Iterable[Mapping[str, Any]], config=None) -> dict[str, list[str]]:
    """Threat → the configured defenses that address it."""
    parsed = parse_specs(specs)
    return coverage_map(parsed, *((config.t_c, config.diffusion.T) if config is not None else ()))


def payload_epsilon(specs: Iterable[Mapping[str, Any]], config) -> PayloadGuarantee:
    """The payload channel's formal ε per client image for this setting (∞ where no bound exists)."""
    return _guarantee(parse_specs(specs), config)
