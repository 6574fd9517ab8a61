"""Chunked T1 scoring (issue 15 item 2, DESIGN §10): every payload × candidate computation in bounded
memory, with the numbers of the unchunked code. The references below are the obvious whole-matrix
formulas (the code before chunking); each chunked path is run with chunk sizes 1, 7 and ≥ N."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse.attacks.chunking import DEFAULT_MEMORY_MB, MEMORY_ENV, memory_budget_bytes, rows_per_chunk
from collafuse.attacks.membership.signals import nearest_distance
from collafuse.attacks.reconstruction import oracle
from collafuse.attacks.reconstruction.multiview import GaussianPrior, _dense_prior_cost, link, link_cost
from collafuse.attacks.reconstruction.scoring import Truth, posterior_labels, score
from collafuse.attacks.reconstruction.view import AttackerResources, PoolLogWeights, ViewArrays, rescaled
from collafuse.errors import ConfigError
from collafuse.schedule import NoiseSchedule

N, M, SHAPE = 23, 11, (1, 8, 8)
CHUNKS = (1, 7, 1000)


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.create("cosine", 100)
    cand = torch.rand((M, *SHAPE), generator=gen) * 2 - 1
    member = torch.randint(0, M, (N,), generator=gen)
    t = torch.randint(1, 60, (N,), generator=gen)
    t[:3] = 0  # exact observations too
    a = schedule.alpha_bar[t].sqrt().reshape(-1, 1, 1, 1).float()
    s = (1 - schedule.alpha_bar[t]).sqrt().reshape(-1, 1, 1, 1).float()
    p = a * cand[member] + s * torch.randn((N, *SHAPE), generator=gen)
    client = torch.arange(N) % 2
    view = ViewArrays(p, t, client, torch.arange(N), torch.arange(N))
    return schedule, view, cand, member


def reference_oracle(view, schedule, cand):
    """The oracle as written before chunking: the whole (N, M) matrix at once."""
    y, var = rescaled(view, schedule)
    lw = oracle.posterior_log_weights(y, oracle._precision(var), cand.double())
    return oracle.posterior_mean(lw, cand.double()), lw.float()


def reference_all_views(view, schedule, cand, groups):
    y, var = rescaled(view, schedule)
    lw = oracle.posterior_log_weights(y, oracle._precision(var), cand.double())
    _, g = torch.unique(groups, return_inverse=True)
    group_lw = torch.zeros(int(g.max()) + 1, M, dtype=torch.float64).index_add_(0, g, lw)
    group_lw -= group_lw.max(1, keepdim=True).values
    return oracle.posterior_mean(group_lw, cand.double())[g], group_lw.float()[g]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_oracle_chunked_equals_the_whole_matrix(small, chunk) -> None:
    schedule, view, cand, _ = small
    images, lw = reference_oracle(view, schedule, cand)
    out = oracle.attack(view, schedule, AttackerResources(candidates=cand), chunk=chunk)
    assert isinstance(out.pool_log_weights, PoolLogWeights) and out.pool_log_weights.shape == (N, M)
    torch.testing.assert_close(out.images, images, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.pool_log_weights.dense(), lw, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.pool_log_weights.argmax(1), lw.argmax(1))
    assert torch.equal(out.pool_log_weights[torch.tensor([5, 2])], out.pool_log_weights.dense()[[5, 2]])


def test_oracle_chunk_size_does_not_change_a_number(small) -> None:
    schedule, view, cand, _ = small
    runs = [oracle.attack(view, schedule, AttackerResources(candidates=cand), chunk=c) for c in CHUNKS]
    for other in runs[1:]:
        torch.testing.assert_close(other.images.double(), runs[0].images.double(), rtol=1e-12, atol=0)
        torch.testing.assert_close(other.pool_log_weights.dense().double(), runs[0].pool_log_weights.dense().double(),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_oracle_all_views_chunked_equals_the_whole_matrix(small, chunk) -> None:
    schedule, view, cand, member = small
    images, lw = reference_all_views(view, schedule, cand, member)
    out = oracle.all_views(view, schedule, cand, member, chunk=chunk)
    torch.testing.assert_close(out.images, images, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.pool_log_weights.dense(), lw, rtol=1e-6, atol=1e-5)
    assert torch.equal(out.pool_log_weights.argmax(1), lw.argmax(1))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_scores_read_block_by_block_equal_the_dense_scores(small, chunk) -> None:
    schedule, view, cand, member = small
    truth = Truth(member, view.client, cand, torch.arange(M) % 3, {0: torch.arange(M), 1: torch.arange(M)},
                  torch.arange(M), "pool")
    dense = oracle.attack(view, schedule, AttackerResources(candidates=cand), chunk=1000)
    chunked = oracle.attack(view, schedule, AttackerResources(candidates=cand), chunk=chunk)
    from collafuse.attacks.reconstruction.view import Reconstruction

    whole = Reconstruction("oracle", dense.images, pool_log_weights=dense.pool_log_weights.dense())  # a tensor, wrapped
    a, b = score(whole, truth, weight_ids=torch.arange(M)), score(chunked, truth, weight_ids=torch.arange(M))
    for key in a.per_row:
        np.testing.assert_allclose(b.per_row[key], a.per_row[key], rtol=1e-12)
    labels = torch.arange(M) % 3
    assert torch.equal(posterior_labels(chunked.pool_log_weights, labels), posterior_labels(whole.pool_log_weights.dense(), labels))


def reference_link_cost(y, v, m, V, prior):
    v, V = v.double(), V.double()
    if prior is None:
        total = v[:, None] + V[None, :]
        return 0.5 * y.shape[1] * total.log() + torch.cdist(y.double(), m.double()).pow(2) / (2.0 * total)
    a = (y.double() - prior.mean) @ prior.basis
    b = (m.double() - prior.mean) @ prior.basis
    return _dense_prior_cost(a, v, b, V, prior.eigenvalues)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", ["flat", "prior-shared-variances", "prior-many-variances"])
def test_link_cost_chunked_equals_the_per_pair_formula(chunk, kind) -> None:
    gen = torch.Generator().manual_seed(1)
    d = 16
    y, m = torch.randn(N, d, generator=gen, dtype=torch.float64), torch.randn(9, d, generator=gen, dtype=torch.float64)
    if kind == "prior-many-variances":
        v, V = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1, torch.rand(9, generator=gen, dtype=torch.float64) + 0.1
    else:
        v, V = torch.full((N,), 0.3, dtype=torch.float64), torch.tensor([0.2] * 5 + [0.1] * 4, dtype=torch.float64)
    prior = None if kind == "flat" else GaussianPrior.fit(torch.randn(64, 1, 4, 4, generator=gen))
    got = link_cost(y, v, m, V, prior, chunk=chunk)
    torch.testing.assert_close(got, reference_link_cost(y, v, m, V, prior), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(got, link_cost(y, v, m, V, prior, chunk=1000), rtol=1e-12, atol=0)


def test_linking_does_not_depend_on_the_chunk(small) -> None:
    schedule, view, cand, _ = small
    y, var = rescaled(view, schedule)
    groups = [link(y, var, view.client, 3, None, chunk=c) for c in CHUNKS]
    assert all(torch.equal(g, groups[0]) for g in groups)


@pytest.mark.parametrize("rows", CHUNKS)
def test_nearest_distance_chunked_equals_the_whole_matrix(rows) -> None:
    gen = np.random.default_rng(2)
    x, g = gen.normal(size=(N, 48)).astype(np.float32), gen.normal(size=(40, 48)).astype(np.float32)
    want = torch.cdist(torch.from_numpy(x), torch.from_numpy(g)).min(1).values.double().numpy()
    # float32 distances (as before chunking): a block of 1 row makes BLAS take a matrix-vector kernel
    # whose rounding differs in the last float32 bit, so the chunked values agree to float32 precision;
    # a block of every row is the unchunked computation itself, bit for bit.
    np.testing.assert_allclose(nearest_distance(x, g, chunk=13, rows=rows), want, rtol=1e-6)
    np.testing.assert_allclose(nearest_distance(x, g, rows=rows), nearest_distance(x, g, rows=1000), rtol=1e-6)
    assert np.array_equal(nearest_distance(x, g, rows=max(rows, N)), want)


def test_chunk_size_comes_from_the_memory_budget(monkeypatch) -> None:
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    assert memory_budget_bytes() == DEFAULT_MEMORY_MB << 20
    assert rows_per_chunk(4096, 8) == (512 << 20) // (4096 * 8)
    monkeypatch.setenv(MEMORY_ENV, "1")
    assert rows_per_chunk(4096, 8) == 32 and rows_per_chunk(10**9, 8) == 1
    assert rows_per_chunk(4096, 8, chunk=5) == 5  # an explicit chunk wins
    for bad in ("lots", "0", "-3", "nan"):
        monkeypatch.setenv(MEMORY_ENV, bad)
        with pytest.raises(ConfigError, match=MEMORY_ENV):
            memory_budget_bytes()
    with pytest.raises(ValueError, match="chunk"):
        rows_per_chunk(10, chunk=0)


def test_a_small_memory_budget_chunks_without_changing_a_number(small, monkeypatch) -> None:
    schedule, view, cand, member = small
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    whole = oracle.attack(view, schedule, AttackerResources(candidates=cand))
    ceiling = oracle.all_views(view, schedule, cand, member)
    assert whole.pool_log_weights.chunk >= N  # it fits the default budget: kept whole, read in one block
    monkeypatch.setenv(MEMORY_ENV, "0.002")  # 2 KB: a few rows per block, recomputed when read
    small_budget = oracle.attack(view, schedule, AttackerResources(candidates=cand))
    small_ceiling = oracle.all_views(view, schedule, cand, member)
    assert small_budget.pool_log_weights.chunk < N
    torch.testing.assert_close(small_budget.images.double(), whole.images.double(), rtol=1e-12, atol=0)
    for a, b in ((small_budget, whole), (small_ceiling, ceiling)):
        torch.testing.assert_close(a.pool_log_weights.dense().double(), b.pool_log_weights.dense().double(),
                                   rtol=1e-12, atol=0)
