"""The Python API (collafuse.api; DESIGN §8; issue 11, item 2): the CLI's operations, defenses included."""
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from collafuse import api
from collafuse.cli import main
from collafuse.config import config_from_dict
from collafuse.errors import CollafuseError, ConfigError
from collafuse.hooks import ReleaseHook
from collafuse.runs import RUN_MARKER, Run, create_run
from collafuse.training import Hooks

DOCS = Path(__file__).resolve().parents[1] / "docs" / "API.md"
NOISED = [{"name": "payload-noise", "sigma": 0.5}]


def _noised_dict():
    return tiny_config_dict(training={"epochs": 1}, defenses=NOISED)


def _hashes(run_dir: Path, prefixes=("checkpoints/", "transcript/", "audit_key", "config.yaml")) -> dict:
    files = json.loads((run_dir / RUN_MARKER).read_text())["files"]
    return {rel: digest for rel, digest in files.items() if rel.startswith(prefixes)}


@pytest.fixture(scope="module")
def noised_run(tmp_path_factory) -> Run:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", api.UncoveredThreatsWarning)
        return api.train(_noised_dict(), tmp_path_factory.mktemp("api") / "noised")


def test_train_applies_the_defenses_and_records_every_hook(noised_run):
    info = noised_run.info
    names = [h["name"] for h in info["hooks"]]
    assert names == ["payload-noise", "privacy-report"]  # today's bug: [] (defenses silently dropped)
    noise = info["hooks"][0]
    assert noise["sigma"] == 0.5
    assert noised_run.t_hand == noise["t_release"] > noised_run.config.t_c  # the noise ran: payloads moved to t' > t_c
    assert list(noised_run.config.defenses) == NOISED


def test_train_warns_about_uncovered_threats(tmp_path):
    with pytest.warns(api.UncoveredThreatsWarning, match="no configured defense addresses T1, T2, T3, T4, T5"):
        api.train(tiny_config_dict(training={"epochs": 1}), tmp_path / "plain")


def test_cli_and_api_train_the_same_run(tmp_path, noised_run):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_noised_dict()))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    cli_info = json.loads((tmp_path / "cli" / RUN_MARKER).read_text())
    assert [h["name"] for h in cli_info["hooks"]] == [h["name"] for h in noised_run.info["hooks"]]
    assert _hashes(tmp_path / "cli") == _hashes(noised_run.path)  # one path: identical weights and transcript


