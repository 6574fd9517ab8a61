"""The simulated server view is the trained one (issue 20 item 4): one protocol round in the core.

Training (:func:`collafuse.training.train_system`) and the payload simulation every payload cell
attacks (:func:`collafuse.attacks.reconstruction.curve.simulate_rounds`, model-less clients) both
play :mod:`collafuse.rounds`. For the same config and release hooks the simulated view must equal
the trained run's transcript row for row: t, the client as the server sees it, step, the member
(audit key), the true sender, and the payload values, labels and wire bytes themselves.
"""
from __future__ import annotations

import pytest
import torch

import collafuse.defenses  # noqa: F401  (registers the hook builder that hooks_for calls)
from collafuse.attacks.reconstruction.curve import SimulationSpec, simulate_rounds, simulated_shards
from collafuse.hooks import hooks_for
from collafuse.runs import prepare_data
from collafuse.training import train_system
from collafuse.transcript import AuditKey, ServerView

from conftest import tiny_config

ID_FREE = {"name": "minimize", "mode": "id-free"}
NOISE = {"name": "payload-noise", "sigma": 1.0}
CASES = {"plain": [], "id-free": [ID_FREE], "payload-noise": [NOISE], "id-free+noise": [NOISE, ID_FREE]}
# Beyond the defenses: a payload kind that draws its t at release, and a canary client whose training set grows.
MORE = {"trajectory": {"training": {"payload": "trajectory"}}, "canaries": {"canaries": {"count": 6, "client": 1}}}


def _config(defenses, **overrides):
    # 8×8 digits, T = 20, 2 clients of 32 members in batches of 12 (a short last batch), 2 epochs, tiny models;
    # conditional with label dropout, so the clients' label draws are replayed too.
    base = dict(
        data={"image_size": 8, "n_members": 64, "n_nonmembers": 8, "n_aux": 8, "num_clients": 2},
        diffusion={"T": 20, "cut_ratio": 0.3},
        server_model={"channels": [4], "time_dim": 8, "groups": 2},
        client_model={"channels": [4], "time_dim": 8, "groups": 2},
        training={"epochs": 2, "batch_size": 12, "label_dropout": 0.25, "ema_decay": 0.0},
    )
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(**base, defenses=defenses)


def _simulate(config, hooks, data, splits):
    return simulate_rounds(SimulationSpec.from_config(config, hooks, data, splits))


@pytest.mark.parametrize("case", [*CASES, *MORE])
def test_simulated_view_is_the_trained_transcript(case, tmp_path):
    config = _config(CASES.get(case, []), **MORE.get(case, {}))
    data, splits = prepare_data(config)
    train_system(config, data, splits, tmp_path, hooks_for(config), progress=False)
    trained, key = ServerView.open(tmp_path).load(), AuditKey.open(tmp_path)

    sim = _simulate(config, hooks_for(config), data, splits)  # fresh hooks: as a payload cell builds them
    view = sim.view
    n = len(view)
    trains_on = sum(len(splits.training_set(k)) for k in range(len(splits.clients)))
    assert n == len(trained["seq"]) == config.training.epochs * trains_on > 0
    assert torch.equal(view.seq, trained["seq"])
    assert torch.equal(view.t, trained["t"])
    assert torch.equal(view.client, trained["client"])  # the sender field as the server sees it
    assert torch.equal(view.step, trained["step"])
    assert torch.equal(view.wire_bytes, trained["wire_bytes"])
    assert torch.equal(view.label, trained["label"])
    assert torch.equal(sim.member, key.member_index[torch.argsort(key.seq)])  # the audit key: member
    assert torch.equal(sim.sender, key.client[torch.argsort(key.seq)])        # and true sender
    assert torch.equal(view.tensor, trained["tensor"])                      # the payload values, bit for bit
    if "id-free" in case:
        assert set(view.client.tolist()) == {-1} and set(sim.sender.tolist()) == {0, 1}
    else:
        assert torch.equal(view.client, sim.sender)
    if "noise" in case:
        assert int(view.t.min()) > config.t_c  # the payloads sit at the later step t'


def test_streamed_simulation_is_the_same_view():
    config = _config([NOISE, ID_FREE])
    data, splits = prepare_data(config)
    whole = _simulate(config, hooks_for(config), data, splits)
    shards = [s for _, s in _simulate_shards(config, data, splits)]
    assert torch.equal(torch.cat([s.view.tensor for s in shards]), whole.view.tensor)
    assert torch.equal(torch.cat([s.member for s in shards]), whole.member)
    assert torch.equal(torch.cat([s.view.seq for s in shards]), whole.view.seq)


def _simulate_shards(config, data, splits):
    return simulated_shards(SimulationSpec.from_config(config, hooks_for(config), data, splits), 20)
