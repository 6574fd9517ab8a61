"""PIA / PIAN as the paper's code computes them (Kong et al. 2024, github.com/kong13661/PIA,
``components.PIA`` / ``components.PIAN``): ε0 at the model's first trained step, PIAN's
ε0 / mean|ε0| · √(2/π), the ℓ4 distance per step; golden numbers on a fixed tiny model, checked
against an independent numpy implementation. Every score keeps its per-step results."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from collafuse.attacks.membership import pia, pian
from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.signals import ModelView, model_signal_cache, payload_signal_cache, pian_normalise
from collafuse.schedule import NoiseSchedule

D = 16
SHAPE = (1, 4, 4)
_I, _J = np.arange(D)[:, None], np.arange(D)[None, :]
W = 0.3 * np.sin(_I + 2.0 * _J)  # fixed weights from a formula: no random numbers anywhere
B = np.cos(np.arange(D))
T, T_C = 100, 20


class TinyEps(nn.Module):
    """ε(x, t) = tanh(W x + 0.02 t b): a deterministic stand-in for a denoiser; records the steps it is asked."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor(W, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(B, dtype=torch.float32))
        self.asked: list[int] = []

    def forward(self, x, t, y=None):
        self.asked.extend(int(v) for v in t.unique())
        return torch.tanh(x.flatten(1) @ self.w.T + 0.02 * t.float()[:, None] * self.b[None]).reshape(x.shape)


def eps_np(x: np.ndarray, t: int) -> np.ndarray:
    return np.tanh(x @ W.T + 0.02 * t * B[None])


def candidates() -> np.ndarray:
    x = np.linspace(-1.0, 1.0, 3 * D).reshape(3, D) ** 3
    x[1] = np.sin(np.arange(D))
    return x


def paper_pian(x0: np.ndarray, alpha_bar: np.ndarray, first: int, steps) -> np.ndarray:
    """The authors' PIAN in numpy: ε0 = ε(x0, first step), ε0 ← ε0 / mean|ε0| · √(2/π), then per step
    d_t = Σ|ε0 − ε(√ᾱ_t x0 + √(1−ᾱ_t) ε0, t)|^4. Returned as −log d_t^{1/4} (our per-step score)."""
    e0 = eps_np(x0, first)
    e0 = e0 / np.abs(e0).mean(axis=1, keepdims=True) * (2.0 / np.pi) ** 0.5
    cols = []
    for t in steps:
        back = eps_np(np.sqrt(alpha_bar[t]) * x0 + np.sqrt(1.0 - alpha_bar[t]) * e0, t)
        cols.append(-0.25 * np.log((np.abs(e0 - back) ** 4).sum(axis=1)))
    return np.stack(cols, axis=1)


# pian per-step scores on TinyEps, client view (cosine T = 100, t_c = 20, steps 1, 3, 9, 20).
GOLDEN_PER_STEP = np.array([
    [-0.56092317, -0.57704104, -0.62866997, -0.73085471],
    [-0.47900986, -0.48767460, -0.52250699, -0.61313515],
    [-0.51883168, -0.53978501, -0.60428890, -0.72110899],
])
# The headline is the paper's single attack step, t = 0.2·T = 20 (issue 21; it was the mean over steps 1, 3, 9).
GOLDEN_SCORES = GOLDEN_PER_STEP[:, 3]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("cosine", T)


def _client_cache(schedule, model=None):
    view = ModelView.client(model or TinyEps(), schedule, T_C, False)
    images = torch.tensor(candidates(), dtype=torch.float32).reshape(3, *SHAPE)
    return view, model_signal_cache(view, images, None, SignalSettings(n_steps=4), torch.Generator().manual_seed(0))


def test_pian_equals_the_papers_formula_golden_numbers(schedule):
    _, cache = _client_cache(schedule)
    res = pian.score(cache.require(pian.ATTACK.signals))
    assert res.steps == (1, 3, 9, 20)
    reference = paper_pian(candidates(), schedule.alpha_bar.numpy(), 1, res.steps)
    np.testing.assert_allclose(res.per_step, reference, rtol=1e-6)       # the independent implementation
    np.testing.assert_allclose(res.per_step, GOLDEN_PER_STEP, rtol=1e-6)  # and the golden numbers (7 digits)
    np.testing.assert_allclose(res.scores, GOLDEN_SCORES, rtol=1e-6)
    np.testing.assert_allclose(reference, GOLDEN_PER_STEP, rtol=1e-6)


