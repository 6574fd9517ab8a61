"""The pictures a cell leaves beside its rows: reconstructions beside their originals, and sample grids."""
from __future__ import annotations

import io

import numpy as np
import torch

from collafuse.runs import image_grid, save_png, to_uint8

from collafuse.attacks.reconstruction.evaluate import ViewEvaluation

GRID_IMAGES = 8   # originals shown in a cell's reconstruction grid
SCORES_FILE = "scores.parquet"  # every membership score of a cell (the per-record evidence, DESIGN §4.2)
SAMPLE_GRID = 16  # samples shown per client in a system cell's samples grid


def _png(images: np.ndarray, rows: int) -> bytes:
    buf = io.BytesIO()
    save_png(image_grid(images, rows=rows), buf, scale=3)
    return buf.getvalue()


def reconstruction_grid(ev: ViewEvaluation, originals: torch.Tensor, rows: torch.Tensor) -> tuple[bytes, list[str]]:
    """PNG bytes: originals in the first row, one row per attack; and the row labels."""
    blocks = [to_uint8(originals)] + [to_uint8(r.images[rows]) for r in ev.reconstructions.values()]
    return _png(np.concatenate(blocks), len(blocks)), ["original", *ev.reconstructions]


def samples_grid(samples: dict[int, torch.Tensor]) -> bytes:
    """PNG bytes: the first :data:`SAMPLE_GRID` samples of each client, one row per client (labels cycle
    through the classes, so columns line up by class)."""
    blocks = [to_uint8(samples[k][:SAMPLE_GRID]) for k in sorted(samples)]
    width = max(b.shape[0] for b in blocks)
    blocks = [np.concatenate([b, np.zeros((width - b.shape[0], *b.shape[1:]), b.dtype)]) for b in blocks]
    return _png(np.concatenate(blocks), len(blocks))


def parquet_bytes(frame) -> bytes:
    """A pandas frame as Parquet bytes (pyarrow), written by the runner like every other artifact."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


def grid_rows(member: torch.Tensor, client: torch.Tensor) -> torch.Tensor:
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
