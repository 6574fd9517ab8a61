"""A payload-only cell whose memory does not grow with the payload rows (issue 15 items 2–3, DESIGN §10).

The cell simulates, attacks and scores its view a shard at a time
(:mod:`collafuse.attacks.reconstruction.streamed`). What must hold, number for number, is that it
reports what the whole-view path reports; the memory itself is measured by
``benchmarks/perf_scale.py`` (``payload-cell``), not here. Each comparison runs with a memory budget
small enough that the view is cut into many shards, and the shards' count is checked."""
from __future__ import annotations

import pytest
import torch
import yaml
from collafuse.attacks.chunking import MEMORY_ENV
from collafuse.attacks.reconstruction import oracle
from collafuse.attacks.reconstruction.curve import (
    SimulationSpec,
    simulate_rounds,
    simulated_metadata,
    simulated_shards,
)
from collafuse.attacks.reconstruction.multiview import (
    GaussianPrior,
    StreamedLinking,
    fuse,
    link,
)
from collafuse.attacks.reconstruction.streamed import shard_rows
from collafuse.attacks.reconstruction.view import rescaled
from collafuse.benchmarks.audit.cells import payload_cell
from collafuse.benchmarks.audit.grid import load_grid

from collafuse.config import config_from_dict
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule

ATTACKS = ["rescale", "multiview", "oracle"]
FIELDS = ("tensor", "t", "client", "step", "seq", "label", "noise", "wire_bytes")
DEFENSES = {"none": [], "noise": [{"name": "payload-noise", "sigma": 0.5}],
            "id-free": [{"name": "minimize", "mode": "id-free"}]}
# 3 clients of uneven size (members 100 = 34 + 33 + 33) in batches of 16: short last batches, and
# epoch blocks that do not line up with the shards.
BASE = {"data": {"image_size": 8, "n_members": 100, "n_nonmembers": 28, "n_aux": 64, "num_clients": 3},
        "diffusion": {"T": 100}, "training": {"batch_size": 16}}


