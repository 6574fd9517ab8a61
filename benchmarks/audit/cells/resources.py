"""What cells share through the content-addressed cache: the attacker's denoiser and the evaluation classifier.

Cells that find a shared model missing build it themselves, with the same result, so building one
ahead (:func:`build_shared`, queued first by the runner) is an optimisation only. Every cell and every
shared build runs on one torch / BLAS thread, so the numbers do not depend on which worker computes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule
from collafuse.device import resolve_device

from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, load_or_train
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS

from collafuse.benchmarks.audit.grid import Cell
from collafuse.benchmarks.audit.utility import load_or_train_feature_classifier

DENOISER_CACHE = "denoisers"      # the attacker denoisers' folder under the audit cache
CLASSIFIER_CACHE = "classifiers"  # the evaluation classifiers' folder


def cell_device(cell: Cell, device=None) -> torch.device:
    """Where a cell runs: ``device`` (the audit's ``--device``) or the grid's ``device`` (``auto``: CUDA when
    available), resolved on the machine that computes it. Not part of the cell's hash: it changes where
    the numbers are computed, not what they mean."""
    return resolve_device(device if device is not None else cell.run_config.device)


def shared_resources(cell: Cell) -> list[tuple[str, str]]:
    """(key, kind) of the cached resources this cell shares with others (kind: "denoiser", "classifier")."""
    cfg = cell.run_config
    if cell.run_dir is not None:
        return []  # an existing run's data is in its folder: the cell builds what it needs itself
    data_key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    out = []
    t5_tweedie = cell.kind == "system" and bool(cell.attacks.get("T5")) and 0 < cfg.t_c  # T5's one-step finisher
    if (RECONSTRUCTION_ATTACKS.needing("denoiser", cell.attacks.get("T1", ())) or t5_tweedie) and cfg.t_c < cfg.diffusion.T:
        out.append((f"denoiser|{data_key}|{cfg.diffusion.schedule}|{cfg.diffusion.T}|{cfg.seed}", "denoiser"))
    if cell.kind == "system":
        out.append((f"classifier|{data_key}|{cfg.seed}", "classifier"))
    return out


def build_shared(kind: str, cell: Cell, cache_dir: Path | str, device=None) -> str:
    """Fill the cache with one shared resource (on one thread, like the cells)."""
    cfg = cell.run_config
    images, splits = prepare_data(cfg)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            if kind == "denoiser":
                schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
                load_or_train(images.images[splits.aux], schedule, DenoiserConfig(seed=cfg.seed),
                              Path(cache_dir) / DENOISER_CACHE, device=cell_device(cell, device))
            elif kind == "classifier" and images.labels is not None and images.num_classes > 0:
                load_or_train_feature_classifier(images.images, images.labels, images.num_classes, cfg.seed,
                                                 Path(cache_dir) / CLASSIFIER_CACHE, device=cell_device(cell, device))
    finally:
        torch.set_num_threads(previous)
    return kind
