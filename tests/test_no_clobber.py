"""Nothing half-written, nothing clobbered (issue 11 item 6): SIGTERM during train, stale partials of dead
processes, attack reports that would overwrite the user's files, and the helpers of collafuse.fsutil.

The audit's lock and its sweep of the cache are tested in test_audit_resume.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from collafuse import fsutil
from collafuse.cli import main
from collafuse.errors import CollafuseError, ConfigError


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: no process has this id now
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- fsutil

@pytest.mark.parametrize("name, pid", [
    (".run.partial-123", 123), (".0123abcd.partial-42", 42), (".m_roc_server.partial-55.png", 55),
    (".results.json.partial-7", 7), ("run.partial-1", None), (".x.partial-abc", None), (".x.partial-", None),
    (".partial-3", None), ("report.html", None),
])
def test_partial_names_give_their_writers_pid(name, pid):
    assert fsutil.partial_pid(name) == pid


def test_pid_alive_tells_live_dead_and_zombie_processes_apart(live_pid):
    assert fsutil.pid_alive(os.getpid()) and fsutil.pid_alive(live_pid)
    assert not fsutil.pid_alive(dead_pid())
    assert not fsutil.pid_alive(0) and not fsutil.pid_alive(-1) and not fsutil.pid_alive(2**40)
    zombie = subprocess.Popen(["true"])  # exited, not reaped yet
    deadline = time.monotonic() + 10
    while fsutil.pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not fsutil.pid_alive(zombie.pid)
    zombie.wait()


def test_sweep_removes_only_dead_writers_partials_down_to_its_depth(tmp_path, live_pid):
    dead = dead_pid()
    stale_dir = tmp_path / f".run.partial-{dead}"
    (stale_dir / "sub").mkdir(parents=True)
    stale_file = tmp_path / f".x.json.partial-{dead}"
    stale_file.write_text("{")
    busy = tmp_path / f".other.partial-{live_pid}"
    busy.mkdir()
    mine = tmp_path / f".mine.partial-{os.getpid()}"
    mine.write_text("")
    deep = tmp_path / "a" / "b" / f".y.partial-{dead}.png"
    deep.parent.mkdir(parents=True)
    deep.write_text("")
    kept = tmp_path / "run.partial-1"  # not a hidden temporary: never touched
    kept.write_text("")
    removed = fsutil.sweep_stale_partials(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert busy.is_dir() and mine.is_file() and kept.is_file() and deep.is_file()
    assert fsutil.sweep_stale_partials(tmp_path, depth=2) == [deep]
    assert fsutil.sweep_stale_partials(tmp_path / "missing") == []


def test_probe_writable_leaves_nothing_and_names_the_option(tmp_path):
    fsutil.probe_writable(tmp_path / "new" / "deeper", "--out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--cache .* is not a folder"):
        fsutil.probe_writable(tmp_path / "file", "--cache")
    with pytest.raises(ConfigError, match="--cache .* not writable"):
        fsutil.probe_writable(tmp_path / "file" / "below", "--cache")


def test_the_lock_is_exclusive_stale_locks_are_taken_over_and_only_ones_own_is_released(tmp_path, live_pid, capsys):
    lock = tmp_path / ".lock"
    with fsutil.folder_lock(tmp_path, "audit folder"):
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname(), fsutil.process_start(os.getpid())]
        fsutil.acquire_lock(tmp_path)  # re-entering in the same process is fine
    assert not lock.exists()
    lock.write_text(f"{live_pid}\n")
    with pytest.raises(fsutil.LockedError, match=f"pid {live_pid}"):
        fsutil.acquire_lock(tmp_path, "audit folder")
    fsutil.release_lock(tmp_path)  # not ours: kept
    assert lock.read_text() == f"{live_pid}\n"
    lock.write_text(f"{live_pid} some-other-host\n")
    with pytest.raises(fsutil.LockedError, match="on host some-other-host"):
        fsutil.acquire_lock(tmp_path)
    lock.write_text(f"{live_pid} {socket.gethostname()} {fsutil.process_start(live_pid)}\n")
    with pytest.raises(fsutil.LockedError, match=f"pid {live_pid}"):
        fsutil.acquire_lock(tmp_path)
    reused = f"{live_pid} {socket.gethostname()} 1\n"  # the pid is alive, but it started after the lock was taken
    for stale in (f"{dead_pid()}\n", "garbage", reused):
        lock.write_text(stale)
        capsys.readouterr()
        with fsutil.folder_lock(tmp_path):
            assert lock.read_text().split()[0] == str(os.getpid())
        assert "taking over the stale lock" in capsys.readouterr().err
        assert not lock.exists()


def test_a_lock_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(fsutil.LockedError, match="not a lock file"):
        fsutil.acquire_lock(tmp_path)
    assert (tmp_path / ".lock").is_dir()


def test_the_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt), fsutil.folder_lock(tmp_path):
        raise KeyboardInterrupt
    assert not (tmp_path / ".lock").exists()


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(fsutil.Terminated), fsutil.sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
    assert signal.getsignal(signal.SIGTERM) == before


def test_publish_no_clobber_never_replaces_an_existing_file(tmp_path):
    tmp, dest = tmp_path / ".a.partial-1", tmp_path / "a.png"
    tmp.write_text("new")
    fsutil.publish_no_clobber(tmp, dest)
    assert dest.read_text() == "new" and not tmp.exists()
    tmp.write_text("newer")
    with pytest.raises(CollafuseError, match="already exists"):
        fsutil.publish_no_clobber(tmp, dest)
    assert dest.read_text() == "new" and not tmp.exists()


# ----------------------------------------------------------------------------- train

def _config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(**overrides)))
    return path


def test_sigterm_during_train_leaves_no_partial_and_exits_143(tmp_path):
    """The default action of SIGTERM killed the process with .run.partial-<pid>/ left behind; now SIGTERM
    raises Terminated, create_run's clean-up removes the staging folder and the exit code is 143 (128 + 15)."""
    config = _config(tmp_path, training={"epochs": 400})
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "collafuse.cli", "train", "--config", str(config),
                             "--out", str(runs / "run"), "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(runs.glob(".run.partial-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(1.0)  # well inside the training loop
    assert list(runs.glob(f".run.partial-{proc.pid}/train_log.jsonl"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == fsutil.EXIT_TERMINATED == 143, err[-2000:]
    assert err.count("\n") == 1 and "terminated (SIGTERM); nothing was written" in err
    assert list(runs.iterdir()) == []


def test_train_sweeps_stale_partials_of_dead_processes_in_the_run_folders_parent(tmp_path, live_pid, capsys):
    runs = tmp_path / "runs"
    stale = runs / f".older-run.partial-{dead_pid()}"
    (stale / "checkpoints").mkdir(parents=True)
    busy = runs / f".busy-run.partial-{live_pid}"
    busy.mkdir()
    rc = main(["train", "--config", str(_config(tmp_path)), "--out", str(runs / "run"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert not stale.exists() and busy.is_dir() and (runs / "run" / "run.json").is_file()


# ----------------------------------------------------------------------------- attack reports

@pytest.mark.parametrize("existing", ["m_roc_server.png", "m_steps_client_1.png", "m_roc_samples_0.png",
                                      "m_roc_payload.png"])
def test_attack_membership_refuses_to_overwrite_a_users_png_before_any_work(tiny_runs, tmp_path, capsys,
                                                                            monkeypatch, existing):
    from collafuse.attacks.membership import command

    run = tiny_runs["cut"]
    (tmp_path / existing).write_bytes(b"the user's own figure")
    monkeypatch.setattr(command, "run_membership", lambda *a, **k: pytest.fail("work started"))
    rc = main(["attack", "membership", "--run", str(run), "--out", str(tmp_path / "m.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("collafuse: error:")
    assert existing in err and "would be overwritten" in err
    assert (tmp_path / existing).read_bytes() == b"the user's own figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_attack_membership_other_names_beside_the_report_do_not_block(tmp_path):
    from collafuse.attacks.membership.command import _resolve_out

    for name in ("other_roc_server.png", "m_roc_server.txt", "m.png", "[m]_roc_server.png"):
        (tmp_path / name).write_text("x")
    assert _resolve_out(tmp_path, str(tmp_path / "m.json")) == tmp_path / "m.json"
    with pytest.raises(CollafuseError, match=r"\[m\]_roc_server.png"):
        _resolve_out(tmp_path, str(tmp_path / "[m].json"))  # glob characters in the name are literal


@pytest.mark.parametrize("existing", ["r.png", "r.per_image.npz", "r.json"])
def test_attack_reconstruct_refuses_to_overwrite_before_any_work(tiny_runs, tmp_path, capsys, monkeypatch, existing):
    from collafuse.attacks.reconstruction import command

    (tmp_path / existing).write_bytes(b"the user's own file")
    monkeypatch.setattr(command, "reconstruct_run", lambda *a, **k: pytest.fail("work started"))
    rc = main(["attack", "reconstruct", "--run", str(tiny_runs["cut"]), "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and existing in err and "already exists" in err
    assert (tmp_path / existing).read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
