"""Scoring metrics and confidence intervals of the reconstruction attacks (DESIGN.md §4.1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from collafuse.attacks.reconstruction.scoring import (
    PSNR_CAP_DB, mse_per_image, nearest_index, posterior_labels, psnr_from_mse, ssim_per_image, ssim_unit,
    linkage_accuracy,
)
from collafuse.attacks.stats import cluster_bootstrap_interval, summarize, t_interval, wilson_interval


def _pairs(n: int, c: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, h, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, c, h, h, generator=g, dtype=torch.float64) * torch.linspace(0.01, 1.0, n, dtype=torch.float64)[:, None, None, None]
    return (x + noise), x  # reconstructions leave [-1, 1] sometimes: scoring clips them


def test_psnr_matches_scikit_image_on_random_pairs() -> None:
    x_hat, x = _pairs(40, 1, 16, seed=1)
    ours = psnr_from_mse(mse_per_image(x_hat, x)).numpy()
    unit = lambda z: ((z + 1) / 2).clamp(0, 1).numpy()  # noqa: E731
    ref = np.array([peak_signal_noise_ratio(unit(x[i]), unit(x_hat[i]), data_range=1.0) for i in range(40)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


@pytest.mark.parametrize("channels,size", [(1, 16), (3, 8), (1, 25)])
def test_ssim_matches_scikit_image_on_random_pairs(channels: int, size: int) -> None:
    x_hat, x = _pairs(30, channels, size, seed=channels + size)
    ours = ssim_per_image(x_hat, x).numpy()
    unit = lambda z: ((z + 1) / 2).clamp(0, 1).numpy()  # noqa: E731
    ref = []
    for i in range(30):
        a, b = unit(x[i]), unit(x_hat[i])
        if channels == 1:
            ref.append(structural_similarity(a[0], b[0], data_range=1.0))
        else:
            ref.append(structural_similarity(a, b, data_range=1.0, channel_axis=0))
    np.testing.assert_allclose(ours, np.array(ref), rtol=1e-9, atol=1e-12)


def test_ssim_and_psnr_of_identical_images() -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.all(psnr_from_mse(mse_per_image(x, x)) == PSNR_CAP_DB)
    with pytest.raises(ValueError, match="7×7"):
        ssim_unit(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))


def test_nearest_index_matches_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(3)
    q, c = torch.randn(20, 1, 4, 4, generator=g), torch.randn(50, 1, 4, 4, generator=g)
    slow = torch.tensor([int(min(range(50), key=lambda j: float((q[i] - c[j]).pow(2).sum()))) for i in range(20)])
    assert torch.equal(nearest_index(q, c), slow)


def test_posterior_labels_and_linkage_accuracy() -> None:
    log_w = torch.log(torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]))
    # classes: candidate 0 and 1 are label 0, candidate 2 is label 1: mass 0.6 vs 0.4 → 0; 0.6 vs 0.4 → 0
    assert posterior_labels(log_w, torch.tensor([0, 0, 1])).tolist() == [0, 0]
    assert posterior_labels(log_w, torch.tensor([1, 0, 1])).tolist() == [1, 1]
    groups = torch.tensor([0, 1, 0, 1, 0])  # rows 2, 3, 4 linked to anchors 0, 1, 0
    member = torch.tensor([7, 8, 7, 9, 7])
    assert linkage_accuracy(groups, member) == pytest.approx(2 / 3)
    assert np.isnan(linkage_accuracy(torch.arange(4), member[:4]))


def test_t_interval_covers_the_true_mean_in_simulation() -> None:
    rng = np.random.default_rng(0)
    sims, n, true_mean = 2000, 30, 1.0
    draws = rng.exponential(true_mean, size=(sims, n))  # skewed: the t interval is only approximate here
    covered = sum(t_interval(d).low <= true_mean <= t_interval(d).high for d in draws)
    assert 0.91 <= covered / sims <= 0.975


def test_wilson_interval_covers_the_true_proportion_in_simulation() -> None:
    rng = np.random.default_rng(1)
    for p, n in [(0.02, 100), (0.5, 40), (0.95, 60)]:
        hits = rng.binomial(n, p, size=3000)
        covered = np.mean([wilson_interval(int(k), n).low <= p <= wilson_interval(int(k), n).high for k in hits])
        assert covered >= 0.92, (p, n, covered)
    # Closed forms (Wilson 1927): centre (k + z²/2)/(n + z²), half-width z/(n + z²)·√(k(n−k)/n + z²/4);
    # at k = 0 the interval is [0, z²/(n + z²)].
    z = 1.959963984540054  # Φ⁻¹(0.975)
    iv = wilson_interval(0, 50)
    assert iv.low == 0.0 and iv.high == pytest.approx(z * z / (50 + z * z), rel=1e-9)
    k, n = 10, 40
    centre, half = (k + z * z / 2) / (n + z * z), z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
    iv = wilson_interval(k, n)
    assert (iv.low, iv.high) == (pytest.approx(centre - half, rel=1e-9), pytest.approx(centre + half, rel=1e-9))
    assert iv.value == 0.25


def test_cluster_bootstrap_covers_the_true_mean_with_correlated_rows() -> None:
    rng = np.random.default_rng(2)
    sims, images, views, true_mean = 300, 60, 3, 0.0
    clusters = np.repeat(np.arange(images), views)
    covered = 0
    naive_covered = 0
    for _ in range(sims):
        shared = np.repeat(rng.normal(0, 1, images), views)  # rows of one image share this
        values = true_mean + shared + rng.normal(0, 0.3, images * views)
        iv = cluster_bootstrap_interval(values, clusters, rng, n_boot=400)
        covered += iv.low <= true_mean <= iv.high
        naive = t_interval(values)
        naive_covered += naive.low <= true_mean <= naive.high
    assert 0.90 <= covered / sims <= 0.985
    assert naive_covered / sims < 0.88  # treating rows as independent would under-cover: why clusters matter


def test_cluster_bootstrap_does_not_depend_on_how_clusters_are_numbered() -> None:
    """Relabelling the images (an imported copy of a run numbers them 0..M-1) must not move the interval;
    regrouping rows must."""
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 40, 200)
    values = rng.normal(size=200) + clusters / 40
    relabel = rng.permutation(1000)[:40] + 7  # any injective renaming
    a = cluster_bootstrap_interval(values, clusters, np.random.default_rng(3))
    b = cluster_bootstrap_interval(values, relabel[clusters], np.random.default_rng(3))
    assert a == b
    c = cluster_bootstrap_interval(values, np.roll(clusters, 1), np.random.default_rng(3))
    assert (c.low, c.high) != (a.low, a.high)


def test_summarize_picks_the_interval_by_structure() -> None:
    assert summarize(np.array([1.0, 0.0, 1.0]), proportion=True).method == "wilson"
    assert summarize(np.array([1.0, 2.0, 4.0])).method == "t"
    assert summarize(np.array([1.0, 2.0, 4.0, 5.0]), clusters=np.array([0, 0, 1, 1])).method == "cluster-bootstrap"
    a = summarize(np.arange(10.0), clusters=np.arange(10) // 2, seed=5)
    b = summarize(np.arange(10.0), clusters=np.arange(10) // 2, seed=5)
    assert a == b  # deterministic under a seed
