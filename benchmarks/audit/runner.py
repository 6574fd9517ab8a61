"""Run the cells of a grid: locally in processes, on Ray or on SLURM; cached, resumable (issue 6 item 2, issue 23).

A finished cell is one file, ``AUDIT_DIR/cells/<config hash>.json`` (its rows), written
after its artifacts and renamed into place, so it exists only when complete. The file
names its own config hash and carries ``content_sha256`` (sha256 of its canonical JSON
without that field) and the sha256 of each of its artifacts. Before running, the
runner skips every cell whose file verifies (:func:`check_cell`); one that does not
(bad JSON, another cell's file, edited, NaN where a number belongs, an artifact
missing or changed) is recomputed with a warning naming it, and a cell path that is
not a regular file (a folder) is refused. A sweep killed at any moment (Ctrl-C,
SIGKILL, power) therefore resumes with no cell lost, duplicated or half written, and
the temporaries of a killed sweep are removed when their writer is dead
(:func:`collafuse.fsutil.sweep_stale_partials`). Only this process (the driver) writes into AUDIT_DIR; workers only compute
and fill the content-addressed cache (trained systems, the attacker's denoiser, the
evaluation classifier, reference models), which is itself written atomically.

Backends give the same numbers because a cell is a pure function of its config
computed on one thread (:func:`~.cells.compute_cell`). The backends (:mod:`collafuse.tasks`):
``local`` worker processes, ``ray`` (a local Ray or ``--address`` of a cluster) and ``slurm``
(submitit; partition, time, GPUs per task and array size from the command line or the grid's
``slurm:`` block). The expensive units are tasks of the backend: the shared models, every cell,
and every reference model of lira / rmia. A cell hands its reference trainings to the driver
through a spool folder in the cache (:class:`~collafuse.attacks.membership.references.SpoolTasks`);
the driver submits each key once, before the queued cells, and the cell trains whatever no task
has claimed yet, then waits for the rest (each reference is trained once, whichever cells or
audits need it, and a worker killed while it trains one only costs that training, run again by
another). With Ray or SLURM on a real cluster, the cache folder must be on storage that every
node shares; stale temporaries there are judged by the process ids of the driver's machine, so
do not start audits from two machines over one cache at the same time.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from collafuse.errors import ConfigError, RunError
from collafuse.fsutil import sweep_stale_partials
from collafuse.jsonio import dumps, encode_number
from collafuse.tasks import BACKENDS as TASK_BACKENDS
from collafuse.tasks import (DEFAULT_RETRIES, LocalPool, RayPool, SlurmOptions, SlurmPool, parse_time_minutes,
                             run_once)

from collafuse.benchmarks.audit.cells import CellOutput, build_shared, cell_device, compute_cell, shared_resources
from collafuse.benchmarks.audit.grid import Cell, canonical_hash

CELLS_DIR = "cells"
ARTIFACTS_DIR = "artifacts"
BACKENDS = TASK_BACKENDS  # local processes, Ray, SLURM (collafuse.tasks)


@dataclass
class SweepStats:
    total: int
    reused: list[str] = field(default_factory=list)     # config hashes found finished
    computed: list[str] = field(default_factory=list)   # config hashes computed by this sweep
    recomputed: list[str] = field(default_factory=list)  # of those, cells whose file did not verify


def cell_path(audit_dir: Path, config_hash: str) -> Path:
    return audit_dir / CELLS_DIR / f"{config_hash}.json"


CONTENT_HASH = "content_sha256"
ARTIFACT_HASHES = "artifact_sha256"
MAX_CELL_BYTES = 64 << 20
ROW_TEXT = ("threat", "target", "attack", "metric")
ROW_NUMBERS = ("value", "ci_low", "ci_high")


def content_hash(record: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON without its own ``content_sha256`` (NaN/inf: ValueError)."""
    body = {k: v for k, v in record.items() if k != CONTENT_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _number_problem(x: Any) -> str | None:
    """Why ``x`` is not a number as a cell file stores one (null, a finite number, "inf" / "-inf"), or None."""
    if x is None or x in ("inf", "-inf"):
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return f"{x!r:.40} is not a number"
    if not math.isfinite(x):
        return f"{x!r} is not finite"
    return None


def _record_problem(audit_dir: Path, config_hash: str, record: Any) -> str | None:
    """Why a parsed cell file is not the finished record of cell ``config_hash``, or None when it verifies."""
    if not isinstance(record, dict):
        return "not a JSON object"
    named = record.get("config_hash")
    if named is None:
        return "it names no config hash (written by an older collafuse)"
    if named != config_hash:
        return f"it is the file of another cell ({str(named)[:40]!r})"
    if not isinstance(record.get("cell"), dict) or not isinstance(record.get("rows"), list) \
            or not isinstance(record.get("artifacts"), dict) or not isinstance(record.get("info"), dict):
        return "it lacks cell, rows, artifacts or info"
    if canonical_hash(record["cell"]) != config_hash:
        return "its cell description does not match its config hash"
    for i, row in enumerate(record["rows"]):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ROW_TEXT):
            return f"row {i} is not a (threat, target, attack, metric) row"
        for k in ROW_NUMBERS:
            bad = _number_problem(row.get(k))
            if bad is not None:
                return f"row {i} ({row['threat']} {row['target']} {row['attack']} {row['metric']}): {k} {bad}"
    if CONTENT_HASH not in record:
        return "it carries no content hash (written by an older collafuse)"
    try:
        digest = content_hash(record)
    except (TypeError, ValueError) as exc:
        return f"its content cannot be hashed ({str(exc)[:80]})"
    if digest != record[CONTENT_HASH]:
        return "its content hash does not match: the file was changed after it was written"
    hashes = record.get(ARTIFACT_HASHES)
    if not isinstance(hashes, dict) or set(hashes) != set(record["artifacts"]):
        return "its artifact hashes are missing"
    for name, rel in record["artifacts"].items():
        if rel != f"{ARTIFACTS_DIR}/{config_hash}/{name}" or "/" in name or name.startswith("."):
            return f"artifact {str(name)[:40]!r} has an unexpected path"
        try:
            if _sha256(audit_dir / rel) != hashes[name]:
                return f"artifact {rel} was changed after it was written"
        except OSError:
            return f"artifact {rel} is missing or unreadable"
    return None


