"""Reference models as tasks (issue 23): R = 4 references of one target, trained by 1 worker and by 2.

One run is trained first (not timed): one client, c = 0.5, a recipe whose client training takes tens of
seconds on one thread (``--epochs``, ``--members``, ``--channels`` change it). Then, each in a fresh
process with an empty reference cache, ``collafuse attack membership --attacks rmia --targets client
--references 4`` is timed (whole command, wall clock):

- ``local``: ``--jobs 1`` (the references one after another in the command's process) and ``--jobs 2``
  (two worker processes);
- ``ray``: a Ray cluster started here with ``ray start`` (``--block``, its own temp folder): one node of one
  CPU, then a head and a worker node of one CPU each (two workers); the command runs with
  ``--backend ray --address HOST:PORT``.

It prints one JSON line per run (backend, workers, seconds, reference trainings, their mean seconds),
then per backend the wall-time ratio (2 workers / 1; target ≤ 0.6) and whether the two reports are
identical (every number, timings and file names aside). Run it on a quiet machine with at least 3 cores
(the command's own process plus two trainers)::

    .venv/bin/python benchmarks/perf_references.py [--backends local,ray] [--epochs 40] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from collafuse.device import CPU

R = 4


def config(args) -> dict:
    return {
        "seed": 0, "device": CPU.type, "conditional": False,
        "data": {"source": "digits", "image_size": 16, "n_members": args.members, "n_nonmembers": 64, "n_aux": 64,
                 "num_clients": 1},
        "diffusion": {"T": 200, "cut_ratio": 0.5},
        "server_model": {"channels": [8, 16], "time_dim": 16},
        "client_model": {"channels": [args.channels, 2 * args.channels], "time_dim": 32},
        "training": {"epochs": args.epochs, "batch_size": 32},
        "sampling": {"steps": 10, "per_client": 4},
    }


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def collafuse(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collafuse.cli", *args], env={**env(), **(extra_env or {})},
                          capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(nodes: int, root: Path):
    """``nodes`` Ray nodes of one CPU each on this machine (a head, then workers); yields HOST:PORT."""
    ray = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="cfbench", dir="/tmp"))
    port = free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000", "--block", "--disable-usage-stats"]
    procs = []
    try:
        procs.append(subprocess.Popen([str(ray), "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       f"--temp-dir={temp}", *common], env=env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        address = f"127.0.0.1:{port}"
        for _ in range(nodes - 1):
            time.sleep(5)
            procs.append(subprocess.Popen([str(ray), "start", f"--address={address}", *common], env=env(),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = subprocess.run([sys.executable, "-c", probe, address], env=env(), capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip().endswith(str(nodes)):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the Ray cluster of {nodes} nodes did not come up")
        yield address
    finally:
        for p in reversed(procs):
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
            with contextlib.suppress(OSError):
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def timeless(report):
    if isinstance(report, dict):
        return {k: timeless(v) for k, v in report.items()
                if k not in ("seconds", "run", "roc_png", "steps_png", "scores_parquet")}
    if isinstance(report, list):
        return [timeless(v) for v in report]
    return report


def measure(run: Path, root: Path, backend: str, workers: int, address: str | None = None) -> dict:
    name = f"{backend}-{workers}"
    cache = root / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    out = root / f"{name}.json"
    for stale in root.glob(f"{name}*"):
        stale.unlink()
    args = ["attack", "membership", "--run", str(run), "--attacks", "rmia", "--targets", "client",
            "--references", str(R), "--out", str(out), "--quiet", "--backend", backend, "--jobs", str(workers)]
    if address:
        args += ["--address", address]
    started = time.perf_counter()
    proc = collafuse(*args, extra_env={"COLLAFUSE_CACHE": str(cache)})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    journal = cache / "references" / "trainings.jsonl"
    trainings = [json.loads(line) for line in journal.read_text().splitlines()] if journal.is_file() else []
    line = {"backend": backend, "workers": workers, "seconds": round(seconds, 2), "trainings": len(trainings),
            "training_seconds_mean": round(sum(t["seconds"] for t in trainings) / max(1, len(trainings)), 2),
            "trainers": len({(t["host"], t["pid"]) for t in trainings})}
    print(json.dumps(line), flush=True)
    return {**line, "report": timeless(json.loads(out.read_text()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="local,ray")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--members", type=int, default=512)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="perf-references-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        import yaml

        run = root / "run"
        if not (run / "run.json").is_file():
            (root / "config.yaml").write_text(yaml.safe_dump(config(args)))
            started = time.perf_counter()
            proc = collafuse("train", "--config", str(root / "config.yaml"), "--out", str(run), "--quiet")
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            print(json.dumps({"trained_run_seconds": round(time.perf_counter() - started, 1)}), flush=True)
        summary = []
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            results = {}
            for workers in (1, 2):
                if backend == "ray":
                    with ray_cluster(workers, root) as address:
                        results[workers] = measure(run, root, backend, workers, address)
                else:
                    results[workers] = measure(run, root, backend, workers)
            ratio = results[2]["seconds"] / results[1]["seconds"]
            summary.append({"backend": backend, "R": R, "seconds_1_worker": results[1]["seconds"],
                            "seconds_2_workers": results[2]["seconds"], "ratio": round(ratio, 3),
                            "ratio_ok": ratio <= 0.6, "identical": results[1]["report"] == results[2]["report"],
                            "each_reference_trained_once": all(r["trainings"] == R for r in results.values())})
        for line in summary:
            print(json.dumps(line), flush=True)
        return 0 if all(s["identical"] for s in summary) else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
