"""Bad input: one clear line on stderr, exit code 2, nothing written (DESIGN §8)."""
import builtins
import errno
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from collafuse.cli import main

from conftest import tiny_config_dict


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_train(tmp_path, capsys, raw: dict | None = None, text: str | None = None, precreate: bool = False):
    cfg = tmp_path / "config.yaml"
    if text is not None:
        cfg.write_text(text)
    else:
        _write_config(tmp_path, raw)
    out = tmp_path / "run"
    if precreate:
        out.mkdir()
    code = main(["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    return code, err, out


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _digits_like(n=64, size=8, channels=None, nan=False, dtype=np.float32):
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    images = rng.random(shape).astype(dtype)
    if nan:
        images[3, 2, 2] = np.nan
    return images


BAD_CASES = {
    "unknown key": (lambda tmp: {**tiny_config_dict(), "epochz": 3}, "unknown config key 'epochz'"),
    "unknown nested key": (
        lambda tmp: tiny_config_dict(training={"epochs": 1, "lr_schedule": "cos"}),
        "unknown config key 'training.lr_schedule'",
    ),
    "cut ratio above 1": (lambda tmp: tiny_config_dict(diffusion={"cut_ratio": 1.5}), "diffusion.cut_ratio"),
    "cut ratio below 0": (lambda tmp: tiny_config_dict(diffusion={"cut_ratio": -0.1}), "diffusion.cut_ratio"),
    "T below 2": (lambda tmp: tiny_config_dict(diffusion={"T": 1}), "diffusion.T"),
    "more clients than images": (
        lambda tmp: tiny_config_dict(data={"n_members": 3, "num_clients": 5}),
        "more clients (5) than member images (3)",
    ),
    "unknown payload kind": (lambda tmp: tiny_config_dict(training={"payload": "raw"}), "training.payload"),
    "missing data folder": (
        lambda tmp: tiny_config_dict(data={"source": "folder", "path": str(tmp / "nope")}),
        "image folder not found",
    ),
    "npz without images": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, pictures=_digits_like())), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "has no 'images' array",
    ),
    "NaN pixels": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like(nan=True))), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "NaN pixels",
    ),
    "wrong channel count": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like(channels=3))), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "3 channel(s) but the config says channels=1",
    ),
    "pixels out of range": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like() * 5)), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "must lie in [0, 1]",
    ),
    "corrupt npz": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str((tmp / "bad.npz").write_bytes(b"not a zip") and tmp / "bad.npz"),
                  "image_size": 8, "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "not a readable .npz",
    ),
    "splits larger than the data": (
        lambda tmp: tiny_config_dict(data={"n_members": 1700, "n_nonmembers": 200, "n_aux": 0}),
        "the data has 1797 images",
    ),
    "conditional on unlabelled data": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like())), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
        ),
        "conditional: true needs labelled data",
    ),
    "image size not divisible": (lambda tmp: tiny_config_dict(data={"image_size": 15}), "image_size 15"),
    "negative learning rate": (lambda tmp: tiny_config_dict(training={"lr": -1}), "training.lr"),
    "unknown schedule": (lambda tmp: tiny_config_dict(diffusion={"schedule": "sigmoid"}), "diffusion.schedule"),
    "trajectory with one server step": (
        lambda tmp: tiny_config_dict(diffusion={"T": 50, "cut_ratio": 0.98}, training={"payload": "trajectory"}),
        "at least 2 steps",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("precreate", [False, True])
def test_bad_config_exit_2_and_nothing_written(case, precreate, tmp_path, capsys):
    make, message = BAD_CASES[case]
    code, err, out = _run_train(tmp_path, capsys, raw=make(tmp_path), precreate=precreate)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    if precreate:
        assert out.is_dir() and list(out.iterdir()) == []  # the user's empty folder stays as it was
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_invalid_yaml(tmp_path, capsys):
    code, err, out = _run_train(tmp_path, capsys, text="data: [unclosed\n")
    assert code == 2 and "not valid YAML" in err and not out.exists()


def test_missing_config_file(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")])
    assert code == 2 and "config file not found" in capsys.readouterr().err


def test_refuses_non_empty_output(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = _write_config(tmp_path, tiny_config_dict())
    code = main(["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_sample_bad_inputs(tmp_path, capsys, tiny_runs):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert main(["sample", "--run", str(not_a_run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 2
    assert "not a collafuse run folder" in capsys.readouterr().err
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "4", "--out", str(tmp_path / "s.gif")]) == 2
    assert "--out must end in .png or .npz" in capsys.readouterr().err
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "0", "--out", str(tmp_path / "s.png")]) == 2
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "4", "--client", "9", "--out", str(tmp_path / "s.png")]) == 2
    assert not (tmp_path / "s.png").exists()