def check_cell(audit_dir: Path, config_hash: str) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a finished cell that verifies, (None, None) for an absent one, (None, why) for
    a file that does not verify. A cell path that is not a regular file (a folder) is refused (ConfigError)."""
    path = cell_path(audit_dir, config_hash)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise ConfigError(f"{path}: cell file unreadable ({exc.strerror or exc}); fix or delete it") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"{path} is {kind}, not a finished-cell file; remove it to recompute that cell")
    if st.st_size > MAX_CELL_BYTES:
        return None, f"it is {st.st_size} bytes, more than a cell file can be"
    try:
        record = json.loads(path.read_bytes())
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return None, f"not valid JSON ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
    problem = _record_problem(audit_dir, config_hash, record)
    return (None, problem) if problem else (record, None)


def reverify_run(cell: Cell) -> None:
    """A cell on a named run folder (systems.runs) is keyed by the folder's whole content; before the sweep
    decides to reuse or compute it, the folder is checked again against that key (hashed again only where a
    file changed since the grid was read). A changed folder is refused (one line), never attacked or reused
    under its old key."""
    if cell.run_dir is None:
        return
    from collafuse.benchmarks.audit.grid import run_content_key

    try:
        key = run_content_key(Path(cell.run_dir))
    except RunError as exc:
        raise ConfigError(f"systems.runs: {exc}") from None
    if key != cell.run_sha256:
        raise ConfigError(f"systems.runs: {cell.run_dir} changed after the grid was read; run the audit again")


def stale_run_cells(audit_dir: Path, cells: list[Cell]) -> list[Cell]:
    """Of ``cells`` (on named run folders, about to be computed), those whose folder an earlier sweep in this
    audit folder attacked with other content (a finished cell of the same cell id and another content key):
    its verdict is stale, so the cell is recomputed, and the caller says so."""
    if not cells or not (audit_dir / CELLS_DIR).is_dir():
        return []
    wanted = {cell.cell_id: cell for cell in cells}
    stale: dict[str, Cell] = {}
    for path in sorted((audit_dir / CELLS_DIR).glob("*.json")):
        try:
            if not path.is_file() or path.stat().st_size > MAX_CELL_BYTES:
                continue
            record = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("cell"), dict):
            continue
        cell = wanted.get(record.get("cell_id"))
        if cell is not None and record["cell"].get("run_sha256") not in (None, cell.run_sha256):
            stale[cell.cell_id] = cell
    return list(stale.values())


def read_cell(audit_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """A finished cell's verified record, or None if absent. A file that does not verify is an error, not a miss."""
    record, problem = check_cell(audit_dir, config_hash)
    if problem is not None:
        raise RunError(f"{cell_path(audit_dir, config_hash)}: finished-cell file does not verify ({problem}); "
                       "run the audit again to recompute that cell")
    return record


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_cell(audit_dir: Path, cell: Cell, out: CellOutput) -> None:
    """Artifacts first, then the cell file (its presence means: done)."""
    h = cell.config_hash
    names = {}
    for name, data in sorted(out.artifacts.items()):
        rel = f"{ARTIFACTS_DIR}/{h}/{name}"
        _atomic_write(audit_dir / rel, data)
        names[name] = rel
    record = {"cell_id": cell.cell_id, "config_hash": h, "cell": cell.to_json(), "rows": [_encode(r) for r in out.rows],
              "artifacts": names, ARTIFACT_HASHES: {name: hashlib.sha256(data).hexdigest()
                                                    for name, data in out.artifacts.items()},
              "info": out.info}
    record[CONTENT_HASH] = content_hash(record)
    _atomic_write(cell_path(audit_dir, h), dumps(record, indent=1).encode())


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: ε = ∞ (no bound) is stored as the string "inf"."""
    return {k: encode_number(v) for k, v in row.items()}


def _unique(cells: Iterable[Cell]) -> list[Cell]:
    seen, out = set(), []
    for cell in cells:
        if cell.config_hash not in seen:
            seen.add(cell.config_hash)
            out.append(cell)
    return out


def shared_tasks(cells: list[Cell]) -> list[tuple[str, Cell]]:
    """(kind, a cell that needs it) for each resource several cells share, once each."""
    tasks: dict[str, tuple[str, Cell]] = {}
    for cell in cells:
        for key, kind in shared_resources(cell):
            tasks.setdefault(key, (kind, cell))
    return list(tasks.values())


def sweep_devices(cells: list[Cell], device: str | None) -> set[str]:
    """The device types (``cpu``, ``cuda``) the cells resolve to on this machine (``--device`` or the grid's)."""
    return {cell_device(cell, device).type for cell in cells}


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_jobs(jobs: int, devices: set[str], gpus: int) -> int:
    """Cells side by side: on a GPU, one per device at a time (``jobs`` capped at the GPU count)."""
    return max(1, min(jobs, gpus)) if "cuda" in devices else jobs


def _device_arg(device) -> tuple:
    """The ``device`` argument of compute_cell / build_shared, passed only when ``--device`` was given."""
    return () if device is None else (device,)


def _claim_gpu(queue) -> None:
    """Worker initialiser: this worker owns one GPU (before CUDA is initialised in it)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _init_worker(queue=None) -> None:
    """Worker initialiser: SIGTERM (how an interrupted sweep ends its workers) exits through Python, so the
    worker's clean-ups and its multiprocessing finalizers run: its semaphores (tqdm's lock) are released,
    and the resource tracker has no leaked ones to warn about after Ctrl-C, SIGTERM or a full disk. With
    ``queue``: this worker owns one GPU."""
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if queue is not None:
        _claim_gpu(queue)


def cell_task(cell: Cell, cache_dir: Path | str, device=None, spool: str | None = None) -> CellOutput:
    """A cell as a task of any backend: :func:`~.cells.compute_cell`, its reference models cached in the audit
    cache (``<cache>/references``) and, with ``spool`` (a folder the driver watches), their trainings handed
    to the sweep's backend as tasks of their own; the cell trains any that no task has claimed yet and waits
    for the rest (:func:`~collafuse.attacks.membership.references.ensure_references`)."""
    from collafuse.attacks.membership.references import SpoolTasks, reference_setup

    _system_once(cell, Path(cache_dir), device)
    with reference_setup(Path(cache_dir), SpoolTasks(Path(spool)) if spool else None):
        return compute_cell(cell, Path(cache_dir), *_device_arg(device))


def _system_once(cell: Cell, cache_dir: Path, device=None) -> None:
    """The cell's trained system in the cache, trained by one of the cells that share it (a lease per system
    key): the others wait for it instead of training it too (on one thread, as compute_cell would)."""
    if cell.kind != "system" or cell.run_dir is not None:
        return
    import torch
    from threadpoolctl import threadpool_limits

    from collafuse.runs import RUN_MARKER

    from collafuse.benchmarks.audit.cells import trained_system
    from collafuse.benchmarks.audit.grid import system_hash

    path = cache_dir / "systems" / system_hash(cell.run_config)

    def train() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                trained_system(cell, cache_dir, device)
        finally:
            torch.set_num_threads(previous)

    run_once(path.with_name(f"{path.name}.lease"), lambda: (path / RUN_MARKER).is_file(), train)


def tasks_folder(cache_dir: Path, audit_dir: Path) -> Path:
    """The sweep's task files in the cache (every node sees it): reference requests, SLURM's jobs and journal;
    one folder per audit folder, so a resumed audit finds what its killed driver left."""
    digest = hashlib.sha256(str(Path(audit_dir).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "tasks" / digest


def _drive(pool, shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path,
           on_done: Callable[[Cell, CellOutput], None], device: str | None, spool: Path | None,
           gpu: bool = False) -> None:
    """Every shared resource and cell as a task of ``pool``; while they run, each reference training a cell
    announces in ``spool`` becomes a task too (urgent: a cell waits on it), once per key. Returns when every
    cell is written; raises a cell's error."""
    from collafuse.attacks.membership.references import JOB_SUFFIX, ReferenceCache, run_reference_task

    cache_dir = Path(cache_dir).resolve()  # workers elsewhere (Ray, SLURM) do not share this process's folder
    spool = None if spool is None else Path(spool).resolve()
    cells: dict[str, Cell] = {}
    waiting: set[str] = set()
    for kind, cell in shared:
        key = f"shared:{kind}:{cell.config_hash}"
        pool.submit(key, build_shared, kind, cell, str(cache_dir), *_device_arg(device), gpu=gpu)
        waiting.add(key)
    for cell in pending:
        key = f"cell:{cell.config_hash}"
        cells[key] = cell
        pool.submit(key, cell_task, cell, str(cache_dir), device, None if spool is None else str(spool), gpu=gpu)
        waiting.add(key)
    references = str(ReferenceCache.under(cache_dir).root)
    requested: set[str] = set()
    while waiting:
        for done in pool.poll(0.5):
            if done.key.startswith("ref:"):
                if done.error is not None:  # the cell that needs it trains it itself
                    print(f"collafuse: warning: reference task {done.key[4:]} failed ({type(done.error).__name__}: "
                          f"{str(done.error)[:200]}); the cell that needs it trains it", file=sys.stderr)
                continue
            waiting.discard(done.key)
            if done.error is not None:
                raise done.error
            if done.key in cells:
                on_done(cells[done.key], done.value)
        if spool is not None and spool.is_dir():
            for path in sorted(spool.glob(f"*{JOB_SUFFIX}")):
                key = path.name[: -len(JOB_SUFFIX)]
                if key not in requested:
                    requested.add(key)
                    pool.submit(f"ref:{key}", run_reference_task, str(path), references, gpu=gpu, urgent=True)


