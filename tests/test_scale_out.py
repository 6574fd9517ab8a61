"""Scale-out (issue 23, DESIGN §7): reference models as tasks, on local processes, a real single-node SLURM
and a real two-node Ray cluster started on this machine, with faults.

One reduced grid serves every test: two system cells that share a recipe (the same run config; they differ
in samples_per_client), each with rmia on the server (T2, 2 reference server models) and on both clients
(T3, 2 reference client models each): 6 reference models in all, each needed by both cells. The local
backend gives the reference results; SLURM (through submitit) and the Ray cluster run both cells at once
and must give the same results.json, each reference trained once, while a process training a reference
is SIGKILLed; a driver (with 2 worker processes) killed mid-sweep must resume to the same results without
training a finished reference again.
(The full quick audit compared across backends is in the issue's closing note: it takes minutes.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from clusters import Unavailable, ray_cluster, required, slurm_cluster

from collafuse.attacks.membership.references import JOURNAL, METADATA, tensors_digest
from collafuse.fsutil import sweep_stale_partials

pytestmark = pytest.mark.slow

GRID = {  # unlabelled 8×8 digits (an .npz without labels): no evaluation classifier to train for utility
    "base": {"device": "cpu", "conditional": False,
             "data": {"source": "npz", "image_size": 8, "n_members": 48, "n_nonmembers": 24, "n_aux": 24,
                      "num_clients": 2},
             "diffusion": {"T": 50}, "server_model": {"channels": [8, 16], "time_dim": 16},
             "client_model": {"channels": [8, 16], "time_dim": 16}, "training": {"epochs": 2, "batch_size": 32},
             "sampling": {"steps": 5, "per_client": 2}},
    "systems": [{"cut_ratios": [0.5], "attacks": {"T2": ["rmia"], "T3": ["rmia"]}, "references": 2,
                 "samples_per_client": n} for n in (8, 10)],
}
POLICY = {"statistic": "value", "limits": {"T2": {"auc": {"max": 0.6}}, "T3": {"auc": {"max": 0.6}}}}
N_REFERENCES = 2 + 2 * 2  # server (T2) + two clients (T3), 2 each; the same for both cells


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    import numpy as np
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("scale-grid")
    digits = load_digits().images[:200]
    np.savez(root / "digits.npz", images=np.round(digits * (255 / 16)).astype(np.uint8))
    grid = {**GRID, "base": {**GRID["base"], "data": {**GRID["base"]["data"], "path": str(root / "digits.npz")}}}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid, allow_unicode=True))
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    return root / "grid.yaml", root / "policy.yaml"


def sweep(grid: Path, out: Path, cache: Path, **kwargs):
    """The sweep in this process (the driver) and its results.json, as ``collafuse audit`` writes it."""
    from collafuse.benchmarks.audit.grid import load_grid
    from collafuse.benchmarks.audit.results import collect, write_results
    from collafuse.benchmarks.audit.runner import run_sweep

    cells = load_grid(grid).cells()
    stats = run_sweep(cells, out, cache, progress=False, **kwargs)
    df, _ = collect(cells, out)
    write_results(df, out)
    return stats


def journal(cache: Path) -> list[dict]:
    path = cache / "references" / JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def verified_models(cache: Path) -> set[str]:
    """The keys of the reference models in the cache; every file must verify (key and tensor digest)."""
    from safetensors import safe_open

    keys = set()
    for path in (cache / "references").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[METADATA])
            assert meta["key"] == path.stem and meta["sha256"] == tensors_digest({k: f.get_tensor(k) for k in f.keys()})
        keys.add(path.stem)
    return keys


def assert_clean(cache: Path) -> None:
    """No partial model, no lease, no temporary anywhere in the cache."""
    left = [p for p in cache.rglob("*")
            if ".partial-" in p.name or p.name.endswith(".lease") or ".lease.stale-" in p.name]
    assert left == []


def assert_trained_once(cache: Path) -> None:
    keys = [e["key"] for e in journal(cache)]
    assert len(keys) == len(set(keys)) and set(keys) <= verified_models(cache)
    assert len(verified_models(cache)) == N_REFERENCES


class KillFirstTrainer(threading.Thread):
    """SIGKILLs the first process (a worker, never this one) seen holding a reference model's lease: it is
    training that reference at that moment."""

    def __init__(self, cache: Path):
        super().__init__(daemon=True)
        self.folder = cache / "references"
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for lease in self.folder.glob("*.lease") if self.folder.is_dir() else ():
                try:
                    pid = int(json.loads(lease.read_text())["pid"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed = pid
                    return
            time.sleep(0.003)


@pytest.fixture(scope="module")
def local_results(files, tmp_path_factory) -> Path:
    """The reference results: the local backend, in this process."""
    grid, _ = files
    root = tmp_path_factory.mktemp("local")
    stats = sweep(grid, root / "audit", root / "cache", jobs=1, backend="local")
    assert len(stats.computed) == 2
    return root


def test_two_cells_sharing_a_recipe_train_each_reference_once(local_results):
    cache = local_results / "cache"
    trainings = journal(cache)
    assert len(trainings) == N_REFERENCES  # 6 trainings for 2 cells × 6 reference models
    assert sorted(e["kind"] for e in trainings) == ["client"] * 4 + ["server"] * 2
    assert_trained_once(cache)
    assert_clean(cache)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        with slurm_cluster(Path(tempfile.mkdtemp(prefix="cfslurm", dir="/tmp"))) as env:
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                yield env
    except Unavailable as exc:
        if required():
            pytest.fail(f"SLURM could not start: {exc}")
        pytest.skip(f"no SLURM here: {str(exc).splitlines()[0]}")


def test_slurm_gives_the_local_results_and_resubmits_a_job_killed_mid_reference(files, local_results, slurm,
                                                                                tmp_path, capsys):
    from collafuse.benchmarks.audit.runner import slurm_settings
    from collafuse.tasks import SlurmOptions

    grid, _ = files
    killer = KillFirstTrainer(tmp_path / "cache")
    killer.start()
    with slurm_settings(SlurmOptions(time_min=10, array_size=2, poll_s=0.5, grace_s=1.0)):
        stats = sweep(grid, tmp_path / "audit", tmp_path / "cache", backend="slurm")
    killer.stop.set()
    assert killer.killed is not None, "no reference training was caught to kill"
    assert "ended" in capsys.readouterr().err  # the killed job was seen and its task submitted again
    assert len(stats.computed) == 2
    assert (tmp_path / "audit" / "results.json").read_bytes() == (local_results / "audit" / "results.json").read_bytes()
    assert_trained_once(tmp_path / "cache")
    assert_clean(tmp_path / "cache")


def test_slurm_requeues_a_preempted_job_and_a_new_driver_attaches_to_it(slurm, tmp_path, monkeypatch):
    """A job preempted (requeued by SLURM: the same job, started again) is waited for, not submitted again;
    a driver started again on the same folder (the first one gone) attaches to it through the journal."""
    from clusters import count_starts

    from collafuse.tasks import SlurmOptions, SlurmPool

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the job imports clusters.count_starts
    env = {**os.environ}
    marker, folder = tmp_path / "starts", tmp_path / "slurm"
    options = SlurmOptions(time_min=5, poll_s=0.5, grace_s=1.0)
    first = SlurmPool(folder, options)
    first.submit("task", count_starts, str(marker), 8.0)
    first.poll(0)
    job_id = str(first._jobs["task"].job.job_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (marker.is_file() and marker.read_text()):
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True, capture_output=True)  # a preemption
    first.close()  # the driver is gone; its job is not cancelled
    while time.monotonic() < deadline and "PENDING" not in subprocess.run(
            ["squeue", "-h", "-o", "%T", "-j", job_id], env=env, capture_output=True, text=True).stdout:
        time.sleep(0.2)
    # SLURM holds a requeued job back for a while (BeginTime); release it now rather than in two minutes
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True, capture_output=True)
    second = SlurmPool(folder, options)
    second.submit("task", count_starts, str(marker), 8.0)
    assert second.attached == ["task"]
    done = []
    while not done and time.monotonic() < deadline + 60:
        done = second.poll(0.5)
    assert [(f.key, f.value, f.error) for f in done] == [("task", 2, None)]  # the second start's result
    assert len(marker.read_text().splitlines()) == 2 and second.resubmitted == []


@pytest.fixture(scope="module")
def ray_address():
    try:
        with ray_cluster() as address:
            yield address
    except Unavailable as exc:
        if required():
            pytest.fail(f"the Ray cluster could not start: {exc}")
        pytest.skip(f"no Ray cluster here: {str(exc).splitlines()[0]}")


def test_ray_cluster_gives_the_local_results_and_reruns_a_worker_killed_mid_reference(files, local_results,
                                                                                     ray_address, tmp_path):
    grid, _ = files
    killer = KillFirstTrainer(tmp_path / "cache")
    killer.start()
    stats = sweep(grid, tmp_path / "audit", tmp_path / "cache", jobs=2, backend="ray", address=ray_address)
    killer.stop.set()
    assert killer.killed is not None, "no reference training was caught to kill"
    assert len(stats.computed) == 2
    assert (tmp_path / "audit" / "results.json").read_bytes() == (local_results / "audit" / "results.json").read_bytes()
    assert_trained_once(tmp_path / "cache")
    assert_clean(tmp_path / "cache")


def collafuse_audit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "collafuse.cli", "audit", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_killed_driver_resumes_without_training_a_finished_reference_again(files, local_results, tmp_path):
    grid, policy = files
    out, cache = tmp_path / "audit", tmp_path / "cache"
    args = ("--config", str(grid), "--policy", str(policy), "--out", str(out), "--cache", str(cache), "--jobs", "2")
    first = collafuse_audit(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and len(journal(cache)) < 2:
        time.sleep(0.005)
    assert first.poll() is None, "the sweep finished before its driver could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its workers, mid-sweep: no clean-up at all
    first.communicate()
    finished = verified_models(cache)
    assert 2 <= len(finished) < N_REFERENCES and not (out / "results.json").exists()
    before = len(journal(cache))
    # The resume, as `collafuse audit` does it (stale temporaries of dead writers swept, then the sweep), in
    # one process: the leases the killed workers left are stale and taken over.
    sweep_stale_partials(cache, depth=2)
    stats = sweep(grid, out, cache, jobs=1, backend="local")
    assert len(stats.computed) + len(stats.reused) == 2
    retrained = {e["key"] for e in journal(cache)[before:]}
    assert retrained and not retrained & finished  # every finished reference reused, the others trained
    assert (out / "results.json").read_bytes() == (local_results / "audit" / "results.json").read_bytes()
    assert_trained_once(cache)
    assert_clean(cache)
