"""The Python API (DESIGN.md §8): the command line's operations as functions, same behaviour.

Every function applies a config exactly as ``collafuse …`` does, because the command
line calls these functions (or the functions under them): ``train`` turns the config's
``defenses:`` into hooks (:func:`collafuse.defenses.build_hooks`) and warns about the
threats none of them covers; the attacks and the audit run the same engines and, when
asked to write files, the same writers. Bad input raises a
:class:`~collafuse.errors.CollafuseError` subclass (the CLI prints its one line).

Like ``collafuse/cli.py``, this module joins the core and its wings (attacks, defenses,
benchmarks); the core itself never imports it. The wings are imported inside the
functions, so ``import collafuse.api`` stays cheap.

See ``docs/API.md`` for examples.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from collafuse.config import RunConfig, config_from_dict, load_config
from collafuse.errors import ConfigError, RunError
from collafuse.runs import Run, create_run
from collafuse.training import Hooks

if TYPE_CHECKING:  # pragma: no cover
    from collafuse.attacks.membership.engine import MembershipResult, MembershipSettings
    from collafuse.attacks.reconstruction.denoiser import DenoiserConfig
    from collafuse.attacks.reconstruction.engine import RunReconstruction

__all__ = [
    "AuditResult", "MembershipShiftWarning", "ReportFiles", "UncoveredThreatsWarning", "attack_membership", "attack_reconstruct", "audit",
    "export_run", "hooks_for", "import_deployment", "load", "membership_shift", "report", "resolve_config", "train",
    "train_run",
]

ConfigLike = RunConfig | Mapping[str, Any] | str | Path | None
RunLike = Run | str | Path
Names = str | Iterable[str] | None


class UncoveredThreatsWarning(UserWarning):
    """A run was trained with threats (DESIGN §3) that no configured defense addresses."""


# -- configs and runs ---------------------------------------------------------------------

def resolve_config(config: ConfigLike) -> RunConfig:
    """A :class:`RunConfig` from a YAML path, a plain dict (validated), a RunConfig, or None (the default)."""
    if isinstance(config, RunConfig):
        return config
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        return config_from_dict(dict(config))
    raise ConfigError(f"config must be a YAML path, a dict or a RunConfig, got {type(config).__name__}")


def hooks_for(config: RunConfig) -> Hooks:
    """The core's hooks for ``config.defenses`` (validated); the plain protocol when there are none.

    :func:`collafuse.hooks.hooks_for`, with ``collafuse.defenses`` imported so that its builder is registered."""
    from collafuse.hooks import hooks_for as core_hooks_for

    if config.defenses:
        import collafuse.defenses  # noqa: F401  (registers the one hook builder)
    return core_hooks_for(config)


def uncovered(config: RunConfig) -> list[str]:
    """Threats (T1..T5) that none of ``config.defenses`` addresses."""
    from collafuse.defenses import uncovered_threats

    return uncovered_threats(config.defenses, config)


def train_run(config: ConfigLike, out: str | Path, *, progress: bool = False) -> tuple[Path, list[str]]:
    """Train and write a run folder; return its path and the threats no defense covers.

    The one training path: ``collafuse train`` and :func:`train` both call it.
    """
    cfg = resolve_config(config)
    path = create_run(cfg, Path(out), hooks=hooks_for(cfg), progress=progress)
    return path, uncovered(cfg)


def train(config: ConfigLike, out: str | Path, *, progress: bool = False) -> Run:
    """Train a split system from ``config`` (YAML path, dict, RunConfig or None) into the new folder ``out``.

    The config's ``defenses:`` are applied exactly as ``collafuse train`` applies them, and
    run.json records every hook that ran. Threats no defense covers are reported with an
    :class:`UncoveredThreatsWarning`. Returns the run, loaded back (and hash-checked) from disk.
    """
    path, left = train_run(config, out, progress=progress)
    if left:
        warnings.warn(UncoveredThreatsWarning(f"no configured defense addresses {', '.join(left)}"), stacklevel=2)
    return Run.load(path)


def load(run_dir: str | Path, device: str | None = None) -> Run:
    """A run folder written by :func:`train` / ``collafuse train`` / :func:`import_deployment`, verified
    against the hashes in run.json; its models on ``device`` (auto/None, cpu, cuda: DESIGN §10)."""
    return Run.load(run_dir, device=device)


class MembershipShiftWarning(UserWarning):
    """The member and non-member images of a run differ without the model (DESIGN §4.2's model-blind control):
    membership results on it are not evidence of leakage, and the audit's membership verdicts are INCONCLUSIVE."""


def import_deployment(manifest: str | Path, out: str | Path) -> Path:
    """``collafuse import MANIFEST --out RUN_DIR`` (DESIGN §9): a deployment trained elsewhere → a run folder.

    The manifest names the member and non-member sets, so a distribution shift between them is one manifest
    away: the model-blind control (:func:`membership_shift`) runs at once and a shift is reported with a
    :class:`MembershipShiftWarning` (the CLI prints it)."""
    from collafuse.deployment import import_deployment as _import

    path = _import(Path(manifest), Path(out))
    shift = membership_shift(path)
    if shift is not None:
        warnings.warn(MembershipShiftWarning(shift), stacklevel=2)
    return path


def membership_shift(run_or_dir: RunLike, limit: float | None = None) -> str | None:
    """The model-blind control on a run's whole member set against its non-members (DESIGN §4.2): a sentence
    when a classifier that sees only the images tells them apart (AUC above ``limit``, default the policy's
    0.6, with permutation p < 0.01), else None (also when the run holds out no non-members)."""
    from collafuse.attacks.membership.controls import BLIND_AUC_WARNING, blind_control

    run = _run(run_or_dir)
    data, splits = run.load_data()
    members = torch.cat([splits.training_set(k) for k in range(len(splits.clients))])
    if min(len(members), len(splits.nonmembers)) < 2:
        return None
    blind = blind_control(data.images[members], data.images[splits.nonmembers], run.config.seed)
    if not blind.exceeds(BLIND_AUC_WARNING if limit is None else limit):
        return None
    auc = blind.auc
    return (f"members and non-members differ without the model: a classifier that sees only the images tells them "
            f"apart with AUC {auc.value:.3f} (permutation p = {blind.p_value:.3g}, {len(members)} members, "
            f"{len(splits.nonmembers)} non-members); membership attacks on this run measure that difference, not the "
            "model, and the audit's membership verdicts will be INCONCLUSIVE. Give non-members from the members' "
            "own distribution (e.g. a random held-out split of the same source)")


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """``collafuse export RUN_DIR --out DIR``: ``DIR/manifest.yaml`` and its files, the inverse of the import."""
    from collafuse.export import export_run as _export

    return _export(Path(run_dir), Path(out))


def _run(run_or_dir: RunLike) -> Run:
    return run_or_dir if isinstance(run_or_dir, Run) else Run.load(run_or_dir)


def _names_text(names: Names) -> str | None:
    """What the CLI's ``--attacks a,b`` would hold: None (all), or the names joined by commas."""
    if names is None or isinstance(names, str):
        return names
    return ",".join(str(n) for n in names)


# -- attacks --------------------------------------------------------------------------------

def attack_reconstruct(
    run_or_dir: RunLike,
    attacks: Names = None,
    *,
    out: str | Path | None = None,
    denoiser_config: DenoiserConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> RunReconstruction:
    """Reconstruction attacks (T1) on a run's server view, scored against its audit key.

    ``attacks``: names (a list or ``"a,b"``; None = all). Returns the engine's typed
    :class:`~collafuse.attacks.reconstruction.engine.RunReconstruction`. Files are written
    only when ``out`` (a new ``.json``) is given: the same JSON, PNG grid and per-image
    arrays as ``collafuse attack reconstruct --out``, through the same writer.
    """
    from collafuse.attacks.reconstruction import command
    from collafuse.attacks.reconstruction.engine import reconstruct_run
    from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS

    names = RECONSTRUCTION_ATTACKS.parse(_names_text(attacks))
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        command._check_output(out_path)  # before any work, as the CLI does
    run = _run(run_or_dir)
    cache = Path(cache_dir) if cache_dir is not None else None
    attacked = reconstruct_run(run, names, denoiser_config=denoiser_config, denoiser_cache=cache,
                               forbid_under=(run.path,), progress=progress)
    if out_path is not None:
        result = command.result_json(run, names, attacked, out_path, cache)
        grid = (attacked.evaluation, attacked.truth, attacked.view) if attacked.attacked else None
        command._write_atomic(result, out_path, grid)
    return attacked


def attack_membership(
    run_or_dir: RunLike,
    attacks: Names = None,
    targets: Names = None,
    *,
    out: str | Path | None = None,
    settings: MembershipSettings | None = None,
    progress: bool = False,
) -> MembershipResult:
    """Membership inference (T1–T5) on a run's payloads, server, clients, samples and co-clients' hand-offs.

    ``attacks`` / ``targets``: names (a list or ``"a,b"``; None = all that apply; targets
    from server, client, samples, payload, coclient). Returns the engine's typed
    :class:`~collafuse.attacks.membership.engine.MembershipResult`; writes the JSON report
    and ROC PNGs (``collafuse attack membership``'s writer) only when ``out`` is given.
    """
    from collafuse.attacks.membership import command
    from collafuse.attacks.membership.catalog import ATTACKS, DEFAULT_ATTACKS
    from collafuse.attacks.membership.engine import run_membership
    from collafuse.attacks.membership.targets import TARGETS

    attacks_text = _names_text(attacks)
    attack_names = ATTACKS.parse(attacks_text) if attacks_text is not None else DEFAULT_ATTACKS
    target_names = TARGETS.parse(_names_text(targets))
    run_dir = run_or_dir.path if isinstance(run_or_dir, Run) else Path(run_or_dir)
    out_path = command._resolve_out(run_dir, str(out)) if out is not None else None
    run = _run(run_or_dir)
    result = run_membership(run, attack_names, target_names, settings, explicit_attacks=attacks_text is not None,
                            progress=progress, formal=formal_ceilings(run))
    if out_path is not None:
        command.write_report(result, out_path)
    return result


def formal_ceilings(run: Run) -> dict[str, "Ceiling"]:
    """The formal guarantee per threat as a trade-off curve (DESIGN §4.2 "The ceiling", §4.3, §5): its ε is set
    beside each one-run bound, its curve is the ceiling of every ROC. T1 the payload channel's (μ-GDP where
    its releases compose as Gaussians; ∞ without a release defense at c = 0), T2 the server model's (never
    worse than the payload channel), T3 the client models' (DP-SGD's accountant; ∞ without it), T4 both
    composed. Read by the defenses from the run's own hook records: attacks never import the defenses, so
    their callers hand this in."""
    from collafuse.defenses import setting_from_run

    return setting_from_run(run.info, run.config).ceilings()


# -- the audit ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportFiles:
    """The report pages of an audit folder."""

    html: Path
    markdown: Path


@dataclass(frozen=True)
class AuditResult:
    """What ``collafuse audit`` decided: ``status`` is "pass" (some setting meets the policy) or "fail".

    ``text``: the verdict sentence; ``recommendation``: the cheapest passing setting (None
    when none passes); ``verdict``: audit.json's whole ``verdict`` entry.
    """

    status: str
    text: str
    recommendation: dict[str, Any] | None
    verdict: dict[str, Any]
    audit_dir: Path
    audit_json: Path
    report: ReportFiles

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@contextlib.contextmanager
def _quiet(progress: bool):
    """The command's summary lines go to stdout; a library call stays silent unless asked for progress."""
    if progress:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _report_files(audit_dir: Path) -> ReportFiles:
    return ReportFiles(audit_dir / "report.html", audit_dir / "report.md")


def audit(
    config: str | Path | None = None,
    *,
    out: str | Path,
    policy: str | Path | None = None,
    quick: bool = False,
    jobs: int | None = None,
    cache: str | Path | None = None,
    backend: str = "local",
    address: str | None = None,
    progress: bool = False,
) -> AuditResult:
    """Sweep cut points × defenses, score every threat, check the policy, write the report (``collafuse audit``).

    ``config``: a grid YAML (None = the embedded default grid; ``quick=True`` the small one);
    ``policy``: a policy YAML (None = the embedded default); ``out``: the audit folder (new,
    empty, or an earlier audit to resume); ``jobs``, ``cache``, ``backend``, ``address`` as
    the CLI flags. Raises KeyboardInterrupt if the sweep was interrupted (finished cells are kept).
    """
    from collafuse.benchmarks.audit.command import (
        AUDIT_JSON,
        EXIT_INTERRUPTED,
        run_audit_command,
    )

    with _quiet(progress):
        code = run_audit_command(
            None if config is None else str(config), None if policy is None else str(policy), quick, str(out),
            jobs, backend, address, None if cache is None else str(cache), progress=progress,
        )
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt("audit interrupted; run it again on the same folder to resume")
    audit_dir = Path(out)
    meta = json.loads((audit_dir / AUDIT_JSON).read_text())
    decision = meta["verdict"]
    return AuditResult(decision["status"], decision["text"], decision.get("recommendation"), decision, audit_dir,
                       audit_dir / AUDIT_JSON, _report_files(audit_dir))


def report(audit_dir: str | Path) -> ReportFiles:
    """Rebuild report.html and report.md of a finished audit folder (``collafuse report``)."""
    from collafuse.benchmarks.audit.command import run_report_command

    with _quiet(False):
        run_report_command(str(audit_dir))
    files = _report_files(Path(audit_dir))
    if not files.html.is_file():  # pragma: no cover - the command raises first
        raise RunError(f"{audit_dir}: the report was not written")
    return files
