"""(ℓ2, δ)-extraction (Carlini et al. 2023, Definition 1; DESIGN.md §4.1): a reconstruction (T1) or the
nearest generated sample (T4) within δ of the member in ‖a − b‖₂/√d on [0, 1]. Re-identification
undercounts when the pool holds near-duplicates of a member; extraction does not. Checked against
brute-force loops; the metric reaches the summaries, the audit rows and the policy."""
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
    summary = sc.summary_json()
    assert summary["extraction"]["value"] == 1.0 and summary["extraction"]["delta"] == EXTRACTION_DELTA
    rows = reconstruction_rows(SimpleNamespace(scores={"oracle": sc}, extra={}, payload_label_summary=lambda seed: None), 0)
    ext = [r for r in rows if r["metric"] == "extraction"]
    assert len(ext) == 1 and ext[0]["threat"] == "T1" and ext[0]["attack"] == "oracle" and ext[0]["value"] == 1.0


def test_reconstruction_extraction_equals_a_brute_force_loop(members):
    g = torch.Generator().manual_seed(2)
    noise_level = torch.linspace(0.0, 0.6, N).reshape(-1, 1, 1, 1)  # from exact copies to far-off estimates
    x_hat = members + noise_level * torch.randn(members.shape, generator=g)  # pixels leave [-1, 1]: clipped
    truth = Truth(member=torch.arange(N), client=torch.zeros(N, dtype=torch.long), source=members, source_labels=None,
                  client_data={0: torch.arange(N)}, pool=torch.arange(N), pool_description="members")
    for delta in (0.05, EXTRACTION_DELTA, 0.2):
        sc = score(Reconstruction("test", x_hat), truth, extraction_delta=delta)
        brute = np.array([1.0 if _brute_l2(x_hat[i], members[i]) <= delta else 0.0 for i in range(N)])
        np.testing.assert_array_equal(sc.per_row["extraction"], brute)
        assert 0 < brute.sum() < N, delta  # the case separates extracted from not extracted
        assert sc.summary_json()["extraction"]["delta"] == delta
    with pytest.raises(ValueError, match="delta"):
        score(Reconstruction("test", x_hat), truth, extraction_delta=0.0)


def test_sample_extraction_equals_a_brute_force_loop(members):
    g = torch.Generator().manual_seed(3)
    near = members[:10] + 0.05 * torch.randn(members[:10].shape, generator=g)  # near-copies of 10 members
    samples = torch.cat([near, torch.rand((30, *members.shape[1:]), generator=g) * 2.4 - 1.2])  # others: noise
    ext = extraction(members, samples)
    brute = [min(_brute_l2(x, gj) for gj in samples) for x in members]
    np.testing.assert_allclose(ext.distance, brute, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ext.extracted, (np.array(brute) <= EXTRACTION_DELTA).astype(float))
    assert ext.value == ext.extracted.mean() and ext.n == N and ext.rate.low <= ext.value <= ext.rate.high
    assert ext.extracted[:10].all() and not ext.extracted[10:].any()
    assert ext.to_json()["delta"] == EXTRACTION_DELTA
    with pytest.raises(ValueError, match="shape"):
        extraction(members, samples[:, :, :4])


def test_a_policy_may_limit_extraction_for_t1_and_t4():
    policy = parse_policy({"limits": {"T1": {"extraction": {"max": 0.0}}, "T4": {"extraction": {"max": 0.01}}}})
    assert {(l.threat, l.metric) for l in policy.limits} == {("T1", "extraction"), ("T4", "extraction")}
