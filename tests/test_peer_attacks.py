"""Issue 25 on trained client models (T3): the peer attacks (``lira-peers``, ``rmia-peers``), source inference, and
FreMIA's ``-hf`` variants and small-noise aggregation, on ONE memorising 4-client IID run shared by the module
(16 × 16 digits, so FreMIA's 10-bin box does not cover the whole spectrum), an untrained 4-client run, and the
memorising run exported and imported as a deployment (no recipe: the peer attacks must still work)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.engine import MembershipSettings, run_membership
from collafuse.attacks.membership.source import infer_sources
from collafuse.attacks.membership.targets import TARGETS, AuditContext
from collafuse.config import config_from_dict
from collafuse.runs import Run, create_run

pytestmark = pytest.mark.slow  # trains a memorising 4-client system and 4 reference models

N_CLIENTS, PER_CLIENT = 4, 16
SIGNALS = SignalSettings(n_steps=4, n_noise=2, references=4)
SETTINGS = MembershipSettings(signals=SIGNALS, n_boot=20)
RESIDUAL = ("loss", "pia", "pian", "secmi")
ATTACKED = (*RESIDUAL, *(f"{a}-hf" for a in RESIDUAL), "sima", "noise-agg", "lira-peers", "rmia-peers")


def _config(epochs: int, per_client: int, lr: float, nonmembers: int) -> dict:
    """4 IID clients, c = 1 (every client owns its whole chain: no server to train), full-batch steps, 16 × 16."""
    return {
        "seed": 0, "device": "cpu", "conditional": False,
        "data": {"image_size": 16, "n_members": N_CLIENTS * per_client, "n_nonmembers": nonmembers, "n_aux": 32,
                 "num_clients": N_CLIENTS},
        "diffusion": {"T": 50, "cut_ratio": 1.0},
        "client_model": {"channels": [16, 32], "time_dim": 32},
        "server_model": {"channels": [8], "time_dim": 8},
        "training": {"epochs": epochs, "batch_size": per_client, "lr": lr, "ema_decay": 0.99},
        "sampling": {"steps": 5, "per_client": 2},
    }


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> Run:
    """16 members per client, 300 full-batch epochs: client models that have memorised their images."""
    path = tmp_path_factory.mktemp("peers") / "mem"
    return Run.load(create_run(config_from_dict(_config(300, PER_CLIENT, 5e-3, PER_CLIENT)), path, progress=False))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Run:
    """160 members per client, one epoch at lr 1e-4: nothing learnt about any image."""
    path = tmp_path_factory.mktemp("peers") / "untrained"
    return Run.load(create_run(config_from_dict(_config(1, 160, 1e-4, 160)), path, progress=False))


@pytest.fixture(scope="module")
def result(memorised):
    return run_membership(memorised, ATTACKED, ("client",), SETTINGS, explicit_attacks=True)


def _auc_of(run: Run, name: str, client: int = 0) -> float:
    """One attack's AUC on one client target, scored from that target's own signal cache."""
    inst = TARGETS.get("client").instances(AuditContext(run, SIGNALS, run.config.seed))[client]
    scores = ATTACKS.get(name).score(inst.make_cache().require(ATTACKS.get(name).signals)).scores
    n = inst.candidates.n_members
    return float(roc_auc_score(np.r_[np.ones(n), np.zeros(len(scores) - n)], scores))


def test_peer_attacks_find_memorising_clients_and_name_their_peers(result):
    for k in range(N_CLIENTS):
        target = result.targets[f"client_{k}"]
        assert target.n_members == PER_CLIENT
        for name in ("lira-peers", "rmia-peers"):
            outcome = target.attacks[name]
            peers = [j for j in range(N_CLIENTS) if j != k]
            assert outcome.details == {"peer_models": 3, "peer_clients": peers, "partition": "iid",
                                       "partition_iid": True}
            assert outcome.queries_per_image == (1 + 3) * 4 * 2  # target + 3 peers, M = 4 steps × K = 2 draws
        assert target.attacks["rmia-peers"].metrics.auc.value >= 0.9, (k, target.attacks["rmia-peers"].metrics.auc)
    report = result.to_json()["targets"]["client_0"]["attacks"]["rmia-peers"]
    assert report["details"]["peer_models"] == 3 and report["queries_per_image"] == 32


def test_rmia_peers_is_within_005_auc_of_rmia_with_four_trained_references(memorised, result):
    peers = result.targets["client_0"].attacks["rmia-peers"].metrics.auc.value
    trained = _auc_of(memorised, "rmia")  # 4 reference client models trained with the target's recipe
    assert _auc_of(memorised, "rmia-peers") == pytest.approx(peers)  # the same fixed draws, the same target losses
    assert abs(trained - peers) <= 0.05, (trained, peers)


def test_rmia_peers_is_at_chance_on_untrained_clients(untrained):
    assert 0.4 <= _auc_of(untrained, "rmia-peers") <= 0.6


def test_source_inference_finds_the_memorising_client_and_is_at_chance_untrained(memorised, untrained):
    found = infer_sources(AuditContext(memorised, SIGNALS, memorised.config.seed))
    assert found.clients == (0, 1, 2, 3) and found.n_images == N_CLIENTS * PER_CLIENT and found.chance == 0.25
    assert found.accuracy.value >= 0.9 and not found.at_chance, found.accuracy
    blind = infer_sources(AuditContext(untrained, SIGNALS, untrained.config.seed))
    assert abs(blind.accuracy.value - 0.25) <= 0.05 and blind.at_chance, blind.accuracy


def test_hf_variants_are_not_below_their_unfiltered_attacks_at_1pct_fpr(result):
    """On the memorising clients, TPR at 1 % FPR (with 16 non-members: at FPR 0) of each -hf variant, averaged over
    the 4 client targets, is not below its unfiltered attack's by more than the resolution of one member."""
    targets = [result.targets[f"client_{k}"] for k in range(N_CLIENTS)]

    def tpr(name: str) -> float:
        return float(np.mean([t.attacks[name].metrics.at_fpr(0.01).tpr.value for t in targets]))

    for name in RESIDUAL:
        assert tpr(f"{name}-hf") >= tpr(name) - 1 / PER_CLIENT, (name, tpr(f"{name}-hf"), tpr(name))
        assert targets[0].attacks[f"{name}-hf"].queries_per_image == targets[0].attacks[name].queries_per_image
    assert all(t.attacks["noise-agg"].queries_per_image == 5 for t in targets)


