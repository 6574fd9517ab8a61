"""A payload-only cell: T1 from the data, the schedule and the release-side defenses alone, no training."""
from __future__ import annotations

from pathlib import Path

import torch

from collafuse.hooks import hooks_for
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule

from collafuse.attacks.linkage.sender import identify_senders, score_sender_identification
from collafuse.attacks.reconstruction.curve import (SimulationSpec, simulate_rounds, simulated_metadata,
                                                   simulated_shards, truth_for)
from collafuse.attacks.reconstruction.engine import attacker_resources
from collafuse.attacks.reconstruction.evaluate import evaluate_view
from collafuse.attacks.reconstruction.streamed import can_stream, evaluate_streamed, shard_rows

from collafuse.benchmarks.audit.costs import compute_costs
from collafuse.benchmarks.audit.grid import Cell

from .artifacts import grid_rows, reconstruction_grid
from .formal import payload_epsilon
from .resources import DENOISER_CACHE, cell_device
from .rows import CellOutput, cost_rows, formal_rows, payload_count_row, reconstruction_rows, sender_rows


def payload_cell(cell: Cell, cache_dir: Path, device=None, streamed: bool = True) -> CellOutput:
    """T1 of a simulated server view: the view of ``cell.epochs`` epochs of the protocol, played with
    model-less clients and the cell's release hooks: what a run trained from the cell's config would have sent,
    row for row (:mod:`collafuse.rounds`; ``tests/test_protocol_twin.py``).

    ``streamed`` (and every attack streamable): the view is simulated and attacked a shard at a time
    (:mod:`~collafuse.attacks.reconstruction.streamed`), so the cell's memory does not grow with the
    payload rows (DESIGN §10), with the numbers of the whole-view path (False: that path)."""
    cfg = cell.run_config
    images, splits = prepare_data(cfg)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    rows = [*cost_rows(compute_costs(cfg)), *formal_rows(payload_epsilon(cfg), None, None)]
    if cfg.t_c >= schedule.T:
        rows.append(payload_count_row(0))
        return CellOutput(rows)
    attacks = cell.attacks["T1"]
    aux = images.subset(splits.aux)
    spec = SimulationSpec.from_config(cfg, hooks_for(cfg), images, splits, cell.epochs)  # the trained run's twin
    pool = torch.cat([splits.members, splits.nonmembers])
    resources, _ = attacker_resources(aux, images.images[pool], schedule, attacks, seed=cfg.seed, epochs=cell.epochs,
                                      denoiser_cache=cache_dir / DENOISER_CACHE, device=cell_device(cell, device))
    meta = simulated_metadata(spec) if streamed and can_stream(attacks) else None  # every field but the values
    size = shard_rows(images.images[0].numel(), attacks, pool.numel())
    # Stream only when the view does not fit one shard of the memory budget: one shard is the whole view, and
    # the whole-view path computes the same numbers (tests/test_streamed_memory.py) about 25 % faster.
    if meta is not None and len(meta.view) > size:
        sim = meta
        view, member = sim.view, sim.member
        picks = grid_rows(member, sim.sender)
        ev = evaluate_streamed(lambda: ((start, s.view) for start, s in simulated_shards(spec, size)),
                               view, schedule, truth_for(member, view, images, splits, sim.sender), resources, attacks,
                               images.num_classes, tuple(images.images.shape[1:]), picks, size)
        grid_at = torch.searchsorted(ev.reconstruction_rows, picks)  # where each pick sits among the kept rows
    else:
        sim = simulate_rounds(spec)
        view, member = sim.view, sim.member
        ev = evaluate_view(view, schedule, truth_for(member, view, images, splits, sim.sender), resources, attacks,
                           images.num_classes)
        picks = grid_at = grid_rows(member, sim.sender)
    rows.append(payload_count_row(len(view)))
    rows.extend(reconstruction_rows(ev, cfg.seed))
    rows.extend(sender_rows(score_sender_identification(identify_senders(view, cfg.data.num_clients), sim.sender,
                                                         cfg.data.num_clients)))
    png, labels = reconstruction_grid(ev, images.images[member[picks]], grid_at)
    return CellOutput(rows, {"reconstructions.png": png}, {"reconstruction_rows": labels})
