"""The calibrated attacks with reference models, ``lira`` and ``rmia`` (DESIGN.md §4.2), and the direction flag.

Pure scores on hand-made signals (fast), the reference design and cache, then real client models:
a memorising one (lira and rmia find every member; secmi's signal is there but reversed, and
flagged), a nearly untrained one (chance), and LiRA with K = 8 references not worse than K = 2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from collafuse.attacks.membership import lira, rmia
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS, DEFAULT_ATTACKS
from collafuse.attacks.membership.engine import MembershipSettings, inverted, run_membership
from collafuse.attacks.membership.metrics import ScoreError, evaluate
from collafuse.attacks.membership.references import (
    ClientRecipe, inclusion_design, load_or_train_client, reference_key,
)
from collafuse.model import UNetConfig

REFERENCE_ATTACKS = ("lira", "lira-offline", "rmia", "rmia-offline")


def _auc(scores: np.ndarray, n_members: int) -> float:
    return float(roc_auc_score(np.r_[np.ones(n_members), np.zeros(len(scores) - n_members)], scores))


def _synthetic(n: int = 40, r: int = 4, m: int = 3, gap: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Signals of a world where a model's loss on x is lower by ``gap`` (relative) when it trained on x.
    Candidates: first half members of the target. Per-candidate difficulty varies a lot (what a
    reference-free attack cannot see), the population is all OUT."""
    rng = np.random.default_rng(seed)
    difficulty = np.exp(rng.normal(0, 0.8, size=(n, 1)))            # per-candidate base loss
    pop_difficulty = np.exp(rng.normal(0, 0.8, size=(2 * n, 1)))
    member = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(bool)
    ref_in = inclusion_design(n, r, torch.Generator().manual_seed(seed))

    def loss(base, is_in):
        return base * np.where(is_in[:, None], 1.0 - gap, 1.0) * np.exp(rng.normal(0, 0.1, size=(len(base), m)))

    return {
        "fixed_loss": loss(difficulty, member),
        "ref_fixed_loss": np.stack([loss(difficulty, ref_in[k]) for k in range(r)]),
        "ref_in": ref_in,
        "pop_fixed_loss": loss(pop_difficulty, np.zeros(2 * n, dtype=bool)),
        "ref_pop_fixed_loss": np.stack([loss(pop_difficulty, np.zeros(2 * n, dtype=bool)) for _ in range(r)]),
        "steps": np.array([1, 5, 10]),
        "t_range": np.array([0, 10]),
    }


# ---------------------------------------------------------------------------------------
# registry and pure scores


def test_reference_attacks_are_registered_as_needing_references_and_not_run_by_default():
    assert ATTACKS.needing("references") == REFERENCE_ATTACKS
    assert not set(REFERENCE_ATTACKS) & set(DEFAULT_ATTACKS)
    for name in REFERENCE_ATTACKS:
        a = ATTACKS.get(name)
        assert a.threats == ("T2", "T3") and a.direction == "higher = more likely member"
        # target + R references, each at M steps × K fixed noise draws
        assert a.queries_per_image(SignalSettings(n_noise=4, references=2), 8) == 3 * 8 * 4
    with pytest.raises(ValueError, match="references must be an integer >= 2"):
        SignalSettings(references=1)


@pytest.mark.parametrize("name", REFERENCE_ATTACKS)
def test_calibrated_scores_find_a_signal_that_difficulty_hides(name):
    signals = _synthetic()
    result = ATTACKS.get(name).score(signals)
    assert result.scores.shape == (40,) and result.per_step.shape == (40, 3) and np.isfinite(result.scores).all()
    assert _auc(result.scores, 20) >= 0.95
    # The reference-free loss barely sees it: per-candidate difficulty dominates.
    assert _auc(-signals["fixed_loss"].mean(1), 20) < 0.85