def cell_of(tmp_path, defense: str, epochs: int = 3):
    grid = {"base": BASE, "payload_curve": {"cut_ratios": [0.3], "epochs": epochs, "attacks": ATTACKS,
                                            "defenses": {defense: DEFENSES[defense]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(str(path)).cells()
    return cell


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_streamed_cell_reports_the_numbers_of_the_whole_view(tmp_path, monkeypatch, defense) -> None:
    # A budget that gives the oracle blocks of 16 rows against the pool of 128: shards of 16 rows.
    monkeypatch.setenv(MEMORY_ENV, str(16 * 128 * 32 / 2**20))
    cell = cell_of(tmp_path, defense)
    size = shard_rows(64, tuple(ATTACKS), 128)
    streamed = payload_cell(cell, tmp_path / "cache")
    whole = payload_cell(cell, tmp_path / "cache", streamed=False)
    n = next(r["value"] for r in whole.rows if r["metric"] == "payload_rows")
    assert size == 16 and n == 300  # 19 shards
    metrics = {(r["attack"], r["metric"]) for r in whole.rows}
    for needed in (("multiview", "linkage_accuracy"), ("multiview-perfect-linking", "psnr"), ("oracle-all-views", "reid_pool"),
                   ("oracle", "label"), ("rescale", "ssim"), ("payload-label", "label"), ("sender-id", "sender_accuracy")):
        assert needed in metrics
    assert streamed.rows == whole.rows  # every value and interval, exactly
    assert streamed.artifacts == whole.artifacts and streamed.info == whole.info


def test_a_view_that_fits_one_shard_takes_the_whole_view_path(tmp_path, monkeypatch) -> None:
    """Streaming only pays when the view does not fit the memory budget (issue 25 item 5): with the default
    budget this 300-row view is one shard, so the cell never enters the streamed path."""
    import collafuse.benchmarks.audit.cells.payload as payload_module

    def refuse(*args, **kwargs):
        raise AssertionError("the streamed path ran on a view that fits one shard")

    monkeypatch.delenv(MEMORY_ENV, raising=False)
    monkeypatch.setattr(payload_module, "evaluate_streamed", refuse)
    cell = cell_of(tmp_path, "none")
    out = payload_cell(cell, tmp_path / "cache")
    assert next(r["value"] for r in out.rows if r["metric"] == "payload_rows") == 300 < shard_rows(64, tuple(ATTACKS), 128)


def test_shards_replay_the_whole_simulated_view() -> None:
    config = config_from_dict(BASE)
    data, splits = prepare_data(config)
    schedule = NoiseSchedule.create("cosine", 100)
    for kind in ("cut", "naive"):
        args = (data, splits, schedule, 30, 2, kind, 16, 0, True)
        whole = simulate_rounds(SimulationSpec(*args))
        shards = list(simulated_shards(SimulationSpec(*args), 48))
        meta = simulated_metadata(SimulationSpec(*args))
        assert [start for start, _ in shards] == list(range(0, len(whole.view), 48))
        for name in FIELDS:
            value = getattr(whole.view, name)
            assert value is not None or name == "noise"
            if value is None:
                continue
            assert torch.equal(torch.cat([getattr(s.view, name) for _, s in shards]), value), (kind, name)
            if name not in ("tensor", "noise"):
                assert torch.equal(getattr(meta.view, name), value), (kind, name)
        assert meta.view.tensor.numel() == 0 and len(meta.view) == len(whole.view)
        assert torch.equal(torch.cat([s.member for _, s in shards]), whole.member) and torch.equal(meta.member, whole.member)
        assert torch.equal(torch.cat([s.sender for _, s in shards]), whole.sender) and torch.equal(meta.sender, whole.sender)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("shard", [1, 7, 50, 1000])
def test_streamed_linking_equals_link_and_fuse(with_prior, shard) -> None:
    config = config_from_dict(BASE)
    data, splits = prepare_data(config)
    schedule = NoiseSchedule.create("cosine", 100)
    view = simulate_rounds(SimulationSpec(data, splits, schedule, 40, 3, "cut", 16, 0)).view
    y, var = rescaled(view, schedule)
    prior = GaussianPrior.fit(data.images[splits.aux]) if with_prior else None
    groups = link(y, var, view.client, 3, prior)
    x, noise_var = fuse(y, var, groups)
    streamed = StreamedLinking(view.client, 3, y[0].numel(), prior)
    for start in range(0, len(view), shard):
        sl = slice(start, start + shard)
        streamed.feed(torch.arange(len(view))[sl], y[sl], var[sl], view.client[sl])
    mean, fused_var, slots = streamed.fused()
    assert torch.equal(streamed.groups, groups)
    assert torch.equal(mean[slots].reshape(x.shape), x) and torch.equal(fused_var[slots], noise_var)
    assert (groups != torch.arange(len(view))).sum() == 2 * 100  # every row of epochs 2 and 3 was linked


def test_streamed_linking_refuses_to_fuse_before_every_row_arrived() -> None:
    client = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    streamed = StreamedLinking(client, 2, 4)
    streamed.feed(torch.arange(4), torch.zeros(4, 1, 2, 2), torch.ones(4), client[:4])
    with pytest.raises(RuntimeError, match="not every row"):
        streamed.fused()


def test_all_views_sums_fed_by_shards_equal_all_views(monkeypatch) -> None:
    monkeypatch.setenv(MEMORY_ENV, str(8 * 128 * 32 / 2**20))  # oracle blocks of 8 rows against 128 candidates
    config = config_from_dict(BASE)
    data, splits = prepare_data(config)
    schedule = NoiseSchedule.create("cosine", 100)
    sim = simulate_rounds(SimulationSpec(data, splits, schedule, 30, 2, "cut", 16, 0))
    cand = data.images[torch.cat([splits.members, splits.nonmembers])]
    whole = oracle.all_views(sim.view, schedule, cand, sim.member)
    _, slot = torch.unique(sim.member, return_inverse=True)
    sums = oracle.AllViewsSums(cand, int(slot.max()) + 1)
    assert sums.size == 8
    for start in range(0, len(sim.view), 24):
        rows = torch.arange(len(sim.view))[start:start + 24]
        sums.add(sim.view.subset(rows), schedule, slot[rows], start)
    group_w, means = sums.result()
    assert torch.equal(means[slot], whole.images) and torch.equal(group_w[slot], whole.pool_log_weights.dense())
    with pytest.raises(ValueError, match="chunk boundary"):
        oracle.AllViewsSums(cand, 1).add(sim.view.subset(torch.arange(3)), schedule, torch.zeros(3, dtype=torch.long), 4)


def test_mse_and_ssim_in_blocks_equal_one_batch(monkeypatch) -> None:
    from collafuse.attacks.reconstruction.scoring import (
        _mse_and_ssim,
        mse_per_image,
        ssim_per_image,
    )

    gen = torch.Generator().manual_seed(0)
    x_hat = torch.rand((37, 3, 8, 8), generator=gen) * 2.4 - 1.2  # some values outside [-1, 1]: clipped
    x = torch.rand((37, 3, 8, 8), generator=gen) * 2 - 1
    monkeypatch.setenv(MEMORY_ENV, str(5 * 192 * 128 / 2**20))  # blocks of 5 rows
    mse, ssim = _mse_and_ssim(x_hat, x)
    assert torch.equal(mse, mse_per_image(x_hat, x)) and torch.equal(ssim, ssim_per_image(x_hat, x))