def test_corrupt_checkpoint_is_refused(tmp_path, capsys, tiny_runs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_runs["cut"], broken)
    ckpt = broken / "checkpoints" / "server.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["sample", "--run", str(broken), "-n", "2", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err  # caught by the file hashes in run.json before it is parsed
    assert "checkpoints/server.safetensors was changed after the run was written" in err and err.count("\n") == 1
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------- issue 11, items 5 and 8



def _one_error_line(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: "), err[-3000:]
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, names in os.walk(root):
        out[folder] = (-1, -1)
        for name in names:
            st = os.stat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def _feed_fifo(path: Path, text: str) -> threading.Thread:
    os.mkfifo(path)

    def write():
        with open(path, "w") as f:
            f.write(text)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_config_from_a_pipe_is_read(tmp_path, capsys):
    """`--config <(...)` is a pipe, not a regular file: it is read, not called "not found"."""
    from collafuse.config import load_config

    fifo = tmp_path / "config.fifo"
    thread = _feed_fifo(fifo, yaml.safe_dump(tiny_config_dict(training={"epochs": 3})))
    assert load_config(fifo).training.epochs == 3
    thread.join(5)
    fifo2 = tmp_path / "bad.fifo"
    thread = _feed_fifo(fifo2, yaml.safe_dump({**tiny_config_dict(), "epochz": 3}))
    assert main(["train", "--config", str(fifo2), "--out", str(tmp_path / "run")]) == 2
    assert "unknown config key 'epochz'" in _one_error_line(capsys.readouterr().err)
    thread.join(5)
    assert not (tmp_path / "run").exists()


def test_grid_and_policy_from_a_pipe_are_read(tmp_path):
    from collafuse.benchmarks.audit.grid import load_grid
    from collafuse.benchmarks.audit.policy import load_policy

    thread = _feed_fifo(tmp_path / "grid.fifo", "payload_curve: {cut_ratios: [0.2], attacks: [rescale]}\n")
    assert len(load_grid(tmp_path / "grid.fifo").cells()) == 1
    thread.join(5)
    thread = _feed_fifo(tmp_path / "policy.fifo", "limits: {T1: {auc: {max: 0.6}}}\n")
    assert load_policy(tmp_path / "policy.fifo").limits[0].bound == 0.6
    thread.join(5)


@pytest.mark.parametrize("argv, phrase", [
    ([], "required: command"),
    (["train"], "required: --out"),
    (["sample", "--run", "r", "-n", "abc", "--out", "s.png"], "invalid int value: 'abc'"),
    (["attack"], "attack_kind"),
    (["attack", "reconstruct", "--run", "r", "--bogus"], "unrecognized arguments: --bogus"),
    (["audit", "--out", "a", "--jobs", "x"], "--jobs"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line(argv, phrase, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert phrase in line and "--help" in line


def test_help_still_prints_usage_and_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0 and "usage: collafuse train" in capsys.readouterr().out


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_sample_refuses_a_seed_out_of_range(seed, tmp_path, capsys, tiny_runs):
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "2", "--seed", seed, "--out", str(tmp_path / "s.png")]) == 2
    assert "--seed must be in 0..2**63-1" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section, key, value, accepted", [
    ("training", "epochs", True, False),
    ("training", "epochs", "2", False),
    ("training", "epochs", 2.0, False),
    ("training", "lr", "0.01", False),
    ("training", "lr", True, False),
    ("training", "lr", 1, True),            # an integer is a fine float
    ("diffusion", "cut_ratio", 0, True),
    ("data", "n_members", "128", False),
    (None, "conditional", "yes", False),
    (None, "conditional", 1, False),
    (None, "seed", -1, False),
    (None, "seed", 2**63, False),
])
def test_config_scalars_are_strict(section, key, value, accepted):
    from collafuse.config import config_from_dict
    from collafuse.errors import ConfigError

    raw = tiny_config_dict(**({section: {key: value}} if section else {key: value}))
    if accepted:
        config_from_dict(raw)
    else:
        with pytest.raises(ConfigError, match=key):
            config_from_dict(raw)


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    text = yaml.safe_dump(tiny_config_dict()) + "seed: 7\n"
    code, err, out = _run_train(tmp_path, capsys, text=text)
    assert code == 2 and "duplicate key 'seed'" in _one_error_line(err) and not out.exists()


def test_yaml_merge_keys_still_work(tmp_path):
    from collafuse.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("server_model: &m {channels: [8, 16], time_dim: 16}\nclient_model:\n  <<: *m\n  time_dim: 32\n")
    cfg = load_config(path)
    assert cfg.client_model.channels == (8, 16) and cfg.client_model.time_dim == 32


def test_alias_bomb_is_refused_fast_with_a_short_line(tmp_path, capsys):
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    assert len(bomb) < 600
    started = time.perf_counter()
    code, err, out = _run_train(tmp_path, capsys, text=bomb)
    assert time.perf_counter() - started < 5
    line = _one_error_line(err)
    assert code == 2 and "aliases are expanded" in line and len(line) < 400 and not out.exists()


@pytest.mark.parametrize("text, phrase", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage" * 10, "not UTF-8 text"),
    ("a: " + "[" * 3000 + "]" * 3000, "nested deeper than"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("data: " + "x" * (2 << 20), "larger than"),
])
def test_garbage_configs_are_one_line(text, phrase, tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert phrase in _one_error_line(capsys.readouterr().err)


def test_long_user_values_are_not_echoed_in_full(tmp_path, capsys):
    code, err, out = _run_train(tmp_path, capsys, raw=tiny_config_dict(training={"epochs": "9" * 100_000}))
    line = _one_error_line(err)
    assert code == 2 and "training.epochs" in line and len(line) < 500 and not out.exists()


@pytest.mark.parametrize("kind, flag", [("reconstruct", "--attacks"), ("membership", "--attacks"),
                                        ("membership", "--targets")])
def test_empty_name_lists_are_refused(kind, flag, tmp_path, capsys, tiny_runs):
    out = tmp_path / "r.json"
    assert main(["attack", kind, "--run", str(tiny_runs["cut"]), flag, "", "--out", str(out), "--quiet"]) == 2
    assert "empty" in _one_error_line(capsys.readouterr().err) and not out.exists()


# ---- full or read-only disks: one line, exit 2, nothing half-written


def _refuse_writes(monkeypatch, match, code=errno.ENOSPC):
    """Make every write-open of a path for which ``match(path)`` holds fail as a full (or read-only) disk would."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") and match(Path(file)):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize("victim", ["train_log.jsonl", "samples.png", "index.json"])
def test_full_disk_during_train_leaves_nothing(victim, tmp_path, capsys, monkeypatch):
    cfg = _write_config(tmp_path, tiny_config_dict(training={"epochs": 1}))
    before = _files(tmp_path)
    _refuse_writes(monkeypatch, lambda p: p.name == victim)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write to {tmp_path / 'run'}: No space left on device; nothing was written" in line
    assert _files(tmp_path) == before  # no run, no staging folder


def test_read_only_output_for_sample_and_attack(tmp_path, capsys, monkeypatch, tiny_runs):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    _refuse_writes(monkeypatch, lambda p: out_dir in p.parents, errno.EROFS)
    before = _files(tmp_path)
    for target, argv in (
            (out_dir / "new" / "s.png", ["sample", "--run", str(tiny_runs["cut"]), "-n", "2", "--quiet", "--out"]),
            (out_dir / "s.npz", ["sample", "--run", str(tiny_runs["cut"]), "-n", "2", "--quiet", "--out"]),
            (out_dir / "rec.json", ["attack", "reconstruct", "--run", str(tiny_runs["cut"]), "--attacks", "rescale",
                                    "--quiet", "--out"])):
        assert main([*argv, str(target)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"cannot write to {target}: Read-only file system" in line
        assert _files(tmp_path) == before  # no partial file, not even the new parent folder


def test_full_disk_message_for_safetensors_errors():
    from safetensors import SafetensorError

    from collafuse.cli import _write_error

    exc = SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/x/run/.tmpAb12"')
    assert _write_error(exc) == ("cannot write to", "/x/run", "No space left on device")
    assert _write_error(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert _write_error(OSError(errno.ENOENT, "No such file or directory")) is None


AUDIT_GRID = """
base:
  device: cpu
  data: {image_size: 8, n_members: 32, n_nonmembers: 16, n_aux: 16, num_clients: 2}
  diffusion: {T: 20}
  server_model: {channels: [8, 16], time_dim: 16}
  client_model: {channels: [8, 16], time_dim: 16}
  training: {epochs: 1, batch_size: 16}
payload_curve: {cut_ratios: [0.2], attacks: [rescale]}
"""


def test_full_disk_during_audit_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    grid, policy = tmp_path / "grid.yaml", tmp_path / "policy.yaml"
    grid.write_text(AUDIT_GRID)
    policy.write_text("limits:\n  T1: {mse: {min: 0.0}}\n")
    out = tmp_path / "audit"
    argv = ["audit", "--config", str(grid), "--policy", str(policy), "--out", str(out), "--cache", str(tmp_path / "c"),
            "--jobs", "1", "--quiet"]
    with monkeypatch.context() as m:  # the disk fills up while the report is written
        _refuse_writes(m, lambda p: p.name.startswith(".report.html"))
        assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "run the same command again to resume" in line
    assert not [p for p in out.rglob("*") if "partial" in p.name]
    assert not (out / "report.html").exists()
    assert main(argv) == 0  # space freed: the same command resumes and writes the report
    assert "0 cells computed, 1 reused" in capsys.readouterr().out and (out / "report.html").is_file()


def test_read_only_audit_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path as P

    grid, policy = tmp_path / "grid.yaml", tmp_path / "policy.yaml"
    grid.write_text(AUDIT_GRID)
    policy.write_text("limits:\n  T1: {mse: {min: 0.0}}\n")
    real_mkdir = P.mkdir

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "ro" or tmp_path / "ro" in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(P, "mkdir", mkdir)
    before = _files(tmp_path)
    assert main(["audit", "--config", str(grid), "--policy", str(policy), "--out", str(tmp_path / "ro" / "audit"), "--cache",
                 str(tmp_path / "c"), "--jobs", "1", "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot write to" in line and "Read-only file system" in line
    assert _files(tmp_path) == before


# ---- the server view: a garbage index and a NaN shard whose hash matches are refused


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"[" * 50_000, b"[]", b'{"format": 1}',
                                     b'{"format": 1, "payload_kind": "cut", "rows": -3, "wire_bytes": 0, "shards": []}',
                                     b'{"format": true, "payload_kind": "cut", "rows": 0, "wire_bytes": 0, "shards": []}'])
def test_garbage_transcript_index_is_a_run_error(content, tmp_path, tiny_runs):
    from collafuse.errors import RunError
    from collafuse.transcript import ServerView

    run = _copy_run(tiny_runs["cut"], tmp_path / "run")
    (run / "transcript" / "index.json").write_bytes(content)
    with pytest.raises(RunError, match="index.json"):
        ServerView.open(run)


def test_shard_outside_the_transcript_folder_is_refused(tmp_path, tiny_runs):
    from collafuse.errors import RunError
    from collafuse.transcript import ServerView

    run = _copy_run(tiny_runs["cut"], tmp_path / "run")
    index = json.loads((run / "transcript" / "index.json").read_text())
    index["shards"][0]["file"] = "../checkpoints/server.safetensors"
    (run / "transcript" / "index.json").write_text(json.dumps(index))
    with pytest.raises(RunError, match="shard file name"):
        ServerView.open(run)


def test_nan_shard_with_a_matching_hash_is_refused(tmp_path, tiny_runs):
    from safetensors.torch import load_file, save_file

    from collafuse.errors import RunError
    from collafuse.fsutil import file_sha256 as _sha256
    from collafuse.transcript import ServerView

    run = _copy_run(tiny_runs["cut"], tmp_path / "run")
    index = json.loads((run / "transcript" / "index.json").read_text())
    shard = run / "transcript" / index["shards"][0]["file"]
    tensors = load_file(str(shard))
    tensors["tensor"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(shard))
    index["shards"][0]["sha256"] = _sha256(shard)
    (run / "transcript" / "index.json").write_text(json.dumps(index))
    with pytest.raises(RunError, match="NaN or infinite"):
        ServerView.open(run).load()
