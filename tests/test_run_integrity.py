"""A run folder changed after it was written is refused (issue 11, item 3).

run.json records the sha256 of every other file; ``Run.load`` checks them (transcript
shards when they are read, the source data when a scorer opens it) and refuses NaN/inf
weights. Through the CLI: one line on stderr, exit 2, nothing written.
"""
import hashlib
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from collafuse.cli import main
from collafuse.errors import RunError
from collafuse.runs import RUN_MARKER, Run
from collafuse.transcript import ServerView

EXPECTED = ("config.yaml", "train_log.jsonl", "samples.png", "data.safetensors", "audit_key.safetensors",
            "transcript/index.json", "checkpoints/server.safetensors", "checkpoints/client_0.safetensors",
            "checkpoints/client_1.safetensors")


@pytest.fixture
def run_copy(tmp_path, tiny_runs):
    """A private copy of the shared tiny run, free to be tampered with."""
    path = tmp_path / "run"
    shutil.copytree(tiny_runs["cut"], path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _info(run_dir) -> dict:
    return json.loads((run_dir / RUN_MARKER).read_text())


def _rehash(run_dir, rel: str) -> None:
    """Tamper as a careful attacker would: update run.json's record of ``rel`` too."""
    info = _info(run_dir)
    info["files"][rel] = _sha(run_dir / rel)
    (run_dir / RUN_MARKER).write_text(json.dumps(info))


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("collafuse: error:") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def test_run_json_records_the_hash_of_every_other_file(tiny_runs):
    run_dir = tiny_runs["cut"]
    files = _info(run_dir)["files"]
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()} - {RUN_MARKER}
    assert set(files) == on_disk
    assert set(EXPECTED) <= set(files)
    assert any(rel.startswith("transcript/") and rel != "transcript/index.json" for rel in files)  # the shards
    for rel, digest in files.items():
        assert digest == _sha(run_dir / rel), rel
    Run.load(run_dir)  # an untouched run loads


def test_edited_config_is_refused_by_sample_and_membership(run_copy, tmp_path, capsys):
    cfg_path = run_copy / "config.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["diffusion"]["T"] = 40  # a plausible edit: still a valid config, but not what was trained
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out_png, out_json = tmp_path / "s.png", tmp_path / "m.json"
    err = _one_line_exit_2(capsys, ["sample", "--run", str(run_copy), "-n", "2", "--out", str(out_png), "--quiet"])
    assert "config.yaml was changed after the run was written" in err
    err = _one_line_exit_2(capsys, ["attack", "membership", "--run", str(run_copy), "--attacks", "loss",
                                    "--targets", "server", "--out", str(out_json), "--quiet"])
    assert "config.yaml was changed" in err
    assert not out_png.exists() and not out_json.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_config_edited_with_its_hash_updated_is_caught_by_the_metadata(run_copy):
    cfg_path = run_copy / "config.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["diffusion"]["T"] = 40
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    _rehash(run_copy, "config.yaml")
    with pytest.raises(RunError, match="run.json says T = 50 but config.yaml says T = 40"):
        Run.load(run_copy)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_with_a_recomputed_hash_are_refused(run_copy, tmp_path, capsys, value):
    rel = "checkpoints/client_1.safetensors"
    state = load_file(str(run_copy / rel))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    save_file(state, str(run_copy / rel))
    _rehash(run_copy, rel)  # the hash check passes: only the weights check can catch it
    with pytest.raises(RunError, match=r"client_1\.safetensors holds NaN/inf weights"):
        Run.load(run_copy)
    err = _one_line_exit_2(capsys, ["sample", "--run", str(run_copy), "-n", "2", "--out", str(tmp_path / "s.npz")])
    assert "checkpoints/client_1.safetensors holds NaN/inf weights" in err and name in err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("rel", ["samples.png", "audit_key.safetensors", "checkpoints/server.safetensors",
                                 "train_log.jsonl", "data.safetensors"])
def test_a_missing_file_is_named(run_copy, rel):
    (run_copy / rel).unlink()
    with pytest.raises(RunError, match=f"{rel} is missing"):
        Run.load(run_copy)


@pytest.mark.parametrize("rel", ["samples.png", "audit_key.safetensors", "train_log.jsonl",
                                 "transcript/index.json"])
def test_a_changed_file_is_named(run_copy, rel):
    path = run_copy / rel
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(RunError, match=f"{rel} was changed after the run was written"):
        Run.load(run_copy)


def test_transcript_shards_are_checked_once_when_read(run_copy, capsys, tmp_path):
    shard = next(p for p in sorted((run_copy / "transcript").glob("*.safetensors")))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    run = Run.load(run_copy)  # not hashed at load: the server view checks it against the index on read
    with pytest.raises(RunError, match="hash mismatch"):
        ServerView.open(run.path).load()
    _one_line_exit_2(capsys, ["attack", "reconstruct", "--run", str(run_copy), "--attacks", "rescale",
                              "--out", str(tmp_path / "r.json"), "--quiet"])
    # Changing the index to match the altered shard is caught at load (the index's hash is checked there).
    index = json.loads((run_copy / "transcript" / "index.json").read_text())
    for entry in index["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = _sha(shard)
    (run_copy / "transcript" / "index.json").write_text(json.dumps(index, indent=1))
    with pytest.raises(RunError, match="transcript/index.json was changed"):
        Run.load(run_copy)


def test_source_data_is_checked_when_a_scorer_opens_it(run_copy):
    path = run_copy / "data.safetensors"
    state = load_file(str(path))
    state["images"] = torch.flip(state["images"], dims=[0]).contiguous()  # same shape, other ground truth
    save_file(state, str(path), metadata={"num_classes": "10"})
    run = Run.load(run_copy)
    with pytest.raises(RunError, match="data.safetensors was changed"):
        run.load_data()


def test_a_run_folder_from_before_the_hand_off_step_had_its_name_still_opens(run_copy):
    info = _info(run_copy)
    info["t_c"] = info.pop("t_hand")  # older run.json files called the hand-off step t_c
    (run_copy / RUN_MARKER).write_text(json.dumps(info))
    assert Run.load(run_copy).t_hand == info["t_c"]


def test_a_run_without_file_hashes_is_refused_as_older(run_copy, capsys, tmp_path):
    info = _info(run_copy)
    del info["files"]
    (run_copy / RUN_MARKER).write_text(json.dumps(info))
    err = _one_line_exit_2(capsys, ["sample", "--run", str(run_copy), "-n", "2", "--out", str(tmp_path / "s.png")])
    assert "written by an older collafuse; re-train it" in err


@pytest.mark.parametrize("edit, message", [
    (lambda info: info.pop("has_server"), "run.json lacks 'has_server'"),
    (lambda info: info.update(t_hand=999), "t_hand = 999 is outside"),
    (lambda info: info.update(t_c=info.pop("t_hand") + 999), "t_hand = 1009 is outside"),  # an older run folder's key
    (lambda info: info.update(num_clients=3), "run.json says 3 clients"),
    (lambda info: info["files"].update({"../outside.txt": "0" * 64}), "outside the run folder"),
    (lambda info: info["files"].pop("config.yaml"), "records no hash for config.yaml"),
])
def test_bad_run_json_is_one_line(run_copy, capsys, tmp_path, edit, message):
    info = _info(run_copy)
    edit(info)
    (run_copy / RUN_MARKER).write_text(json.dumps(info))
    err = _one_line_exit_2(capsys, ["sample", "--run", str(run_copy), "-n", "2", "--out", str(tmp_path / "s.png")])
    assert message in err
