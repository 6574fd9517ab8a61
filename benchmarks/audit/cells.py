"""One audit cell, computed (DESIGN.md §6, §7): a pure function of its :class:`~.grid.Cell`.

:func:`compute_cell` returns tidy rows ``(threat, target, attack, metric, value, ci_low,
ci_high)`` and small artifacts (a reconstruction grid, ROC curves). It reads and fills
only content-addressed caches under ``cache_dir`` (the attacker's denoiser, the
evaluation classifier, trained systems by :func:`~.grid.system_hash`), so the same
cell gives the same numbers in any process, on any backend, before or after a resume.

Threads: every cell runs torch and BLAS on one thread. Results are then bitwise the
same whichever worker computes them; parallelism comes from running cells side by side.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve
from threadpoolctl import threadpool_limits

from collafuse.errors import RunError
from collafuse.runs import RUN_MARKER, Run, create_run, image_grid, prepare_data, sample_labels, save_png, to_uint8
from collafuse.schedule import NoiseSchedule
from collafuse.training import Hooks, resolve_device

from collafuse.benchmarks.audit.grid import Cell, system_hash
from collafuse.benchmarks.audit.handoff import check_handoff, handoff_rows

DENOISER_CACHE = "denoisers"  # the attacker denoisers' folder under the audit cache
ROC_POINTS = 200  # ROC curves are thinned to about this many points for the report
GRID_IMAGES = 8   # originals shown in a cell's reconstruction grid
SAMPLE_GRID = 16  # samples shown per client in a system cell's samples grid


@dataclass
class CellOutput:
    rows: list[dict[str, Any]]
    artifacts: dict[str, bytes] = field(default_factory=dict)   # file name → content (written by the runner)
    info: dict[str, Any] = field(default_factory=dict)          # not part of the results table (timings, paths)


def _row(threat: str, target: str, attack: str, metric: str, value, lo=None, hi=None) -> dict[str, Any]:
    def num(x):
        if x is None:
            return None
        x = float(x)
        return x if math.isfinite(x) else (None if math.isnan(x) else x)

    return {"threat": threat, "target": target, "attack": attack, "metric": metric,
            "value": num(value), "ci_low": num(lo), "ci_high": num(hi)}


def _interval_row(threat: str, target: str, attack: str, metric: str, iv: dict) -> dict[str, Any]:
    return _row(threat, target, attack, metric, iv.get("value"), iv.get("lo", iv.get("ci_low")), iv.get("hi", iv.get("ci_high")))


# -- T1 reconstruction ------------------------------------------------------------------

def reconstruction_rows(ev, seed: int) -> list[dict[str, Any]]:
    """Pooled metrics of every attack (and the scorer-side upper bounds) of one evaluated view."""
    rows = []
    for attack, sc in ev.scores.items():
        for metric, iv in sc.summary(seed=seed).items():
            rows.append(_interval_row("T1", "payload", attack, metric, iv))
        for key, value in ev.extra.get(attack, {}).items():
            if key == "linkage_accuracy":
                rows.append(_row("T1", "payload", attack, key, value))
    lab = ev.payload_label_summary(seed=seed)
    if lab is not None:
        rows.append(_interval_row("T1", "payload", "payload-label", "label", lab))
    return rows


def sender_rows(view, true_sender: torch.Tensor, num_clients: int) -> list[dict[str, Any]]:
    """T1 sender identification (DESIGN.md §5 (d)): accuracy (Wilson 95 %, best relabelling) and chance = 1/N.

    Runs on every setting with payloads: the attack sees ``view`` only; ``true_sender`` is the scorer's."""
    from collafuse.attacks.linkage.sender import NAME, identify_senders, score_sender_identification

    score = score_sender_identification(identify_senders(view, num_clients), true_sender, num_clients)
    iv = score.accuracy
    return [_row("T1", "payload", NAME, "accuracy", iv.value, iv.lo, iv.hi),
            _row("T1", "payload", NAME, "chance", score.chance)]


def samples_grid(samples: dict[int, torch.Tensor]) -> bytes:
    """PNG bytes: the first :data:`SAMPLE_GRID` samples of each client, one row per client (labels cycle
    through the classes, so columns line up by class)."""
    blocks = [to_uint8(samples[k][:SAMPLE_GRID]) for k in sorted(samples)]
    width = max(b.shape[0] for b in blocks)
    blocks = [np.concatenate([b, np.zeros((width - b.shape[0], *b.shape[1:]), b.dtype)]) for b in blocks]
    buf = io.BytesIO()
    save_png(image_grid(np.concatenate(blocks), rows=len(blocks)), buf, scale=3)
    return buf.getvalue()