def _run_pool(pool, shared, pending, cache_dir: Path, on_done, device, spool: Path | None, gpu: bool) -> None:
    """:func:`_drive` on ``pool``; on an interrupt or an error the pool's work is stopped and the temporaries
    of its ended workers are removed from the cache (a system half trained: their pids are dead)."""
    try:
        _drive(pool, shared, pending, cache_dir, on_done, device, spool, gpu)
    except BaseException:
        pool.close(cancel=True)
        sweep_stale_partials(cache_dir, depth=2)
        raise
    else:
        pool.close(cancel=True)  # what still runs is a reference task whose cells are all written: not needed
    finally:
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)


def _local(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int,
           on_done: Callable[[Cell, CellOutput], None], device: str | None = None, gpus: int = 0) -> None:
    """Shared resources first in the queue, then the cells, in worker processes (in this one when
    jobs = 1): while one worker trains the attacker's denoiser, the others already train systems, and the
    reference models a cell waits on go before the queued cells. With ``gpus`` > 0 (cells on CUDA), each
    worker owns one GPU (``jobs`` ≤ ``gpus``). A worker killed meanwhile costs its tasks, run again."""
    pool = LocalPool(jobs, gpus, initializer=_init_worker)
    spool = None if jobs <= 1 else Path(cache_dir) / "tasks" / f"requests-{os.getpid()}-{secrets.token_hex(4)}"
    _run_pool(pool, shared, pending, Path(cache_dir), on_done, device, spool, gpus > 0)