def test_pian_normalisation_is_mean_abs_not_l2_norm():
    rng = np.random.default_rng(0)
    eps = rng.normal(size=(5, 64)) * rng.uniform(0.1, 3.0, size=(5, 1))
    out = pian.rescale_rows(eps)
    np.testing.assert_allclose(np.abs(out).mean(axis=1), np.sqrt(2.0 / np.pi), rtol=1e-12)
    np.testing.assert_allclose(out, eps / np.abs(eps).mean(axis=1, keepdims=True) * np.sqrt(2 / np.pi), rtol=1e-12)
    torch_out = pian_normalise(torch.tensor(eps, dtype=torch.float64))
    np.testing.assert_allclose(torch_out.numpy(), out, rtol=1e-12)
    assert not np.allclose(np.linalg.norm(out, axis=1), np.sqrt(64))  # not the old √D-norm rescaling
    np.testing.assert_array_equal(pian.rescale_rows(np.zeros((1, 4))), np.zeros((1, 4)))


def test_pia_matches_the_papers_distance(schedule):
    _, cache = _client_cache(schedule)
    res = pia.score(cache.require(pia.ATTACK.signals))
    x0, ab = candidates(), schedule.alpha_bar.numpy()
    e0 = eps_np(x0, 1)
    cols = [-0.25 * np.log((np.abs(e0 - eps_np(np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * e0, t)) ** 4).sum(1))
            for t in res.steps]
    # At t = 1 the model barely moves ε0: float32 queries lose a few digits in ε0 − ε_t there.
    np.testing.assert_allclose(res.per_step, np.stack(cols, 1), rtol=1e-5)


@pytest.mark.parametrize("role", ["client", "server"])
def test_eps0_is_queried_at_the_first_trained_step(role, schedule):
    model = TinyEps()
    make = ModelView.client if role == "client" else ModelView.server
    view = make(model, schedule, T_C, False)
    images = torch.tensor(candidates(), dtype=torch.float32).reshape(3, *SHAPE)
    cache = model_signal_cache(view, images, None, SignalSettings(n_steps=4), torch.Generator().manual_seed(0))
    cache.get("eps_origin")
    first = 1 if role == "client" else T_C + 1
    assert model.asked == [first] and view.t_min == first
    # The server's data point is the noise-free payload a_{t_c} x0, queried at t_c + 1 (not at t_c).
    d = schedule.a(view.origin) * candidates()
    np.testing.assert_allclose(cache.get("eps_origin"), eps_np(d, first), rtol=1e-5, atol=1e-6)


def test_every_attack_keeps_its_per_step_results(schedule):
    _, cache = _client_cache(schedule)
    m = len(cache.get("steps"))
    for name in ("loss", "sima", "pia", "pian", "secmi"):
        res = ATTACKS.get(name).score(cache.require(ATTACKS.get(name).signals))
        assert res.per_step is not None and res.per_step.shape[0] == 3 and len(res.steps) == res.per_step.shape[1], name
        assert res.per_step.shape[1] == m  # one column per query (or probe) step
    images = torch.tensor(candidates(), dtype=torch.float32).reshape(3, *SHAPE)
    view = {"tensor": images[:2] * 0.5, "t": torch.full((2,), T_C)}
    pcache = payload_signal_cache(images, view, schedule, images[:1], views_per_image=2)
    for name in ("payload-lr", "payload-lr-single", "payload-lr-fused"):
        res = ATTACKS.get(name).score(pcache.require(ATTACKS.get(name).signals))
        assert res.per_step is not None and res.per_step.shape == (3, len(res.steps)) and res.steps == (T_C,), name


def test_the_headline_is_the_papers_single_attack_step():
    """PIA's paper attacks at t = 200 of T = 1000: 0.2 of the model's own chain, clipped to its trained steps
    (a client owns 1..t_c; the server's data sit at t_c and it owns t_c+1..T)."""
    assert pia.paper_step(0, 1, 900, 1000) == 200      # a client at c = 0.9
    assert pia.paper_step(0, 1, 100, 1000) == 100      # a client at c = 0.1: clipped to what it trained on
    assert pia.paper_step(900, 901, 1000, 1000) == 920  # the server at c = 0.9: 0.2 into its own chain
    assert pia.paper_step(0, 1, 20, 100) == 20
