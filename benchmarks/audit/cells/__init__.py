"""One audit cell, computed (DESIGN.md §6, §7): a pure function of its :class:`~..grid.Cell`.

:func:`compute_cell` returns the cell's tidy rows and small artifacts (a reconstruction grid, a sample
grid, ROC curves). It reads and fills only content-addressed caches under ``cache_dir`` (the attacker's
denoiser, the evaluation classifier, trained systems by :func:`~..grid.system_hash`), so the same cell
gives the same numbers in any process, on any backend, before or after a resume.

- :mod:`.payload`: payload-only cells (T1 of a simulated server view; no training);
- :mod:`.system`: system cells (train or load a split system; T1–T4, the hand-off, utility, cost);
- :mod:`.rows`: one row adapter per typed result (every metric name from :mod:`collafuse.metrics`);
- :mod:`.artifacts`: the pictures; :mod:`.resources`: the shared cached models; :mod:`.formal`: formal ε.

Threads: every cell runs torch and BLAS on one thread. Results are then bitwise the same whichever
worker computes them; parallelism comes from running cells side by side.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

import collafuse.defenses  # noqa: F401  (registers the one hook builder the cells' configs need)

from collafuse.benchmarks.audit.grid import Cell

from .payload import payload_cell
from .resources import build_shared, cell_device, shared_resources
from .rows import CellOutput
from .system import system_cell, trained_system

__all__ = ["CellOutput", "build_shared", "cell_device", "compute_cell", "payload_cell", "shared_resources",
           "system_cell", "trained_system"]


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
