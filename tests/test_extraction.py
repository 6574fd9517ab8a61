"""Extraction as Carlini et al. 2023 define it for pixel-space models (§5.1; DESIGN.md §4.1): x̂ extracts x when
ℓ2(x̂, x) < α · mean ℓ2(x̂, S_x̂), S_x̂ the 50 training images nearest to x̂, α = 0.5, ℓ2 = ‖a − b‖₂/√d on
[0, 1]; and the absolute-threshold rate (ℓ2 ≤ δ) beside it under its own name (``extraction_abs``).
Re-identification undercounts when the pool holds near-duplicates of a member; extraction does not.
Checked against brute-force loops; the metric reaches the summaries, the audit rows and the policy."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from collafuse.attacks.membership.nn_distance import extraction
from collafuse.attacks.reconstruction.registry import run_attack
from collafuse.attacks.reconstruction.scoring import EXTRACTION_DELTA, Truth, score
from collafuse.attacks.reconstruction.view import AttackerResources, Reconstruction, ViewArrays
from collafuse.benchmarks.audit.cells.rows import reconstruction_rows
from collafuse.benchmarks.audit.policy import parse_policy
from collafuse.data import load_digits16
from collafuse.schedule import NoiseSchedule

T, T_C, N = 100, 20, 40


@pytest.fixture(scope="module")
def members():
    data = load_digits16(1, 8)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.images[perm][:N]


def _unit(x: torch.Tensor) -> np.ndarray:
    return np.clip((x.double().numpy() + 1.0) / 2.0, 0.0, 1.0)


def _brute_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Carlini's ℓ2 of two single images, the obvious way: sqrt(Σ (a_i − b_i)² / d) on [0, 1]."""
    u, v = _unit(a).ravel(), _unit(b).ravel()
    return math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(u, v)) / u.size)


def test_planted_near_duplicates_reid_undercounts_and_extraction_does_not(members):
    """The oracle's posterior splits between each member and its planted near-copy: its argmax lands
    on the copy about half the time (re-identification fails), its reconstruction is still the member."""
    schedule = NoiseSchedule.create("cosine", T)
    pattern = torch.sign(torch.sin(torch.arange(members[0].numel(), dtype=torch.float32))).reshape(members.shape[1:])
    duplicates = (members + 0.004 * pattern).clamp(-1, 1)  # ℓ2 to the member ≈ 0.002 ≪ δ
    source = torch.cat([members, duplicates])
    g = torch.Generator().manual_seed(1)
    a, s = float(schedule.alpha_bar[T_C].sqrt()), float((1 - schedule.alpha_bar[T_C]).sqrt())
    view = ViewArrays(a * members + s * torch.randn(members.shape, generator=g), torch.full((N,), T_C),
                      torch.zeros(N, dtype=torch.long), torch.arange(N), torch.arange(N))
    truth = Truth(member=torch.arange(N), client=torch.zeros(N, dtype=torch.long), source=source, source_labels=None,
                  client_data={0: torch.arange(N)}, pool=torch.arange(2 * N), pool_description="members and near-copies")
    recon = run_attack("oracle", view, schedule, AttackerResources(candidates=source))
    sc = score(recon, truth, None, truth.pool)
    assert sc.per_row["psnr"].min() > 40.0                 # every member reconstructed almost exactly
    assert sc.per_row["reid_pool"].mean() < 0.8            # but the argmax often names the near-copy
    assert sc.per_row["extraction"].mean() == 1.0          # extraction counts every one
    assert sc.per_row["extraction_abs"].mean() == 1.0
    summary = sc.summary_json()
    assert summary["extraction"]["value"] == 1.0 and summary["extraction"]["neighbours"] == 50
    assert summary["extraction_abs"]["delta"] == EXTRACTION_DELTA
    rows = reconstruction_rows(SimpleNamespace(scores={"oracle": sc}, extra={}, payload_label_summary=lambda seed: None), 0)
    ext = [r for r in rows if r["metric"] in ("extraction", "extraction_abs")]
    assert len(ext) == 2 and all(r["threat"] == "T1" and r["attack"] == "oracle" and r["value"] == 1.0 for r in ext)


def _brute_carlini(x_hat: torch.Tensor, target: torch.Tensor, train: torch.Tensor, n: int = 50, alpha: float = 0.5) -> bool:
    """Carlini et al.'s criterion, the obvious way: every distance, sorted, the n smallest averaged."""
    near = sorted(_brute_l2(x_hat, y) for y in train)[:n]
    return _brute_l2(x_hat, target) < alpha * sum(near) / len(near)


@pytest.fixture(scope="module")
def train_set():
    data = load_digits16(1, 8)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(5))
    return data.images[perm][:120]


