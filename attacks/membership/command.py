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

import glob
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from collafuse.attacks.membership.catalog import ATTACKS, DEFAULT_ATTACKS
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.engine import MembershipResult, MembershipSettings, run_membership
from collafuse.attacks.membership.metrics import save_curve_png, save_roc_png
from collafuse.attacks.membership.targets import TARGETS
from collafuse.errors import CollafuseError
from collafuse.fsutil import publish_no_clobber
from collafuse.jsonio import dumps


def _resolve_out(run_dir: Path, out: str | None) -> Path:
    path = Path(out) if out is not None else run_dir.parent / f"{run_dir.name}-membership.json"
    if path.suffix.lower() != ".json":
        raise CollafuseError(f"--out must end in .json, got {path.name!r}")
    if os.path.lexists(path):
        raise CollafuseError(f"{path} already exists; choose a new file")
    # The PNGs beside it are named per target (server, client_<k>, samples_<k>, payload): refuse
    # before any work if a file of one of those names is already there (never overwrite the user's).
    if path.parent.is_dir():
        stem = glob.escape(path.stem)
        for pattern in (f"{stem}_roc_*.png", f"{stem}_steps_*.png"):
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
                _tmp_png(roc_path), f"membership ROC, {key} ({target.threat})",
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
        tmp.write_text(dumps(report, indent=1))
        publish_no_clobber(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for p in [*written, *temps]:
            p.unlink(missing_ok=True)
        raise
    return [out, *written]


def run_command(run_dir: Path, attacks: str | None, targets: str | None, out: str | None, progress: bool,
                device: str | None = None, references: int | None = None,
                formal_for: Callable[[Any], Mapping[str, float]] | None = None) -> int:
    """The CLI entry point: parse names, load the run, audit, write. Returns the exit code.
    ``references``: reference models per target for lira / rmia (None = the settings' default).
    ``formal_for``: run → threat → formal ε, set beside the one-run bounds (the caller knows the defenses)."""
    from collafuse.runs import Run

    attack_names = ATTACKS.parse(attacks) if attacks is not None else DEFAULT_ATTACKS  # reference attacks: only when named
    target_names = TARGETS.parse(targets)
    if references is not None and references < 2:
        raise CollafuseError(f"--references must be >= 2 (an IN and an OUT model per candidate), got {references}")
    settings = MembershipSettings() if references is None else MembershipSettings(signals=SignalSettings(references=references))
    run_dir = Path(run_dir)
    out_path = _resolve_out(run_dir, out)
    run = Run.load(run_dir, device=device)  # every model query runs on this device
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
    print(f"membership report written to {out_path}")
    return 0
