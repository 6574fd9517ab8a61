"""A resumed audit trusts only cell files that verify; the audit folder is locked; stale partials are swept
(issue 11 items 4 and 6).

A tiny payload-only grid (3 cells, no training, about a second each) is audited once per module in
process (``collafuse.cli.main``); each test copies that folder, damages it and resumes.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collafuse.cli import main

GRID = {
    "base": {"device": "cpu", "data": {"image_size": 8, "n_members": 64, "n_nonmembers": 32, "n_aux": 32,
                                        "num_clients": 2},
             "diffusion": {"T": 50}, "server_model": {"channels": [8, 16], "time_dim": 16},
             "client_model": {"channels": [8, 16], "time_dim": 16}, "training": {"epochs": 1, "batch_size": 32},
             "sampling": {"steps": 5, "per_client": 2}},
    "payload_curve": {"cut_ratios": [0.3, 0.6, 0.9], "epochs": 1, "attacks": ["rescale", "oracle"]},
}
POLICY = {"limits": {"T1": {"reid_pool": {"max": 0.5}}}}
CELLS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume-inputs")
    (root / "grid.yaml").write_text(yaml.safe_dump(GRID))
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    return root / "grid.yaml", root / "policy.yaml"


def audit(files, out: Path, cache: Path, capsys) -> tuple[int, str, str]:
    grid, policy = files
    rc = main(["audit", "--config", str(grid), "--policy", str(policy), "--out", str(out), "--cache", str(cache),
               "--jobs", "1", "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume-base") / "audit"
    grid, policy = files
    rc = main(["audit", "--config", str(grid), "--policy", str(policy), "--out", str(out),
               "--cache", str(out.parent / "cache"), "--jobs", "1", "--quiet"])
    assert rc in (0, 1)
    assert len(list((out / "cells").glob("*.json"))) == CELLS
    return out


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    out = tmp_path / "audit"
    shutil.copytree(finished, out)
    return out


def cell_files(out: Path) -> list[Path]:
    return sorted((out / "cells").glob("*.json"))


def rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


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


# ----------------------------------------------------------------------------- item 4: verified cells

def test_cell_files_name_their_hash_and_carry_a_content_hash(finished):
    from collafuse.benchmarks.audit.runner import content_hash

    for path in cell_files(finished):
        record = json.loads(path.read_text())
        assert record["config_hash"] == path.stem
        assert record["content_sha256"] == content_hash(record)
        assert set(record["artifact_sha256"]) == set(record["artifacts"])


def test_a_clean_resume_reuses_every_cell_without_warnings(copy, files, tmp_path, capsys):
    rc, out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc in (0, 1) and f"0 cells computed, {CELLS} reused" in out
    assert "warning" not in err


def _edit_value(path: Path) -> None:
    record = json.loads(path.read_text())
    row = next(r for r in record["rows"] if r["threat"] == "T1" and r["metric"] == "reid_pool")
    row["value"] = 0.0  # a hand edit that would make a leaking cell pass
    path.write_text(json.dumps(record, indent=1))


def _nan_row(path: Path) -> None:
    record = json.loads(path.read_text())
    for r in record["rows"]:
        if r["threat"] == "T1":
            r["value"] = math.nan
    path.write_text(json.dumps(record, indent=1))  # json writes NaN; json.loads reads it back as nan


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _old_format(path: Path) -> None:
    record = json.loads(path.read_text())
    for key in ("content_sha256", "artifact_sha256", "config_hash"):
        record.pop(key)
    path.write_text(json.dumps(record, indent=1))


def _artifact_changed(path: Path) -> None:
    record = json.loads(path.read_text())
    (path.parent.parent / record["artifacts"]["reconstructions.png"]).write_bytes(b"not the grid")


def _artifact_missing(path: Path) -> None:
    record = json.loads(path.read_text())
    (path.parent.parent / record["artifacts"]["reconstructions.png"]).unlink()


def _binary(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize("damage, reason", [
    (_edit_value, "content hash does not match"),
    (_nan_row, "is not finite"),
    (_truncate, "not valid JSON"),
    (_binary, "not valid JSON"),
    (_old_format, "names no config hash"),
    (_artifact_changed, "was changed after it was written"),
    (_artifact_missing, "missing"),
])
def test_a_cell_file_that_does_not_verify_is_recomputed_with_a_warning(copy, finished, files, tmp_path, capsys,
                                                                         damage, reason):
    victim = cell_files(copy)[1]
    damage(victim)
    rc, out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc in (0, 1), err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(victim) in warnings[0] and reason in warnings[0], err
    assert f"1 cells computed (1 because their cell file did not verify), {CELLS - 1} reused" in out
    assert rows(copy) == rows(finished)  # recomputed to the same numbers: the damage is gone
    from collafuse.benchmarks.audit.runner import check_cell

    assert check_cell(copy, victim.stem)[1] is None  # rewritten: it verifies again


def test_a_cell_file_swapped_with_another_cells_is_recomputed(copy, finished, files, tmp_path, capsys):
    a, b = cell_files(copy)[:2]
    shutil.copyfile(a, b)  # b's name, a's content: a valid file of the wrong cell
    rc, out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc in (0, 1), err
    assert str(b) in err and "another cell" in err and str(a) not in err
    assert f"1 cells computed (1 because their cell file did not verify), {CELLS - 1} reused" in out
    assert rows(copy) == rows(finished)


def test_a_cell_path_that_is_a_folder_is_refused_before_any_work(copy, files, tmp_path, capsys, monkeypatch):
    from collafuse.benchmarks.audit import runner

    victim = cell_files(copy)[0]
    victim.unlink()
    victim.mkdir()
    (victim / "x").write_text("keep")
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    monkeypatch.setattr(runner, "compute_cell", lambda *a: pytest.fail("work started"))
    rc, _out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("collafuse: error:")
    assert str(victim) in err and "a folder" in err
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


class _ReadOnly:
    """os.open / os.mkdir refuse every path under ``root`` as a read-only file system (or a folder without
    write permission) would: the tests run as root, where chmod stops nothing."""

    def __init__(self, monkeypatch, root: Path, code: int):
        real_open, real_mkdir = os.open, os.mkdir
        root = str(root)

        def under(path) -> bool:
            p = os.path.abspath(os.fspath(path))
            return p == root or p.startswith(root + os.sep)

        def fake_open(path, flags, *args, **kwargs):
            if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if under(path):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("which", ["out", "cache"])
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_out_or_cache_folder_is_one_line_exit_2_before_any_work(copy, files, tmp_path, capsys,
                                                                              monkeypatch, which, code):
    from collafuse.benchmarks.audit import runner

    cache = tmp_path / "cache"
    cache.mkdir()
    _edit_value(cell_files(copy)[0])  # a cell to recompute: the old code computed it, then failed or went on
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(runner, "compute_cell", lambda *a: pytest.fail("work started"))
    _ReadOnly(monkeypatch, copy if which == "out" else cache, code)
    rc, _out, err = audit(files, copy, cache, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("collafuse: error:"), err
    assert f"--{which}" in err and "not writable" in err and os.strerror(code) in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_new_out_folder_under_a_read_only_parent_is_refused_and_nothing_is_created(files, tmp_path, capsys,
                                                                                       monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _ReadOnly(monkeypatch, ro, errno.EROFS)
    rc, _, err = audit(files, ro / "a" / "b", tmp_path / "cache", capsys)
    assert rc == 2 and err.count("\n") == 1 and "not writable" in err
    assert list(ro.iterdir()) == [] and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- item 6: the lock

def test_a_second_audit_on_a_locked_folder_is_refused(copy, files, tmp_path, capsys, live_pid):
    lock = copy / ".lock"
    lock.write_text(f"{live_pid}\n")
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    _edit_value(cell_files(copy)[0])  # work it would do if it ran
    before[cell_files(copy)[0]] = cell_files(copy)[0].read_bytes()
    rc, _out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("collafuse: error:"), err
    assert f"pid {live_pid}" in err and "in use" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # lock kept, nothing recomputed


def test_a_locked_new_folder_is_refused_as_locked_not_as_a_foreign_folder(files, tmp_path, capsys, live_pid):
    out = tmp_path / "starting"
    out.mkdir()
    (out / ".lock").write_text(f"{live_pid}\n")  # the first audit has locked it but written no cell yet
    rc, _, err = audit(files, out, tmp_path / "cache", capsys)
    assert rc == 2 and "in use" in err and "not an audit" not in err
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_stale_lock_is_taken_over_with_a_warning_and_released(copy, files, tmp_path, capsys):
    pid = dead_pid()
    (copy / ".lock").write_text(f"{pid}\n")
    rc, out, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc in (0, 1), err
    assert "taking over the stale lock" in err and f"process {pid} is no longer running" in err
    assert f"0 cells computed, {CELLS} reused" in out
    assert not (copy / ".lock").exists()


def test_the_lock_is_held_during_the_sweep_and_released_on_error_and_ctrl_c(copy, files, tmp_path, capsys,
                                                                              monkeypatch):
    from collafuse.benchmarks.audit import runner

    _edit_value(cell_files(copy)[0])
    seen = []

    def crash(cell, cache_dir):
        seen.append((copy / ".lock").read_text().split()[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "compute_cell", crash)
    rc, _, err = audit(files, copy, tmp_path / "cache", capsys)
    assert rc == 130 and "interrupted" in err
    assert seen == [str(os.getpid())] and not (copy / ".lock").exists()

    def bug(cell, cache_dir):
        raise RuntimeError("a bug")

    monkeypatch.setattr(runner, "compute_cell", bug)
    with pytest.raises(RuntimeError):
        audit(files, copy, tmp_path / "cache", capsys)
    assert not (copy / ".lock").exists()


# ----------------------------------------------------------------------------- item 6: stale partials

def test_an_audit_start_sweeps_stale_partials_of_dead_processes_only(copy, files, tmp_path, capsys, live_pid):
    dead = dead_pid()
    cache = tmp_path / "cache"
    systems = cache / "systems"
    systems.mkdir(parents=True)
    stale_system = systems / f".0123456789abcdef.partial-{dead}"
    busy_system = systems / f".fedcba9876543210.partial-{live_pid}"
    for folder in (stale_system, busy_system):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "server.safetensors").write_bytes(b"half")
    stale_denoiser = cache / "denoisers" / "attacker-denoiser" / f".abc.safetensors.partial-{dead}"
    stale_denoiser.parent.mkdir(parents=True)
    stale_denoiser.write_bytes(b"half")
    stale_cell = copy / "cells" / f".{cell_files(copy)[0].name}.partial-{dead}"
    stale_cell.write_text("{")
    stale_results = copy / f".results.json.partial-{dead}"
    stale_results.write_text("[")
    busy_report = copy / f".report.html.partial-{live_pid}"
    busy_report.write_text("<")
    rc, _, err = audit(files, copy, cache, capsys)
    assert rc in (0, 1), err
    for gone in (stale_system, stale_denoiser, stale_cell, stale_results):
        assert not gone.exists(), gone
    assert busy_system.is_dir() and busy_report.is_file()  # a live writer's temporaries are kept