def _ray(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int, address: str | None,
         on_done: Callable[[Cell, CellOutput], None], device: str | None = None, gpu_cells: bool = False) -> None:
    """Every task on Ray (a local Ray of ``jobs`` CPUs, or the cluster at ``address``, whose nodes must share
    the cache folder): the shared resources, the cells and the reference models they wait on.
    ``gpu_cells``: the cells resolve to CUDA, so each task asks Ray for one GPU (Ray then sets
    CUDA_VISIBLE_DEVICES for it: one task per GPU at a time). A task whose worker dies runs again elsewhere."""
    pool = RayPool(jobs, address, options=ray_options)
    spool = Path(cache_dir) / "tasks" / f"requests-{os.getpid()}-{secrets.token_hex(4)}"
    _run_pool(pool, shared, pending, Path(cache_dir), on_done, device, spool, gpu_cells)


def ray_options(gpu_cells: bool) -> dict[str, Any]:
    """Ray's resource request for one task: a CPU, and a GPU when the cells run on CUDA; a task whose worker
    dies is run again (tasks are pure, their outputs cached atomically)."""
    return {"num_cpus": 1, "max_retries": DEFAULT_RETRIES, **({"num_gpus": 1} if gpu_cells else {})}


def _slurm(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, audit_dir: Path,
           on_done: Callable[[Cell, CellOutput], None], device: str | None = None,
           options: SlurmOptions | None = None) -> None:
    """Every task a SLURM job through submitit (:class:`~collafuse.tasks.SlurmPool`): the cells as one job
    array (at most ``options.array_size`` at once), each reference model a cell waits on as a job of its
    own. The job files and the journal are in :func:`tasks_folder`, so a driver started again attaches to
    the jobs a killed one left. The cache folder must be on storage every node shares."""
    folder = tasks_folder(cache_dir, audit_dir)
    pool = SlurmPool(folder / "slurm", options or current_slurm_options())
    _run_pool(pool, shared, pending, Path(cache_dir), on_done, device, folder / "requests", False)
    shutil.rmtree(folder, ignore_errors=True)  # every cell written: no job of this sweep to attach to again


