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

What a setting does, as one typed value that readers take instead of re-deriving it
from config keys: :func:`describe_setting` (from a config) and :func:`setting_from_run`
(from a trained run's run.json) give a :class:`~.setting.SettingSummary` (release step,
payload row bytes, noise multiplicity, payload guarantee, models' ε, coverage, per-hook
records); :func:`defense_effects` gives only its cheap protocol part.

Modules: one per defense (:mod:`.dp_sgd`, :mod:`.payload_noise`, :mod:`.payload_clip`,
:mod:`.minimize`), the pure math (:mod:`.accounting`), the payload channel's ε for a
whole setting (:mod:`.guarantees`), the threat coverage map (:mod:`.coverage`) and the
setting as a typed value (:mod:`.setting`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from collafuse.errors import ConfigError
from collafuse.hooks import Hooks, ReleaseHook, register_hook_builder
from collafuse.registry import Registry

from . import dp_sgd, minimize, payload_clip, payload_noise
from .coverage import THREATS, coverage_map, uncovered
from .guarantees import PayloadGuarantee
from .setting import (
    DefenseEffects, HookRecord, PrivacyReport, SettingSummary, effects_of, guarantee_of, model_epsilon, summarize,
    summary_from_run,
)

__all__ = [
    "DEFENSES", "THREATS", "build_hooks", "parse_specs", "uncovered_threats", "coverage", "payload_epsilon",
    "PrivacyReport", "DefenseEffects", "HookRecord", "PayloadGuarantee", "SettingSummary", "defense_effects",
    "describe_setting", "setting_from_run", "model_epsilon",
]


@dataclass(frozen=True)
class DefenseKind:
    """How one defense name is parsed from YAML and built into hooks (what a spec does: its own methods,
    :class:`~.validate.DefenseSpec`)."""

    parse: Callable[[Mapping[str, Any], str], Any]
    build: Callable[[Any, Any], Any]


DEFENSES: Registry[DefenseKind] = Registry("defense")
DEFENSES.register(payload_clip.NAME, DefenseKind(payload_clip.PayloadClipSpec.parse, payload_clip.build))
DEFENSES.register(payload_noise.NAME, DefenseKind(payload_noise.PayloadNoiseSpec.parse, payload_noise.build))
DEFENSES.register(minimize.NAME, DefenseKind(minimize.MinimizeSpec.parse, minimize.build))
DEFENSES.register(dp_sgd.NAME, DefenseKind(dp_sgd.DPSGDSpec.parse, dp_sgd.build))


def parse_specs(specs: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Validate every entry of ``defenses:`` (no run config needed) and refuse duplicates and impossible combinations."""
    parsed, seen = [], {}
    for i, raw in enumerate(specs):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"defenses[{i}] must be a mapping with a 'name', got {raw!r}")
        kind = DEFENSES.get(raw.get("name"))
        where = f"defenses[{i}] ({raw['name']})"
        spec = kind.parse(raw, where)
        if spec.unique_key in seen:
            raise ConfigError(f"defenses[{i}]: {spec.twice()} (first at defenses[{seen[spec.unique_key]}])")
        seen[spec.unique_key] = i
        parsed.append(spec)
    for spec in parsed:
        spec.check_setting(parsed)
    return parsed


def build_hooks(specs: Iterable[Mapping[str, Any]], config) -> Hooks:
    """The core's :class:`~collafuse.hooks.Hooks` for a config's ``defenses:`` (validated first).

    Registered as the core's one hook builder when this package is imported: callers ask
    :func:`collafuse.hooks.hooks_for`, which calls this."""
    specs = tuple(specs)  # read twice: parsed here, fingerprinted below
    parsed = parse_specs(specs)
    release: list[tuple[int, ReleaseHook]] = []
    training = []
    for spec in parsed:
        hook = DEFENSES.get(spec.name).build(spec, config)
        if spec.acts_on_training:
            training.append(hook)
        else:
            release.append((spec.order, hook))
    release.sort(key=lambda pair: pair[0])
    report = PrivacyReport(parsed, config, training)
    # built_from: create_run checks that these hooks came from the config's own defenses: list.
    return Hooks(release=tuple(h for _, h in release) + (report,), training=tuple(training),
                 built_from=Hooks.fingerprint(specs))


register_hook_builder(build_hooks)


def uncovered_threats(specs: Iterable[Mapping[str, Any]], config=None) -> list[str]:
    """Threats (T1..T5) that no configured defense addresses; ``config`` refines DP-SGD's T4 by the cut."""
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
    return guarantee_of(parse_specs(specs), config)


def defense_effects(specs: Iterable[Mapping[str, Any]], config) -> DefenseEffects:
    """What the setting changes in the protocol (release step, payload row bytes, noise multiplicity); cheap."""
    return effects_of(parse_specs(specs), config)


def describe_setting(specs: Iterable[Mapping[str, Any]], config) -> SettingSummary:
    """The whole setting for a config, before any training (DP-SGD's ε as planned)."""
    return summarize(parse_specs(specs), config)


def setting_from_run(run_info: Mapping[str, Any] | None, config) -> SettingSummary:
    """The setting as a trained run recorded it in run.json (``run_info``: its parsed JSON, with ``hooks``)."""
    return summary_from_run(parse_specs(config.defenses), config, (run_info or {}).get("hooks", []))