def test_an_imported_deployment_gets_the_peer_results_without_a_recipe(memorised, result, tmp_path):
    from collafuse.api import export_run, import_deployment

    exported = export_run(memorised.path, tmp_path / "export")
    imported = Run.load(import_deployment(exported / "manifest.yaml", tmp_path / "imported"))
    assert imported.config.data.source == "imported"
    got = run_membership(imported, ("lira-peers", "rmia-peers"), ("client",), SETTINGS, explicit_attacks=True)
    for k in range(N_CLIENTS):
        for name in ("lira-peers", "rmia-peers"):
            outcome = got.targets[f"client_{k}"].attacks[name]
            assert outcome.details["peer_models"] == 3 and outcome.details["partition"] == "undeclared"
            assert "does not declare" in outcome.details["warning"] and not outcome.details["partition_iid"]
            # the same models, images and draws: the trained run's numbers
            np.testing.assert_allclose(outcome.member_scores, result.targets[f"client_{k}"].attacks[name].member_scores)
    assert infer_sources(AuditContext(imported, SIGNALS, imported.config.seed)).accuracy.value >= 0.9


def test_peer_draws_reach_the_peer_queries_and_the_cell_hash_only_where_a_peer_attack_runs(tmp_path):
    """A grid block's ``peer_draws`` sets K of the peer attacks (their query count says so) and enters the cell's
    hash only where a peer attack reads it, so every other cell keeps its hash."""
    import yaml

    from collafuse.benchmarks.audit.grid import load_grid

    assert SignalSettings(peer_noise=1).peer_draws == 1 and SignalSettings().peer_draws == SignalSettings().n_noise
    with pytest.raises(ValueError, match="peer_noise"):
        SignalSettings(peer_noise=0)
    assert ATTACKS.get("lira-peers").queries_per_image(SignalSettings(peer_noise=1), 8) * 4 == \
        ATTACKS.get("lira-peers").queries_per_image(SignalSettings(peer_noise=4), 8)

    def cell(attacks: list[str], **block) -> object:
        grid = {"base": {"device": "cpu"}, "systems": {"cut_ratios": [0.5], "attacks": {"T3": attacks}, **block}}
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
        (c,) = load_grid(tmp_path / "grid.yaml").cells()
        return c

    peers, plain = cell(["sima", "lira-peers"], peer_draws=1), cell(["sima"], peer_draws=1)
    assert peers.peer_draws == 1 and peers.to_json()["peer_draws"] == 1
    assert "peer_draws" not in plain.to_json() and plain.config_hash == cell(["sima"]).config_hash
    assert peers.config_hash != cell(["sima", "lira-peers"]).config_hash
