"""Evaluate a view too large to hold, a shard at a time (DESIGN.md §10; issue 15).

:func:`evaluate_view` holds the whole view, every attack's N reconstructions and the scorer's
per-row temporaries at once: at 32×32×3 about 260 MB per 1,000 payload rows. Here the view arrives
as shards (a callable that replays them, e.g. :func:`~.curve.simulated_shards`) beside its metadata
(every field but the payload values, :func:`~.curve.simulated_metadata`), and only per-row scores
(a few numbers a row) and per-image state grow with the work:

- the row-local attacks (:data:`ROW_LOCAL`: a row's reconstruction depends on that row alone) run
  and are scored shard by shard;
- ``multiview`` links the epoch blocks of each client as their rows arrive and fuses them
  (:class:`~.multiview.StreamedLinking`), and the perfect-linking bound fuses by the true images
  (:class:`~.multiview.FusionSums`); both are scored after the last shard, from the fused means of
  the images (one per image, whatever the number of epochs);
- ``oracle-all-views`` adds each shard to its (images × pool) sums (:class:`~.oracle.AllViewsSums`)
  and is scored after the last shard the same way.

The numbers are those of :func:`evaluate_view` on the whole view: every attack and scorer computes a
row by a per-row formula, the oracle's blocks are laid on the same rows (shards start on its chunk
boundaries), linking matches the very same blocks and fusion sums each image's views in row order.
(Nearest-neighbour re-identification compares float64 distances that BLAS may round differently in
the last bit for a row in a different position of its batch; it changes a guess only on an exact tie.)
The reconstructions themselves are kept for the rows ``keep_rows`` only (a report's example grid).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from collafuse.attacks.chunking import memory_budget_bytes, row_slices, rows_per_chunk
from collafuse.attacks.reconstruction import multiview, oracle
from collafuse.attacks.reconstruction.evaluate import ALL_VIEWS, PERFECT, ViewEvaluation
from collafuse.attacks.reconstruction.registry import run_attack
from collafuse.attacks.reconstruction.scoring import (
    LabelClassifier,
    Scores,
    Truth,
    chance_levels,
    linkage_accuracy,
    score,
)
from collafuse.attacks.reconstruction.view import (
    AttackerResources,
    PoolLogWeights,
    Reconstruction,
    ViewArrays,
    rescaled,
)

from collafuse.schedule import NoiseSchedule

# Attacks whose reconstruction of a row depends on that row alone (and the attacker's fixed means).
# ``inversion`` is not one: it trains its network on the steps of the whole view.
ROW_LOCAL = frozenset({"rescale", "tweedie", "ddim", oracle.NAME})
STREAMED = ROW_LOCAL | {multiview.NAME}
# Bytes one value (row × pixel) of a shard costs while it is alive: the float32 payload and one
# reconstruction, the float64 rescaled rows and the scorer's float64 copies.
SHARD_BYTES_PER_VALUE = 48
# The denoiser attacks run in batches of this many rows; shards of a multiple of it run the same batches.
DENOISER_BATCH = 1024

Shards = Callable[[], Iterable[tuple[int, ViewArrays]]]


def can_stream(attacks: tuple[str, ...]) -> bool:
    """Can :func:`evaluate_streamed` run every one of ``attacks``?"""
    return all(name in STREAMED for name in attacks)


def shard_rows(values_per_row: int, attacks: tuple[str, ...], pool: int | None) -> int:
    """Rows per shard: what the memory budget holds (:data:`SHARD_BYTES_PER_VALUE` a value), a multiple
    of the oracle's chunk when it runs (its blocks then fall on the same rows as over the whole view),
    else of :data:`DENOISER_BATCH`; at least one such unit."""
    unit = rows_per_chunk(pool, oracle.BYTES_PER_PAIR) if oracle.NAME in attacks and pool else DENOISER_BATCH
    fit = memory_budget_bytes() // max(1, values_per_row * SHARD_BYTES_PER_VALUE)
    return max(1, fit // unit) * unit


def truth_rows(truth: Truth, rows: slice) -> Truth:
    """The ground truth of the rows ``rows`` (the source images are shared, not copied)."""
    return Truth(truth.member[rows], truth.client[rows], truth.source, truth.source_labels, truth.client_data,
                 truth.pool, truth.pool_description)


def concat_scores(parts: list[Scores]) -> Scores:
    """Per-row scores of consecutive row blocks as one :class:`Scores` over all their rows."""
    first = parts[0]
    per_row = {name: np.concatenate([p.per_row[name] for p in parts]) for name in first.per_row}
    return Scores(first.attack, per_row, np.concatenate([p.clusters for p in parts]),
                  np.concatenate([p.client for p in parts]), first.extraction_delta)


class _Kept:
    """The reconstructions of the rows ``keep`` (sorted positions into the view), gathered as rows pass."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, first_row: int, images: torch.Tensor) -> None:
        mine = (self.keep >= first_row) & (self.keep < first_row + images.shape[0])
        self.parts.setdefault(name, []).append(images[self.keep[mine] - first_row])

    def get(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name])


