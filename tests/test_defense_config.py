"""``defenses:`` in the config: validation (one clear line, exit code 2), registries, coverage map."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from collafuse.cli import main
from collafuse.defenses import DEFENSES, build_hooks, coverage, parse_specs, uncovered_threats
from collafuse.errors import ConfigError
from collafuse.registry import Registry

from conftest import tiny_config, tiny_config_dict


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "payload-noise", "sigma": -0.1}, "sigma must be >= 0"),
        ({"name": "payload-clip", "C": 0.0}, "C must be > 0"),
        ({"name": "payload-clip", "C": -2}, "C must be > 0"),
        ({"name": "dp-sgd", "C": 0, "sigma": 1.0}, "C must be > 0"),
        ({"name": "dp-sgd", "sigma": -1.0}, "sigma must be > 0"),
        ({"name": "payload-nois", "sigma": 1.0}, "unknown defense 'payload-nois'; valid: payload-clip, payload-noise, minimize, dp-sgd"),
        ({"name": "payload-noise", "sgima": 1.0}, "unknown key 'sgima'; valid: sigma"),
        ({"name": "minimize", "mode": "int4"}, "unknown minimize mode 'int4'; valid:"),
        ({"name": "minimize", "mode": "k-bit", "bits": 12}, "bits must be <= 8"),
        ({"name": "dp-sgd"}, "exactly one of 'sigma'"),
        ({"name": "dp-sgd", "sigma": 1.0, "target": "everyone"}, "target must be one of server, clients, both"),
        ({"name": "dp-sgd", "sigma": 1.0, "accountant": "gdp"}, "accountant must be one of prv, rdp"),
        ({"name": "payload-noise", "sigma": "big"}, "sigma must be a number"),
        ({"name": "payload-noise", "sigma": float("nan")}, "sigma must be finite"),
    ],
)
def test_bad_specs_raise_one_clear_line(spec, message):
    with pytest.raises(ConfigError) as info:
        build_hooks([spec], tiny_config())
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unreachable_target_epsilon_is_a_config_error():
    with pytest.raises(ConfigError, match="target epsilon 0.01 .* not reachable"):
        build_hooks([{"name": "dp-sgd", "epsilon": 0.01, "accountant": "rdp"}], tiny_config(training={"epochs": 50}))


def test_impossible_settings_for_the_run():
    cfg = tiny_config(diffusion={"T": 50, "cut_ratio": 0.2})
    with pytest.raises(ConfigError, match="past step 49"):
        build_hooks([{"name": "payload-noise", "sigma": 1e4}], cfg)
    with pytest.raises(ConfigError, match="needs training.payload 'cut'"):
        build_hooks([{"name": "payload-noise", "sigma": 0.5}], tiny_config(training={"payload": "naive"}))
    with pytest.raises(ConfigError, match="no client models"):
        build_hooks([{"name": "dp-sgd", "sigma": 1.0, "target": "clients"}], tiny_config(diffusion={"cut_ratio": 0.0}))
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_hooks([{"name": "minimize", "mode": "single-release"}, {"name": "payload-noise", "sigma": 0.5}], cfg)


def test_duplicates_are_refused():
    with pytest.raises(ConfigError, match="'payload-noise' twice"):
        parse_specs([{"name": "payload-noise", "sigma": 0.5}, {"name": "payload-noise", "sigma": 1.0}])
    with pytest.raises(ConfigError, match="a second quantiser"):
        parse_specs([{"name": "minimize", "mode": "fp16"}, {"name": "minimize", "mode": "int8"}])
    registry: Registry[int] = Registry("thing")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        DEFENSES.register("dp-sgd", DEFENSES.get("dp-sgd"))


def test_several_defenses_at_once_in_a_fixed_order():
    specs = [
        {"name": "minimize", "mode": "int8"},
        {"name": "payload-noise", "sigma": 0.3},
        {"name": "minimize", "mode": "no-labels"},
        {"name": "payload-clip", "C": 8.0, "center": -1.0},
        {"name": "dp-sgd", "sigma": 1.0, "target": "server"},
    ]
    hooks = build_hooks(specs, tiny_config())
    names = [h.name for h in hooks.release]
    # clip before noising, extra noise before quantising, quantising last; the report changes nothing.
    assert names == ["payload-clip", "payload-noise", "minimize:no-labels", "minimize:int8", "privacy-report"]
    assert [h.name for h in hooks.training] == ["dp-sgd"]


def test_coverage_map_and_uncovered_threats():
    assert uncovered_threats([]) == ["T1", "T2", "T3", "T4", "T5"]
    assert uncovered_threats([{"name": "payload-noise", "sigma": 1.0}]) == ["T3", "T4"]
    assert uncovered_threats([{"name": "dp-sgd", "sigma": 1.0}]) == ["T1"]  # DP-SGD never covers the payloads
    assert uncovered_threats([{"name": "dp-sgd", "sigma": 1.0, "target": "server"}]) == ["T1", "T3", "T4"]
    central = tiny_config(diffusion={"cut_ratio": 0.0})
    assert uncovered_threats([{"name": "dp-sgd", "sigma": 1.0, "target": "server"}], central) == ["T1", "T3"]
    cov = coverage([{"name": "minimize", "mode": "int8"}, {"name": "payload-clip", "C": 2.0}])
    assert cov["T1"] == ["minimize:int8", "payload-clip"]
    assert cov["T3"] == []


def _write_config(tmp_path, defenses):
    raw = tiny_config_dict(defenses=defenses)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "defenses",
    [
        [{"name": "payload-noise", "sigma": -1.0}],
        [{"name": "payload-clip", "C": 0}],
        [{"name": "shield"}],
        [{"name": "dp-sgd", "epsilon": 0.01, "accountant": "rdp"}],
    ],
)
def test_cli_exit_code_2_and_nothing_written(tmp_path, capsys, defenses):
    out = tmp_path / "run"
    code = main(["train", "--config", str(_write_config(tmp_path, defenses)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("collafuse: error:") and err.count("\n") == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.yaml"]


def test_run_json_stores_the_coverage_map_and_formal_epsilon(tmp_path):
    defenses = [{"name": "payload-clip", "C": 4.0, "center": -1.0}, {"name": "minimize", "mode": "no-labels"}]
    out = tmp_path / "run"
    assert main(["train", "--config", str(_write_config(tmp_path, defenses)), "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    report = next(h for h in info["hooks"] if h["name"] == "privacy-report")
    assert report["uncovered"] == ["T3", "T4"]
    assert report["coverage"]["T1"] == ["payload-clip", "minimize:no-labels"]
    channel = report["payload_channel"]
    assert channel["label_epsilon"] == 0.0
    assert channel["sensitivity"] == pytest.approx(2 * channel["a"] * 4.0)
    assert 0 < channel["epsilon"] < 1e4


# ---------- the suite every defense passes ----------

EXAMPLES = {
    "payload-clip": {"name": "payload-clip", "C": 3.0, "center": -1.0},
    "payload-noise": {"name": "payload-noise", "sigma": 0.5},
    "dp-sgd": {"name": "dp-sgd", "sigma": 1.0, "C": 1.0},
    "minimize:single-release": {"name": "minimize", "mode": "single-release"},
    "minimize:fp16": {"name": "minimize", "mode": "fp16"},
    "minimize:int8": {"name": "minimize", "mode": "int8"},
    "minimize:k-bit": {"name": "minimize", "mode": "k-bit", "bits": 3},
    "minimize:no-labels": {"name": "minimize", "mode": "no-labels"},
    "minimize:id-free": {"name": "minimize", "mode": "id-free"},
}


def test_every_registered_defense_and_mode_has_an_example():
    from collafuse.defenses.minimize import MODES

    names = {k.split(":")[0] for k in EXAMPLES}
    modes = {k.split(":")[1] for k in EXAMPLES if k.startswith("minimize:")}
    assert names == set(DEFENSES.names())
    assert modes == set(MODES.names())


@pytest.mark.parametrize("label", sorted(EXAMPLES))
def test_defense_contract(label):
    spec = EXAMPLES[label]
    config = tiny_config(defenses=[spec])
    hooks = build_hooks(config.defenses, config)
    described = [h.describe() for h in hooks.release + hooks.training]
    json.dumps(described)  # run.json must be able to store it
    mine = [d for d in described if d["name"] != "privacy-report"]
    assert len(mine) == 1 and set(mine[0]["threats"]) <= {"T1", "T2", "T3", "T4", "T5"} and mine[0]["threats"]
    assert uncovered_threats([spec]) != ["T1", "T2", "T3", "T4", "T5"]  # it covers something
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        build_hooks([{**spec, "bogus": 1}], config)
    # Deterministic under a seed: the same release twice from the same generator state.
    from collafuse.protocol import Client
    from collafuse.schedule import NoiseSchedule

    schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    y = torch.arange(6)
    payloads = []
    for _ in range(2):
        client = Client(
            0, None, None, schedule, config.t_c, "cut", torch.Generator().manual_seed(9),
            release_hooks=hooks.release, send_labels=True,
        )
        payloads.append(client.release(x0, y, torch.arange(6), 0))
    assert torch.equal(payloads[0].values(), payloads[1].values())
    assert torch.equal(payloads[0].t, payloads[1].t)
