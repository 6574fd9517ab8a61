"""Leakage against training length (issue 14, item 5): ``training.snapshots`` keeps every model's EMA weights
after those epochs in the run folder, hash-checked like every checkpoint; ``Run.at_snapshot`` loads them;
``attack membership`` attacks the model targets of every snapshot."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config, tiny_config_dict
from collafuse.attacks.membership.engine import MembershipSettings, run_membership
from collafuse.cli import main
from collafuse.config import config_from_dict, config_to_yaml
from collafuse.errors import ConfigError, RunError
from collafuse.runs import RUN_MARKER, Run, create_run, snapshot_file

SNAPSHOTS = [1, 2, 4]
MODELS = ("server", "client_0", "client_1")


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("snapshots") / "run"
    create_run(tiny_config(training={"epochs": 4, "snapshots": SNAPSHOTS}), path, progress=False)
    return path


@pytest.fixture
def snap_copy(snap_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(snap_run, path)
    return path


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("snapshots, epochs", [([0], 4), ([5], 4), ([2, 1], 4), ([1, 1], 4)])
def test_snapshots_are_validated_with_one_clear_error(snapshots, epochs):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_config_dict(training={"epochs": epochs, "snapshots": snapshots}))
    assert str(err.value).startswith("config error: training: snapshots must be distinct epochs in increasing order")
    assert "\n" not in str(err.value)


def test_a_config_without_snapshots_reads_and_writes_as_before():
    plain = tiny_config()
    assert plain.training.snapshots == ()
    assert "snapshots" not in plain.model_dump(mode="json")["training"] and "snapshots" not in config_to_yaml(plain)
    assert tiny_config(training={"epochs": 4, "snapshots": [2, 4]}).model_dump(mode="json")["training"]["snapshots"] == [2, 4]


def test_snapshot_checkpoints_are_written_recorded_and_verified(snap_run):
    info = json.loads((snap_run / RUN_MARKER).read_text())
    assert info["snapshots"] == SNAPSHOTS
    for epoch in SNAPSHOTS:
        for name in MODELS:
            rel = snapshot_file(epoch, name)
            assert rel == f"checkpoints/snapshots/epoch_{epoch}/{name}.safetensors"
            assert info["files"][rel] == hashlib.sha256((snap_run / rel).read_bytes()).hexdigest()
    run = Run.load(snap_run)
    assert run.snapshot_epochs == tuple(SNAPSHOTS) and run.snapshot is None
    last, first = run.at_snapshot(4), run.at_snapshot(1)
    assert last.snapshot == 4 and first.snapshot == 1 and first.config == run.config and first.path == run.path
    # The last epoch's snapshot is the final model; the first one is not.
    assert _equal(last.server_model, run.server_model) and _equal(last.client_models[1], run.client_models[1])
    assert not _equal(first.client_models[0], run.client_models[0])
    with pytest.raises(RunError, match="no snapshot at epoch 3; snapshots kept: 1, 2, 4"):
        run.at_snapshot(3)


def test_a_changed_snapshot_is_refused_at_load(snap_copy):
    rel = snapshot_file(2, "client_0")
    state = load_file(snap_copy / rel)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(snap_copy / rel))
    with pytest.raises(RunError, match=f"{rel} was changed after the run was written"):
        Run.load(snap_copy)


def test_a_removed_snapshot_is_refused_at_load(snap_copy):
    rel = snapshot_file(1, "server")
    info = json.loads((snap_copy / RUN_MARKER).read_text())
    del info["files"][rel]  # gone from the folder and from the record
    (snap_copy / RUN_MARKER).write_text(json.dumps(info))
    (snap_copy / rel).unlink()
    with pytest.raises(RunError, match=f"records no hash for {rel}"):
        Run.load(snap_copy)


def test_run_json_snapshots_must_match_the_config(snap_copy):
    info = json.loads((snap_copy / RUN_MARKER).read_text())
    info["snapshots"] = [1, 2]
    (snap_copy / RUN_MARKER).write_text(json.dumps(info))
    with pytest.raises(RunError, match="do not match config.yaml's training.snapshots"):
        Run.load(snap_copy)


def test_membership_is_reported_per_snapshot(snap_run, tmp_path, capsys):
    out = tmp_path / "mia.json"
    assert main(["attack", "membership", "--run", str(snap_run), "--attacks", "loss,sima,nn-distance",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report["snapshots"]) == {str(e) for e in SNAPSHOTS}
    assert "final models only" in report["snapshot_definition"]
    for epoch, targets in report["snapshots"].items():
        assert set(targets) == {"server", "client_0", "client_1"}  # the model targets; samples: final models only
        for key, entry in targets.items():
            assert set(entry["attacks"]) == {"loss", "sima"}
            a = entry["attacks"]["loss"]
            assert {"auc", "auc_ci", "tpr_at_fpr", "balanced_accuracy", "epsilon", "per_step"} <= set(a)
            assert set(a["tpr_at_fpr"]) == {"0.01", "0.001"} and a["per_step"]
    # The final epoch's snapshot is the final model: the same numbers.
    # (the controls, blind baseline, held-out thresholds and ceiling, are the final models' only)
    controls = {"against_blind", "heldout", "ceiling"}
    final = {k: v for k, v in report["targets"]["client_1"]["attacks"]["loss"].items() if k not in controls}
    assert report["snapshots"]["4"]["client_1"]["attacks"]["loss"] == final
    summary = [r for r in report["summary"] if r.get("available", True)]
    assert {r.get("epoch") for r in summary} == {None, *SNAPSHOTS}
    assert {"tpr_at_01pct_fpr", "tpr_at_01pct_fpr_resolved", "balanced_accuracy", "epsilon_gdp"} <= set(summary[0])


def test_the_engine_attacks_a_snapshot_like_a_run(snap_run):
    """at_snapshot(e) attacked directly gives the numbers the engine reports for epoch e (same candidates, noise)."""
    run = Run.load(snap_run)
    settings = MembershipSettings(n_boot=0)
    whole = run_membership(run, ("loss",), ("client",), settings)
    direct = run_membership(run.at_snapshot(2), ("loss",), ("client",), settings)
    assert direct.snapshots == {}  # a snapshot is not snapshotted again
    for key in ("client_0", "client_1"):
        a, b = whole.snapshots[2][key].attacks["loss"], direct.targets[key].attacks["loss"]
        assert a.metrics == b.metrics and a.step_aucs == b.step_aucs
