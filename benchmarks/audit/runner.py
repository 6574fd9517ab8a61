"""Run the cells of a grid: locally in processes, or on Ray; cached, resumable (issue 6 item 2).

A finished cell is one file, ``AUDIT_DIR/cells/<config hash>.json`` (its rows), written
after its artifacts and renamed into place, so it exists only when complete. Before
running, the runner skips every cell whose file exists; a sweep killed at any moment
(Ctrl-C, SIGKILL, power) therefore resumes with no cell lost, duplicated or half
written. Only this process (the driver) writes into AUDIT_DIR; workers only compute
and fill the content-addressed cache (trained systems, the attacker's denoiser, the
evaluation classifier), which is itself written atomically.

Backends give the same numbers because a cell is a pure function of its config
computed on one thread (:func:`~.cells.compute_cell`). With Ray on a real cluster,
the cache folder must be on storage that every node shares.
"""
from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from collafuse.errors import ConfigError, RunError

from collafuse.benchmarks.audit.cells import CellOutput, build_shared, compute_cell, shared_resources
from collafuse.benchmarks.audit.grid import Cell

CELLS_DIR = "cells"
ARTIFACTS_DIR = "artifacts"
BACKENDS = ("local", "ray")


@dataclass
class SweepStats:
    total: int
    reused: list[str] = field(default_factory=list)     # config hashes found finished
    computed: list[str] = field(default_factory=list)   # config hashes computed by this sweep


def cell_path(audit_dir: Path, config_hash: str) -> Path:
    return audit_dir / CELLS_DIR / f"{config_hash}.json"


def read_cell(audit_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """A finished cell's record, or None if absent. A file that cannot be read is an error, not a miss."""
    path = cell_path(audit_dir, config_hash)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["rows"], record["cell"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: finished-cell file unreadable ({exc}); delete it to recompute that cell") from None
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
              "artifacts": names, "info": out.info}
    _atomic_write(cell_path(audit_dir, h), json.dumps(record, indent=1, allow_nan=False).encode())


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: ε = ∞ (no bound) is stored as the string "inf"."""
    return {k: ("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}


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


def _local(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int,
           on_done: Callable[[Cell, CellOutput], None]) -> None:
    """Shared resources first in the queue, then the cells, in worker processes (in this one when
    jobs = 1): while one worker trains the attacker's denoiser, the others already train systems."""
    if jobs <= 1:
        for kind, cell in shared:
            build_shared(kind, cell, cache_dir)
        for cell in pending:
            on_done(cell, compute_cell(cell, cache_dir))
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures: dict[Any, Cell | None] = {pool.submit(build_shared, kind, cell, cache_dir): None for kind, cell in shared}
        futures.update({pool.submit(compute_cell, cell, cache_dir): cell for cell in pending})
        try:
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for fut in done:
                    result = fut.result()
                    if futures[fut] is not None:
                        on_done(futures[fut], result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray(shared: list[tuple[str, Cell]], pending: list[Cell], cache_dir: Path, jobs: int, address: str | None,
         on_done: Callable[[Cell, CellOutput], None]) -> None:
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
        build = ray.remote(num_cpus=1, max_retries=0)(build_shared)
        task = ray.remote(num_cpus=1, max_retries=0)(compute_cell)
        refs: dict[Any, Cell | None] = {build.remote(kind, cell, str(cache_dir)): None for kind, cell in shared}
        refs.update({task.remote(cell, str(cache_dir)): cell for cell in pending})
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


def remove_partials(audit_dir: Path) -> None:
    """Temporary files of a sweep that was killed before it could rename them (never a finished file)."""
    for sub in (CELLS_DIR, ARTIFACTS_DIR):
        if (audit_dir / sub).is_dir():
            for tmp in (audit_dir / sub).rglob(".*.partial-*"):
                tmp.unlink(missing_ok=True)


def run_sweep(
    cells: list[Cell],
    audit_dir: Path,
    cache_dir: Path,
    jobs: int = 1,
    backend: str = "local",
    address: str | None = None,
    progress: bool = True,
) -> SweepStats:
    """Compute every cell that is not finished in ``audit_dir``; return which were reused and computed."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    cells = _unique(cells)
    stats = SweepStats(total=len(cells))
    remove_partials(audit_dir)
    pending = []
    for cell in cells:
        if read_cell(audit_dir, cell.config_hash) is not None:
            stats.reused.append(cell.config_hash)
        else:
            pending.append(cell)
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

    try:
        if backend == "ray":
            _ray(shared, pending, cache_dir, jobs, address, on_done)
        else:
            _local(shared, pending, cache_dir, jobs, on_done)
    finally:
        bar.close()
    return stats