@pytest.mark.parametrize("name", REFERENCE_ATTACKS)
def test_calibrated_scores_are_at_chance_without_membership_effect(name):
    aucs = [_auc(ATTACKS.get(name).score(_synthetic(n=200, gap=0.0, seed=s)).scores, 100) for s in range(3)]
    assert all(0.4 <= a <= 0.6 for a in aucs), aucs


def test_online_lira_learns_the_direction_from_the_references():
    """A world where training RAISES the loss on the trained images: online LiRA follows its IN and OUT
    references and still ranks members first; the raw loss would be inverted. (RMIA and offline LiRA
    keep their papers' direction, "training raises the likelihood", which a denoising loss obeys.)"""
    signals = _synthetic(gap=-0.8)
    assert _auc(ATTACKS.get("lira").score(signals).scores, 20) >= 0.9
    assert _auc(-signals["fixed_loss"].mean(1), 20) < 0.5


def test_rmia_matches_its_definition_on_a_tiny_case():
    p_x = np.array([0.9, 0.5])
    pr_x = np.array([0.6, 0.6])
    p_z = np.array([0.5, 0.6, 0.7])
    pr_z = np.array([0.6, 0.6, 0.6])
    s = rmia.rmia_scores(p_x, pr_x, p_z, pr_z)
    # x0: ratio 1.5 beats all three z (0.83, 1, 1.17); x1: ratio 0.83 beats none (ties are not > γ)
    assert np.floor(s * 3).tolist() == [3.0, 0.0]
    # offline: Pr(x) = ((1 + a)·Pr_OUT + (1 − a))/2
    ref_p = np.array([[0.4], [0.8]])
    out = np.array([[True], [False]])
    assert rmia.marginal(ref_p, out, 0.3)[0] == pytest.approx(0.5 * (1.3 * 0.4 + 0.7))
    assert rmia.marginal(ref_p, out, None)[0] == pytest.approx(0.6)


def test_lira_refuses_candidates_without_an_in_or_out_reference():
    signals = dict(_synthetic(r=2))
    signals["ref_in"] = np.zeros_like(signals["ref_in"])
    with pytest.raises(ScoreError, match="no IN reference"):
        lira.score_online(signals)
    assert np.isfinite(lira.score_offline(signals).scores).all()