_SLURM_OPTIONS: contextvars.ContextVar[SlurmOptions | None] = contextvars.ContextVar("slurm_options", default=None)


def current_slurm_options() -> SlurmOptions:
    return _SLURM_OPTIONS.get() or SlurmOptions()


@contextlib.contextmanager
def slurm_settings(options: SlurmOptions | None):
    """Within the block, ``--backend slurm`` sweeps submit with ``options`` (partition, time, GPUs per task,
    array size: the command line's over the grid's ``slurm:`` block)."""
    token = _SLURM_OPTIONS.set(options)
    try:
        yield options
    finally:
        _SLURM_OPTIONS.reset(token)


def slurm_options(grid_block: Any = None, **command_line: Any) -> SlurmOptions:
    """The SLURM options of a sweep: the defaults, then the grid's ``slurm:`` block, then the command line
    (values given as None are not given). Checked (one line on a bad value)."""
    options = SlurmOptions()
    if grid_block is not None:
        options = options.merged(**{k: getattr(grid_block, k) for k in ("partition", "gpus_per_task", "array_size")},
                                 time_min=None if grid_block.time is None else parse_time_minutes(grid_block.time))
    time_value = command_line.pop("time", None)
    options = options.merged(**command_line, time_min=None if time_value is None else parse_time_minutes(time_value))
    return options.check()


