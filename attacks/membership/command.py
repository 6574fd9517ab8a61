"""``collafuse attack membership``: parse the names, run the engine, write the report files (§4.2, §4.3, §8).

The work is done by :func:`~collafuse.attacks.membership.engine.run_membership`; this
module writes its result: one JSON report (atomically: temp file + rename) with, per target and attack,
ROC AUC, TPR at 1 % and 0.1 % FPR, balanced accuracy (bootstrap intervals), empirical ε
lower bounds and the leakage-per-timestep curve (and the same for the model targets of every
``training.snapshots`` epoch, under ``snapshots``); beside it, per target, a log–log ROC PNG
and a per-timestep AUC PNG. Targets that do not exist in the run (no server at c = 1, no
client models at c = 0) are listed with the reason. Bad input raises
:class:`~collafuse.errors.CollafuseError` (the CLI prints one line and exits 2).
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from collafuse.attacks.membership.catalog import ATTACKS, DEFAULT_ATTACKS
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.controls import BLIND_AUC_WARNING
from collafuse.attacks.membership.engine import MembershipResult, MembershipSettings, run_membership
from collafuse.attacks.membership.metrics import save_curve_png, save_roc_png
from collafuse.attacks.membership.targets import TARGETS
from collafuse.attacks.chunking import memory_budget_bytes
from collafuse.attacks.membership.references import CACHE_SUBDIR as REFERENCES_CACHE
from collafuse.attacks.reconstruction.denoiser import CACHE_ENV, default_cache_dir
from collafuse.errors import CollafuseError
from collafuse.config import MAX_REFERENCES
from collafuse.fsutil import check_output, probe_writable, publish_no_clobber
from collafuse.jsonio import dumps
from collafuse.tradeoff import Ceiling


def _resolve_out(run_dir: Path, out: str | None) -> Path:
    path = Path(out) if out is not None else run_dir.parent / f"{run_dir.name}-membership.json"
    if path.suffix.lower() != ".json":
        raise CollafuseError(f"--out must end in .json, got {path.name!r}")
    if os.path.lexists(path):
        raise CollafuseError(f"{path} already exists; choose a new file")
    check_output(path, "--out")  # a file above it, read-only or full: refused before any work
    # The PNGs beside it are named per target (server, client_<k>, samples_<k>, payload): refuse
    # before any work if a file of one of those names is already there (never overwrite the user's).
    if path.parent.is_dir():
        stem = glob.escape(path.stem)
        for pattern in (f"{stem}_roc_*.png", f"{stem}_steps_*.png", f"{stem}_scores.parquet"):
            clash = sorted(path.parent.glob(pattern))
            if clash:
                raise CollafuseError(f"{clash[0]} already exists and would be overwritten by this report; "
                                     "move it or choose a new --out")
    return path


def _tmp_png(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial-{os.getpid()}.png")


def write_report(result: MembershipResult, out: Path) -> list[Path]:
    """PNGs beside ``out`` then the JSON, each atomically; on failure nothing is left behind."""
    report = result.to_json()
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    temps: list[Path] = []  # each PNG is drawn into a temporary name, then moved beside the JSON
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        for key, target in result.targets.items():
            if not target.attacks:
                continue
            roc_path = out.with_name(f"{out.stem}_roc_{key}.png")
            temps.append(_tmp_png(roc_path))
            save_roc_png(
                {name: (a.member_scores, a.nonmember_scores) for name, a in target.attacks.items()},
                _tmp_png(roc_path), f"membership ROC, {key} ({target.threat})", ceiling=result.formal.get(target.threat),
            )
            publish_no_clobber(_tmp_png(roc_path), roc_path)  # a file created meanwhile is not overwritten
            written.append(roc_path)
            report["targets"][key]["roc_png"] = roc_path.name
            curves = {name: (a.steps, a.step_aucs) for name, a in target.attacks.items() if a.steps}
            if curves:
                curve_path = out.with_name(f"{out.stem}_steps_{key}.png")
                temps.append(_tmp_png(curve_path))
                save_curve_png(curves, _tmp_png(curve_path), f"leakage per timestep, {key}")
                publish_no_clobber(_tmp_png(curve_path), curve_path)
                written.append(curve_path)
                report["targets"][key]["steps_png"] = curve_path.name
        scores_path = out.with_name(f"{out.stem}_scores.parquet")
        scores_tmp = out.with_name(f".{out.stem}_scores.partial-{os.getpid()}.parquet")
        temps.append(scores_tmp)
        result.score_frame().to_parquet(scores_tmp, index=False)
        publish_no_clobber(scores_tmp, scores_path)
        written.append(scores_path)
        report["scores_parquet"] = scores_path.name
        tmp.write_text(dumps(report, indent=1))
        publish_no_clobber(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for p in [*written, *temps]:
            p.unlink(missing_ok=True)
        raise
    return [out, *written]


class PoolTasks:
    """Reference trainings announced by the engine become tasks of ``pool`` (:mod:`collafuse.tasks`), each key
    once; a thread polls the pool (so a local pool dispatches and restarts, Ray reports, SLURM resubmits)."""

    def __init__(self, pool):
        self.pool = pool
        self._lock = threading.Lock()
        self._submitted: set[str] = set()
        self._stop = threading.Event()
        self.failed: list[str] = []
        self._thread = threading.Thread(target=self._poll, daemon=True, name="reference-tasks")
        self._thread.start()

    def announce(self, jobs, cache) -> None:
        from collafuse.attacks.membership.references import run_reference_task

        with self._lock:
            for job in jobs:
                if job.key not in self._submitted:
                    self._submitted.add(job.key)
                    self.pool.submit(f"ref:{job.key}", run_reference_task, job, str(cache.root),
                                     gpu=job.device == "cuda")

    def settled(self, key: str) -> bool:
        """The pool will not train ``key`` any more: its task ended (or it was never handed over)."""
        with self._lock:
            return f"ref:{key}" not in self.pool.outstanding()

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                try:
                    finished = self.pool.poll(0.1) if self.pool.outstanding() else []
                except Exception as exc:  # noqa: BLE001 — the engine trains what no task delivered
                    finished = []
                    self.failed.append(f"{type(exc).__name__}: {exc}")
            self.failed.extend(f.key for f in finished if f.error is not None)
            self._stop.wait(0.05 if finished else 0.2)

    def close(self, cancel: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.pool.close(cancel=cancel)


def check_backend(jobs: int, backend: str) -> None:
    """``--jobs`` and ``--backend`` of ``attack membership``: refused (one line) before any work."""
    from collafuse.tasks import BACKENDS, slurm_available

    if backend not in BACKENDS:
        raise CollafuseError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if jobs < 1:
        raise CollafuseError(f"--jobs must be at least 1, got {jobs}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise CollafuseError("--backend ray needs Ray: pip install 'collafuse[ray]'")
    if backend == "slurm" and slurm_available():
        raise CollafuseError(slurm_available())


@contextlib.contextmanager
def reference_backend(jobs: int = 1, backend: str = "local", address: str | None = None, slurm=None):
    """The reference trainings of the block as tasks of ``backend`` (``local``: ``jobs`` worker processes;
    ``ray``: a local Ray of ``jobs`` CPUs, or the cluster at ``address``; ``slurm``: SLURM jobs with
    ``slurm``'s options, their files under the attacker cache). This process waits for them (and trains only
    what a task failed to deliver). ``local`` with one job: no tasks, every reference is trained here."""
    from collafuse.attacks.membership.references import current_setup, reference_setup
    from collafuse.tasks import open_pool

    if backend == "local" and jobs <= 1:
        yield None
        return
    folder = default_cache_dir() / "tasks" / f"membership-{os.getpid()}-{secrets.token_hex(4)}"
    pool = open_pool(backend, jobs, address, slurm=slurm, folder=folder / "slurm")
    tasks = PoolTasks(pool)
    ok = False
    try:
        with reference_setup(current_setup().cache_dir, tasks, helps=False):
            yield tasks
        ok = True
    finally:
        tasks.close(cancel=True)
        if ok and backend == "slurm":
            shutil.rmtree(folder, ignore_errors=True)
        if not ok:  # workers ended mid-write leave temporaries: removed once their pids are dead
            from collafuse.attacks.membership.references import ReferenceCache
            from collafuse.fsutil import sweep_stale_partials

            sweep_stale_partials(ReferenceCache.under().root)


def run_command(run_dir: Path, attacks: str | None, targets: str | None, out: str | None, progress: bool,
                device: str | None = None, references: int | None = None,
                formal_for: Callable[[Any], Mapping[str, Ceiling]] | None = None, jobs: int = 1,
                backend: str = "local", address: str | None = None, slurm=None) -> int:
    """The CLI entry point: parse names, load the run, audit, write. Returns the exit code.
    ``references``: reference models per target for lira / rmia (None = the settings' default).
    ``formal_for``: run → threat → formal guarantee (:class:`~collafuse.tradeoff.Ceiling`): its ε beside the
    one-run bounds, its curve the ceiling of every ROC (the caller knows the defenses).
    ``jobs``, ``backend``, ``address``, ``slurm``: where the reference models of lira / rmia train
    (:func:`reference_backend`); the results are the same on every backend."""
    from collafuse.runs import Run

    check_backend(jobs, backend)

    attack_names = ATTACKS.parse(attacks) if attacks is not None else DEFAULT_ATTACKS  # reference attacks: only when named
    target_names = TARGETS.parse(targets)
    if references is not None and not 2 <= references <= MAX_REFERENCES:
        raise CollafuseError(f"--references must be in 2..{MAX_REFERENCES} (an IN and an OUT model per candidate; "
                             f"each is one client training), got {references}")
    settings = MembershipSettings() if references is None else MembershipSettings(signals=SignalSettings(references=references))
    memory_budget_bytes()  # $COLLAFUSE_MEMORY_MB: a bad value is one line now, not after the work
    run_dir = Path(run_dir)
    out_path = _resolve_out(run_dir, out)
    if ATTACKS.needing("references", attack_names):  # the reference models are cached there after training
        probe_writable(default_cache_dir() / REFERENCES_CACHE, f"the reference-model cache (${CACHE_ENV})")
    run = Run.load(run_dir, device=device)  # every model query runs on this device
    with reference_backend(jobs, backend, address, slurm):
        result = run_membership(run, attack_names, target_names, settings, explicit_attacks=attacks is not None,
                                progress=progress, formal=formal_for(run) if formal_for is not None else None)
    write_report(result, out_path)
    if progress:
        for row in result.summary_rows():
            where = row["target"] if "epoch" not in row else f"{row['target']}@epoch={row['epoch']}"
            if row.get("available", True):
                def unresolved(key: str) -> str:
                    return "" if row[f"{key}_resolved"] else " (unresolved)"

                print(
                    f"{where:>16} {row['threat']} {row['attack']:>12}  AUC {row['auc']:.3f}  "
                    f"TPR@1%FPR {row['tpr_at_1pct_fpr']:.3f}{unresolved('tpr_at_1pct_fpr')}  "
                    f"TPR@0.1%FPR {row['tpr_at_01pct_fpr']:.3f}{unresolved('tpr_at_01pct_fpr')}  "
                    f"bal.acc {row['balanced_accuracy']:.3f}  eps_LB {row['epsilon_lb']:.2f}  "
                    f"eps_GDP {row['epsilon_gdp']:.2f}"
                )
            else:
                print(f"{where:>16} {row['threat']}  not applicable: {row['reason']}")
        for target, outcome in result.outcomes():
            if outcome.inverted:
                print(f"{target.key:>16} {target.threat} {outcome.name:>12}  signal found, reversed "
                      f"(AUC {outcome.metrics.auc.value:.3f}, significantly below 0.5)")
            if outcome.one_run is not None:
                o = outcome.one_run
                print(f"{target.key:>16} {target.threat} {outcome.name:>12}  one-run eps_LB {o.epsilon_lb:.3f} "
                      f"({o.correct}/{o.k_plus + o.k_minus} correct of m = {o.m} canaries)"
                      + (f"  formal eps {o.formal_epsilon:.3g}" if o.formal_epsilon is not None else ""))
            if outcome.heldout is not None:
                r = outcome.heldout.at(0.01)
                print(f"{target.key:>16} {target.threat} {outcome.name:>12}  held-out threshold for 1% FPR: "
                      f"TPR {r.tpr.value:.3f}, FPR reached {r.fpr.value:.3f}")
            if outcome.blind is not None and not outcome.blind.above:
                print(f"{target.key:>16} {target.threat} {outcome.name:>12}  not significantly above the model-blind "
                      f"baseline (AUC {outcome.metrics.auc.value:.3f} vs blind {target.blind.auc.value:.3f})")
            if outcome.ceiling is not None and outcome.ceiling.above:
                print(f"{target.key:>16} {target.threat} {outcome.name:>12}  AUDIT ERROR: the ROC lies above the "
                      f"formal ceiling ({outcome.ceiling.ceiling.source}): the guarantee or the measurement is wrong")
        for target in result.targets.values():
            if target.blind is not None and target.blind.exceeds(BLIND_AUC_WARNING):
                print(f"{target.key:>16} {target.threat}  WARNING: members and non-members differ without the model "
                      f"(blind AUC {target.blind.auc.value:.3f}, p = {target.blind.p_value:.3g}): membership "
                      "results on this target are not evidence of leakage")
    print(f"membership report written to {out_path}")
    return 0
