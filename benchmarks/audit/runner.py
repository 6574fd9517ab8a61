"""Run the cells of a grid: locally in processes, or on Ray; cached, resumable (issue 6 item 2).

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
evaluation classifier), which is itself written atomically.

Backends give the same numbers because a cell is a pure function of its config
computed on one thread (:func:`~.cells.compute_cell`). With Ray on a real cluster,
the cache folder must be on storage that every node shares; stale temporaries there
are judged by the process ids of the driver's machine, so do not start audits from
two machines over one cache at the same time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from collafuse.errors import ConfigError, RunError
from collafuse.fsutil import sweep_stale_partials
from collafuse.jsonio import dumps, encode_number

from collafuse.benchmarks.audit.cells import CellOutput, build_shared, cell_device, compute_cell, shared_resources
from collafuse.benchmarks.audit.grid import Cell, canonical_hash

CELLS_DIR = "cells"
ARTIFACTS_DIR = "artifacts"
BACKENDS = ("local", "ray")


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


def _local(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int,
           on_done: Callable[[Cell, CellOutput], None], device: str | None = None, gpus: int = 0) -> None:
    """Shared resources first in the queue, then the cells, in worker processes (in this one when
    jobs = 1): while one worker trains the attacker's denoiser, the others already train systems.
    With ``gpus`` > 0 (cells on CUDA), each worker owns one GPU (``jobs`` ≤ ``gpus``)."""
    if jobs <= 1:
        for kind, cell in shared:
            build_shared(kind, cell, cache_dir, *_device_arg(device))
        for cell in pending:
            on_done(cell, compute_cell(cell, cache_dir, *_device_arg(device)))
        return
    ctx = get_context("spawn")
    init: dict[str, Any] = {}
    if gpus > 0:
        queue = ctx.Queue()
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible[:gpus] if len(visible) >= gpus else [str(i) for i in range(gpus)]
        for i in range(jobs):  # jobs <= gpus: a GPU each
            queue.put(ids[i % gpus])
        init = {"initializer": _claim_gpu, "initargs": (queue,)}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, **init) as pool:
        futures: dict[Any, Cell | None] = {pool.submit(build_shared, kind, cell, cache_dir, *_device_arg(device)): None
                                           for kind, cell in shared}
        futures.update({pool.submit(compute_cell, cell, cache_dir, *_device_arg(device)): cell for cell in pending})
        try:
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for fut in done:
                    result = fut.result()
                    if futures[fut] is not None:
                        on_done(futures[fut], result)
        except BaseException:
            workers = list((getattr(pool, "_processes", None) or {}).values())  # gone after shutdown()
            manager = getattr(pool, "_executor_manager_thread", None)
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_workers(workers, cache_dir)
            if manager is not None:
                manager.join(timeout=10)  # it notices the ended workers and closes its queues
            raise


def _stop_workers(workers: list, cache_dir: Path) -> None:
    """Interrupted (Ctrl-C, SIGTERM, an error): end the workers now rather than wait for their cells (only
    this process writes cells, so their results would be dropped anyway), then remove the temporaries they
    leave in the cache (a system half trained): once joined, their pids are dead."""
    for proc in workers:
        with contextlib.suppress(OSError, ValueError):  # already gone
            proc.terminate()
    for proc in workers:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            proc.join(timeout=10)
    sweep_stale_partials(cache_dir, depth=2)


def _ray(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int, address: str | None,
         on_done: Callable[[Cell, CellOutput], None], device: str | None = None, gpu_cells: bool = False) -> None:
    """Every task on Ray; ``gpu_cells``: the cells resolve to CUDA, so each task asks Ray for one GPU
    (Ray then sets CUDA_VISIBLE_DEVICES for it: one cell per GPU at a time)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'collafuse[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=max(1, jobs), **kwargs)
    try:
        options = ray_options(gpu_cells)
        build = ray.remote(**options)(build_shared)
        task = ray.remote(**options)(compute_cell)
        refs: dict[Any, Cell | None] = {build.remote(kind, cell, str(cache_dir), *_device_arg(device)): None
                                        for kind, cell in shared}
        refs.update({task.remote(cell, str(cache_dir), *_device_arg(device)): cell for cell in pending})
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    cell = refs.pop(ref)
                    result = ray.get(ref)
                    if cell is not None:
                        on_done(cell, result)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def ray_options(gpu_cells: bool) -> dict[str, Any]:
    """Ray's resource request for one task: a CPU, and a GPU when the cells run on CUDA."""
    return {"num_cpus": 1, "max_retries": 0, **({"num_gpus": 1} if gpu_cells else {})}


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
        else:
            _local(shared, pending, cache_dir, device_jobs(jobs, {"cuda"} if on_gpu else set(), gpus), on_done,
                   device, gpus)
    finally:
        bar.close()
    return stats