def remove_partials(audit_dir: Path) -> list[Path]:
    """Temporary files of a sweep that was killed before it could rename them (never a finished file,
    never one of a live process): in the audit folder, cells/ and artifacts/<hash>/."""
    return sweep_stale_partials(audit_dir, depth=2)


def run_sweep(
    cells: list[Cell],
    audit_dir: Path,
    cache_dir: Path,
    jobs: int = 1,
    backend: str = "local",
    address: str | None = None,
    progress: bool = True,
    device: str | None = None,
) -> SweepStats:
    """Compute every cell that is not finished in ``audit_dir``; return which were reused and computed.

    ``device``: the audit's ``--device`` (None: each cell's grid ``device``, ``auto`` by default). Cells
    that resolve to CUDA run one per GPU at a time (local: ``jobs`` capped at the GPU count; Ray: one
    GPU requested per task)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    cells = _unique(cells)
    stats = SweepStats(total=len(cells))
    remove_partials(audit_dir)
    for cell in cells:  # named run folders: still the content they were keyed by (else refused, never reused)
        reverify_run(cell)
    pending, unverified = [], []
    for cell in cells:  # every cell path is checked before any work starts (a folder there: ConfigError)
        record, problem = check_cell(audit_dir, cell.config_hash)
        if record is not None:
            stats.reused.append(cell.config_hash)
        else:
            pending.append(cell)
            if problem is not None:
                unverified.append((cell, problem))
    for cell, problem in unverified:
        print(f"collafuse: warning: cell file {cell_path(audit_dir, cell.config_hash)} ({cell.cell_id}) does not "
              f"verify: {problem}; recomputing it", file=sys.stderr)
    for cell in stale_run_cells(audit_dir, [c for c in pending if c.run_dir is not None]):
        print(f"collafuse: warning: the run folder {cell.run_dir} changed since its cell ({cell.cell_id}) was "
              "computed; its old verdict is not reused: recomputing it", file=sys.stderr)
    stats.recomputed = [cell.config_hash for cell, _ in unverified]
    if not pending:
        return stats
    (audit_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    pending.sort(key=lambda c: c.kind != "system")  # the long cells first, so workers finish together
    shared = shared_tasks(pending)
    bar = tqdm(total=len(cells), initial=len(stats.reused), desc="audit cells", unit="cell", disable=not progress,
               file=sys.stderr)

    def on_done(cell: Cell, out: CellOutput) -> None:
        write_cell(audit_dir, cell, out)
        stats.computed.append(cell.config_hash)
        bar.set_postfix_str(f"{cell.kind} c={cell.cut_ratio:.2f} {cell.defense}", refresh=False)
        bar.update(1)

    on_gpu = "cuda" in sweep_devices(pending, device)
    gpus = gpu_count() if on_gpu else 0
    try:
        if backend == "ray":
            _ray(shared, pending, cache_dir, jobs, address, on_done, device, gpu_cells=on_gpu)
        elif backend == "slurm":
            _slurm(shared, pending, cache_dir, audit_dir, on_done, device)
        else:
            _local(shared, pending, cache_dir, device_jobs(jobs, {"cuda"} if on_gpu else set(), gpus), on_done,
                   device, gpus)
    finally:
        bar.close()
    return stats
