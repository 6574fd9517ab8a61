"""Tasks on a backend: local processes, a Ray cluster, or SLURM through submitit (DESIGN.md §7, scale-out).

The audit's sweep (its cells, the shared models, the reference models they wait on) and ``collafuse
attack membership --jobs N`` (its reference models) hand their expensive units here as tasks: a picklable
function and its arguments, under a key. :func:`open_pool` gives a :class:`TaskPool` for a backend;
the caller submits, then polls for :class:`Finished` tasks. What a task computes never depends on the
backend (every task runs its torch / BLAS work on one thread), so the results do not either.

- ``local``: worker processes (spawn) on this machine, at most ``jobs`` at a time; an urgent task (a
  reference a cell waits on) goes before the queued ones. A worker that dies (SIGKILL, out of memory)
  breaks a ``ProcessPoolExecutor``: the pool is started again and every task that was running is
  queued again (``retries`` times at most). ``jobs`` = 1 runs every task in this process.
- ``ray``: one Ray task per task (a CPU, and a GPU when asked), on a local Ray or the cluster at
  ``address``; a worker that dies is retried by Ray on another (``max_retries``).
- ``slurm``: one SLURM job per task through submitit (a batch of tasks submitted together is one job
  array, at most ``array_size`` running at once), with the partition, the time limit and the GPUs per
  task of :class:`SlurmOptions`. A job ended by a timeout or a preemption is requeued by submitit (its
  task is checkpointable: it starts again); a job that disappears without a result (killed, node
  failure) is submitted again, ``retries`` times at most. Every submission is recorded in the pool's
  folder (``journal.jsonl``), so a driver started again on the same folder attaches to the jobs that a
  killed driver left running, or takes their results, instead of computing them again.

This module is part of the core: it imports only the standard library at import time (Ray and submitit
when their backend is opened), and nothing of attacks, defenses or benchmarks.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from collafuse.errors import ConfigError

BACKENDS = ("local", "ray", "slurm")
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class SlurmOptions:
    """What each SLURM job asks for. ``time_min``: the time limit in minutes; ``gpus_per_task``: GPUs per
    job (0: none); ``array_size``: array tasks running at once (0: as many as SLURM allows); ``retries``:
    resubmissions of a job that ended without a result."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_task: int = 0
    array_size: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    retries: int = DEFAULT_RETRIES
    poll_s: float = 2.0      # how often squeue is asked about the running jobs
    grace_s: float = 10.0    # a job SLURM no longer lists may still be writing its result to shared storage

    def merged(self, **values: Any) -> "SlurmOptions":
        """These options with every value that is not None replaced (command line over grid over defaults)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def check(self) -> "SlurmOptions":
        if self.time_min < 1:
            raise ConfigError(f"the SLURM time limit must be at least 1 minute, got {self.time_min}")
        for name in ("gpus_per_task", "array_size", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SLURM {name.replace('_', ' ')} must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_task < 1:
            raise ConfigError(f"SLURM cpus per task must be >= 1, got {self.cpus_per_task}")
        return self


def parse_time_minutes(text: str | int) -> int:
    """A SLURM time limit in minutes, from minutes (``90``) or SLURM's forms ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS`` (seconds round up to a minute)."""
    if isinstance(text, int) and not isinstance(text, bool):
        minutes = text
    else:
        s = str(text).strip()
        try:
            days, _, rest = s.partition("-") if "-" in s else ("0", "", s)
            if not days.isdigit() or not all(p.isdigit() for p in rest.split(":")):
                raise ValueError
            parts = [int(p) for p in rest.split(":")]
            d = int(days)
            if "-" in s:  # D-HH, D-HH:MM, D-HH:MM:SS
                h, m, sec = (parts + [0, 0])[:3]
            elif len(parts) == 1:
                h, m, sec = 0, parts[0], 0
            elif len(parts) == 2:
                h, m, sec = 0, parts[0], parts[1]
            elif len(parts) == 3:
                h, m, sec = parts
            else:
                raise ValueError
            if min(d, h, m, sec) < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"SLURM time {s[:40]!r} is not minutes or [D-]HH:MM:SS") from None
        minutes = d * 1440 + h * 60 + m + (1 if sec else 0)
    if minutes < 1:
        raise ConfigError(f"the SLURM time limit must be at least 1 minute, got {text!r}")
    return minutes


