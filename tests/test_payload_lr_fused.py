"""The fused payload likelihood of ``payload-lr`` (T1; DESIGN.md §4.2 "Fused payload likelihood"):
with E views per member it beats the single-view max, it is no worse where the single view is
already perfect, and the blocked, bounded-memory computation equals a slow obvious loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.signals import (
    payload_chunk_size, payload_log_ratio, payload_pool_stats, payload_signal_cache,
)
from collafuse.data import load_digits16
from collafuse.schedule import NoiseSchedule, cut_step

T, EPOCHS, N = 1000, 25, 256


@pytest.fixture(scope="module")
def digits():
    data = load_digits16(1, 16)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.images[perm]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("cosine", T)


def simulate(members: torch.Tensor, schedule: NoiseSchedule, t_c: int, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    """A ``cut`` server view straight from the schedule: every member once per epoch, p = a x0 + s ε."""
    g = torch.Generator().manual_seed(seed)
    a, s = float(schedule.alpha_bar[t_c].sqrt()), float((1 - schedule.alpha_bar[t_c]).sqrt())
    p = torch.cat([a * members + s * torch.randn(members.shape, generator=g) for _ in range(epochs)])
    order = torch.randperm(p.shape[0], generator=g)  # the server does not know which rows belong together
    return {"tensor": p[order], "t": torch.full((p.shape[0],), t_c, dtype=torch.long)}


def _auc(scores: np.ndarray, n: int) -> float:
    return float(roc_auc_score(np.r_[np.ones(n), np.zeros(len(scores) - n)], scores))


def _aucs(digits, schedule, c: float, setting: str = "all") -> tuple[float, float, float]:
    """AUCs of payload-lr-single, payload-lr-fused and payload-lr. ``all``: the 256 member candidates are
    every image that sent payloads; ``quarter``: 128 member candidates out of 512 senders (the others'
    payloads have no source among the candidates, as when the candidates are subsampled)."""
    senders = N if setting == "all" else 4 * (N // 2)
    n = N if setting == "all" else N // 2
    members, nonmembers = digits[:n], digits[senders : senders + n]
    aux = digits[senders + n : senders + n + N]
    view = simulate(digits[:senders], schedule, cut_step(c, T), EPOCHS, seed=1)
    cache = payload_signal_cache(torch.cat([members, nonmembers]), view, schedule, aux, views_per_image=EPOCHS)
    get = lambda name: ATTACKS.get(name).score(cache.require(ATTACKS.get(name).signals)).scores  # noqa: E731
    return _auc(get("payload-lr-single"), n), _auc(get("payload-lr-fused"), n), _auc(get("payload-lr"), n)


# Measured (digits 16×16, cosine T = 1000, 25 views, 256 references), AUC single → fused:
#   all:     c = 0.2: 0.999 → 1.000; c = 0.5: 0.643 → 1.000; c = 0.7: 0.584 → 0.885
#   quarter: c = 0.2: 0.998 → 1.000; c = 0.5: 0.581 → 0.914; c = 0.7: 0.561 → 0.741
#   (c = 0.9, both near chance: all 0.565 → 0.557, quarter 0.533 → 0.516)
@pytest.mark.parametrize("setting", ["all", "quarter"])
@pytest.mark.parametrize("c", [0.5, 0.7])
def test_fused_beats_the_single_view_max_with_25_views(c, setting, digits, schedule):
    single, fused, chosen = _aucs(digits, schedule, c, setting)
    assert fused >= single + 0.08, (c, setting, single, fused)
    assert chosen == fused  # payload-lr is the fused statistic when the server holds E > 1 views


@pytest.mark.parametrize("setting", ["all", "quarter"])
def test_fused_is_no_worse_where_one_view_already_suffices(setting, digits, schedule):
    single, fused, chosen = _aucs(digits, schedule, 0.2, setting)
    assert single >= 0.99 and fused >= single - 0.01, (setting, single, fused)
    assert chosen == fused


def test_one_epoch_reports_the_single_view_statistic(digits, schedule):
    members, nonmembers, aux = digits[:64], digits[64:128], digits[128:192]
    view = simulate(members, schedule, cut_step(0.5, T), 1, seed=2)
    cache = payload_signal_cache(torch.cat([members, nonmembers]), view, schedule, aux, views_per_image=1)
    np.testing.assert_array_equal(cache.get("payload_lr"), cache.get("payload_lr_single"))
    np.testing.assert_array_equal(cache.get("payload_lr_per_step"), cache.get("payload_lr_single_per_step"))
    assert int(cache.get("payload_views")[0]) == 1


def _slow(candidates, payloads, a, s, references, views):
    """Per candidate, per payload, per pool image: the obvious loops (float64, math.log/exp)."""
    pool = np.concatenate([candidates, references])
    dim = candidates.shape[1]
    var = np.maximum(s**2, 1e-12)
    sources = len(payloads) / views

    def ell(x, j):
        return 0.5 * (dim - float(((payloads[j] - a[j] * x) ** 2).sum()) / var[j])

    log_z = []
    for j in range(len(payloads)):
        pool_sum = sum(math.exp(ell(y, j)) for y in pool)
        refs_mean = sum(math.exp(ell(r, j)) for r in references) / len(references)
        log_z.append(math.log(pool_sum + 1.0 + sources * refs_mean))

    def stats(x):
        single = max(ell(x, j) for j in range(len(payloads)))
        return single, math.log(sum(math.exp(ell(x, j) - log_z[j]) for j in range(len(payloads))))

    cand = [stats(x) for x in candidates]
    refs = [stats(r) for r in references]
    single = np.array([c[0] for c in cand]) - max(r[0] for r in refs)
    fused = np.array([c[1] for c in cand]) - max(r[1] for r in refs)
    return single, fused


def test_vectorised_statistics_equal_a_slow_loop():
    rng = np.random.default_rng(0)
    d, n, r, p, views = 12, 7, 5, 12, 3
    candidates, references = rng.normal(size=(n, d)), rng.normal(size=(r, d))
    a, s = rng.uniform(0.3, 0.9, size=p), rng.uniform(0.6, 1.0, size=p)
    payloads = a[:, None] * candidates[rng.integers(0, n, size=p)] + s[:, None] * rng.normal(size=(p, d))
    single, fused = _slow(candidates, payloads, a, s, references, views)
    np.testing.assert_allclose(payload_log_ratio(candidates, payloads, a, s, references, views=views), single,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(payload_log_ratio(candidates, payloads, a, s, references, fused=True, views=views), fused,
                               rtol=1e-9, atol=1e-9)


def test_blocking_does_not_change_the_statistics():
    rng = np.random.default_rng(1)
    pool, payloads = rng.normal(size=(40, 20)), rng.normal(size=(33, 20))
    a, s = np.full(33, 0.6), np.full(33, 0.8)
    whole = payload_pool_stats(pool, payloads, a, s, 10, 11, payload_chunk=33, candidate_chunk=40)
    for pc, cc in ((1, 1), (4, 7), (32, 3)):
        part = payload_pool_stats(pool, payloads, a, s, 10, 11, payload_chunk=pc, candidate_chunk=cc)
        # Identical up to float64 rounding (the matrix products and the running log-sum-exp change shape).
        np.testing.assert_allclose(part[0], whole[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(part[1], whole[1], rtol=1e-12, atol=1e-12)
    # The memory budget sets the block size: 32 bytes per (pool image, payload) pair.
    assert payload_chunk_size(40, 33, 40 * 32 * 5) == 5 and payload_chunk_size(40, 33, 1) == 1
    small = payload_pool_stats(pool, payloads, a, s, 10, 11, memory_budget=40 * 32 * 5)
    np.testing.assert_allclose(small[1], whole[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="memory_budget"):
        payload_pool_stats(pool, payloads, a, s, memory_budget=0)


def test_fused_over_step_bins_is_the_fused_over_all_payloads(schedule, digits):
    """Trajectory-like payloads at several steps: the bins' log-sum-exp is the statistic over every payload."""
    members, nonmembers, aux = digits[:20], digits[20:40], digits[40:60]
    g = torch.Generator().manual_seed(3)
    t = torch.randint(300, 700, (60,), generator=g)
    src = members[torch.arange(60) % 20]
    ab = schedule.alpha_bar[t].float().reshape(-1, 1, 1, 1)
    view = {"tensor": ab.sqrt() * src + (1 - ab).sqrt() * torch.randn(src.shape, generator=g), "t": t}
    cache = payload_signal_cache(torch.cat([members, nonmembers]), view, schedule, aux, max_bins=4, views_per_image=3)
    assert cache.get("payload_lr_fused_per_step").shape == (40, len(cache.get("payload_lr_steps"))) and len(cache.get("payload_lr_steps")) == 4
    flat = lambda x: x.reshape(x.shape[0], -1).numpy().astype(np.float64)  # noqa: E731
    a, s = np.sqrt(schedule.alpha_bar.numpy()[t.numpy()]), np.sqrt(1 - schedule.alpha_bar.numpy()[t.numpy()])
    expected = payload_log_ratio(flat(torch.cat([members, nonmembers])), flat(view["tensor"]), a, s, flat(aux),
                                 fused=True, views=3)
    np.testing.assert_allclose(cache.get("payload_lr_fused"), expected, rtol=1e-9, atol=1e-9)


def test_a_trained_run_reports_the_fused_statistic_as_payload_lr(tiny_runs):
    """The payload target passes the run's epochs (E = 2, public protocol knowledge): payload-lr is
    payload-lr-fused there, and both sub-results are reported beside it."""
    from collafuse.attacks.membership.engine import MembershipSettings, run_membership
    from collafuse.runs import Run

    run = Run.load(tiny_runs["cut"])
    result = run_membership(run, ("payload-lr", "payload-lr-single", "payload-lr-fused"), ("payload",),
                            MembershipSettings(n_boot=20))
    target = result.targets["payload"]
    assert target.info["views_per_image"] == run.config.training.epochs == 2
    np.testing.assert_array_equal(target.attacks["payload-lr"].member_scores, target.attacks["payload-lr-fused"].member_scores)
    assert target.attacks["payload-lr"].metrics.auc.value >= target.attacks["payload-lr-single"].metrics.auc.value - 0.01
    assert all(target.attacks[n].steps for n in target.attacks)  # per-step results kept
