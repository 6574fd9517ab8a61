"""Reference trainings as tasks (issue 23): the cache never holds a partial or unverified model, a key is
trained once however many processes ask, a dead holder's claim is taken over, and the task layer's pieces
(local pool restarts, SLURM options, the command-line options) behave. The real clusters are in
tests/test_scale_out.py."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from collafuse.attacks.membership.references import (
    BUSY, CACHED, JOURNAL, TRAINED, ClientRecipe, ReferenceCache, ReferenceJob, SpoolTasks, ensure_references,
    reference_setup, run_reference_task,
)
from collafuse.errors import ConfigError
from collafuse.model import UNetConfig
from collafuse.tasks import Lease, LocalPool, SlurmOptions, parse_time_minutes


def job(seed: int = 3, n: int = 8) -> ReferenceJob:
    recipe = ClientRecipe(UNetConfig(channels=(8, 16), time_dim=16), "cosine", 50, 10, 1, 8, 1e-3, 0.0, 0.0)
    images = torch.linspace(-1, 1, n * 64).reshape(n, 1, 8, 8)
    return ReferenceJob(recipe, images, None, seed)


def test_a_reference_is_written_atomically_verified_on_load_and_journaled(tmp_path):
    cache = ReferenceCache(tmp_path)
    j = job()
    assert cache.load(j) is None and cache.ensure(j) == TRAINED and cache.ensure(j) == CACHED
    model = cache.load(j)
    assert model is not None and not model.training
    assert [e["key"] for e in cache.trainings()] == [j.key] and (tmp_path / JOURNAL).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{j.key}.safetensors", JOURNAL])  # no lease left
    # another key's file under this key's name, a changed byte, a truncated file: never loaded, trained again
    other = job(seed=4)
    cache.ensure(other)
    good = cache.path(j.key).read_bytes()
    flipped = good[:-9] + bytes([good[-9] ^ 1]) + good[-8:]
    for bad in (cache.path(other.key).read_bytes(), flipped, good[: len(good) // 2]):
        cache.path(j.key).write_bytes(bad)
        assert cache.load(j) is None
        assert cache.ensure(j) == TRAINED and cache.path(j.key).read_bytes() == good  # the same bytes again
    assert len(cache.trainings()) == 5


def test_a_live_claim_is_left_to_its_holder_and_a_dead_one_is_taken_over(tmp_path):
    cache = ReferenceCache(tmp_path)
    j = job()
    lease = Lease.claim(cache.lease_path(j.key))  # this (live) process holds it
    try:
        assert cache.ensure(j, wait=False) == BUSY and not cache.has(j)
    finally:
        lease.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    cache.lease_path(j.key).write_text(json.dumps({"host": os.uname().nodename, "pid": pid, "start": None,
                                                   "nonce": "gone"}))
    partial = cache.path(j.key).with_name(f".{j.key}.safetensors.partial-{pid}")
    partial.write_bytes(b"half a model")  # what a writer killed mid-write leaves
    assert cache.ensure(j, wait=False) == TRAINED
    assert not partial.exists() and not cache.lease_path(j.key).exists() and cache.load(j) is not None


def test_a_lease_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    path = tmp_path / "k.lease"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": None, "nonce": "x"}))
    assert not Lease.read(path).dead()
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert Lease.read(path).dead()
    assert Lease.break_stale(path, Lease.read(path)) and not path.exists()


def test_announced_jobs_reach_a_task_through_the_spool_and_are_trained_once(tmp_path):
    jobs = [job(seed=s) for s in (1, 2)]
    seen = []

    class Recorder(SpoolTasks):
        def announce(self, js, cache):
            seen.extend(j.key for j in js)
            super().announce(js, cache)
            for path in sorted(self.folder.glob("*.job")):  # what a backend's task does with the file
                assert run_reference_task(str(path), str(cache.root)) in (TRAINED, CACHED)

    with reference_setup(tmp_path / "cache", Recorder(tmp_path / "spool")):
        cache = ensure_references(jobs)
    assert seen == [j.key for j in jobs] and {e["key"] for e in cache.trainings()} == set(seen)
    assert len(cache.trainings()) == 2 and cache.root == tmp_path / "cache" / "references"
    assert pickle.loads((tmp_path / "spool" / f"{jobs[0].key}.job").read_bytes()).key == jobs[0].key
    with reference_setup(tmp_path / "cache", Recorder(tmp_path / "spool")):
        ensure_references(jobs)  # all cached: nothing announced, nothing trained
    assert len(seen) == 2 and len(cache.trainings()) == 2


def test_a_local_worker_killed_mid_task_costs_only_a_rerun(tmp_path, capsys):
    from clusters import die_once  # a light module: the worker need not import torch to run it

    pool = LocalPool(2)
    try:
        pool.submit("a", die_once, str(tmp_path / "marker"))
        done = []
        deadline = time.monotonic() + 120
        while not done and time.monotonic() < deadline:
            done = pool.poll(0.5)
    finally:
        pool.close()
    assert [(f.key, f.error) for f in done] == [("a", None)] and done[0].value != os.getpid()
    assert pool.restarts == 1 and "worker process died" in capsys.readouterr().err


def test_slurm_options_from_the_grid_and_the_command_line():
    from collafuse.benchmarks.audit.grid import GridSpec
    from collafuse.benchmarks.audit.runner import slurm_options

    times = (90, "90", "30:30", "1:00:00", "2-0", "1-02:03:04")
    assert [parse_time_minutes(t) for t in times] == [90, 90, 31, 60, 2880, 1564]
    for bad in ("", "x", "-5", "1:2:3:4", 0):
        with pytest.raises(ConfigError):
            parse_time_minutes(bad)
    block = GridSpec.model_validate({"slurm": {"partition": "gpu", "time": "2:00:00", "array_size": 8}}).slurm
    merged = slurm_options(block, partition="debug", time=None, gpus_per_task=1, array_size=None)
    assert merged == SlurmOptions(partition="debug", time_min=120, gpus_per_task=1, array_size=8)
    assert slurm_options() == SlurmOptions()
    with pytest.raises(ConfigError, match="gpus per task"):
        slurm_options(gpus_per_task=-1)
    with pytest.raises(Exception, match="slurm.time"):
        GridSpec.model_validate({"slurm": {"time": "soon"}})
    with pytest.raises(Exception, match="slurm.nodes"):
        GridSpec.model_validate({"slurm": {"nodes": 2}})


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--backend", "spark"], "unknown backend 'spark'"),
])
def test_attack_membership_refuses_bad_jobs_or_backends_in_one_line(tmp_path, capsys, args, message):
    from collafuse.cli import main

    out = tmp_path / "mia.json"
    rc = main(["attack", "membership", "--run", str(tmp_path / "run"), "--attacks", "rmia", "--out", str(out),
               "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_attack_membership_jobs_train_the_same_references_side_by_side(tmp_path):
    """``attack membership --jobs 2``'s backend (:func:`reference_backend`): the announced references become tasks
    of a worker process beside this one; the same bytes as trained here alone, each reference trained once."""
    from collafuse.attacks.membership.command import reference_backend

    jobs = [job(seed=s) for s in (1, 2, 3)]
    with reference_setup(tmp_path / "one"):
        alone = ensure_references(jobs)
    with reference_setup(tmp_path / "two"), reference_backend(jobs=2) as tasks:
        shared = ensure_references(jobs)
        assert tasks is not None and tasks.pool.backend == "local"
    for j in jobs:
        assert shared.path(j.key).read_bytes() == alone.path(j.key).read_bytes()
    assert sorted(e["key"] for e in shared.trainings()) == sorted(j.key for j in jobs)