# ----------------------------------------------------------------------------- leases: one worker per key

LEASE_HEARTBEAT_S = 10.0   # a lease holder touches its lease this often
LEASE_STALE_S = 120.0      # another host's lease untouched this long: its holder is gone


@dataclass(frozen=True)
class Lease:
    """A claim on one unit of work (a reference model, a trained system) that several tasks, cells or audits
    may need at once: a file created with O_EXCL holding its holder's host, pid, process start and a nonce,
    touched every LEASE_HEARTBEAT_S while held. The holder is dead when, on its own host, its pid is gone or
    belongs to a later process, or, seen from another host, the file has not been touched for LEASE_STALE_S;
    a dead holder's lease is broken (:meth:`break_stale`) and the work claimed again."""

    path: Path
    host: str
    pid: int
    start: str | None
    nonce: str
    mtime: float = 0.0
    beat: "threading.Event | None" = None

    @classmethod
    def claim(cls, path: Path) -> "Lease | None":
        """The lease, or None when someone holds it."""
        from collafuse.fsutil import process_start

        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                "nonce": secrets.token_hex(8)}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, json.dumps(body).encode())
        finally:
            os.close(fd)
        stop = threading.Event()
        lease = cls(path, body["host"], body["pid"], body["start"], body["nonce"], beat=stop)
        threading.Thread(target=lease._heartbeat, daemon=True, name=f"lease-{path.stem[:8]}").start()
        return lease

    def _heartbeat(self) -> None:
        while not self.beat.wait(LEASE_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    @classmethod
    def read(cls, path: Path) -> "Lease | None":
        """The lease at ``path`` as its holder wrote it (None: no lease)."""
        try:
            mtime = path.stat().st_mtime
            body = json.loads(path.read_text() or "null")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            body = None
        if not isinstance(body, dict):  # being written, or garbage: judged by its age alone
            return cls(path, "", -1, None, "", mtime)
        try:
            pid = int(body.get("pid") or -1)
        except (TypeError, ValueError):
            pid = -1
        return cls(path, str(body.get("host")), pid, body.get("start"), str(body.get("nonce")), mtime)

    def dead(self) -> bool:
        from collafuse.fsutil import pid_alive, process_start

        if self.host == socket.gethostname() and self.pid > 0:
            return not pid_alive(self.pid) or (self.start is not None and process_start(self.pid) != self.start)
        return time.time() - self.mtime > LEASE_STALE_S

    @classmethod
    def break_stale(cls, path: Path, stale: "Lease") -> bool:
        """Remove the dead ``stale`` lease: moved aside first, so that of two processes breaking it one wins,
        and a fresh lease taken meanwhile is put back. True when this call removed it."""
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        taken = cls.read(aside)
        if taken is not None and taken.nonce != stale.nonce:  # a fresh claim: give it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if self.beat is not None:
            self.beat.set()
        current = Lease.read(self.path)
        if current is not None and current.nonce == self.nonce:
            self.path.unlink(missing_ok=True)


def run_once(lease_path: Path, done: Callable[[], bool], work: Callable[[], Any], wait: bool = True,
             poll_s: float = 0.2, on_broken: Callable[[Lease], None] | None = None) -> str:
    """Do ``work`` unless ``done()``: under the lease at ``lease_path``, so that of all the processes that
    need it at once one works and the others wait (``wait`` False: return at once). A dead holder's lease
    is broken (``on_broken(holder)`` then cleans up after it) and the work claimed again. Returns "cached"
    (it was done), "done" (this call did it) or "busy" (a live process holds it; ``wait`` False)."""
    delay = poll_s
    while True:
        if done():
            return "cached"
        lease = Lease.claim(lease_path)
        if lease is not None:
            try:
                if done():
                    return "cached"  # finished by another process between the check and the claim
                work()
                return "done"
            finally:
                lease.release()
        holder = Lease.read(lease_path)
        if holder is not None and holder.dead():
            if Lease.break_stale(lease_path, holder) and on_broken is not None:
                on_broken(holder)
            continue
        if not wait:
            return "busy"
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


@dataclass
class Finished:
    """A task that ended: its key and either its value or the error it raised (or why it was lost)."""

    key: str
    value: Any = None
    error: BaseException | None = None


@dataclass
class _Task:
    key: str
    fn: Callable
    args: tuple
    gpu: bool = False
    attempts: int = 0


class TaskPool(ABC):
    """Submit keyed tasks, poll for the finished ones. Subclasses: :class:`LocalPool`, :class:`RayPool`,
    :class:`SlurmPool`. Not thread-safe: one thread submits and polls."""

    backend = "?"

    @abstractmethod
    def submit(self, key: str, fn: Callable, *args: Any, gpu: bool = False, urgent: bool = False) -> None:
        """Queue ``fn(*args)`` under ``key`` (``urgent``: ahead of queued tasks)."""

    @abstractmethod
    def poll(self, timeout: float = 0.5) -> list[Finished]:
        """The tasks finished since the last poll, waiting at most ``timeout`` seconds for one."""

    @abstractmethod
    def outstanding(self) -> set[str]:
        """Keys submitted and not yet reported finished."""

    def close(self, cancel: bool = False) -> None:
        """Release the backend; ``cancel``: stop what still runs (an interrupted sweep)."""

    def __enter__(self) -> "TaskPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


# ----------------------------------------------------------------------------- local processes

def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def init_worker(queue=None) -> None:
    """Worker initialiser: SIGTERM (how an interrupted pool ends its workers) exits through Python, so the
    worker's clean-ups and multiprocessing finalizers run; with ``queue``: this worker owns one GPU (its id
    taken from the queue before CUDA is initialised in it)."""
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


class LocalPool(TaskPool):
    """``jobs`` worker processes (spawn); with ``gpus`` > 0 each worker owns one GPU. ``jobs`` <= 1: every
    task runs in this process, one per :meth:`poll`."""

    backend = "local"

    def __init__(self, jobs: int, gpus: int = 0, retries: int = DEFAULT_RETRIES,
                 initializer: Callable[..., None] = init_worker):
        self.jobs = max(1, int(jobs))
        self.gpus = gpus
        self.initializer = initializer
        self.retries = retries
        self.restarts = 0
        self._queue: deque[_Task] = deque()
        self._running: dict[Any, _Task] = {}
        self._executor = None

    def submit(self, key: str, fn: Callable, *args: Any, gpu: bool = False, urgent: bool = False) -> None:
        task = _Task(key, fn, args, gpu)
        (self._queue.appendleft if urgent else self._queue.append)(task)

    def outstanding(self) -> set[str]:
        return {t.key for t in self._queue} | {t.key for t in self._running.values()}

    def _start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        ctx = get_context("spawn")
        init: dict[str, Any] = {"initializer": self.initializer, "initargs": ()}
        if self.gpus > 0:
            queue = ctx.Queue()
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            ids = visible[: self.gpus] if len(visible) >= self.gpus else [str(i) for i in range(self.gpus)]
            for i in range(self.jobs):  # jobs <= gpus: a GPU each
                queue.put(ids[i % self.gpus])
            init = {"initializer": self.initializer, "initargs": (queue,)}
        self._executor = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, **init)

    def poll(self, timeout: float = 0.5) -> list[Finished]:
        if self.jobs <= 1:
            if not self._queue:
                return []
            task = self._queue.popleft()
            try:
                return [Finished(task.key, task.fn(*task.args))]
            except Exception as exc:  # noqa: BLE001 — handed to the caller, who decides
                return [Finished(task.key, error=exc)]
        if self._executor is None:
            self._start()
        while self._queue and len(self._running) < self.jobs:
            task = self._queue.popleft()
            try:
                self._running[self._executor.submit(task.fn, *task.args)] = task
            except BrokenProcessPool:
                self._queue.appendleft(task)
                return self._restart()
        if not self._running:
            return []
        done, _ = wait(list(self._running), timeout=timeout, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for fut in done:
            try:
                value = fut.result()
            except BrokenProcessPool:
                broken = True
                continue
            except Exception as exc:  # noqa: BLE001
                out.append(Finished(self._running.pop(fut).key, error=exc))
                continue
            out.append(Finished(self._running.pop(fut).key, value))
        if broken:
            out.extend(self._restart())
        return out

    def _restart(self) -> list[Finished]:
        """A worker died: the executor is broken (its other workers are ended too). Queue every task that
        was running again, at the front, and start new workers."""
        self.restarts += 1
        lost = list(self._running.values())
        self._running.clear()
        self._shutdown(cancel=True)
        if self.restarts > self.retries:
            return [Finished(t.key, error=RuntimeError(
                f"a worker process died {self.restarts} times (killed, or out of memory); task {t.key} was running"))
                for t in lost]
        print(f"collafuse: warning: a worker process died; running its {len(lost)} task(s) again "
              f"({self.restarts}/{self.retries})", file=sys.stderr)
        for task in reversed(lost):
            task.attempts += 1
            self._queue.appendleft(task)
        return []

    def _shutdown(self, cancel: bool) -> None:
        pool, self._executor = self._executor, None
        if pool is None:
            return
        workers = list((getattr(pool, "_processes", None) or {}).values())  # gone after shutdown()
        manager = getattr(pool, "_executor_manager_thread", None)
        pool.shutdown(wait=False, cancel_futures=True)
        if cancel:
            for proc in workers:
                try:
                    proc.terminate()
                except (OSError, ValueError):  # already gone
                    pass
        for proc in workers:
            try:
                proc.join(timeout=10)
            except (OSError, ValueError, AssertionError):
                pass
        if manager is not None:
            manager.join(timeout=10)  # it notices the ended workers and closes its queues

    def close(self, cancel: bool = False) -> None:
        self._queue.clear()
        self._running.clear()
        self._shutdown(cancel=True)  # what still runs here is no longer needed (or interrupted)


# ----------------------------------------------------------------------------- Ray

class RayPool(TaskPool):
    """Tasks on Ray: the cluster at ``address``, or a local Ray of ``jobs`` CPUs. ``options(gpu)``: the
    resources of one task (a CPU; a GPU when asked); a task whose worker dies is retried on another."""

    backend = "ray"

    def __init__(self, jobs: int, address: str | None = None, retries: int = DEFAULT_RETRIES,
                 options: Callable[[bool], dict] | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install 'collafuse[ray]'") from None
        self._ray = ray
        self.retries = retries
        self._options = options or (lambda gpu: {"num_cpus": 1, **({"num_gpus": 1} if gpu else {})})
        self.started_here = not ray.is_initialized()
        if self.started_here:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(1, jobs), **kwargs)
        self._remote: dict[Any, Any] = {}
        self._refs: dict[Any, str] = {}

    def submit(self, key: str, fn: Callable, *args: Any, gpu: bool = False, urgent: bool = False) -> None:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn)
        opts = {**self._options(gpu), "max_retries": self.retries, "retry_exceptions": False}
        self._refs[self._remote[fn].options(**opts).remote(*args)] = key

    def outstanding(self) -> set[str]:
        return set(self._refs.values())

    def poll(self, timeout: float = 0.5) -> list[Finished]:
        if not self._refs:
            return []
        ray = self._ray
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
            ready = list(dict.fromkeys([*ready, *more]))
        out = []
        for ref in ready:
            key = self._refs.pop(ref)
            try:
                out.append(Finished(key, ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 — a task's error (RayTaskError) or a lost worker
                out.append(Finished(key, error=exc))
        return out

    def close(self, cancel: bool = False) -> None:
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 — finished meanwhile, or already gone
                pass
        self._refs.clear()
        if self.started_here:
            self._ray.shutdown()


# ----------------------------------------------------------------------------- SLURM (submitit)

class SlurmTask:
    """One task as a SLURM job: ``fn(*args)``. Checkpointable: a job SLURM ends for its time limit or a
    preemption is requeued by submitit and starts the task again (tasks are pure and their outputs are
    cached atomically, so a new start is always safe)."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn
        self.args = args

    def __call__(self) -> Any:
        return self.fn(*self.args)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTask(self.fn, self.args))


ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED"}


def squeue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """SLURM's state of each job still known to it (array elements as ``<job>_<index>``), or None when
    ``squeue`` cannot answer (no controller). Jobs it no longer lists are absent."""
    bases = sorted({str(j).split("_")[0] for j in job_ids})
    if not bases:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(bases)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every one of them is gone from the controller
            return {}
        return None
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def slurm_available() -> str | None:
    """None when SLURM jobs can be submitted from here, else why not (one line)."""
    import importlib.util

    if importlib.util.find_spec("submitit") is None:
        return "--backend slurm needs submitit: pip install 'collafuse[slurm]'"
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "--backend slurm needs SLURM's sbatch and squeue on PATH (run it on a login node of the cluster)"
    # sbatch on PATH is not a cluster: ask the controller once, so an unreachable one is one line here
    # rather than a failed submission in the middle of a sweep.
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"--backend slurm: SLURM's controller does not answer (sinfo: {exc})"
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"--backend slurm: SLURM's controller does not answer (sinfo: {why})"
    return None


@dataclass
class _Job:
    task: _Task
    job: Any                       # submitit.SlurmJob
    gone_since: float | None = None


class SlurmPool(TaskPool):
    """Tasks as SLURM jobs through submitit, their files (and the journal) in ``folder``, which every
    node must see."""

    backend = "slurm"

    def __init__(self, folder: Path | str, options: SlurmOptions | None = None):
        problem = slurm_available()
        if problem:
            raise ConfigError(problem)
        import submitit

        self.options = (options or SlurmOptions()).check()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._submitit = submitit
        self._executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.options.retries)
        params: dict[str, Any] = {"time": self.options.time_min, "cpus_per_task": self.options.cpus_per_task,
                                  "ntasks_per_node": 1, "nodes": 1, "job_name": "collafuse", "signal_delay_s": 60,
                                  "stderr_to_stdout": True}
        if self.options.partition:
            params["partition"] = self.options.partition
        if self.options.gpus_per_task:
            params["gpus_per_task"] = self.options.gpus_per_task
        if self.options.array_size:
            params["array_parallelism"] = self.options.array_size
        if self.options.mem_gb:
            params["mem"] = f"{int(self.options.mem_gb * 1024)}M"
        self._executor.update_parameters(**params)
        self._queue: list[_Task] = []
        self._jobs: dict[str, _Job] = {}
        self._journal = self.folder / "journal.jsonl"
        self._known: dict[str, str] = self._read_journal()
        self._last_check = 0.0
        self.resubmitted: list[str] = []
        self.attached: list[str] = []

    def _read_journal(self) -> dict[str, str]:
        try:
            lines = self._journal.read_text().splitlines()
        except OSError:
            return {}
        known = {}
        for line in lines:
            try:
                entry = json.loads(line)
                known[str(entry["key"])] = str(entry["job_id"])
            except (ValueError, KeyError, TypeError):
                continue
        return known

    def _record(self, key: str, job_id: str) -> None:
        with open(self._journal, "a") as f:
            f.write(json.dumps({"key": key, "job_id": job_id}) + "\n")
        self._known[key] = job_id

    def submit(self, key: str, fn: Callable, *args: Any, gpu: bool = False, urgent: bool = False) -> None:
        task = _Task(key, fn, args, gpu)
        if self._attach(task):
            return
        self._queue.append(task)

    def _attach(self, task: _Task) -> bool:
        """A job of an earlier driver for this key that is still queued or running, or that left its
        result: wait for it (or take its result) rather than submit the task again."""
        job_id = self._known.get(task.key)
        if job_id is None:
            return False
        job = self._submitit.SlurmJob(folder=self.folder, job_id=job_id)
        if not job.paths.result_pickle.exists():
            states = squeue_states([job_id]) or {}
            if states.get(job_id) not in ALIVE_STATES:
                return False
        self._jobs[task.key] = _Job(task, job)
        self.attached.append(task.key)
        return True

    def outstanding(self) -> set[str]:
        return {t.key for t in self._queue} | set(self._jobs)

    def _flush(self) -> None:
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        from submitit.core.utils import FailedJobError

        try:
            if len(batch) == 1:
                jobs = [self._executor.submit(SlurmTask(batch[0].fn, batch[0].args))]
            else:
                with self._executor.batch():
                    pending = [self._executor.submit(SlurmTask(t.fn, t.args)) for t in batch]
                jobs = pending
        except FailedJobError as exc:  # sbatch refused the job (controller gone, bad partition, limits)
            why = (str(exc).strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"--backend slurm: sbatch refused the job: {why}") from None
        for task, job in zip(batch, jobs):
            self._jobs[task.key] = _Job(task, job)
            self._record(task.key, str(job.job_id))

    def poll(self, timeout: float = 0.5) -> list[Finished]:
        self._flush()
        deadline = time.monotonic() + timeout
        while True:
            out = self._collect()
            if out or time.monotonic() >= deadline or not self._jobs:
                return out
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _collect(self) -> list[Finished]:
        out = []
        for key, entry in list(self._jobs.items()):
            if entry.job.paths.result_pickle.exists():
                del self._jobs[key]
                try:
                    out.append(Finished(key, entry.job.result()))
                except Exception as exc:  # noqa: BLE001 — the task raised: its traceback, as submitit has it
                    out.append(Finished(key, error=exc))
        now = time.monotonic()
        if self._jobs and now - self._last_check >= self.options.poll_s:
            self._last_check = now
            states = squeue_states(str(e.job.job_id) for e in self._jobs.values())
            if states is not None:
                for key, entry in list(self._jobs.items()):
                    state = states.get(str(entry.job.job_id))
                    if state in ALIVE_STATES:
                        entry.gone_since = None
                        continue
                    if entry.gone_since is None:
                        entry.gone_since = now
                        continue
                    if now - entry.gone_since < self.options.grace_s or entry.job.paths.result_pickle.exists():
                        continue
                    out.extend(self._lost(key, entry, state or "no longer listed"))
        return out

    def _lost(self, key: str, entry: _Job, state: str) -> list[Finished]:
        """A job ended without a result (killed, node failure, out of memory, cancelled): submit its task
        again, ``retries`` times at most."""
        del self._jobs[key]
        task = entry.task
        job_id = entry.job.job_id
        if task.attempts >= self.options.retries:
            return [Finished(key, error=RuntimeError(
                f"SLURM job {job_id} ({key}) ended {state} without a result, {task.attempts + 1} times; "
                f"see {self.folder}/{job_id}_0_log.out"))]
        task.attempts += 1
        print(f"collafuse: warning: SLURM job {job_id} ({key}) ended {state} without a result; "
              f"submitting it again ({task.attempts}/{self.options.retries})", file=sys.stderr)
        self.resubmitted.append(key)
        self._queue.append(task)
        self._flush()
        return []

    def close(self, cancel: bool = False) -> None:
        self._queue.clear()
        if cancel:
            for entry in self._jobs.values():
                try:
                    entry.job.cancel(check=False)
                except Exception:  # noqa: BLE001 — finished meanwhile
                    pass
        self._jobs.clear()


def open_pool(backend: str, jobs: int = 1, address: str | None = None, *, gpus: int = 0,
              slurm: SlurmOptions | None = None, folder: Path | str | None = None,
              ray_options: Callable[[bool], dict] | None = None, retries: int = DEFAULT_RETRIES) -> TaskPool:
    """The :class:`TaskPool` of ``backend``: ``jobs`` processes (local), a Ray of ``jobs`` CPUs or the
    cluster at ``address`` (ray), SLURM jobs with their files in ``folder`` (slurm)."""
    if backend == "local":
        return LocalPool(jobs, gpus, retries)
    if backend == "ray":
        return RayPool(jobs, address, retries, ray_options)
    if backend == "slurm":
        if folder is None:
            raise ValueError("the slurm backend needs a folder that every node sees")
        return SlurmPool(folder, slurm)
    raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