@pytest.mark.parametrize("form", ["path", "str", "dict", "RunConfig"])
def test_config_forms(tmp_path, form):
    raw = tiny_config_dict(training={"epochs": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    given = {"path": tmp_path / "c.yaml", "str": str(tmp_path / "c.yaml"), "dict": raw,
             "RunConfig": config_from_dict(raw)}[form]
    assert api.resolve_config(given) == config_from_dict(raw)


def test_bad_config_type_and_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config must be a YAML path, a dict or a RunConfig"):
        api.train(42, tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown defense|valid"):
        api.train(tiny_config_dict(defenses=[{"name": "magic"}]), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_create_run_refuses_defenses_that_were_not_turned_into_hooks(tmp_path):
    cfg = config_from_dict(_noised_dict())
    for hooks, what in [(Hooks(), "were not built from them"),
                        (api.hooks_for(config_from_dict(tiny_config_dict(defenses=[{"name": "payload-noise",
                                                                                     "sigma": 2.0}]))),
                         "were built from other defenses")]:
        with pytest.raises(ConfigError) as err:
            create_run(cfg, tmp_path / "r", hooks=hooks, progress=False)
        message = str(err.value)
        assert what in message and "payload-noise" in message and "\n" not in message
    # Hooks built from defenses the config does not list would make config.yaml lie the other way.
    with pytest.raises(ConfigError, match="were built from other defenses"):
        create_run(config_from_dict(tiny_config_dict()), tmp_path / "r", hooks=api.hooks_for(cfg), progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


class _Tag(ReleaseHook):
    name = "tag"

    def describe(self):
        return {"name": self.name, "note": "hand-made"}


def test_hand_made_hooks_without_defenses_are_recorded(tmp_path):
    out = create_run(config_from_dict(tiny_config_dict(training={"epochs": 1})), tmp_path / "r",
                     hooks=Hooks(release=(_Tag(),)), progress=False)
    assert json.loads((out / RUN_MARKER).read_text())["hooks"] == [{"name": "tag", "note": "hand-made"}]


def test_attacks_return_typed_results_and_write_only_when_asked(tmp_path, noised_run):
    from collafuse.attacks.membership.engine import MembershipResult, MembershipSettings
    from collafuse.attacks.reconstruction.engine import RunReconstruction

    before = sorted(p.name for p in noised_run.path.parent.iterdir())
    rec = api.attack_reconstruct(noised_run, ["rescale", "oracle"])
    assert isinstance(rec, RunReconstruction) and rec.attacked and "rescale" in rec.evaluation.scores
    mem = api.attack_membership(noised_run.path, "loss", "server", settings=MembershipSettings(n_boot=20))
    assert isinstance(mem, MembershipResult) and mem.targets["server"].attacks["loss"].metrics.auc.value >= 0
    assert sorted(p.name for p in noised_run.path.parent.iterdir()) == before  # nothing written without out

    # With out: the same files as the CLI, and the same numbers.
    api.attack_reconstruct(noised_run.path, "rescale,oracle", out=tmp_path / "api" / "rec.json")
    assert main(["attack", "reconstruct", "--run", str(noised_run.path), "--attacks", "rescale,oracle",
                 "--out", str(tmp_path / "cli" / "rec.json"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    a, c = (json.loads((tmp_path / d / "rec.json").read_text()) for d in ("api", "cli"))
    assert a["attacks"].keys() == c["attacks"].keys()
    assert a["attacks"]["rescale"]["pooled"] == c["attacks"]["rescale"]["pooled"]

    api.attack_membership(noised_run, ["loss"], ["server"], out=tmp_path / "api" / "mem.json")
    assert main(["attack", "membership", "--run", str(noised_run.path), "--attacks", "loss", "--targets", "server",
                 "--out", str(tmp_path / "cli" / "mem.json"), "--quiet"]) == 0
    a, c = (json.loads((tmp_path / d / "mem.json").read_text()) for d in ("api", "cli"))
    assert a["targets"]["server"]["attacks"] == c["targets"]["server"]["attacks"]
    with pytest.raises(CollafuseError, match="already exists"):
        api.attack_membership(noised_run, ["loss"], ["server"], out=tmp_path / "api" / "mem.json")


def test_attack_names_are_checked_like_the_cli(noised_run):
    with pytest.raises(CollafuseError, match="valid"):
        api.attack_reconstruct(noised_run, ["no-such-attack"])
    with pytest.raises(CollafuseError, match="empty"):
        api.attack_membership(noised_run, [])


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_every_example_in_docs_api_runs(tmp_path, monkeypatch):
    blocks = _python_blocks(DOCS.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "cache-home"))  # the attacker's models stay here
    namespace: dict = {"__name__": "docs_api"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/API.md[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message says which block broke
            raise AssertionError(f"docs/API.md python block {i} failed: {exc!r}\n{block}") from exc
    assert [h["name"] for h in namespace["run"].info["hooks"]] == ["payload-noise", "privacy-report"]
    assert not Path("runs/unprotected").exists()
    assert Path("results/reconstruct.json").is_file() and Path("results/membership.json").is_file()
    result = namespace["result"]
    assert result.status in ("pass", "fail") and result.text
    assert json.loads(result.audit_json.read_text())["verdict"]["status"] == result.status
    assert result.report.html.is_file() and namespace["pages"].markdown.is_file()
    assert os.environ["COLLAFUSE_CACHE"] == str(tmp_path / "cache-home")
