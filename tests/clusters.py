"""Real clusters on this machine for the scale-out tests (issue 23): a single-node SLURM and a two-node Ray.

- :func:`slurm_cluster`: Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``, as
  ``.ci/run`` does): a munge key, ``munged``, ``slurmctld`` and ``slurmd`` started in the foreground from
  a private folder with a minimal ``slurm.conf`` for localhost (free ports, no accounting, no cgroups),
  stopped again afterwards. Yields the environment its clients need (``SLURM_CONF``).
- :func:`ray_cluster`: ``ray start --head --block`` and ``ray start --address … --block`` (a head and a
  worker node on localhost, 2 CPUs each, their own temp folder so that no other ``ray.init()`` on this
  machine finds them). Yields the address ``HOST:PORT``.

Both raise :class:`Unavailable` (with the reason) when the cluster cannot start here; the tests then skip
unless ``COLLAFUSE_REQUIRE_CLUSTERS=1`` (set by ``.ci/run``), where they fail instead. Only processes
started here are stopped, by their ids.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REQUIRE_ENV = "COLLAFUSE_REQUIRE_CLUSTERS"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")


class Unavailable(RuntimeError):
    """The cluster cannot start on this machine (the message says why)."""


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each started process (and what it started), SIGKILL what is left after ``grace`` seconds."""
    tree = {p.pid: _descendants(p.pid) for p in procs}
    for p in procs:
        with contextlib.suppress(OSError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        for pid in [p.pid, *tree[p.pid]]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def _wait(condition, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    tail = "\n".join(f"--- {p.name}:\n" + p.read_text(errors="replace")[-1500:] for p in logs if p.is_file())
    raise Unavailable(f"{what} did not come up within {timeout:.0f} s\n{tail}")


SLURM_CONF = """\
ClusterName=collafuse-test
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge-run/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=3
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@contextlib.contextmanager
def slurm_cluster(root: Path, cpus: int = 4) -> Iterator[dict[str, str]]:
    """A single-node SLURM in ``root`` (``cpus`` job slots on localhost); yields the clients' environment."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    root = Path(root)
    for sub in ("munge-key", "munge-run", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge-key", 0o700)
    os.chmod(root / "munge-run", 0o755)
    key = root / "munge-key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    user = pwd.getpwuid(os.getuid()).pw_name
    ctld_port, slurmd_port = free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(user=user, root=root, ctld_port=ctld_port, slurmd_port=slurmd_port, cpus=cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    log = root / "log"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> None:
        out = open(log / f"{name}.out", "wb")
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start(["munged", "-F", "-f", f"--socket={root}/munge-run/munge.socket", f"--key-file={key}",
               f"--log-file={log}/munged.log", f"--pid-file={root}/munge-run/munged.pid",
               f"--seed-file={root}/munge-key/munged.seed"], "munged")
        _wait(lambda: (root / "munge-run" / "munge.socket").exists(), 20, "munged", [log / "munged.out"])
        start(["slurmctld", "-D", "-f", str(conf)], "slurmctld")
        start(["slurmd", "-D", "-f", str(conf), "-N", "localhost"], "slurmd")

        def idle() -> bool:
            if any(p.poll() is not None for p in procs):
                raise Unavailable("a SLURM daemon exited: " + "; ".join(
                    (log / f"{n}.out").read_text(errors="replace")[-500:] for n in ("slurmctld", "slurmd")))
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        _wait(idle, 45, "SLURM (slurmctld + slurmd)", [log / "slurmctld.log", log / "slurmd.log"])
        yield {"SLURM_CONF": str(conf)}
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["scancel", "-u", user], env=env, capture_output=True, timeout=30)
            time.sleep(1)
        _stop(list(reversed(procs)))


@contextlib.contextmanager
def ray_cluster(cpus_per_node: int = 2) -> Iterator[str]:
    """A head and a worker node on localhost (``ray start --block``); yields the address HOST:PORT."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.is_file():
        raise Unavailable("Ray's `ray` command is not installed next to this Python: pip install 'collafuse[ray]'")
    temp = Path(tempfile.mkdtemp(prefix="cfray", dir="/tmp"))  # short: Ray's socket paths live below it
    (port,) = free_ports(1)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = [f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--object-store-memory=100000000", "--block",
              "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> None:
        out = open(temp / f"{name}.log", "wb")
        procs.append(subprocess.Popen([str(ray_bin), "start", *args, *common], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    address = f"127.0.0.1:{port}"
    try:
        start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"], "head")

        def listening() -> bool:
            if procs[0].poll() is not None:
                raise Unavailable("ray start --head exited: " + (temp / "head.log").read_text(errors="replace")[-1500:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
            return False

        _wait(listening, 60, "the Ray head", [temp / "head.log"])
        start([f"--address={address}"], "worker")
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")

        def two_nodes() -> bool:
            if procs[1].poll() is not None:
                log = (temp / "worker.log").read_text(errors="replace")
                raise Unavailable("ray start (worker) exited: " + log[-1500:])
            r = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                               timeout=60)
            return r.returncode == 0 and r.stdout.strip().endswith("2")

        _wait(two_nodes, 90, "the two Ray nodes", [temp / "head.log", temp / "worker.log"])
        yield address
    finally:
        _stop(list(reversed(procs)), grace=15)
        shutil.rmtree(temp, ignore_errors=True)


def die_once(marker: str) -> int:
    """A task that SIGKILLs its own worker the first time it runs (as the OOM killer would), then returns its pid."""
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def count_starts(marker: str, seconds: float) -> int:
    """A task that records each of its starts in ``marker``, runs ``seconds`` and returns how often it started."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    with open(marker) as f:
        return len(f.read().splitlines())
