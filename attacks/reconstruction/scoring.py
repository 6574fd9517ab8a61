"""Scoring reconstructions against the ground truth (DESIGN.md §4.1 "Metrics").

This module — not the attacks — uses the ground truth: which image each payload
row came from (the audit key, or a simulation's own record). Per row it computes

- ``mse`` and ``psnr`` on the [0, 1] scale (images mapped by (x+1)/2 and clipped to
  [0, 1], the valid range any attacker may enforce); PSNR = 10 log10(1/MSE), capped at
  :data:`PSNR_CAP_DB` so exact reconstructions give a finite number;
- ``ssim``: scikit-image's ``structural_similarity`` (7×7 uniform window, sample
  covariance, K1 = 0.01, K2 = 0.03, data_range 1), computed batched; for several
  channels the mean over channels as scikit-image does with ``channel_axis``;
- ``reid_client`` / ``reid_pool``: top-1 re-identification — the nearest (L2) image
  to x̂ in the client's own data / in the stated candidate pool is the true one. An
  attack that returns a posterior over candidates (``oracle``) is scored by its argmax;
- ``label``: the label predicted from x̂ by a classifier trained on noised public
  images (:class:`LabelClassifier`) equals the true label; an attack that returns a
  posterior over a labelled pool (``oracle``) predicts its heaviest label instead;
- ``extraction``: extraction as Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
  USENIX Security, §5.1) define it for pixel-space models: with ℓ2 their normalised distance
  ‖a − b‖₂/√d on the [0, 1] scale (= √MSE) and S_x̂ the n = 50 training images nearest to x̂, x̂ extracts
  its true image x when ℓ2(x̂, x) / (α · mean_{y ∈ S_x̂} ℓ2(x̂, y)) < 1, α = 0.5 (:func:`carlini_extracted`):
  x̂ is far closer to x than to its other neighbours. The training set is every member image. Unlike
  re-identification it does not need the argmax to land on the member: a near-copy counts even when a
  near-duplicate wins the nearest-neighbour search;
- ``extraction_abs``: the absolute-threshold rate beside it, under its own name: ℓ2(x̂, x) ≤ δ,
  δ = :data:`EXTRACTION_DELTA` = 0.1 unless stated (the summary states it).
  Both per payload row like re-identification: with one view per member the fraction of members
  extracted, with E views the mean over members of the fraction of their views that extract them;

and summarises each with a 95 % interval (t / Wilson, or a cluster bootstrap over
images when an image has several rows). Per-row values are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch.nn import functional as F

from collafuse.metrics import metric
from collafuse.schedule import NoiseSchedule, q_sample

from collafuse.attacks.chunking import row_slices, rows_per_chunk
from collafuse.attacks.reconstruction.view import PoolLogWeights, Reconstruction
from collafuse.attacks.stats import Interval, summarize

PSNR_CAP_DB = 100.0
EXTRACTION_DELTA = 0.1  # the absolute rate's δ for the normalised ℓ2 on [0, 1] images
CARLINI_NEIGHBOURS, CARLINI_ALPHA = 50, 0.5  # Carlini et al. 2023 §5.1: n = 50 nearest training images, α = 0.5
METRICS: tuple[str, ...] = ("mse", "psnr", "ssim", "reid_client", "reid_pool", "label", "extraction", "extraction_abs")
PROPORTIONS = frozenset({"reid_client", "reid_pool", "label", "extraction", "extraction_abs"})
# Bytes one value (row × pixel) costs while MSE and SSIM are computed: SSIM's float64 temporaries.
SCORE_BYTES_PER_VALUE = 128
# Which way helps the attacker, from the one metric vocabulary (collafuse.metrics: "worse" for privacy).
HIGHER_IS_BETTER = {name: metric(name).worse == "higher" for name in METRICS}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space → [0, 1], clipped; float64."""
    return ((x.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def mse_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image on the [0, 1] scale. (N,C,H,W) × 2 → (N,) float64."""
    return (to_unit(x_hat) - to_unit(x)).pow(2).flatten(1).mean(1)


def normalised_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Carlini et al. 2023's ℓ2(a, b) = ‖a − b‖₂/√d on the [0, 1] scale (images in [-1, 1], clipped
    by :func:`to_unit`), i.e. the root mean squared error. (N,C,H,W) × 2 → (N,) float64."""
    return mse_per_image(a, b).sqrt()


def nearest_distances(queries: torch.Tensor, train: torch.Tensor, n: int = CARLINI_NEIGHBOURS) -> torch.Tensor:
    """The ``n`` smallest normalised ℓ2 distances ‖u(q) − u(y)‖₂/√d (u: the [0, 1] map) from each of
    (Q, C, H, W) ``queries`` to the (M, C, H, W) ``train`` images, ascending: (Q, min(n, M)) float64.

    Blocked over both sets within the memory budget (a running top-n over training blocks), each block one
    matrix product (``use_mm_for_euclid_dist``): torch's direct cdist path, which it takes for blocks of
    ≤ 25 rows, made this 20 × slower than every attack of a payload cell together."""
    d = queries[0].numel()
    q = to_unit(queries).reshape(queries.shape[0], -1)
    y_rows = max(n, rows_per_chunk(d, 16))                             # training rows held at once (float64)
    q_rows = max(1, rows_per_chunk(min(train.shape[0], y_rows), 16))   # query rows × those: distances + top-n
    k = min(n, train.shape[0])
    out = torch.empty((q.shape[0], k), dtype=torch.float64)
    for tsl in row_slices(train.shape[0], y_rows):
        y = to_unit(train[tsl]).reshape(-1, d)
        for qsl in row_slices(q.shape[0], q_rows):
            block = torch.cdist(q[qsl], y, compute_mode="use_mm_for_euclid_dist") / math.sqrt(d)
            if tsl.start > 0:  # merge with the running top-n of the earlier training blocks
                block = torch.cat([out[qsl], block], 1)
            out[qsl] = block.topk(k, dim=1, largest=False).values
    return out


def carlini_ratio(to_target: torch.Tensor, neighbours: torch.Tensor, alpha: float = CARLINI_ALPHA) -> torch.Tensor:
    """ℓ2(x̂, x) / (α · mean_{y ∈ S_x̂} ℓ2(x̂, y)) per row: ``to_target`` (Q,), ``neighbours`` (Q, n) the distances
    to the n training images nearest to x̂ (S_x̂, the target among them when it is a training image).
    Below 1: x̂ extracts x (Carlini et al. 2023, §5.1)."""
    mean = neighbours.double().mean(1)
    return torch.where(mean > 0, to_target.double() / (alpha * mean), torch.where(to_target > 0, torch.inf, 0.0))


def carlini_extracted(reconstructions: torch.Tensor, targets: torch.Tensor, train: torch.Tensor,
                      n: int = CARLINI_NEIGHBOURS, alpha: float = CARLINI_ALPHA) -> np.ndarray:
    """Carlini et al. 2023's extraction indicator (§5.1) of each row: does x̂ (``reconstructions``, (Q,C,H,W))
    extract its target x (``targets``, (Q,C,H,W)) relative to the ``train`` images' n nearest to x̂? (Q,) 0/1."""
    d = targets[0].numel()
    to_target = (to_unit(reconstructions) - to_unit(targets)).reshape(targets.shape[0], -1).double().norm(dim=1) / math.sqrt(d)
    ratio = carlini_ratio(to_target, nearest_distances(reconstructions, train, n), alpha)
    return (ratio < 1.0).double().numpy()


def extracted(distance: torch.Tensor | np.ndarray, delta: float = EXTRACTION_DELTA) -> np.ndarray:
    """(ℓ2, δ)-extraction indicator: normalised ℓ2 distance ≤ δ, as float64 0/1 (N,)."""
    if not delta > 0:
        raise ValueError(f"extraction delta must be > 0, got {delta}")
    return (np.asarray(distance, dtype=np.float64) <= delta).astype(np.float64)


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """10 log10(R² / MSE), at most ``cap_db`` (so MSE = 0 gives the cap, not infinity). (N,) → (N,)."""
    floor = data_range**2 * 10.0 ** (-cap_db / 10.0)
    return 10.0 * torch.log10(data_range**2 / mse.double().clamp_min(floor))


def ssim_unit(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Mean SSIM per image of two batches already on the [0, R] scale, (N,C,H,W) → (N,) float64.

    Same as ``skimage.metrics.structural_similarity(..., data_range=R)`` with its defaults
    (uniform ``win_size`` window, sample covariance, K1 = 0.01, K2 = 0.03): scikit-image filters
    with reflection at the borders and then crops (win_size−1)/2 pixels, which leaves exactly
    the windows that lie inside the image — a 'valid' average pooling here.
    """
    if a.shape[-1] < win_size or a.shape[-2] < win_size:
        raise ValueError(f"SSIM needs images at least {win_size}×{win_size}, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    pool = lambda z: F.avg_pool2d(z, win_size, stride=1)  # noqa: E731
    ux, uy = pool(x), pool(y)
    cov_norm = win_size**2 / (win_size**2 - 1)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)


def ssim_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SSIM per image on the [0, 1] scale (x̂ clipped). (N,C,H,W) × 2 → (N,)."""
    return ssim_unit(to_unit(x_hat), to_unit(x), 1.0)


def nearest_index(queries: torch.Tensor, candidates: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the L2-nearest candidate (M,...) for every query (N,...), shape (N,) int64."""
    q = queries.reshape(queries.shape[0], -1).double()
    c = candidates.reshape(candidates.shape[0], -1).double()
    return torch.cat([torch.cdist(q[i : i + chunk], c).argmin(1) for i in range(0, q.shape[0], chunk)]) if q.shape[0] else torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class Truth:
    """Ground truth for N view rows: scorer-only (built from the audit key or a simulation).

    member: (N,) source index of each row's image; client: (N,) sender; source: (S,C,H,W) the
    images those indices point into, source_labels: (S,) their labels or None; client_data: per client, the source
    indices of its data (re-identification within the client); pool: (M,) source indices of the
    stated candidate pool, described by ``pool_description``.
    """

    member: torch.Tensor
    client: torch.Tensor
    source: torch.Tensor
    source_labels: torch.Tensor | None
    client_data: dict[int, torch.Tensor]
    pool: torch.Tensor
    pool_description: str

    @property
    def images(self) -> torch.Tensor:
        """(N,C,H,W) the true image of every row."""
        return self.source[self.member]

    @property
    def labels(self) -> torch.Tensor | None:
        """(N,) the true label of every row, or None."""
        return None if self.source_labels is None else self.source_labels[self.member]

    @property
    def training_set(self) -> torch.Tensor:
        """Source indices of every image the clients trained on (the union of their data)."""
        return torch.cat(list(self.client_data.values())).unique()

    def __post_init__(self) -> None:
        n = self.member.shape[0]
        if self.client.shape != (n,):
            raise ValueError(f"Truth.client must have shape ({n},), got {tuple(self.client.shape)}")
        if self.source_labels is not None and self.source_labels.shape != self.source.shape[:1]:
            raise ValueError("Truth.source_labels must have one label per source image")


def _reid_from_weights(log_w, weight_ids: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Source index of the argmax over the columns whose id is in ``allowed``, for ``rows`` (default all) of
    the (N, M) :class:`PoolLogWeights` (or a tensor): (len(rows),), read block by block (bounded memory)."""
    log_w = log_w if isinstance(log_w, PoolLogWeights) else PoolLogWeights.of(log_w)
    keep = torch.isin(weight_ids, allowed)
    n = log_w.shape[0] if rows is None else int(torch.as_tensor(rows).numel())
    out = torch.empty(n, dtype=torch.long)
    for pos, block in log_w.blocks(rows):
        masked = torch.where(keep[None, :], block.double(), torch.full_like(block, -torch.inf, dtype=torch.float64))
        out[pos] = weight_ids[masked.argmax(1)]
    return out


def reidentify(recon: Reconstruction, truth: Truth, weight_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(guess within the row's client, guess within the pool), source indices (N,) each.

    With ``recon.pool_log_weights`` and the source ids of its columns (``weight_ids``), the argmax
    posterior (restricted to the client's data for the first); otherwise the nearest image to x̂.
    """
    n = truth.member.shape[0]
    x_hat = to_unit(recon.images).float()
    use_w = recon.pool_log_weights is not None and weight_ids is not None
    in_client = torch.empty(n, dtype=torch.long)
    for k, ids in truth.client_data.items():
        rows = torch.nonzero(truth.client == k).flatten()
        if rows.numel() == 0:
            continue
        if use_w and bool(torch.isin(ids, weight_ids).all()):
            in_client[rows] = _reid_from_weights(recon.pool_log_weights, weight_ids, ids, rows)
        else:
            in_client[rows] = ids[nearest_index(x_hat[rows], to_unit(truth.source[ids]).float())]
    if use_w and bool(torch.isin(truth.pool, weight_ids).all()):
        in_pool = _reid_from_weights(recon.pool_log_weights, weight_ids, truth.pool)
    else:
        in_pool = truth.pool[nearest_index(x_hat, to_unit(truth.source[truth.pool]).float())]
    return in_client, in_pool


class LabelClassifier:
    """Linear discriminant analysis (shrinkage by Ledoit–Wolf) on public images noised to given
    steps (DESIGN.md §4.1). Gaussian classes with a shared covariance are exactly what additive
    Gaussian noise produces, and the fit is closed-form (fast enough for dense cut-point curves).

    Inputs are in x0 units, clipped to [-1, 1]: a noised public image p = a x + s ε enters as
    clip(p/a); a reconstruction x̂ enters as clip(x̂). ``fit`` returns self; ``classes_`` learned.
    """

    def __init__(self, draws: int = 4, seed: int = 0):
        self.draws = draws
        self.seed = seed

    def fit(self, images: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule, steps: torch.Tensor) -> "LabelClassifier":
        """images (N,C,H,W) public, labels (N,), steps: the t values to noise at (drawn uniformly)."""
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys = [], []
        for _ in range(self.draws):
            t = steps[torch.randint(0, steps.numel(), (images.shape[0],), generator=gen)].long()
            noise = torch.randn(images.shape, generator=gen)
            p = q_sample(images.double(), t, noise.double(), schedule.alpha_bar)
            a = schedule.alpha_bar[t].sqrt().reshape(-1, 1, 1, 1)
            xs.append((p / a).clamp(-1, 1).flatten(1))
            ys.append(labels)
        self.model_ = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(torch.cat(xs).numpy(), torch.cat(ys).numpy())
        self.classes_ = self.model_.classes_
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels (N,) for images in x0 units (N,C,H,W)."""
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long)
        return torch.from_numpy(self.model_.predict(x.double().clamp(-1, 1).flatten(1).numpy())).long()


def posterior_labels(log_w, candidate_labels: torch.Tensor) -> torch.Tensor:
    """argmax_c Σ_m softmax(log w)_nm [label_m = c]: (N, M) × (M,) → (N,) int64, block by block
    (``log_w`` a :class:`PoolLogWeights` or a tensor)."""
    log_w = log_w if isinstance(log_w, PoolLogWeights) else PoolLogWeights.of(log_w)
    k = int(candidate_labels.max()) + 1
    out = torch.empty(log_w.shape[0], dtype=torch.long)
    for pos, block in log_w.blocks():
        w = torch.softmax(block.double(), dim=1)
        mass = torch.zeros(w.shape[0], k, dtype=torch.float64).index_add_(1, candidate_labels.long(), w)
        out[pos] = mass.argmax(1)
    return out


@dataclass
class Scores:
    """Per-row metric values (each (N,) float64 numpy) and what they were computed on."""

    attack: str
    per_row: dict[str, np.ndarray]
    clusters: np.ndarray  # (N,) source index of each row's image: rows of one image are not independent
    client: np.ndarray
    extraction_delta: float = EXTRACTION_DELTA  # the δ of the ``extraction`` metric

    def summary(self, rows: np.ndarray | None = None, seed: int = 0) -> dict[str, Interval]:
        """{metric: interval} over all rows or the boolean mask ``rows``."""
        mask = np.ones_like(self.client, dtype=bool) if rows is None else rows
        return {
            name: summarize(v[mask], self.clusters[mask], proportion=name in PROPORTIONS, seed=seed)
            for name, v in self.per_row.items()
        }

    def summary_json(self, rows: np.ndarray | None = None, seed: int = 0) -> dict[str, dict]:
        """:meth:`summary` as the reports write it; each extraction rate states its definition."""
        out = {name: iv.to_json() for name, iv in self.summary(rows, seed).items()}
        if "extraction" in out:
            out["extraction"].update(neighbours=CARLINI_NEIGHBOURS, alpha=CARLINI_ALPHA)
        if "extraction_abs" in out:
            out["extraction_abs"]["delta"] = self.extraction_delta
        return out

    def by_client(self, seed: int = 0) -> dict[str, dict[str, dict]]:
        """:meth:`summary_json` per client."""
        return {str(int(k)): self.summary_json(self.client == k, seed) for k in np.unique(self.client)}


def _mse_and_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mse_per_image` and :func:`ssim_per_image` (N,) each, a block of rows at a time (sized from the
    memory budget, :mod:`collafuse.attacks.chunking`): per-row formulas, so any block gives the same
    numbers, and SSIM's float64 temporaries stay bounded however many rows there are."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    size = rows_per_chunk(x[0].numel(), SCORE_BYTES_PER_VALUE)
    blocks = [(mse_per_image(x_hat[sl], x[sl]), ssim_per_image(x_hat[sl], x[sl])) for sl in row_slices(x.shape[0], size)]
    return torch.cat([m for m, _ in blocks]), torch.cat([s for _, s in blocks])


def score(
    recon: Reconstruction,
    truth: Truth,
    classifier: LabelClassifier | None = None,
    weight_ids: torch.Tensor | None = None,
    extraction_delta: float = EXTRACTION_DELTA,
) -> Scores:
    """Every §4.1 metric per row for one attack's reconstruction. ``classifier`` None or no labels: no ``label``.
    ``extraction_delta``: the δ of (ℓ2, δ)-extraction."""
    x = truth.images
    if recon.images.shape != x.shape:
        raise ValueError(f"reconstruction {tuple(recon.images.shape)} does not match the truth {tuple(x.shape)}")
    mse, ssim = _mse_and_ssim(recon.images, x)
    in_client, in_pool = reidentify(recon, truth, weight_ids)
    per_row = {
        "mse": mse.numpy(),
        "psnr": psnr_from_mse(mse).numpy(),
        "ssim": ssim.numpy(),
        "reid_client": (in_client == truth.member).double().numpy(),
        "reid_pool": (in_pool == truth.member).double().numpy(),
        "extraction": carlini_extracted(recon.images, x, truth.source[truth.training_set]),
        "extraction_abs": extracted(mse.sqrt(), extraction_delta),
    }
    if truth.labels is not None and recon.pool_log_weights is not None and weight_ids is not None:
        # A posterior over labelled candidates infers the label as its heaviest class (Bayes rule).
        per_row["label"] = (posterior_labels(recon.pool_log_weights, truth.source_labels[weight_ids]) == truth.labels).double().numpy()
    elif classifier is not None and truth.labels is not None:
        per_row["label"] = (classifier.predict(recon.images) == truth.labels).double().numpy()
    return Scores(recon.attack, per_row, truth.member.numpy(), truth.client.numpy(), float(extraction_delta))


def chance_levels(truth: Truth, num_classes: int) -> dict[str, float]:
    """What guessing achieves: 1/|client data| (averaged over rows), 1/|pool|, 1/classes."""
    sizes = torch.tensor([truth.client_data[int(k)].numel() for k in truth.client], dtype=torch.float64)
    out = {"reid_client": float((1.0 / sizes).mean()) if sizes.numel() else float("nan"), "reid_pool": 1.0 / max(1, truth.pool.numel())}
    if num_classes > 0:
        out["label"] = 1.0 / num_classes
    return out


def linkage_accuracy(groups: torch.Tensor, member: torch.Tensor) -> float:
    """Share of linked rows (rows that are not their own anchor) whose anchor shows the same image.

    groups, member: (N,). NaN when nothing was linked (one epoch).
    """
    linked = groups != torch.arange(groups.numel())
    if not bool(linked.any()):
        return float("nan")
    return float((member[groups[linked]] == member[linked]).double().mean())