def reconstruction_grid(ev, originals: torch.Tensor, rows: torch.Tensor) -> tuple[bytes, list[str]]:
    """PNG bytes: originals in the first row, one row per attack; and the row labels."""
    blocks = [to_uint8(originals)] + [to_uint8(r.images[rows]) for r in ev.reconstructions.values()]
    buf = io.BytesIO()
    save_png(image_grid(np.concatenate(blocks), rows=len(blocks)), buf, scale=3)
    return buf.getvalue(), ["original", *ev.reconstructions]


def _grid_rows(member: torch.Tensor, client: torch.Tensor) -> torch.Tensor:
    """Rows of distinct images, alternating clients, for the example grid."""
    picks, seen = [], set()
    order = torch.argsort(client * (member.numel() + 1) + torch.arange(member.numel()), stable=True)
    per_client: dict[int, list[int]] = {}
    for i in order.tolist():
        m = int(member[i])
        if m not in seen:
            seen.add(m)
            per_client.setdefault(int(client[i]), []).append(i)
    lists = list(per_client.values())
    while len(picks) < GRID_IMAGES and any(lists):
        for lst in lists:
            if lst and len(picks) < GRID_IMAGES:
                picks.append(lst.pop(0))
    return torch.tensor(picks, dtype=torch.long)


# -- cost and formal privacy ------------------------------------------------------------

def cost_rows(config) -> list[dict[str, Any]]:
    from collafuse.benchmarks.audit.costs import compute_costs

    return [_row("cost", "clients", "count", k, v) for k, v in compute_costs(config).items()]


def payload_epsilon_value(config, run_info: dict | None = None) -> float:
    """The payload channel's formal ε per image, from the defenses' typed setting; a trained run's own
    record wins (it knows the real Poisson rounds under DP-SGD)."""
    from collafuse.defenses import describe_setting, setting_from_run

    setting = setting_from_run(run_info, config) if run_info is not None else describe_setting(config.defenses, config)
    return setting.payload_guarantee.epsilon


def model_epsilons(run_info: dict, eps_payload: float) -> tuple[float, float]:
    """(clients, server) formal ε of the models, read by the defenses from the run's hook records: DP-SGD's
    accountant where it ran; the server model is trained on payloads only, so it is never worse than the
    payload channel (post-processing)."""
    from collafuse.defenses import HookRecord, model_epsilon

    return model_epsilon([HookRecord.from_json(h) for h in run_info.get("hooks", [])], eps_payload)


def formal_rows(eps_payload: float, eps_clients: float | None, eps_server: float | None) -> list[dict[str, Any]]:
    rows = [_row("formal", "payload", "accountant", "epsilon_payload", eps_payload)]
    if eps_clients is not None:
        rows.append(_row("formal", "clients", "accountant", "epsilon_model_clients", eps_clients))
    if eps_server is not None:
        rows.append(_row("formal", "server", "accountant", "epsilon_model_server", eps_server))
    return rows


# -- the two kinds of cell --------------------------------------------------------------

def _release_hooks(config) -> tuple:
    if not config.defenses:
        return ()
    from collafuse.defenses import build_hooks

    return build_hooks(config.defenses, config).release


def cell_device(cell: Cell, device=None) -> torch.device:
    """Where a cell runs: ``device`` (the audit's ``--device``) or the grid's ``device`` (``auto``: CUDA when
    available), resolved on the machine that computes it. Not part of the cell's hash: it changes where
    the numbers are computed, not what they mean."""
    return resolve_device(device if device is not None else cell.run_config.device)


