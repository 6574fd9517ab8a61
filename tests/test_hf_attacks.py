"""Issue 25's cheap upgrades, on hand-made numbers (fast): FreMIA's filter (golden numbers computed by hand, the
authors' box), the -hf variants, small-noise aggregation's math, steps and queries, the pure parts of the peer
attacks and of source inference, and their audit rows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from collafuse.attacks.membership import aggregation, fremia, lira, lira_peers, loss, pia, pian, rmia, rmia_peers, secmi
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.metrics import ScoreError
from collafuse.attacks.membership.peers import peer_producers
from collafuse.attacks.membership.signals import ModelView, SignalCache, model_signal_cache
from collafuse.attacks.membership.source import predict_sources, score_source_inference
from collafuse.model import UNetConfig
from collafuse.schedule import NoiseSchedule
from collafuse.training import build_model

HF = ("loss-hf", "pia-hf", "pian-hf", "secmi-hf")


def _auc(scores: np.ndarray, n_members: int) -> float:
    return float(roc_auc_score(np.r_[np.ones(n_members), np.zeros(len(scores) - n_members)], scores))


# ---------------------------------------------------------------------------------------------- FreMIA's filter


def test_fremia_mask_golden_numbers():
    s = 0.2
    # 4 × 4, τ = 1: the centre (frequency 0) sits at index 2 after the shift; the authors' box is the slice [2-1, 2+1)
    np.testing.assert_array_equal(fremia.fremia_mask(4, 4, 1, s), [[s, s, s, s], [s, 1, 1, s], [s, 1, 1, s], [s, s, s, s]])
    # 5 × 6, τ = 2: rows [0, 4) of 5 (centre 2), columns [1, 5) of 6 (centre 3): offsets −2 .. +1, not |k| ≤ 2
    expected = np.full((5, 6), s)
    expected[0:4, 1:5] = 1.0
    np.testing.assert_array_equal(fremia.fremia_mask(5, 6, 2, s), expected)
    # the paper's τ = 5 on 16 × 16: rows and columns 3 .. 12 pass; on 8 × 8 the box covers the whole spectrum (the
    # authors' slice would start at index −1 there; we clip it)
    m16 = fremia.fremia_mask(16, 16)
    assert (m16[3:13, 3:13] == 1).all() and (m16[:3] == 0.2).all() and (m16[13:] == 0.2).all() and m16.sum() == 100 + 0.2 * 156
    assert (fremia.fremia_mask(8, 8) == 1).all()


def test_fremia_filter_golden_numbers_by_hand():
    """4 × 4 images, τ = 1, s = 0.2, computed by hand from the DFT:
    - a constant holds only frequency 0 (inside the box): unchanged;
    - the checkerboard (−1)^(i+j) is the Nyquist frequency (2, 2), shifted to index (0, 0): outside, × 0.2;
    - cos(2π j/4) holds the column frequencies +1 and −1; shifted they sit at columns 3 (outside the slice [1, 3)) and
      1 (inside), so the masked spectrum is s·e^{iθ} + e^{−iθ} (over 2) and its real part (1 + s)/2 · cos θ = 0.6 cos θ:
      the authors' asymmetric box halves the weight of +τ; sin θ likewise gets 0.6."""
    i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    const = np.full((4, 4), 3.0)
    checker = (-1.0) ** (i + j)
    cos = np.cos(2 * np.pi * j / 4)
    sin = np.sin(2 * np.pi * j / 4)
    f = lambda x: fremia.fremia_filter(x, 1, 0.2)  # noqa: E731
    np.testing.assert_allclose(f(const), const, atol=1e-12)
    np.testing.assert_allclose(f(checker), 0.2 * checker, atol=1e-12)
    np.testing.assert_allclose(f(cos), np.tile([0.6, 0.0, -0.6, 0.0], (4, 1)), atol=1e-12)
    np.testing.assert_allclose(f(sin), np.tile([0.0, 0.6, 0.0, -0.6], (4, 1)), atol=1e-12)
    # linear (so filtering both terms, as the authors do, is filtering the residual), per channel, batched
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    np.testing.assert_allclose(f(a - b), f(a) - f(b), atol=1e-12)
    np.testing.assert_allclose(f(a)[1, 2], f(a[1, 2]), atol=1e-12)
    flat = a.reshape(2, 1, 48)  # (N, M, D) flat signals
    np.testing.assert_allclose(fremia.filter_flat(flat, np.array([3, 4, 4]), 1, 0.2), f(a).reshape(2, 1, 48), atol=1e-12)


