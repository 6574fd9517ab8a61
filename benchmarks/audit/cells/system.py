"""A system cell: train (or load) a split system and measure it under every threat, its utility and its cost."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from collafuse.errors import RunError
from collafuse.hooks import hooks_for
from collafuse.runs import RUN_MARKER, Run, create_run, sample_labels
from collafuse.device import resolve_device
from collafuse.tradeoff import Ceiling
from collafuse.transcript import AuditKey, MissingAuditKey, ServerView

from collafuse.attacks.linkage.sender import identify_senders, score_sender_identification
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS as MEMBERSHIP
from collafuse.attacks.membership.engine import MembershipSettings, run_membership
from collafuse.attacks.membership.nn_distance import client_extraction
from collafuse.attacks.membership.targets import attacker_samples
from collafuse.attacks.membership.source import infer_sources
from collafuse.attacks.membership.targets import AuditContext
from collafuse.attacks.membership.coclient_run import attacker_denoiser, coclient_draws, run_extraction, unavailable_reason
from collafuse.attacks.reconstruction.engine import reconstruct_run, resolve_truth_rows
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.view import ViewArrays

from collafuse.benchmarks.audit.costs import compute_costs
from collafuse.benchmarks.audit.grid import Cell, system_hash
from collafuse.benchmarks.audit.handoff import check_handoff
from collafuse.benchmarks.audit.utility import inception_fid, load_or_train_feature_classifier, sample_utility

from .artifacts import SCORES_FILE, grid_rows, parquet_bytes, reconstruction_grid, samples_grid
from .formal import run_setting
from .resources import CLASSIFIER_CACHE, DENOISER_CACHE, cell_device
from .rows import (CellOutput, blind_rows, cost_rows, extraction_rows, formal_rows, handoff_rows, outcome_rows,
                   payload_count_row, reconstruction_rows, roc_curves, row, sender_rows, snapshot_rows, utility_rows)
from .rows import dataset_rows, trend_rows
from .rows import coclient_rows, handoffs_row
from .rows import source_rows
from collafuse.benchmarks.audit.trend import leakage_trends

MEMBERSHIP_TARGETS = {"T1": "payload", "T2": "server", "T3": "client", "T4": "samples", "T5": "coclient"}


def trained_system(cell: Cell, cache_dir: Path, device=None) -> tuple[Path, bool]:
    """The cell's trained system from the cache, trained (on ``device`` when given) and cached (atomically) on a miss."""
    if cell.run_dir is not None:  # systems.runs: an imported deployment (or any run) is attacked, never trained
        return Path(cell.run_dir), True
    cfg = cell.run_config
    path = cache_dir / "systems" / system_hash(cfg)  # keyed by the grid's config: a --device override shares it
    if (path / RUN_MARKER).is_file():
        return path, True
    hooks = hooks_for(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if device is not None:
        cfg = cfg.model_copy(update={"device": resolve_device(device).type})
    try:
        create_run(cfg, path, hooks=hooks, progress=False)
    except RunError:
        if not (path / RUN_MARKER).is_file():  # not a concurrent writer that finished first
            raise
    return path, False


def can_sample(run: Run, k: int) -> bool:
    """Whether client ``k``'s collaborative samples can be drawn: an imported deployment may lack the
    server's or this client's model."""
    return (run.server_model is not None or run.t_hand >= run.schedule.T) and (
        run.client_models[k] is not None or run.t_hand == 0)


def client_samples(run: Run, cell: Cell) -> dict[int, torch.Tensor]:
    """``samples_per_client`` samples finished by each client, drawn once with the T4 attacker's seed
    and shared by the T4 attacks and the utility metrics."""
    return {k: attacker_samples(run, k, cell.samples_per_client, run.config.seed)
            for k in range(len(run.client_models)) if can_sample(run, k)}


def membership_rows(run: Run, cell: Cell, samples: dict[int, torch.Tensor],
                    formal: dict[str, Ceiling] | None = None) -> tuple[list[dict[str, Any]], dict, pd.DataFrame]:
    """Every requested membership attack on its threat's targets: rows, ROC curves with the formal ceilings, and
    every score (the per-record evidence) of the final models; the model targets again on each
    training.snapshots epoch (``*_at_epoch`` rows). ``formal``: threat → the formal guarantee (its ε beside the
    one-run bounds of a run with canaries, its curve the ceiling every ROC is checked against)."""
    rows, roc, ceilings, scores = [], {}, {}, []
    settings = MembershipSettings(signals=SignalSettings(references=cell.references, peer_noise=cell.peer_draws),
                                  n_samples=cell.samples_per_client)
    for threat, target in MEMBERSHIP_TARGETS.items():
        names = tuple(a for a in cell.attacks.get(threat, ()) if a in MEMBERSHIP)
        if not names:
            continue
        result = run_membership(run, names, (target,), settings, samples=samples, formal=formal)
        for key, entry in result.targets.items():
            if not entry.available:
                continue
            if entry.blind is not None:
                rows.extend(blind_rows(threat, key, entry.blind))
            for outcome in entry.attacks.values():
                rows.extend(outcome_rows(threat, key, outcome))
            rows.extend(dataset_rows(threat, key, entry.client, entry.dataset))  # per client, from the scores above
            if threat == "T4" and "nn-distance" in entry.attacks and samples.get(entry.client) is not None:
                rows.extend(extraction_rows(key, client_extraction(run, entry.client, samples[entry.client])))
        roc.update(roc_curves(result))
        ceilings.update({t: c.to_json() for t, c in result.formal.items() if t == threat and c.finite})
        scores.append(result.score_frame())
        for epoch, targets in result.snapshots.items():
            for key, entry in targets.items():
                for outcome in entry.attacks.values():
                    rows.extend(snapshot_rows(threat, key, outcome, epoch))
    if MEMBERSHIP.needing("peers", cell.attacks.get("T3", ())):  # beside the peer attacks: which client holds a member?
        rows.extend(run_source_rows(run, settings))
    if run.snapshot_epochs:  # is the worst AUC still rising at the last epoch? (T2, T3)
        rows.extend(trend_rows(leakage_trends(rows, run.config.training.epochs)))
    frame = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame()
    return rows, ({"targets": roc, "ceilings": ceilings} if roc else {}), frame


def run_source_rows(run: Run, settings: MembershipSettings) -> list[dict[str, Any]]:
    """T3 source inference on the run's client models (:mod:`collafuse.attacks.membership.source`), run in a cell
    whose T3 attacks name a peer attack: it queries what they query (every client model at the peer attacks' fixed
    draws, on each client's member candidates; computed again, not shared), so a T3 list without peers keeps its
    cost. None with < 2 client models."""
    ctx = AuditContext(run, settings.signals, run.config.seed if settings.seed is None else settings.seed)
    score = infer_sources(ctx)
    return [] if score is None else source_rows(score)


def measured_utility(run: Run, cell: Cell, cache_dir: Path, samples: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    """FID, KID, precision/recall and class accuracy of each client's samples and of all of them pooled, in the
    features of the evaluation classifier (on the cell's device); Inception FID when the grid asks for it."""
    data, splits = run.load_data()
    if data.labels is None or data.num_classes == 0 or not all(can_sample(run, k) for k in range(len(run.client_models))):
        return []  # unlabelled data, or a client whose samples cannot be drawn (an imported model not given)
    classifier = load_or_train_feature_classifier(data.images, data.labels, data.num_classes, run.config.seed,
                                                  cache_dir / CLASSIFIER_CACHE, device=run.device)
    n = cell.samples_per_client
    labels = sample_labels(n, run.num_classes) if run.num_classes > 0 else None
    rows = []
    for k in range(len(run.client_models)):
        real = splits.clients[k]
        rows += utility_rows(f"samples_{k}", sample_utility(samples[k], labels, data.images[real], data.labels[real],
                                                            classifier, run.config.seed))
    fakes = torch.cat([samples[k] for k in range(len(run.client_models))])
    pooled_labels = None if labels is None else labels.repeat(len(run.client_models))
    rows += utility_rows("pooled", sample_utility(fakes, pooled_labels, data.images[splits.members],
                                                  data.labels[splits.members], classifier, run.config.seed))
    if cell.inception_fid:
        rows.append(row("utility", "pooled", "inception-v3", "fid_inception",
                        inception_fid(fakes, data.images[splits.members], device=run.device)))
    return rows


def run_sender_rows(run: Run) -> list[dict[str, Any]]:
    """T1 sender identification on a trained run's transcript (none without its audit key: no true senders)."""
    view = ViewArrays.from_server_view(ServerView.open(run.path))
    if len(view) == 0:
        return []
    try:
        key = AuditKey.open(run.path)  # scorer side only
    except MissingAuditKey:
        return []  # an imported deployment without its audit key: the true senders are unknown
    _, sender = resolve_truth_rows(view, key)
    n = run.config.data.num_clients
    return sender_rows(score_sender_identification(identify_senders(view, n), sender, n))


def coclient_extraction_rows(run: Run, cell: Cell, cache_dir: Path) -> list[dict[str, Any]]:
    """T5 (issue 22): each co-client j's ``samples_per_client`` hand-offs (the draws its membership target scores:
    same seed, same count), finished by its own chain and by one Tweedie step of the attacker's denoiser (the T1
    one, shared through the cache; none without an auxiliary split), and the extraction of every other client's
    images by each, per victim and pooled, beside the number drawn. Nothing when the grid asks for no T5 attack."""
    if not any(a in MEMBERSHIP for a in cell.attacks.get("T5", ())):
        return []
    attackers = [j for j in range(len(run.client_models)) if unavailable_reason(run, j) is None]
    if not attackers:
        return []
    _, splits = run.load_data()
    # At t = 0 (central) the hand-off is the finished sample: no Tweedie step to take.
    needs_denoiser = len(splits.aux) >= 2 and run.t_hand > 0
    denoiser = attacker_denoiser(run, run.config.seed, cache_dir / DENOISER_CACHE) if needs_denoiser else None
    rows = []
    for j in attackers:
        finished = coclient_draws(run, j, cell.samples_per_client, run.config.seed, denoiser)
        rows.append(handoffs_row(j, len(finished.handoffs)))
        for extraction in run_extraction(run, finished):
            rows.extend(coclient_rows(extraction))
    return rows


def system_cell(cell: Cell, cache_dir: Path, device=None) -> CellOutput:
    """Train (or load) the system, attack it under every threat, measure its utility and cost."""
    path, cached = trained_system(cell, cache_dir, device)
    run = Run.load(path, device=cell_device(cell, device))  # every model query, attack and metric on this device
    cfg = run.config
    setting = run_setting(run)
    clients_eps, server_eps = setting.model_epsilon
    rows = [*cost_rows(compute_costs(cfg)), *formal_rows(setting.payload_guarantee.epsilon, clients_eps, server_eps)]
    artifacts: dict[str, bytes] = {}
    info: dict[str, Any] = {"system": str(path), "system_cached": cached, "train_seconds": run.info.get("train_seconds")}
    recon = tuple(a for a in cell.attacks.get("T1", ()) if a in RECONSTRUCTION_ATTACKS)
    has_payloads = run.t_hand < run.schedule.T  # imported: the transcript may come without the server model
    if not has_payloads:
        rows.append(payload_count_row(0))
    elif recon:
        attacked = reconstruct_run(run, recon, denoiser_cache=cache_dir / DENOISER_CACHE)
        info["reconstruction"] = attacked.reason if not attacked.attacked else "scored"
        if attacked.attacked:
            ev, truth = attacked.evaluation, attacked.truth
            rows.append(payload_count_row(len(attacked.view)))
            rows.extend(reconstruction_rows(ev, cfg.seed))
            picks = grid_rows(truth.member, truth.client)
            artifacts["reconstructions.png"], info["reconstruction_rows"] = reconstruction_grid(
                ev, truth.source[truth.member[picks]], picks)
    if has_payloads:  # every setting with payloads: does the server know who sent each?
        rows.extend(run_sender_rows(run))
    samples = client_samples(run, cell)
    if samples:
        artifacts["samples.png"] = samples_grid(samples)
    rows.extend(handoff_rows(check_handoff(run)))  # is the server's hand-off payload-like? (DESIGN §2.3)
    mrows, roc, scores = membership_rows(run, cell, samples, setting.ceilings())
    rows.extend(mrows)
    rows.extend(coclient_extraction_rows(run, cell, cache_dir))  # T5: what a co-client extracts
    if roc:
        artifacts["roc.json"] = json.dumps(roc, sort_keys=True).encode()
    if not scores.empty:
        artifacts[SCORES_FILE] = parquet_bytes(scores)
    rows.extend(measured_utility(run, cell, cache_dir, samples))
    return CellOutput(rows, artifacts, info)