def payload_cell(cell: Cell, cache_dir: Path, device=None, streamed: bool = True) -> CellOutput:
    """T1 from the data, the schedule and the release-side defenses alone: no system is trained.

    ``streamed`` (and every attack streamable): the view is simulated and attacked a shard at a time
    (:mod:`~collafuse.attacks.reconstruction.streamed`), so the cell's memory does not grow with the
    payload rows (DESIGN §10), with the numbers of the whole-view path (False: that path)."""
    from collafuse.attacks.reconstruction.curve import simulate_rounds, simulated_metadata, simulated_shards, truth_for
    from collafuse.attacks.reconstruction.engine import attacker_resources
    from collafuse.attacks.reconstruction.evaluate import evaluate_view
    from collafuse.attacks.reconstruction.streamed import can_stream, evaluate_streamed, shard_rows

    cfg = cell.run_config
    images, splits = prepare_data(cfg)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    rows = [*cost_rows(cfg), *formal_rows(payload_epsilon_value(cfg), None, None)]
    if cfg.t_c >= schedule.T:
        rows.append(_row("T1", "payload", "count", "payload_rows", 0))
        return CellOutput(rows)
    attacks = cell.attacks["T1"]
    aux = images.subset(splits.aux)
    send_labels = cfg.conditional and images.labels is not None
    protocol = (images, splits, schedule, cfg.t_c, cell.epochs, cfg.training.payload, cfg.training.batch_size, cfg.seed,
                send_labels, _release_hooks(cfg))
    pool = torch.cat([splits.members, splits.nonmembers])
    resources, _ = attacker_resources(aux, images.images[pool], schedule, attacks, seed=cfg.seed, epochs=cell.epochs,
                                      denoiser_cache=cache_dir / DENOISER_CACHE, device=cell_device(cell, device))
    if streamed and can_stream(attacks):
        sim = simulated_metadata(*protocol)  # every field but the payload values
        view, member = sim.view, sim.member
        picks = _grid_rows(member, sim.sender)
        size = shard_rows(images.images[0].numel(), attacks, pool.numel())
        ev = evaluate_streamed(lambda: ((start, s.view) for start, s in simulated_shards(*protocol, shard_rows=size)),
                               view, schedule, truth_for(member, view, images, splits, sim.sender), resources, attacks,
                               images.num_classes, tuple(images.images.shape[1:]), picks, size)
        grid_at = torch.searchsorted(ev.reconstruction_rows, picks)  # where each pick sits among the kept rows
    else:
        sim = simulate_rounds(*protocol)
        view, member = sim.view, sim.member
        ev = evaluate_view(view, schedule, truth_for(member, view, images, splits, sim.sender), resources, attacks,
                           images.num_classes)
        picks = grid_at = _grid_rows(member, sim.sender)
    rows.append(_row("T1", "payload", "count", "payload_rows", len(view)))
    rows.extend(reconstruction_rows(ev, cfg.seed))
    rows.extend(sender_rows(view, sim.sender, cfg.data.num_clients))
    png, labels = reconstruction_grid(ev, images.images[member[picks]], grid_at)
    return CellOutput(rows, {"reconstructions.png": png}, {"reconstruction_rows": labels})


