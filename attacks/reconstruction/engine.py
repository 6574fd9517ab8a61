"""The reconstruction engine: a run (or a simulated view) in, a typed :class:`RunReconstruction` out (§4.1).

``collafuse attack reconstruct``, the audit's cells and :mod:`collafuse.api` all call
:func:`reconstruct_run` for a trained run, and :func:`attacker_resources` +
:func:`~collafuse.attacks.reconstruction.evaluate.evaluate_view` for a view simulated
from data and schedule. The attacks see only the server view and the attacker's own
resources; the audit key is opened afterwards, by the scorer side, to build the truth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from collafuse.data import ImageSet
from collafuse.errors import RunError
from collafuse.runs import Run
from collafuse.schedule import NoiseSchedule
from collafuse.device import resolve_device
from collafuse.transcript import TRANSCRIPT_DIR, AuditKey, MissingAuditKey, ServerView

from collafuse.attacks.reconstruction.curve import POOL_DESCRIPTION
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, load_or_train
from collafuse.attacks.reconstruction.evaluate import ViewEvaluation, evaluate_view
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.scoring import Truth
from collafuse.attacks.reconstruction.view import AttackerResources, ViewArrays


@dataclass(frozen=True)
class DenoiserUsed:
    """The attacker's denoiser an evaluation used: where it is cached, its recipe, whether it was a cache hit."""

    cache_file: Path
    config: DenoiserConfig
    cache_hit: bool

    def to_json(self, cache_root: Path | str) -> dict:
        return {"cache_file": str(self.cache_file), "config": asdict(self.config), "cache_root": str(cache_root)}


def attacker_resources(aux: ImageSet, candidates: torch.Tensor, schedule: NoiseSchedule, names: tuple[str, ...],
                       *, seed: int, epochs: int, denoiser_config: DenoiserConfig | None = None,
                       denoiser_cache: Path | None = None, forbid_under: tuple[Path, ...] = (),
                       progress: bool = False, device=None) -> tuple[AttackerResources, DenoiserUsed | None]:
    """What the attacker holds for ``names``: the aux split, a denoiser trained on it when an attack needs one
    (cached by content under ``denoiser_cache``), the candidate pool and the protocol's epoch count.

    ``device`` (None/``auto``, ``cpu``, ``cuda`` or a torch.device): where the attacker's networks train and run."""
    device = resolve_device(device)
    trained_on_aux = RECONSTRUCTION_ATTACKS.needing("denoiser", names) + RECONSTRUCTION_ATTACKS.needing("aux", names)
    if trained_on_aux and len(aux) < 2:
        raise RunError(f"{'/'.join(trained_on_aux)} need the attacker's auxiliary public split; the run has data.n_aux < 2")
    used = None
    denoiser = None
    if RECONSTRUCTION_ATTACKS.needing("denoiser", names):
        cfg = denoiser_config or DenoiserConfig(seed=seed)
        denoiser, path, hit = load_or_train(aux.images, schedule, cfg, denoiser_cache, forbid_under=forbid_under,
                                            progress=progress, device=device)
        used = DenoiserUsed(path, cfg, hit)
    resources = AttackerResources(aux=aux if len(aux) else None, denoiser=denoiser, candidates=candidates,
                                  epochs=epochs, seed=seed, device=device)
    return resources, used


def resolve_truth_rows(view: ViewArrays, key: AuditKey) -> tuple[torch.Tensor, torch.Tensor]:
    """Scorer side: (member index, true sender) of every view row, by ``seq``, each (N,).

    The sender comes from the key, not the view: an id-free release (a defense) hides it from
    the server, but re-identification within a client and per-client results use the truth.
    Refuses a key that does not match the transcript.
    """
    if key.seq.numel() != len(view):
        raise RunError(f"the audit key has {key.seq.numel()} rows but the transcript has {len(view)}")
    order = torch.argsort(key.seq)
    seq_sorted = key.seq[order]
    pos = torch.searchsorted(seq_sorted, view.seq).clamp(max=max(0, seq_sorted.numel() - 1))
    if not bool((seq_sorted[pos] == view.seq).all()):
        raise RunError("the audit key does not match the transcript (sequence numbers differ)")
    return key.member_index[order][pos], key.client[order][pos]


@dataclass(frozen=True)
class RunReconstruction:
    """Every requested T1 attack on a run's server view, scored against the audit key.

    ``evaluation`` is None when nothing crossed to a server (``reason`` says why)."""

    view: ViewArrays | None
    truth: Truth | None
    evaluation: ViewEvaluation | None
    resources: AttackerResources | None
    denoiser: DenoiserUsed | None
    aux_images: int
    reason: str | None = None
    status: str = "nothing-to-attack"  # when not attacked: or "not-scored" (an imported run without an audit key)

    @property
    def attacked(self) -> bool:
        return self.evaluation is not None


def reconstruct_run(run: Run, names: tuple[str, ...], *, denoiser_config: DenoiserConfig | None = None,
                    denoiser_cache: Path | None = None, forbid_under: tuple[Path, ...] = (),
                    progress: bool = False) -> RunReconstruction:
    """Attack ``run``'s server view with ``names`` and score the attacks (the audit key is read only here)."""
    cfg, schedule = run.config, run.schedule
    has_transcript = (run.path / TRANSCRIPT_DIR).is_dir()
    if run.t_hand < schedule.T and not has_transcript:
        raise RunError(f"{run.path}: the run has a server but no transcript folder")
    # The transcript exists whenever the server owns steps, with or without its model (an imported
    # deployment may not hand the server model over: the T1 attacks do not need it).
    view = ViewArrays.from_server_view(ServerView.open(run.path)) if run.t_hand < schedule.T else None
    if view is None or len(view) == 0:
        reason = (
            f"c = {cfg.diffusion.cut_ratio} (t_c = {run.t_hand} = T): every client works alone; no payload crossed to a server"
            if run.t_hand >= schedule.T else "the transcript holds no payload rows"
        )
        return RunReconstruction(view, None, None, None, None, 0, reason)
    try:
        key = AuditKey.open(run.path)  # scorer side only
    except MissingAuditKey as exc:
        return RunReconstruction(view, None, None, None, None, 0, f"not scored: {exc}", status="not-scored")
    data, splits = run.load_data()
    aux = data.subset(splits.aux)
    member, sender = resolve_truth_rows(view, key)
    pool = torch.cat([splits.members, splits.nonmembers])
    truth = Truth(member, sender, data.images, data.labels, {k: idx for k, idx in enumerate(splits.clients)}, pool,
                  POOL_DESCRIPTION)
    resources, used = attacker_resources(aux, data.images[pool], schedule, names, seed=cfg.seed,
                                         epochs=cfg.training.epochs, denoiser_config=denoiser_config,
                                         denoiser_cache=denoiser_cache, forbid_under=forbid_under, progress=progress,
                                         device=run.device)  # where Run.load put the models (its --device)
    ev = evaluate_view(view, schedule, truth, resources, names, data.num_classes, progress=progress)
    return RunReconstruction(view, truth, ev, resources, used, len(aux))
