"""A defense setting as one typed value (defenses/setting.py): what readers take instead of config keys."""
from __future__ import annotations

import json
import math

import pytest
import torch

from collafuse.config import DEFAULT_CONFIG, replace
from collafuse.defenses import (
    DEFENSES, HookRecord, SettingSummary, build_hooks, defense_effects, describe_setting, parse_specs,
    payload_epsilon, setting_from_run,
)
from collafuse.defenses.accounting import as_json_number, from_json_number
from collafuse.errors import ConfigError
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule


def _cfg(**sections):
    base = {"device": "cpu", "data": {"n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
            "diffusion": {"T": 100}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return replace(DEFAULT_CONFIG, **base)


SETTINGS = [
    [],
    [{"name": "payload-noise", "sigma": 0.7}],
    [{"name": "payload-clip", "C": 4.0, "center": -1.0}, {"name": "payload-noise", "sigma": 0.3},
     {"name": "minimize", "mode": "int8"}, {"name": "minimize", "mode": "no-labels"}],
    [{"name": "minimize", "mode": "fp16"}, {"name": "minimize", "mode": "single-release"}],
    [{"name": "dp-sgd", "target": "clients", "sigma": 1.0, "multiplicity": 2, "accountant": "rdp"}],
    [{"name": "dp-sgd", "target": "both", "sigma": 1.0, "multiplicity": 3, "accountant": "rdp"},
     {"name": "minimize", "mode": "k-bit", "bits": 3}],
]


def test_from_json_number_inverts_as_json_number():
    for x in (0.0, 1.25, 4.9e3, math.inf):
        assert from_json_number(as_json_number(x)) == x
    assert from_json_number(None) == math.inf  # no bound recorded: the conservative reading
    assert from_json_number(3) == 3.0
    with pytest.raises(ValueError, match="epsilon"):
        from_json_number("12.5")


@pytest.mark.parametrize("defenses", SETTINGS)
def test_effects_are_what_the_built_hooks_do(defenses):
    cfg = _cfg(diffusion={"cut_ratio": 0.3}, defenses=defenses)
    effects = defense_effects(defenses, cfg)
    assert describe_setting(defenses, cfg).effects == effects
    hooks = build_hooks(defenses, cfg)
    t_hand = cfg.t_c
    for hook in hooks.release:  # the core's own fold (collafuse/training.py)
        t_hand = hook.release_step(t_hand)
    assert effects.release_step == t_hand
    for role in ("server", "client"):
        assert effects.noise_multiplicity[role] == max([h.noise_multiplicity(role) for h in hooks.training] + [1])
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    client = Client(0, None, None, schedule, cfg.t_c, cfg.training.payload, torch.Generator().manual_seed(0),
                    release_hooks=hooks.release, send_labels=cfg.conditional)
    payload = client.release(torch.rand(2, 1, 16, 16) * 2 - 1, torch.tensor([1, 2]), torch.arange(2), 0)
    assert effects.payload_row_bytes == int(payload.row_wire_bytes()[0])
    assert effects.labels_sent == (payload.label is not None)


def test_release_step_past_T_is_refused_and_edges_keep_t_c():
    cfg = _cfg(diffusion={"cut_ratio": 0.9}, defenses=[{"name": "payload-noise", "sigma": 100.0}])
    with pytest.raises(ConfigError, match="payload-noise"):
        defense_effects(cfg.defenses, cfg)
    for c in (0.0, 1.0):  # nothing to move: c = 0 sends images, c = 1 sends nothing
        edge = _cfg(diffusion={"cut_ratio": c}, defenses=[{"name": "payload-noise", "sigma": 1.0}])
        assert defense_effects(edge.defenses, edge).release_step == edge.t_c


@pytest.mark.parametrize("defenses", SETTINGS)
def test_summary_round_trips_through_json(defenses):
    cfg = _cfg(diffusion={"cut_ratio": 0.3}, defenses=defenses)
    summary = describe_setting(defenses, cfg)
    text = json.dumps(summary.to_json())  # plain JSON: no ∞ literal
    back = SettingSummary.from_json(json.loads(text))
    assert back.to_json() == summary.to_json()
    assert back.effects == summary.effects and back.coverage == summary.coverage
    assert summary.payload_guarantee == payload_epsilon(defenses, cfg)
    assert [h.name for h in summary.hooks] == [h.name for h in back.hooks]


def test_model_epsilon_from_a_config():
    plain = _cfg(diffusion={"cut_ratio": 0.3})
    s = describe_setting([], plain)
    assert s.model_epsilon == (math.inf, s.payload_guarantee.epsilon)
    assert s.uncovered == ["T1", "T2", "T3", "T4", "T5"]
    dp = [{"name": "dp-sgd", "target": "clients", "epsilon": 8.0}]
    s = describe_setting(dp, _cfg(diffusion={"cut_ratio": 0.3}, defenses=dp))
    assert s.model_epsilon == (8.0, s.payload_guarantee.epsilon)  # the target Opacus calibrates to
    assert s.hooks[0].epsilon == {"client_0": 8.0, "client_1": 8.0}
    assert s.coverage["T3"] == ("dp-sgd",) and "T1" in s.uncovered


def test_setting_from_run_reads_the_hook_records():
    defenses = [{"name": "payload-noise", "sigma": 0.5}, {"name": "dp-sgd", "target": "both", "sigma": 1.0}]
    cfg = _cfg(diffusion={"cut_ratio": 0.3}, defenses=defenses)
    hooks = build_hooks(defenses, cfg)
    records = json.loads(json.dumps([h.describe() for h in hooks.release] + [h.describe() for h in hooks.training]))
    records[-1]["epsilon"] = {"server": 1e9, "client0": 2.5, "client1": "inf"}  # as a run before client_<k> wrote it
    setting = setting_from_run({"hooks": records}, cfg)
    report = next(r for r in records if r["name"] == "privacy-report")
    assert setting.payload_guarantee.to_json() == report["payload_channel"]
    assert setting.model_epsilon == (math.inf, setting.payload_guarantee.epsilon)  # server: payload ε < 1e9
    assert [h.name for h in setting.hooks] == ["payload-noise", "dp-sgd"]
    assert setting.hooks[1].epsilon == {"server": 1e9, "client_0": 2.5, "client_1": math.inf}  # old spelling read
    noise = setting.hooks[0]
    assert noise.threats == ("T1", "T2", "T5") and noise.parameters["t_release"] == setting.release_step
    assert HookRecord.from_json(noise.to_json()) == noise
    # No records (a run without defenses): the guarantee from the config.
    assert setting_from_run({}, cfg).payload_guarantee == payload_epsilon(defenses, cfg)


def test_every_defense_declares_whether_it_acts_on_training():
    examples = {"payload-clip": {"C": 1.0}, "payload-noise": {"sigma": 1.0}, "minimize": {"mode": "int8"},
                "dp-sgd": {"sigma": 1.0}}
    assert set(examples) == set(DEFENSES.names())
    for name, raw in examples.items():
        (spec,) = parse_specs([{"name": name, **raw}])
        assert spec.acts_on_training is (name == "dp-sgd")