def trained_system(cell: Cell, cache_dir: Path, device=None) -> tuple[Path, bool]:
    """The cell's trained system from the cache, trained (on ``device`` when given) and cached (atomically) on a miss."""
    if cell.run_dir is not None:  # systems.runs: an imported deployment (or any run) is attacked, never trained
        return Path(cell.run_dir), True
    cfg = cell.run_config
    path = cache_dir / "systems" / system_hash(cfg)  # keyed by the grid's config: a --device override shares it
    if (path / RUN_MARKER).is_file():
        return path, True
    hooks = Hooks()
    if cfg.defenses:
        from collafuse.defenses import build_hooks

        hooks = build_hooks(cfg.defenses, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if device is not None:
        cfg = cfg.model_copy(update={"device": resolve_device(device).type})
    try:
        create_run(cfg, path, hooks=hooks, progress=False)
    except RunError:
        if not (path / RUN_MARKER).is_file():  # not a concurrent writer that finished first
            raise
    return path, False


def _thin(fpr: np.ndarray, tpr: np.ndarray) -> tuple[list[float], list[float]]:
    if fpr.size > ROC_POINTS:
        keep = np.unique(np.r_[0, np.linspace(0, fpr.size - 1, ROC_POINTS).round().astype(int), fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(x), 6) for x in fpr], [round(float(x), 6) for x in tpr]


MEMBERSHIP_TARGETS = {"T1": "payload", "T2": "server", "T3": "client", "T4": "samples"}
AT_EPOCH = "_at_epoch"  # suffix of the metrics of a training.snapshots model; its epoch is the row's `epoch`


def outcome_metrics(outcome) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, low, high) of every headline membership metric of one (target, attack) outcome."""
    m = outcome.metrics
    tpr, tpr01 = m.at_fpr(0.01).tpr, m.at_fpr(0.001).tpr
    return [("auc", m.auc.value, m.auc.low, m.auc.high), ("tpr_at_1pct_fpr", tpr.value, tpr.low, tpr.high),
            ("tpr_at_01pct_fpr", tpr01.value, tpr01.low, tpr01.high),
            ("balanced_accuracy", m.balanced_accuracy.value, m.balanced_accuracy.low, m.balanced_accuracy.high),
            ("epsilon_lb", outcome.epsilon_lb, None, None), ("epsilon_gdp", outcome.epsilon_gdp, None, None)]


def more_membership_rows(threat: str, key: str, name: str, outcome) -> list[dict[str, Any]]:
    """The rows beside auc / tpr_at_1pct_fpr / epsilon_lb: TPR at 0.1 % FPR and whether there were enough
    non-members to resolve it (1.0 / 0.0), balanced accuracy, the Gaussian-DP ε lower bound, and the AUC at
    each query step (metric ``auc_at_t``, the step in the row's ``t``)."""
    values = {metric: (v, lo, hi) for metric, v, lo, hi in outcome_metrics(outcome)}
    rows = [_row(threat, key, name, metric, *values[metric])
            for metric in ("tpr_at_01pct_fpr", "balanced_accuracy", "epsilon_gdp")]
    # 1.0: AUC significantly below 0.5, a signal found reversed (flagged only; the worst case never flips it)
    rows.append(_row(threat, key, name, "inverted", float(outcome.inverted)))
    if outcome.one_run is not None:  # the run config's canaries: the one-run audit's ε lower bound (§4.3)
        eps = outcome.one_run["epsilon_lb"]
        rows.append(_row(threat, key, name, "one_run_epsilon_lb", float(eps) if eps != "inf" else math.inf))
    rows.insert(1, _row(threat, key, name, "tpr_at_01pct_fpr_resolved", float(outcome.metrics.at_fpr(0.001).resolved)))
    rows += [{**_row(threat, key, name, "auc_at_t", auc), "t": int(t)} for t, auc in zip(outcome.steps, outcome.step_aucs)]
    return rows


def snapshot_rows(threat: str, key: str, name: str, outcome, epoch: int) -> list[dict[str, Any]]:
    """Every headline metric of one attack on a snapshot model: metric ``<metric>_at_epoch``, the epoch in ``epoch``
    (apart from the final models' rows, so a policy and the worst-case tables judge the released models)."""
    return [{**_row(threat, key, name, metric + AT_EPOCH, v, lo, hi), "epoch": int(epoch)}
            for metric, v, lo, hi in outcome_metrics(outcome)]


def membership_rows(run: Run, cell: Cell, samples: dict[int, torch.Tensor]) -> tuple[list[dict[str, Any]], dict]:
    """Every requested membership attack on its threat's targets: rows and ROC curves (final models); the
    model targets again on each training.snapshots epoch (``*_at_epoch`` rows)."""
    from collafuse.attacks.membership.catalog import ATTACKS
    from collafuse.attacks.membership.base import SignalSettings
    from collafuse.attacks.membership.engine import MembershipSettings, run_membership

    rows, roc = [], {}
    settings = MembershipSettings(signals=SignalSettings(references=cell.references), n_samples=cell.samples_per_client)
    for threat, target in MEMBERSHIP_TARGETS.items():
        names = tuple(a for a in cell.attacks.get(threat, ()) if a in ATTACKS)
        if not names:
            continue
        result = run_membership(run, names, (target,), settings, samples=samples)
        for key, entry in result.targets.items():
            if not entry.available:
                continue
            for name, outcome in entry.attacks.items():
                m = outcome.metrics
                tpr = m.at_fpr(0.01).tpr
                rows.append(_row(threat, key, name, "auc", m.auc.value, m.auc.low, m.auc.high))
                rows.append(_row(threat, key, name, "tpr_at_1pct_fpr", tpr.value, tpr.low, tpr.high))
                rows.append(_row(threat, key, name, "epsilon_lb", outcome.epsilon_lb))
                rows.extend(more_membership_rows(threat, key, name, outcome))
            if threat == "T4" and "nn-distance" in entry.attacks and samples and key.startswith("samples_"):
                # (ℓ2, δ)-extraction (Carlini et al. 2023) of the client's images by its samples, beside nn-distance.
                from collafuse.attacks.membership.nn_distance import client_extraction

                k = int(key.split("_")[1])
                if samples.get(k) is not None:
                    ext = client_extraction(run, k, samples[k])
                    rows.append(_row("T4", key, "nn-distance", "extraction", ext.value, ext.lo, ext.hi))
            if not entry.attacks:
                continue
            roc[key] = {}
            for name, outcome in entry.attacks.items():
                labels = np.r_[np.ones(outcome.member_scores.size), np.zeros(outcome.nonmember_scores.size)]
                fpr, tpr, _ = roc_curve(labels, np.r_[outcome.member_scores, outcome.nonmember_scores])
                f, t = _thin(fpr, tpr)
                roc[key][name] = {"fpr": f, "tpr": t, "auc": outcome.metrics.auc.value}
        for epoch, targets in result.snapshots.items():
            for key, entry in targets.items():
                for name, outcome in entry.attacks.items():
                    rows.extend(snapshot_rows(threat, key, name, outcome, epoch))
    return rows, roc


def client_samples(run: Run, cell: Cell) -> dict[int, torch.Tensor]:
    """``samples_per_client`` samples finished by each client, drawn once with the T4 attacker's seed
    and shared by the T4 attacks and the utility metrics."""
    from collafuse.attacks.membership.targets import attacker_samples

    return {k: attacker_samples(run, k, cell.samples_per_client, run.config.seed)
            for k in range(len(run.client_models)) if can_sample(run, k)}


def can_sample(run: Run, k: int) -> bool:
    """Whether client ``k``'s collaborative samples can be drawn: an imported deployment may lack the
    server's or this client's model."""
    return (run.server_model is not None or run.t_c >= run.schedule.T) and (
        run.client_models[k] is not None or run.t_c == 0)


def utility_rows(run: Run, cell: Cell, cache_dir: Path, samples: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    # The evaluation classifier and Inception run where the run's models were loaded (the cell's device).
    """FID, KID, precision/recall and class accuracy of each client's samples and of all of them pooled."""
    from collafuse.benchmarks.audit.utility import load_or_train_feature_classifier, sample_utility

    data, splits = run.load_data()
    if data.labels is None or data.num_classes == 0 or not all(can_sample(run, k) for k in range(len(run.client_models))):
        return []  # unlabelled data, or a client whose samples cannot be drawn (an imported model not given)
    classifier = load_or_train_feature_classifier(data.images, data.labels, data.num_classes, run.config.seed,
                                                  cache_dir / "classifiers", device=run.device)
    n = cell.samples_per_client
    fakes, fake_labels = [], []
    rows = []
    for k in range(len(run.client_models)):
        fake = samples[k]
        labels = sample_labels(n, run.num_classes) if run.num_classes > 0 else None
        real = splits.clients[k]
        scores = sample_utility(fake, labels, data.images[real], data.labels[real], classifier, run.config.seed)
        rows += [_interval_row("utility", f"samples_{k}", "classifier-features", m, iv) for m, iv in scores.items()]
        fakes.append(fake)
        fake_labels.append(labels)
    pooled = sample_utility(torch.cat(fakes), torch.cat(fake_labels) if fake_labels[0] is not None else None,
                            data.images[splits.members], data.labels[splits.members], classifier, run.config.seed)
    rows += [_interval_row("utility", "pooled", "classifier-features", m, iv) for m, iv in pooled.items()]
    if cell.inception_fid:
        from collafuse.benchmarks.audit.utility import inception_fid

        rows.append(_row("utility", "pooled", "inception-v3", "fid_inception",
                         inception_fid(torch.cat(fakes), data.images[splits.members], device=run.device)))
    return rows


def _run_sender_rows(run: Run) -> list[dict[str, Any]]:
    from collafuse.attacks.reconstruction.engine import resolve_truth_rows
    from collafuse.attacks.reconstruction.view import ViewArrays
    from collafuse.transcript import AuditKey, MissingAuditKey, ServerView

    view = ViewArrays.from_server_view(ServerView.open(run.path))
    if len(view) == 0:
        return []
    try:
        key = AuditKey.open(run.path)  # scorer side only
    except MissingAuditKey:
        return []  # an imported deployment without its audit key: the true senders are unknown
    _, sender = resolve_truth_rows(view, key)
    return sender_rows(view, sender, run.config.data.num_clients)


def system_cell(cell: Cell, cache_dir: Path, device=None) -> CellOutput:
    """Train (or load) the system, attack it under every threat, measure its utility and cost."""
    from collafuse.attacks.reconstruction.engine import reconstruct_run
    from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS

    path, cached = trained_system(cell, cache_dir, device)
    run = Run.load(path, device=cell_device(cell, device))  # every model query, attack and metric on this device
    cfg = run.config
    eps_payload = payload_epsilon_value(cfg, run.info)
    rows = [*cost_rows(cfg), *formal_rows(eps_payload, *model_epsilons(run.info, eps_payload))]
    artifacts: dict[str, bytes] = {}
    info: dict[str, Any] = {"system": str(path), "system_cached": cached, "train_seconds": run.info.get("train_seconds")}
    recon = tuple(a for a in cell.attacks.get("T1", ()) if a in RECONSTRUCTION_ATTACKS)
    has_payloads = run.t_c < run.schedule.T  # imported: the transcript may come without the server model
    if not has_payloads:
        rows.append(_row("T1", "payload", "count", "payload_rows", 0))
    elif recon:
        attacked = reconstruct_run(run, recon, denoiser_cache=cache_dir / DENOISER_CACHE)
        info["reconstruction"] = attacked.reason if not attacked.attacked else "scored"
    if has_payloads and recon and attacked.attacked:
        ev, truth = attacked.evaluation, attacked.truth
        rows.append(_row("T1", "payload", "count", "payload_rows", len(attacked.view)))
        rows.extend(reconstruction_rows(ev, cfg.seed))
        picks = _grid_rows(truth.member, truth.client)
        artifacts["reconstructions.png"], info["reconstruction_rows"] = reconstruction_grid(
            ev, truth.source[truth.member[picks]], picks)
    if has_payloads:  # every setting with payloads: does the server know who sent each?
        rows.extend(_run_sender_rows(run))
    samples = client_samples(run, cell)
    if samples:
        artifacts["samples.png"] = samples_grid(samples)
    rows.extend(handoff_rows(check_handoff(run)))  # is the server's hand-off payload-like? (DESIGN §2.3)
    mrows, roc = membership_rows(run, cell, samples)
    rows.extend(mrows)
    if roc:
        artifacts["roc.json"] = json.dumps(roc, sort_keys=True).encode()
    rows.extend(utility_rows(run, cell, cache_dir, samples))
    return CellOutput(rows, artifacts, info)


def shared_resources(cell: Cell) -> list[tuple[str, str]]:
    """(key, kind) of the cached resources this cell shares with others (kind: "denoiser", "classifier")."""
    from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS

    cfg = cell.run_config
    if cell.run_dir is not None:
        return []  # an existing run's data is in its folder: the cell builds what it needs itself
    data_key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    out = []
    if RECONSTRUCTION_ATTACKS.needing("denoiser", cell.attacks.get("T1", ())) and cfg.t_c < cfg.diffusion.T:
        out.append((f"denoiser|{data_key}|{cfg.diffusion.schedule}|{cfg.diffusion.T}|{cfg.seed}", "denoiser"))
    if cell.kind == "system":
        out.append((f"classifier|{data_key}|{cfg.seed}", "classifier"))
    return out


def build_shared(kind: str, cell: Cell, cache_dir: Path | str, device=None) -> str:
    """Fill the cache with one shared resource (on one thread, like the cells). Cells that find it
    missing build it themselves, with the same result, so this is an optimisation only."""
    cfg = cell.run_config
    images, splits = prepare_data(cfg)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            if kind == "denoiser":
                from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, load_or_train

                schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
                load_or_train(images.images[splits.aux], schedule, DenoiserConfig(seed=cfg.seed),
                              Path(cache_dir) / DENOISER_CACHE, device=cell_device(cell, device))
            elif kind == "classifier" and images.labels is not None and images.num_classes > 0:
                from collafuse.benchmarks.audit.utility import load_or_train_feature_classifier

                load_or_train_feature_classifier(images.images, images.labels, images.num_classes, cfg.seed,
                                                 Path(cache_dir) / "classifiers", device=cell_device(cell, device))
    finally:
        torch.set_num_threads(previous)
    return kind


def compute_cell(cell: Cell, cache_dir: Path | str, device=None) -> CellOutput:
    """The cell's rows and artifacts, on one torch/BLAS thread, with ``info['seconds']``.

    ``device``: the audit's ``--device`` (None: the grid's ``device``, ``auto`` by default)."""
    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            out = (payload_cell if cell.kind == "payload" else system_cell)(cell, Path(cache_dir), device)
    finally:
        torch.set_num_threads(previous)
    out.info["seconds"] = round(time.perf_counter() - started, 2)
    out.info["device"] = str(cell_device(cell, device))
    return out
