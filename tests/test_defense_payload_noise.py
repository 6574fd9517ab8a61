"""``payload-noise``: the rescaled payload is exactly a payload at t' (statistically), the server is told t',
the leakage falls, and a server trained on it still generates recognisable digits."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy.stats import kstest

from collafuse.attacks.reconstruction.oracle import posterior_log_weights
from collafuse.config import config_from_dict
from collafuse.data import load_digits16
from collafuse.defenses import build_hooks
from collafuse.defenses.payload_noise import PayloadNoise, effective_sigma, noised_step, renoise
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule


SCHEDULE = NoiseSchedule.create("cosine", 100)
T_C = 20


def _client(hooks=()) -> Client:
    return Client(0, None, None, SCHEDULE, T_C, "cut", torch.Generator().manual_seed(3), release_hooks=tuple(hooks))


@functools.lru_cache(maxsize=1)
def _all_digits() -> torch.Tensor:
    return load_digits16(1, 8).images


def _digits(n: int) -> torch.Tensor:
    return _all_digits()[:n]


def test_noised_step_is_the_first_step_past_the_target():
    ab = SCHEDULE.alpha_bar
    for sigma in (0.1, 0.5, 1.0, 3.0):
        t_prime = noised_step(ab, T_C, sigma)
        assert ab[t_prime] <= ab[T_C] / (1 + sigma**2) < ab[t_prime - 1]
        assert effective_sigma(ab, T_C, t_prime) >= sigma
    assert noised_step(ab, T_C, 0.0) == T_C


def test_rescaled_payload_has_the_marginal_of_x_t_prime():
    """p' − a_{t'} x0 must be N(0, s_{t'}² I): a KS test over many releases of a few fixed images.

    The same test rejects the payload when the server is told a neighbouring step, so it has power.
    """
    hook = PayloadNoise(0.7, SCHEDULE)
    client = _client([hook])
    x0 = _digits(4).repeat(100, 1, 1, 1)  # 4 fixed images, 100 rows each per release
    ids = torch.arange(4).repeat(100)
    p, t = [], []
    for step in range(15):
        payload = client.release(x0, None, ids, step)
        p.append(payload.tensor)
        t.append(payload.t)
    p, t = torch.cat(p).double(), torch.cat(t)
    t_prime = noised_step(SCHEDULE.alpha_bar, T_C, 0.7)
    assert (t == t_prime).all() and t_prime > T_C
    x = x0.repeat(15, 1, 1, 1).double()

    def residual(step: int) -> torch.Tensor:
        return ((p - SCHEDULE.a(step) * x) / SCHEDULE.s(step)).flatten()

    r = residual(t_prime)
    assert abs(float(r.mean())) < 0.01 and abs(float(r.var()) - 1.0) < 0.02
    assert kstest(r.numpy(), "norm", method="asymp").pvalue > 1e-3
    for wrong in (t_prime - 1, t_prime + 1):
        assert kstest(residual(wrong).numpy(), "norm", method="asymp").pvalue < 1e-6
    # Pixels stay independent: the residual covariance across pixels is the identity.
    cov = torch.cov(((p - SCHEDULE.a(t_prime) * x) / SCHEDULE.s(t_prime)).flatten(1).T)
    off = cov - torch.diag(torch.diag(cov))
    assert float(off.abs().max()) < 0.1


def test_renoise_equals_the_forward_step():
    p = torch.randn(3, 1, 4, 4)
    xi = torch.randn(3, 1, 4, 4)
    ab = SCHEDULE.alpha_bar
    out = renoise(p, float(ab[20]), float(ab[40]), xi)
    rel = float(ab[40] / ab[20])
    assert torch.allclose(out, (math.sqrt(rel) * p.double() + math.sqrt(1 - rel) * xi.double()).float(), atol=1e-6)


def _oracle_reid(payloads: torch.Tensor, t: torch.Tensor, pool: torch.Tensor, truth: torch.Tensor) -> float:
    """Bayes-optimal re-identification (the ``oracle`` attack) of each payload within ``pool``."""
    a, s = SCHEDULE.a(int(t[0])), SCHEDULE.s(int(t[0]))
    log_w = posterior_log_weights(payloads / a, torch.full((len(payloads),), a * a / (s * s)), pool)
    return float((log_w.argmax(1) == truth).double().mean())


def test_payload_noise_lowers_reidentification_and_reconstruction():
    pool = _digits(400)
    truth = torch.arange(200)
    results = {}
    for sigma in (0.0, 1.0, 3.0):
        client = _client([PayloadNoise(sigma, SCHEDULE)] if sigma else [])
        payload = client.release(pool[:200], None, truth, 0)
        x_hat = payload.tensor / SCHEDULE.a(int(payload.t[0]))  # the ``rescale`` attack
        mse = float((((x_hat.clamp(-1, 1) + 1) / 2 - (pool[:200] + 1) / 2) ** 2).mean())
        results[sigma] = (_oracle_reid(payload.tensor, payload.t, pool, truth), -10 * math.log10(mse))
    reid = [results[s][0] for s in (0.0, 1.0, 3.0)]
    psnr = [results[s][1] for s in (0.0, 1.0, 3.0)]
    assert reid[0] > 0.95  # at t_c = 20 of 100 the plain payload identifies its image
    assert reid[0] > reid[1] > reid[2]
    assert reid[2] < 0.5
    assert psnr[0] > psnr[1] + 3 > psnr[2] + 3


@pytest.mark.slow
def test_server_trained_on_noised_payloads_still_generates_digits(tmp_path):
    from collafuse.benchmarks.sample_quality import fit_judge, judge_accuracy
    from collafuse.runs import generate, prepare_data
    from collafuse.training import train_system

    raw = {
        "seed": 0, "device": "cpu",
        "data": {"image_size": 8, "n_members": 1024, "n_nonmembers": 256, "n_aux": 256, "num_clients": 2},
        "diffusion": {"T": 100, "cut_ratio": 0.2},
        "server_model": {"channels": [16, 32], "time_dim": 32},
        "client_model": {"channels": [16, 32], "time_dim": 32},
        "training": {"epochs": 30, "batch_size": 64, "lr": 3e-3},
        "sampling": {"steps": 20, "guidance": 1.0},
        "defenses": [{"name": "payload-noise", "sigma": 0.5}],
    }
    config = config_from_dict(raw)
    hooks = build_hooks(config.defenses, config)
    data, splits = prepare_data(config)
    system = train_system(config, data, splits, tmp_path, hooks, progress=False)
    assert system.t_hand == noised_step(NoiseSchedule.create("cosine", 100).alpha_bar, 20, 0.5) > 20  # hand-off at t'
    judge_idx = torch.cat([splits.nonmembers, splits.aux])
    judge = fit_judge(data.images[judge_idx], data.labels[judge_idx])
    samples = generate(system, 0, 200, seed=5)
    accuracy = judge_accuracy(judge, samples, torch.arange(200) % 10)
    assert accuracy > 0.4  # chance is 0.1