def test_reconstruction_extraction_equals_a_brute_force_loop(train_set):
    members = train_set[:N]
    g = torch.Generator().manual_seed(2)
    noise_level = torch.linspace(0.0, 0.6, N).reshape(-1, 1, 1, 1)  # from exact copies to far-off estimates
    x_hat = members + noise_level * torch.randn(members.shape, generator=g)  # pixels leave [-1, 1]: clipped
    truth = Truth(member=torch.arange(N), client=torch.zeros(N, dtype=torch.long), source=train_set, source_labels=None,
                  client_data={0: torch.arange(len(train_set))}, pool=torch.arange(N), pool_description="members")
    carlini = np.array([1.0 if _brute_carlini(x_hat[i], members[i], train_set) else 0.0 for i in range(N)])
    assert 0 < carlini.sum() < N  # the case separates extracted from not extracted
    for delta in (0.05, EXTRACTION_DELTA, 0.2):
        sc = score(Reconstruction("test", x_hat), truth, extraction_delta=delta)
        np.testing.assert_array_equal(sc.per_row["extraction"], carlini)
        brute = np.array([1.0 if _brute_l2(x_hat[i], members[i]) <= delta else 0.0 for i in range(N)])
        np.testing.assert_array_equal(sc.per_row["extraction_abs"], brute)
        assert 0 < brute.sum() < N, delta
        assert sc.summary_json()["extraction_abs"]["delta"] == delta
    with pytest.raises(ValueError, match="delta"):
        score(Reconstruction("test", x_hat), truth, extraction_delta=0.0)


def test_exact_copies_are_extracted_and_a_near_duplicate_is_not_credited_to_the_wrong_image(train_set):
    """Samples that copy training images extract exactly those images; a sample copying x' (a near-duplicate of
    x planted in the training set) extracts x' — its nearest — and is never counted for x."""
    members = train_set.clone()
    x, x_dup = members[0], (members[0] + 0.02).clamp(-1, 1)
    members[1] = x_dup                                       # the training set holds x and its near-duplicate
    samples = torch.stack([members[5], members[6], x_dup + 0.001, torch.zeros_like(x)])
    ext = extraction(members, samples)
    assert ext.extracted[5] == ext.extracted[6] == 1.0        # exact copies
    assert ext.extracted[1] == 1.0 and ext.extracted[0] == 0.0  # credited to the copied duplicate only
    assert ext.extracted.sum() == 3 and ext.rate.value == pytest.approx(3 / len(members))
    brute = np.zeros(len(members))
    for g in samples:
        dists = [_brute_l2(g, y) for y in members]
        j = int(np.argmin(dists))
        if _brute_carlini(g, members[j], members):
            brute[j] = 1.0
    np.testing.assert_array_equal(ext.extracted, brute)


def test_sample_extraction_equals_a_brute_force_loop(members):
    g = torch.Generator().manual_seed(3)
    near = members[:10] + 0.05 * torch.randn(members[:10].shape, generator=g)  # near-copies of 10 members
    samples = torch.cat([near, torch.rand((30, *members.shape[1:]), generator=g) * 2.4 - 1.2])  # others: noise
    ext = extraction(members, samples)
    brute = [min(_brute_l2(x, gj) for gj in samples) for x in members]
    np.testing.assert_allclose(ext.distance, brute, rtol=1e-5, atol=1e-6)
    close = (np.array(brute) <= EXTRACTION_DELTA).astype(float)
    assert ext.absolute.value == close.mean() and close[:10].all() and not close[10:].any()
    assert ext.value == ext.extracted.mean() and ext.n == N and ext.rate.low <= ext.value <= ext.rate.high
    assert ext.extracted[:10].all() and not ext.extracted[10:].any()  # the near-copies extract their originals
    assert ext.to_json()["absolute"]["delta"] == EXTRACTION_DELTA and ext.to_json()["neighbours"] == 50
    with pytest.raises(ValueError, match="shape"):
        extraction(members, samples[:, :, :4])


def test_a_policy_may_limit_extraction_for_t1_and_t4():
    policy = parse_policy({"limits": {"T1": {"extraction": {"max": 0.0}}, "T4": {"extraction": {"max": 0.01}}}})
    assert {(l.threat, l.metric) for l in policy.limits} == {("T1", "extraction"), ("T4", "extraction")}


@pytest.mark.parametrize("budget_mb", [None, 0.02])
def test_nearest_distances_equal_a_loop_over_every_pair(monkeypatch, budget_mb):
    """The blocked matrix-product distances (one block, and many small blocks of both sets under a tiny memory
    budget, so the running top-n merges across training blocks) against every pair's ℓ2 computed one by one."""
    from collafuse.attacks.chunking import MEMORY_ENV
    from collafuse.attacks.reconstruction.scoring import nearest_distances

    if budget_mb is None:
        monkeypatch.delenv(MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(MEMORY_ENV, str(budget_mb))
    g = torch.Generator().manual_seed(3)
    train = torch.rand((130, 1, 8, 8), generator=g) * 2 - 1
    queries = torch.cat([train[:5], torch.rand((40, 1, 8, 8), generator=g) * 2.4 - 1.2])  # exact copies, clipped values
    got = nearest_distances(queries, train, n=7)
    u = lambda x: ((x.double() + 1) / 2).clamp(0, 1).flatten()  # noqa: E731
    for i, q in enumerate(queries):
        every = sorted(math.sqrt(((u(q) - u(y)) ** 2).sum().item() / 64) for y in train)
        assert np.allclose(got[i].numpy(), every[:7], rtol=0, atol=1e-7), i
    assert got.shape == (45, 7) and (got[:5, 0] < 1e-6).all()