def evaluate_streamed(
    shards: Shards,
    metadata: ViewArrays,
    schedule: NoiseSchedule,
    truth: Truth,
    resources: AttackerResources,
    attacks: tuple[str, ...],
    num_classes: int,
    image_shape: tuple[int, int, int],
    keep_rows: torch.Tensor | None = None,
    rows_per_shard: int | None = None,
) -> ViewEvaluation:
    """:func:`~.evaluate.evaluate_view` without holding the view (module docstring).

    ``shards()`` yields (first row, shard) over the N rows in order, each shard starting on a multiple
    of ``rows_per_shard`` (default :func:`shard_rows`; they may be of any length that keeps that);
    ``metadata``: the N rows without payload values; ``truth``: the scorer's truth of all N rows;
    ``image_shape``: (C, H, W) of a payload. ``keep_rows``: the rows whose reconstructions the result
    keeps (``reconstruction_rows``; default none)."""
    if not can_stream(attacks):
        raise ValueError(f"evaluate_streamed runs {sorted(STREAMED)} only, got {list(attacks)}")
    n = len(metadata)
    keep = torch.sort(torch.as_tensor(keep_rows if keep_rows is not None else [], dtype=torch.long)).values
    kept = _Kept(keep)
    values = int(np.prod(image_shape))
    size = rows_per_shard or shard_rows(values, attacks, None if resources.candidates is None else resources.candidates.shape[0])
    aux = resources.aux
    labelled = aux is not None and aux.labels is not None and truth.labels is not None and n > 0
    recon_clf = payload_clf = None
    payload_label = None
    if labelled:
        t_max = int(metadata.t.max())
        recon_clf = LabelClassifier(seed=resources.seed).fit(aux.images, aux.labels, schedule, torch.arange(0, t_max + 1))
        if metadata.label is not None:
            payload_label = (metadata.label == truth.labels).double().numpy()
        else:
            payload_clf = LabelClassifier(seed=resources.seed).fit(aux.images, aux.labels, schedule, metadata.t)
    pool_ids = truth.pool if resources.candidates is not None else None
    linking = perfect = ceiling = None
    if multiview.NAME in attacks:
        prior = multiview.GaussianPrior.fit(aux.images) if aux is not None and len(aux) > 1 else None
        linking = multiview.StreamedLinking(metadata.client, resources.epochs, values, prior)
        _, true_slot = torch.unique(truth.member, return_inverse=True)
        perfect = multiview.FusionSums(int(true_slot.max()) + 1 if n else 0, values)
    all_views = oracle.NAME in attacks and resources.candidates is not None
    if all_views:
        _, image_slot = torch.unique(truth.member, return_inverse=True)
        ceiling = oracle.AllViewsSums(resources.candidates, int(image_slot.max()) + 1 if n else 0)
    parts: dict[str, list[Scores]] = {}
    label_parts: list[np.ndarray] = []
    for start, shard in shards():  # pass 1: the row-local attacks, linking and the sums
        if start % size:
            raise ValueError(f"a shard must start on a multiple of {size} rows, got row {start}")
        rows = slice(start, start + len(shard))
        truth_s = truth_rows(truth, rows)
        for name in attacks:
            if name == multiview.NAME:
                y, var = rescaled(shard, schedule)
                linking.feed(torch.arange(rows.start, rows.stop), y, var, shard.client)
                perfect.add(true_slot[rows], y, var)
                del y, var
                continue
            recon = run_attack(name, shard, schedule, resources)
            parts.setdefault(name, []).append(score(recon, truth_s, recon_clf, pool_ids))
            kept.add(name, start, recon.images)
            del recon
        if all_views:
            ceiling.add(shard, schedule, image_slot[rows], start)
        if payload_clf is not None:
            y, _ = rescaled(shard, schedule)
            label_parts.append((payload_clf.predict(y) == truth_s.labels).double().numpy())
    if payload_clf is not None:
        payload_label = np.concatenate(label_parts)
    extra: dict[str, dict] = {}
    fused: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}  # name → (per-image x̂, row → image, score kwargs)
    if linking is not None:  # pass 2, from the metadata: the fused images
        mean, noise_var, slots = linking.fused()
        extra[multiview.NAME] = {"linkage_accuracy": linkage_accuracy(linking.groups, truth.member),
                                 "mean_noise_var": float(noise_var[slots].mean())}
        fused[multiview.NAME] = (mean.reshape(-1, *image_shape), slots, {"weight_ids": pool_ids})
        p_mean, p_var = perfect.result()
        extra[PERFECT] = {"mean_noise_var": float(p_var[true_slot].mean())}
        fused[PERFECT] = (p_mean.reshape(-1, *image_shape), true_slot, {})
    ceiling_w = None
    if all_views:
        ceiling_w, ceiling_means = ceiling.result()
        fused[ALL_VIEWS] = (ceiling_means, image_slot, {"weight_ids": pool_ids})
    for name, (images, slot, kwargs) in fused.items():
        for sl in row_slices(n, size):
            x = images[slot[sl]].float()
            weights = None
            if name == ALL_VIEWS:
                rows_slot = slot[sl]
                weights = PoolLogWeights((x.shape[0], ceiling_w.shape[1]), lambda r, s=rows_slot: ceiling_w[s[r]],
                                                rows_per_chunk(ceiling_w.shape[1], oracle.BYTES_PER_PAIR))
            recon = Reconstruction(name, x, pool_log_weights=weights)
            parts.setdefault(name, []).append(score(recon, truth_rows(truth, sl), recon_clf, **kwargs))
            kept.add(name, sl.start, x)
    order = []  # evaluate_view's order: the attacks, the perfect linking right after multiview, the ceiling last
    for name in attacks:
        order.append(name)
        if name == multiview.NAME:
            order.append(PERFECT)
    if all_views:
        order.append(ALL_VIEWS)
    scores = {name: concat_scores(parts[name]) for name in order}
    recons = {name: Reconstruction(name, kept.get(name)) for name in order}
    return ViewEvaluation(scores, recons, payload_label, metadata.label is not None, chance_levels(truth, num_classes),
                          extra, reconstruction_rows=keep)