def _residual_signals(size: int, n: int = 40, m: int = 3, k: int = 2, seed: int = 0):
    """A FreMIA world: every candidate's residual holds high-frequency content of a random amount (what the model
    fails to fit on any image, member or not), members a smaller low-frequency part. The attacks' signals built
    from those residuals."""
    rng = np.random.default_rng(seed)
    member = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(bool)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    low_basis = np.cos(2 * np.pi * yy / size) + np.sin(2 * np.pi * xx / size)  # frequency 1: inside the box

    def residual(shape):
        low = np.where(member, 0.3, 1.0).reshape(-1, *([1] * (len(shape) - 1))) * rng.normal(size=shape[:-3] + (1, 1, 1))
        amount = rng.uniform(0.0, 3.0, size=shape[:-3] + (1, 1, 1))
        high = amount * ((-1.0) ** (yy + xx))  # the Nyquist checkerboard: outside the box
        return low * low_basis + high

    d = size * size
    eps0 = rng.normal(size=(n, d))
    return {
        "loss_sq": None, "loss_hf_sq": None, "image_shape": np.array([1, size, size]),
        "raw": residual((n, m, k, 1, size, size)).reshape(n, m, k, d),
        "eps_origin": eps0, "pia_eps": eps0[:, None] + residual((n, m, 1, size, size)).reshape(n, m, d),
        "pia_head_eps": eps0 + residual((n, 1, size, size)).reshape(n, d),
        "pian_eps": pian.rescale_rows(eps0)[:, None] + residual((n, m, 1, size, size)).reshape(n, m, d),
        "pian_head_eps": pian.rescale_rows(eps0) + residual((n, 1, size, size)).reshape(n, d),
        "secmi_inv": np.zeros((n, m, d)), "secmi_rec": residual((n, m, 1, size, size)).reshape(n, m, d),
        "steps": np.array([1, 2, 3]), "secmi_steps": np.array([0, 1, 2]), "t_range": np.array([0, 4]),
    }


def test_hf_variants_score_their_unfiltered_attack_on_filtered_residuals():
    sig = _residual_signals(16)
    raw = sig["raw"]
    sig["loss_sq"] = (raw**2).mean(-1)
    sig["loss_hf_sq"] = (fremia.filter_flat(raw, sig["image_shape"]) ** 2).mean(-1)
    base = {"loss-hf": "loss", "pia-hf": "pia", "pian-hf": "pian", "secmi-hf": "secmi"}
    for name in HF:
        hf = ATTACKS.get(name).score({k: sig[k] for k in ATTACKS.get(name).signals})
        plain = ATTACKS.get(base[name]).score({k: sig[k] for k in ATTACKS.get(base[name]).signals})
        assert hf.scores.shape == (40,) and np.isfinite(hf.scores).all()
        # the high frequencies hide the membership signal; the filter brings it back
        assert _auc(hf.scores, 20) >= _auc(plain.scores, 20) + 0.1, (name, _auc(hf.scores, 20), _auc(plain.scores, 20))
        assert ATTACKS.get(name).threats == ATTACKS.get(base[name]).threats == ("T2", "T3")
    # on 8 × 8 images the box is the whole spectrum: each -hf variant is its unfiltered attack, number for number
    small = _residual_signals(8)
    for name in ("pia-hf", "pian-hf", "secmi-hf"):
        hf = ATTACKS.get(name).score({k: small[k] for k in ATTACKS.get(name).signals}).scores
        plain = ATTACKS.get(base[name]).score({k: small[k] for k in ATTACKS.get(base[name]).signals}).scores
        np.testing.assert_allclose(hf, plain, rtol=1e-9)


def test_model_signals_make_no_extra_query_for_the_hf_variants():
    schedule = NoiseSchedule.create("cosine", 50)
    model = build_model(UNetConfig(channels=(8, 16), time_dim=16), 0, 3).eval()
    view = ModelView.client(model, schedule, 10, False)
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    cache = model_signal_cache(view, images, None, SignalSettings(n_steps=3, n_noise=2), torch.Generator().manual_seed(0))
    for name in ("loss", "pia", "pian", "secmi"):
        ATTACKS.get(name).score(cache.require(ATTACKS.get(name).signals))
    before = view.counter.rows
    for name in HF:
        result = ATTACKS.get(name).score(cache.require(ATTACKS.get(name).signals))
        assert np.isfinite(result.scores).all() and result.scores.shape == (6,)
    assert view.counter.rows == before  # the filtered residuals come from the same queries
    # loss_hf_sq is the filter of the very residuals loss_sq squares: with s = 1 it would be loss_sq itself, and
    # the filter only removes energy (every mask weight ≤ 1)
    assert (cache.get("loss_hf_sq") <= cache.get("loss_sq") + 1e-12).all()
    assert not np.allclose(cache.get("loss_hf_sq"), cache.get("loss_sq"))


# ---------------------------------------------------------------------------------------------- small-noise aggregation


