"""Membership attacks (DESIGN.md §4.2): the shared suite every attack passes, their directions,
their declared query counts, and the two ends: a memorising model and an untrained one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from collafuse.attacks.membership import loss, nn_distance, pia, pian, secmi, sima
from collafuse.attacks.membership.base import MembershipAttack, SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.registry import Registry, UnknownNameError
from collafuse.attacks.membership.signals import (
    ModelView, loss_target_scale, model_signal_cache, payload_signal_cache, sample_signal_cache, step_grid,
)
from collafuse.data import load_digits16
from collafuse.model import UNetConfig
from collafuse.protocol import Client, Server
from collafuse.sampling import collaborative_sample
from collafuse.sampling import server_handoff
from collafuse.attacks.membership.coclient import Finished, Handoffs, OwnChain, coclient_signal_cache, finish_chain
from collafuse.schedule import NoiseSchedule
from collafuse.training import build_model

MODEL_ATTACKS = ("loss", "sima", "pia", "pian", "secmi")
T, T_C = 100, 20


@pytest.fixture(scope="module")
def digits8():
    data = load_digits16(1, 8)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.images[perm]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("cosine", T)


def _auc(scores: np.ndarray, n_members: int) -> float:
    labels = np.r_[np.ones(n_members), np.zeros(len(scores) - n_members)]
    return float(roc_auc_score(labels, scores))


def _scores(cache, name: str) -> np.ndarray:
    attack = ATTACKS.get(name)
    return attack.score(cache.require(attack.signals)).scores


@pytest.fixture(scope="module")
def memorised(digits8, schedule):
    """A client model (c = 1: it owns every step) trained long on 32 images, full batch."""
    members = digits8[:32]
    model = build_model(UNetConfig(channels=(16, 32), time_dim=32), 0, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    client = Client(0, model, opt, schedule, T, "cut", torch.Generator().manual_seed(1))
    for _ in range(800):
        client.train_step(members, None)
    return model.eval()


def _untrained(seed: int, channels=(8, 16)):
    """A freshly initialised UNet whose zero-initialised output layer is given random weights,
    so that it is a non-degenerate function that has seen no data."""
    model = build_model(UNetConfig(channels=channels, time_dim=16), seed, 9)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.out.weight.copy_(0.1 * torch.randn(model.out.weight.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------
# registry


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(UnknownNameError, match="unknown thing 'b'; valid: a"):
        reg.get("b")
    with pytest.raises(UnknownNameError, match="empty thing name"):
        reg.parse("a,,")
    assert reg.parse(None) == ("a",) and reg.parse(" a , a") == ("a",)
    with pytest.raises(ValueError, match="already registered"):
        ATTACKS.register("loss", ATTACKS.get("loss"))
    assert set(ATTACKS.names()) == {"loss", "sima", "pia", "pian", "secmi", "payload-lr", "nn-distance",
                                    "payload-lr-single", "payload-lr-fused",
                                    "lira", "lira-offline", "rmia", "rmia-offline",
                                    "handoff-nn", "handoff-lr",
                                    "loss-hf", "pia-hf", "pian-hf", "secmi-hf", "noise-agg", "lira-peers", "rmia-peers"}


def test_every_attack_declares_threats_direction_and_cost():
    for name in ATTACKS:
        a: MembershipAttack = ATTACKS.get(name)
        assert a.direction == "higher = more likely member"
        assert set(a.threats) <= {"T1", "T2", "T3", "T4", "T5"} and a.threats
    # Model forwards per image at M = 8 steps, K = 4 noise draws: loss M·K, SimA M, PIA/PIAN M + 2
    # (the origin ε query and the paper's attack step), SecMI M + 1 (the chained inversion), the model-free ones none.
    queries = {name: ATTACKS.get(name).queries_per_image(SignalSettings(n_noise=4), 8) for name in ATTACKS}
    assert queries == {"loss": 32, "sima": 8, "pia": 10, "pian": 10, "secmi": 9, "payload-lr": 0, "nn-distance": 0,
                       "payload-lr-single": 0, "payload-lr-fused": 0,
                       # target + R = 4 references at the M·K fixed draws (plus R client trainings)
                       "lira": 160, "lira-offline": 160, "rmia": 160, "rmia-offline": 160,
                       "handoff-nn": 0, "handoff-lr": 0,
                       # FreMIA's -hf variants: their unfiltered attack's queries; noise-agg: 5; the peer attacks:
                       # target + P peers at the M·K fixed draws, the registry stating P = 1 (each result its own P)
                       "loss-hf": 32, "pia-hf": 10, "pian-hf": 10, "secmi-hf": 9, "noise-agg": 5,
                       "lira-peers": 64, "rmia-peers": 64}
    assert ATTACKS.get("payload-lr").threats == ("T1",) and ATTACKS.get("nn-distance").threats == ("T4",)
    assert all(ATTACKS.get(n).threats == ("T2", "T3") for n in MODEL_ATTACKS)


# ---------------------------------------------------------------------------------------
# direction: pure score functions on hand-made signals


def test_directions_of_the_pure_scores():
    rng = np.random.default_rng(0)
    n, m, d = 20, 3, 16
    steps, t_range = np.array([1, 5, 10]), np.array([0, 10])
    member = np.r_[np.ones(n), np.zeros(n)].astype(bool)  # first half: "members"
    small = np.where(member[:, None, None], 0.1, 1.0)

    s = loss.score({"loss_sq": small * rng.random((2 * n, m, 4)), "steps": steps, "t_range": t_range}).scores
    assert s[member].min() > s[~member].max()
    s = sima.score({"sima_eps": small * rng.standard_normal((2 * n, m, d)), "steps": steps, "t_range": t_range}).scores
    assert _auc(s, n) > 0.95
    eps0 = rng.standard_normal((2 * n, d))
    near = eps0[:, None, :] + small * rng.standard_normal((2 * n, m, d))
    head = near[:, 1]  # the paper's step
    assert _auc(pia.score({"eps_origin": eps0, "pia_head_eps": head, "pia_eps": near, "steps": steps}).scores, n) > 0.95
    near_n = pian.rescale_rows(eps0)[:, None, :] + small * rng.standard_normal((2 * n, m, d))
    assert _auc(pian.score({"eps_origin": eps0, "pian_head_eps": near_n[:, 1], "pian_eps": near_n,
                            "steps": steps}).scores, n) > 0.95
    inv = rng.standard_normal((2 * n, m, d))
    rec = inv + small * rng.standard_normal((2 * n, m, d))
    assert _auc(secmi.score({"secmi_inv": inv, "secmi_rec": rec, "secmi_steps": steps, "t_range": t_range}).scores, n) > 0.95
    s = nn_distance.score({"nn_dist": np.where(member, 0.1, 1.0)}).scores
    assert s[member].min() > s[~member].max()


def test_payload_lr_prefers_the_images_that_produced_payloads(digits8, schedule):
    members, nonmembers, aux = digits8[:32], digits8[32:64], digits8[64:96]
    client = Client(0, None, None, schedule, T_C, "cut", torch.Generator().manual_seed(0))
    payloads = [client.release(members, None, torch.arange(32), step) for step in range(3)]
    view = {"tensor": torch.cat([p.tensor for p in payloads]), "t": torch.cat([p.t for p in payloads])}
    cache = payload_signal_cache(torch.cat([members, nonmembers]), view, schedule, aux)
    scores = _scores(cache, "payload-lr")
    assert _auc(scores, 32) >= 0.99
    assert (scores[:32] > 0).mean() > 0.9  # calibrated: members explain a payload better than any reference


# ---------------------------------------------------------------------------------------
# the server view's coefficients


def test_server_loss_target_is_the_posterior_mean_of_its_noise(schedule):
    """x_t = √ᾱ'_t (a_c x0 + s_c ε_c) + √(1−ᾱ'_t) η = a_t x0 + s_t ε; E[η | ε] = scale·ε (§2.2 step 3)."""
    ab, rel = schedule.alpha_bar.numpy(), schedule.relative(T_C).numpy()
    rng = np.random.default_rng(0)
    for t in (T_C + 1, 40, T):
        eps_c, eta = rng.standard_normal(200_000), rng.standard_normal(200_000)
        total = (np.sqrt(rel[t]) * np.sqrt(1 - ab[T_C]) * eps_c + np.sqrt(1 - rel[t]) * eta) / np.sqrt(1 - ab[t])
        assert total.std() == pytest.approx(1.0, abs=0.01)  # ε is standard normal
        slope = (eta * total).mean() / (total * total).mean()  # regression of η on ε
        assert slope == pytest.approx(loss_target_scale(ab[t], rel[t]), abs=0.01)
    assert loss_target_scale(ab[5], ab[5]) == 1.0


def test_step_grid_spans_the_range_densest_at_low_noise():
    g = step_grid(21, 100, 8)
    assert g[0] == 21 and g[-1] == 100 and g == sorted(set(g))
    assert g[1] - g[0] < g[-1] - g[-2]
    assert step_grid(1, 2, 8) == [1, 2] and step_grid(5, 4, 8) == []


# ---------------------------------------------------------------------------------------
# cost: declared queries = counted queries; signals shared; determinism


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_declared_queries_are_the_counted_queries(name, digits8, schedule):
    settings = SignalSettings(n_steps=5, n_noise=3, batch_size=7)  # odd batch: several chunks
    images = digits8[:10]
    for view in (ModelView.client(_untrained(0), schedule, T_C, False), ModelView.server(_untrained(0), schedule, T_C, False)):
        cache = model_signal_cache(view, images, None, settings, torch.Generator().manual_seed(0))
        _scores(cache, name)
        m = len(cache.get("steps"))
        assert view.counter.rows == ATTACKS.get(name).queries_per_image(settings, m) * len(images)


def test_shared_signals_are_computed_once(digits8, schedule):
    view = ModelView.client(_untrained(0), schedule, T_C, False)
    settings = SignalSettings(n_steps=4)
    cache = model_signal_cache(view, digits8[:6], None, settings, torch.Generator().manual_seed(0))
    _scores(cache, "pia")
    after_pia = view.counter.rows
    _scores(cache, "pian")  # reuses ε0
    m = len(cache.get("steps"))
    # ε0, the paper's step and the M grid steps; pian adds its own paper step and grid on the shared ε0
    assert after_pia == (2 + m) * 6 and view.counter.rows - after_pia == (1 + m) * 6
    _scores(cache, "pia")
    assert view.counter.rows - after_pia == (1 + m) * 6  # nothing recomputed


def test_scores_are_deterministic_under_a_seed_and_independent_of_batching(digits8, schedule):
    model = _untrained(1)

    def run(seed, batch):
        view = ModelView.client(model, schedule, T_C, False)
        cache = model_signal_cache(view, digits8[:12], None, SignalSettings(n_steps=3, n_noise=2, batch_size=batch),
                                   torch.Generator().manual_seed(seed))
        return {n: _scores(cache, n) for n in MODEL_ATTACKS}

    a, b, c = run(0, 12), run(0, 5), run(1, 12)
    for n in MODEL_ATTACKS:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["loss"], c["loss"])  # the loss draws noise from the generator
    np.testing.assert_allclose(a["pia"], c["pia"], rtol=1e-6)  # pia is deterministic


# ---------------------------------------------------------------------------------------
# the two ends: a memorising model and an untrained one


@pytest.mark.slow
def test_memorising_model_is_detected(memorised, digits8, schedule):
    images = torch.cat([digits8[:32], digits8[32:64]])
    view = ModelView.client(memorised, schedule, T, False)
    cache = model_signal_cache(view, images, None, SignalSettings(), torch.Generator().manual_seed(0))
    aucs = {n: _auc(_scores(cache, n), 32) for n in MODEL_ATTACKS}
    assert aucs["loss"] >= 0.9 and aucs["pia"] >= 0.9, aucs
    # Every model attack finds the leak. PIAN as the paper normalises ε0 (mean |ε0| = √(2/π)) inverts at
    # t = 1–3 on this model, so its low-noise mean is near chance (measured 0.45); per step, as the paper
    # reports it, it finds the leak (measured 0.90 at t = 19).
    assert min(v for n, v in aucs.items() if n != "pian") >= 0.65, aucs
    per_step = ATTACKS.get("pian").score(cache.require(ATTACKS.get("pian").signals)).per_step
    assert max(_auc(per_step[:, j], 32) for j in range(per_step.shape[1])) >= 0.65


def test_memorised_server_is_detected_through_the_relative_schedule(digits8, schedule):
    """The server, trained on cut payloads of 32 images, queried at t in (t_c, T]."""
    members = digits8[:32]
    model = build_model(UNetConfig(channels=(8, 16), time_dim=16), 0, 2)
    server = Server(model, torch.optim.Adam(model.parameters(), lr=3e-3), schedule, T_C,
                    torch.Generator().manual_seed(2), torch.device("cpu"))
    client = Client(0, None, None, schedule, T_C, "cut", torch.Generator().manual_seed(3))
    for step in range(400):
        server.receive(client.release(members, None, torch.arange(32), step))
    view = ModelView.server(model.eval(), schedule, T_C, False)
    cache = model_signal_cache(view, torch.cat([members, digits8[32:64]]), None, SignalSettings(), torch.Generator().manual_seed(0))
    assert _auc(_scores(cache, "loss"), 32) >= 0.8
    assert _auc(_scores(cache, "pia"), 32) >= 0.8
    assert min(cache.get("steps")) == T_C + 1 and max(cache.get("steps")) == T


def test_untrained_model_gives_chance_auc_for_every_attack(digits8, schedule):
    n = 160
    members, nonmembers = digits8[:n], digits8[n : 2 * n]
    images = torch.cat([members, nonmembers])
    for name in ATTACKS:
        attack = ATTACKS.get(name)
        if name in ATTACKS.needing("references"):
            continue  # lira / rmia train reference models: tests/test_reference_attacks.py
        if name in ATTACKS.needing("peers"):
            continue  # lira-peers / rmia-peers read other clients' models: tests/test_peer_attacks.py
        if "T1" in attack.threats:
            # Payloads of a third, disjoint set: neither side produced any of them.
            client = Client(0, None, None, schedule, T_C, "cut", torch.Generator().manual_seed(0))
            p = [client.release(digits8[2 * n : 3 * n], None, torch.arange(n), s) for s in range(2)]
            view = {"tensor": torch.cat([x.tensor for x in p]), "t": torch.cat([x.t for x in p])}
            caches = [payload_signal_cache(images, view, schedule, digits8[3 * n : 3 * n + 64])]
        elif "T5" in attack.threats:
            # A co-client's hand-offs from an untrained server, finished by its untrained chain.
            g = torch.Generator().manual_seed(0)
            handoffs = Handoffs(server_handoff(_untrained(3), schedule, T_C, torch.randn((n, 1, 8, 8), generator=g), g,
                                               sampler="ddim", server_steps=8), T_C)
            chain = finish_chain(handoffs, OwnChain(_untrained(4), schedule, "ddim", 4), g)
            caches = [coclient_signal_cache(images, Finished(0, handoffs, chain), schedule, digits8[3 * n : 3 * n + 16],
                                            digits8[3 * n + 16 : 3 * n + 80], float(n))]
        elif "T4" in attack.threats:
            samples = collaborative_sample(_untrained(3), _untrained(4), schedule, T_C, (n, 1, 8, 8),
                                           torch.Generator().manual_seed(0), sampler="ddim", ddim_steps=10)
            caches = [sample_signal_cache(images, samples)]
        else:
            caches = [
                model_signal_cache(make(_untrained(5), schedule, T_C, False), images, None, SignalSettings(n_steps=4, n_noise=2),
                                   torch.Generator().manual_seed(0))
                for make in (ModelView.client, ModelView.server)
            ]
        for cache in caches:
            auc = _auc(_scores(cache, name), n)
            assert 0.4 <= auc <= 0.6, (name, auc)


def test_payload_likelihood_is_finite_for_exact_payloads_at_t0():
    """c = 0 sends the raw images (s = 0): the exact match must rank first, with finite scores."""
    from collafuse.attacks.membership.signals import payload_log_ratio

    rng = np.random.default_rng(0)
    members, others = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    scores = payload_log_ratio(np.r_[members, others], members, np.ones(5), np.zeros(5), others[:2])
    assert np.isfinite(scores).all()
    assert scores[:5].min() > scores[5:].max()