def test_inclusion_design_balances_every_candidate():
    for r in (2, 4, 8):
        d = inclusion_design(30, r, torch.Generator().manual_seed(r))
        assert d.shape == (r, 30) and (d.sum(0) == r // 2).all() and (d.sum(1) == 15).all()
    # the first pair of K = 8 is the pair of K = 2 (so the cache serves a larger K with the smaller's models)
    np.testing.assert_array_equal(inclusion_design(30, 2, torch.Generator().manual_seed(0)),
                                  inclusion_design(30, 8, torch.Generator().manual_seed(0))[:2])


def test_inverted_flag_needs_the_whole_interval_below_one_half():
    rng = np.random.default_rng(0)
    low = evaluate(rng.normal(0, 1, 60), rng.normal(2, 1, 60), 100, 0)
    chance = evaluate(rng.normal(0, 1, 60), rng.normal(0, 1, 60), 100, 0)
    assert inverted(low) and low.auc.high < 0.5
    assert not inverted(chance)


def test_reference_models_are_cached_by_content(tmp_path):
    recipe = ClientRecipe(UNetConfig(channels=(8, 16), time_dim=16), "cosine", 50, 10, 2, 8, 1e-3, 0.0, 0.0)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    a, hit_a = load_or_train_client(recipe, images, None, 3, tmp_path)
    b, hit_b = load_or_train_client(recipe, images, None, 3, tmp_path)
    assert not hit_a and hit_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert reference_key(recipe, images, None, 3) != reference_key(recipe, images, None, 4)
    assert reference_key(recipe, images, None, 3) != reference_key(recipe, images.flip(0), None, 3)


# ---------------------------------------------------------------------------------------
# real client models (T3)


def _config(epochs: int, n: int, lr: float = 3e-3, cut_ratio: float = 1.0) -> dict:
    """One client, c = 1 (it owns every step; no server to train), 8×8 digits, full-batch steps."""
    return {
        "seed": 0, "device": "cpu", "conditional": False,
        "data": {"image_size": 8, "n_members": n, "n_nonmembers": n, "n_aux": 64, "num_clients": 1},
        "diffusion": {"T": 100, "cut_ratio": cut_ratio},
        "client_model": {"channels": [8, 16], "time_dim": 32},
        "server_model": {"channels": [8, 16], "time_dim": 16},
        "training": {"epochs": epochs, "batch_size": 32, "lr": lr, "ema_decay": 0.99},
        "sampling": {"steps": 5, "per_client": 2},
    }


def _train(config: dict, path):
    from collafuse.runs import Run, create_run
    from collafuse.config import config_from_dict

    return Run.load(create_run(config_from_dict(config), path, progress=False))


def _settings(k: int) -> MembershipSettings:
    return MembershipSettings(signals=SignalSettings(references=k), n_boot=200)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """32 members, 300 full-batch epochs: a client model that has memorised its images."""
    return _train(_config(300, 32), tmp_path_factory.mktemp("mem") / "run")


@pytest.mark.slow
def test_memorising_client_is_found_by_lira_and_rmia_and_secmi_is_flagged_inverted(memorised):
    result = run_membership(memorised, (*REFERENCE_ATTACKS, "loss", "secmi"), ("client",), _settings(2))
    target = result.targets["client_0"]
    assert target.n_members == 32 and target.n_nonmembers == 32
    for name in ("lira", "rmia"):
        m = target.attacks[name].metrics
        # 32 non-members cannot resolve 1 % FPR: the rate reported is the TPR at FPR = 0, which is stricter
        assert m.auc.value >= 0.95 and m.at_fpr(0.01).tpr.value >= 0.5, (name, m.auc.value, m.at_fpr(0.01).tpr.value)
        assert not target.attacks[name].inverted
    secmi = target.attacks["secmi"]
    assert secmi.inverted and secmi.to_json()["inverted"] is True, secmi.metrics.auc
    assert result.to_json()["targets"]["client_0"]["attacks"]["lira"]["inverted"] is False


@pytest.mark.slow
def test_untrained_client_gives_chance_for_lira_and_rmia(tmp_path):
    run = _train(_config(1, 160, lr=1e-4), tmp_path / "run")
    result = run_membership(run, REFERENCE_ATTACKS, ("client",), _settings(2))
    aucs = {name: a.metrics.auc.value for name, a in result.targets["client_0"].attacks.items()}
    assert all(0.4 <= v <= 0.6 for v in aucs.values()), aucs


@pytest.mark.slow
def test_lira_with_more_references_is_not_worse(tmp_path):
    """A partly memorising model (120 epochs), where K matters: K = 8 reuses K = 2's models (cache)."""
    run = _train(_config(120, 32), tmp_path / "run")
    auc = {k: run_membership(run, ("lira",), ("client",), _settings(k)).targets["client_0"].attacks["lira"].metrics.auc.value
           for k in (2, 8)}
    assert auc[8] >= auc[2] - 0.01, auc


def test_a_systems_block_passes_references_to_its_cells(tmp_path):
    import yaml

    from collafuse.benchmarks.audit.grid import load_grid
    from collafuse.errors import ConfigError

    def cells(systems):
        grid = {"base": {"data": {"image_size": 8, "n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
                         "diffusion": {"T": 50}},
                "payload_curve": {}, "systems": systems}
        path = tmp_path / "g.yaml"
        path.write_text(yaml.safe_dump(grid))
        return load_grid(str(path)).cells()

    block = {"cut_ratios": [0.5], "defenses": {"none": []}, "attacks": {"T3": ["loss", "rmia"]}, "references": 2}
    (cell,) = cells(block)
    assert cell.references == 2 and cell.uses_references and cell.to_json()["references"] == 2
    (more,) = cells({**block, "references": 8})
    assert more.config_hash != cell.config_hash
    # without a reference attack, references shape nothing: the cell (and its hash) is what it was
    plain = {**block, "attacks": {"T3": ["loss"]}}
    (a,), (b,) = cells(plain), cells({**plain, "references": 8})
    assert "references" not in a.to_json() and a.config_hash == b.config_hash
    with pytest.raises(ConfigError, match="references"):
        cells({**block, "references": 1})


def test_command_line_runs_reference_attacks_with_the_asked_number_of_references(tiny_runs, tmp_path, capsys):
    import json

    from collafuse.cli import main

    out = tmp_path / "mia.json"
    rc = main(["attack", "membership", "--run", str(tiny_runs["cut"]), "--attacks", "lira,rmia-offline,secmi",
               "--targets", "client", "--references", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["signals"]["references"] == 2
    for k in (0, 1):  # the tiny run has 2 clients: each target has its own references
        attacks = rep["targets"][f"client_{k}"]["attacks"]
        assert set(attacks) == {"lira", "rmia-offline", "secmi"}
        assert all(isinstance(a["inverted"], bool) for a in attacks.values())
    capsys.readouterr()
    rc = main(["attack", "membership", "--run", str(tiny_runs["cut"]), "--attacks", "lira", "--references", "1",
               "--out", str(tmp_path / "bad.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--references must be in 2..64" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.json").exists()


# ---------------------------------------------------------------------------------------
# reference SERVER models (T2): trained on payloads simulated from each subset


def test_reference_server_models_train_on_simulated_payloads_and_are_cached(tmp_path):
    from collafuse.attacks.membership.references import ServerRecipe, load_or_train_server, release_hooks
    from collafuse.config import config_from_dict

    cfg = config_from_dict({**_config(2, 8, cut_ratio=0.3), "defenses": [{"name": "payload-noise", "sigma": 1.0}]})
    hooks = release_hooks(cfg)
    assert hooks  # payload noise shapes the simulated payloads as it shaped the target's
    recipe = ServerRecipe(UNetConfig(channels=(8, 16), time_dim=16), "cosine", 100, 30, 30, "cut", 2, 8, 1e-3, 0.0,
                          0.0, json.dumps(cfg.defenses))
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    a, hit_a = load_or_train_server(recipe, hooks, images, None, 3, tmp_path)
    b, hit_b = load_or_train_server(recipe, hooks, images, None, 3, tmp_path)
    assert not hit_a and hit_b
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))
    plain = ServerRecipe(**{**recipe.__dict__, "defenses": "[]"})
    assert reference_key(plain, images, None, 3) != reference_key(recipe, images, None, 3)
    c, _ = load_or_train_server(plain, (), images, None, 3, tmp_path)  # other payloads: other weights
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.slow
def test_memorising_server_is_found_by_lira_and_rmia_and_untrained_is_chance(tmp_path):
    """One client, c = 0.1, 32 members, 300 full-batch epochs: the server has memorised the payloads of its
    32 images; 2 reference server models each. A 1-epoch server at lr 1e-4 (160 members) gives chance."""
    run = _train(_config(300, 32, cut_ratio=0.1), tmp_path / "mem")
    target = run_membership(run, ("lira", "rmia", "loss"), ("server",), _settings(2)).targets["server"]
    for name in ("lira", "rmia"):
        m = target.attacks[name].metrics
        assert m.auc.value >= 0.9, (name, m.auc.value, target.attacks["loss"].metrics.auc.value)
    untrained = _train(_config(1, 160, lr=1e-4, cut_ratio=0.1), tmp_path / "untrained")
    result = run_membership(untrained, ("lira", "rmia"), ("server",), _settings(2))
    aucs = {name: a.metrics.auc.value for name, a in result.targets["server"].attacks.items()}
    assert all(0.4 <= v <= 0.6 for v in aucs.values()), aucs