def test_aggregation_steps_scale_the_papers_walk_to_each_chain():
    assert aggregation.aggregation_steps(0, 1, 1000, 1000) == [80, 70, 60, 50, 40]  # the paper's, T = 1000
    assert aggregation.aggregation_steps(0, 1, 200, 1000) == [80, 70, 60, 50, 40]   # a client at c = 0.2
    assert aggregation.aggregation_steps(0, 1, 50, 50) == [5, 4, 3, 2, 1]           # T = 50: stride 1, room for 5
    assert aggregation.aggregation_steps(0, 1, 60, 1000) == [60, 50, 40, 30, 20]    # a client at c = 0.06
    assert aggregation.aggregation_steps(200, 201, 1000, 1000) == [264, 256, 248, 240, 232]  # the server above t_c = 200
    assert aggregation.aggregation_steps(0, 1, 3, 50) == [3, 2, 1]                  # a range of 3 steps: all of them


def test_pairwise_spread_is_the_mean_over_pairs():
    rng = np.random.default_rng(1)
    eps = rng.normal(size=(3, 5, 7))
    slow = [np.mean([np.sum((e[i] - e[j]) ** 2) for i in range(5) for j in range(i + 1, 5)]) for e in eps]
    np.testing.assert_allclose(aggregation.pairwise_spread(eps), slow, rtol=1e-12)
    # members' predictions stay together along the walk: higher score
    member = rng.normal(size=(10, 1, 7)) + 0.05 * rng.normal(size=(10, 5, 7))
    other = rng.normal(size=(10, 1, 7)) + 1.0 * rng.normal(size=(10, 5, 7))
    result = aggregation.score({"agg_eps": np.concatenate([member, other])})
    assert result.scores[:10].min() > result.scores[10:].max() and result.queries_per_image == 5
    identical = aggregation.score({"agg_eps": np.ones((2, 5, 7))}).scores
    assert np.isfinite(identical).all() and identical[0] == pytest.approx(-math.log(aggregation.DELTA))


def test_aggregation_queries_five_times_per_image_with_one_noise_draw():
    schedule = NoiseSchedule.create("cosine", 50)
    model = build_model(UNetConfig(channels=(8, 16), time_dim=16), 0, 3).eval()
    view = ModelView.client(model, schedule, 10, False)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    settings = SignalSettings(n_steps=3, n_noise=2)
    cache = model_signal_cache(view, images, None, settings, torch.Generator().manual_seed(0))
    result = ATTACKS.get("noise-agg").score(cache.require(("agg_eps",)))
    assert view.counter.rows == 5 * 6 and cache.get("agg_steps").tolist() == [5, 4, 3, 2, 1]
    assert ATTACKS.get("noise-agg").queries_per_image(settings, 3) == 5 == result.queries_per_image
    # its draw is its own stream: computing it first or after loss changes neither
    other = model_signal_cache(view, images, None, settings, torch.Generator().manual_seed(0))
    loss_first = other.get("loss_sq").copy()
    np.testing.assert_array_equal(other.get("agg_eps"), cache.get("agg_eps"))
    np.testing.assert_array_equal(loss_first, cache.get("loss_sq"))


# ---------------------------------------------------------------------------------------------- peers (pure parts)


def _peer_signals(partition: str = "iid", p: int = 3, n: int = 40, seed: int = 0) -> dict:
    """Target loss lower on its members (first half) than the peers' (all OUT); population OUT for all."""
    rng = np.random.default_rng(seed)
    difficulty = np.exp(rng.normal(0, 0.8, size=(n, 1)))
    member = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(bool)
    noise = lambda shape: np.exp(rng.normal(0, 0.1, size=shape))  # noqa: E731
    pop = np.exp(rng.normal(0, 0.8, size=(2 * n, 1)))
    return {"peer_target_loss": difficulty * np.where(member[:, None], 0.5, 1.0) * noise((n, 3)),
            "peer_loss": np.stack([difficulty * noise((n, 3)) for _ in range(p)]),
            "peer_pop_target_loss": pop * noise((2 * n, 3)), "peer_pop_loss": np.stack([pop * noise((2 * n, 3)) for _ in range(p)]),
            "peer_clients": np.arange(1, p + 1), "peer_partition": np.asarray([partition]),
            "peer_draws": np.asarray([2]), "steps": np.array([1, 5, 10]), "t_range": np.array([0, 10])}


def test_peer_attacks_are_the_offline_formulas_with_peers_as_out_references():
    sig = _peer_signals()
    ref = {"fixed_loss": sig["peer_target_loss"], "ref_fixed_loss": sig["peer_loss"],
           "ref_in": np.zeros((3, 40), bool), "pop_fixed_loss": sig["peer_pop_target_loss"],
           "ref_pop_fixed_loss": sig["peer_pop_loss"], "steps": sig["steps"], "t_range": sig["t_range"]}
    lp, rp = lira_peers.score(sig), rmia_peers.score(sig)
    np.testing.assert_array_equal(lp.scores, lira.score_offline(ref).scores)
    np.testing.assert_array_equal(rp.scores, rmia.score_offline(ref).scores)
    assert _auc(lp.scores, 20) >= 0.95 and _auc(rp.scores, 20) >= 0.95
    for result in (lp, rp):
        assert result.details == {"peer_models": 3, "peer_clients": [1, 2, 3], "partition": "iid", "partition_iid": True}
        assert result.queries_per_image == (1 + 3) * 3 * 2  # target + 3 peers at M = 3 steps × K = 2 draws
    assert ATTACKS.needing("peers") == ("lira-peers", "rmia-peers") and ATTACKS.get("rmia-peers").threats == ("T3",)


@pytest.mark.parametrize("partition", ["label", "dirichlet", "undeclared"])
def test_peer_attacks_say_when_the_partition_is_not_iid(partition):
    details = rmia_peers.score(_peer_signals(partition)).details
    assert details["partition"] == partition and details["partition_iid"] is False
    assert ("does not declare" if partition == "undeclared" else "not IID") in details["warning"]


def test_a_client_without_peer_models_is_refused_with_one_clear_error():
    schedule = NoiseSchedule.create("cosine", 50)
    view = ModelView.client(build_model(UNetConfig(channels=(8, 16), time_dim=16), 0, 3).eval(), schedule, 10, False)
    images = torch.rand(4, 1, 8, 8)
    cache = SignalCache({"steps": lambda c: {"steps": np.array([1])}, "t_range": lambda c: {"t_range": np.array([0, 10])}})
    cache = cache.with_producers(peer_producers(view, [], images, None, images, None, "iid", 2, 1, 8, 0, 1))
    with pytest.raises(ScoreError, match="at least 2 clients with models"):
        lira_peers.score(cache.require(lira_peers.SIGNALS))


# ---------------------------------------------------------------------------------------------- source inference


def test_source_inference_predicts_the_lowest_loss_and_scores_against_chance():
    losses = np.array([[0.1, 0.5, 0.3, 0.2], [0.2, 0.1, 0.3, 0.2], [0.3, 0.4, 0.1, 0.2]])
    assert predict_sources(losses).tolist() == [0, 1, 2, 0]  # the last one a tie: the lowest index
    score = score_source_inference(np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2]), np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
                                   (0, 1, 2))
    # 9 of 10: Wilson 95 % = (p + z²/2n ± z√(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964
    z, n, p = 1.959964, 10, 0.9
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert score.accuracy.value == pytest.approx(0.9) and score.accuracy.low == pytest.approx(centre - half, abs=1e-6)
    assert score.accuracy.high == pytest.approx(centre + half, abs=1e-6)
    assert score.chance == pytest.approx(1 / 3) and not score.at_chance
    assert score.per_client == {0: (3, 4), 1: (3, 3), 2: (3, 3)}
    blind = score_source_inference(np.zeros(30, int), np.repeat([0, 1, 2], 10), (0, 1, 2))  # always client 0
    assert blind.accuracy.value == pytest.approx(1 / 3) and blind.at_chance
    with pytest.raises(ValueError, match="at least 2 client models"):
        score_source_inference(np.zeros(3, int), np.zeros(3, int), (0,))


def test_source_and_peer_rows_use_the_vocabulary():
    from collafuse.benchmarks.audit.cells.rows import peer_rows, source_rows
    from collafuse.attacks.membership.engine import AttackOutcome
    from collafuse.attacks.membership.epsilon import empirical_epsilon
    from collafuse.attacks.membership.metrics import evaluate

    rows = source_rows(score_source_inference(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), (0, 1)))
    assert [(r["threat"], r["target"], r["attack"], r["metric"]) for r in rows] == [
        ("T3", "clients", "source-inference", "source_accuracy"), ("T3", "clients", "source-inference", "source_chance")]
    assert rows[0]["value"] == 0.75 and rows[1]["value"] == 0.5
    m, o = np.linspace(1, 2, 10), np.linspace(0, 1, 10)
    outcome = AttackOutcome("rmia-peers", ("T3",), "higher = more likely member", 64, evaluate(m, o, 10, 0),
                            empirical_epsilon(m, o, 1e-5, 0.05), (), (), m, o,
                            details=rmia_peers.score(_peer_signals("label")).details)
    assert [(r["metric"], r["value"]) for r in peer_rows("T3", "client_0", outcome)] == [
        ("peer_models", 3.0), ("peer_partition_iid", 0.0)]
    assert outcome.to_json()["details"]["partition"] == "label"
