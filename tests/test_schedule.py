import math

import pytest
import torch

from collafuse.errors import ConfigError
from collafuse.schedule import NoiseSchedule, cut_step, ddim_timesteps, q_sample


def test_cosine_matches_design_facts():
    # DESIGN §5: cosine, T = 1000, t_c = 200 gives a = 0.948, s = 0.318.
    sched = NoiseSchedule.create("cosine", 1000)
    assert sched.a(200) == pytest.approx(0.948, abs=5e-4)
    assert sched.s(200) == pytest.approx(0.318, abs=5e-4)
    assert sched.alpha_bar[0] == 1.0
    assert sched.alpha_bar.dtype == torch.float64


def test_cosine_against_closed_form():
    # ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2), wherever β is not clipped.
    T, s = 1000, 0.008
    sched = NoiseSchedule.create("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 250, 500, 900):
        assert float(sched.alpha_bar[t]) == pytest.approx(f(t) / f(0), rel=1e-9)


def test_linear_matches_definition():
    T = 1000
    sched = NoiseSchedule.create("linear", T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    prod = 1.0
    for t in range(1, T + 1):
        prod *= 1 - betas[t - 1]
        if t in (1, 100, 800, 1000):
            assert float(sched.alpha_bar[t]) == pytest.approx(prod, rel=1e-10)
    assert torch.all(sched.alpha_bar[1:] < sched.alpha_bar[:-1])


def test_relative_schedule():
    sched = NoiseSchedule.create("cosine", 100)
    assert torch.equal(sched.relative(0), sched.alpha_bar)  # t_c = 0: identical, bit for bit
    rel = sched.relative(30)
    assert torch.all(rel[:31] == 1.0)
    assert torch.allclose(rel[31:] * sched.alpha_bar[30], sched.alpha_bar[31:])


@pytest.mark.parametrize("c,T,expected", [(0.0, 1000, 0), (1.0, 1000, 1000), (0.2, 1000, 200), (0.25, 10, 2), (0.5, 7, 4)])
def test_cut_step(c, T, expected):
    assert cut_step(c, T) == expected == round(c * T)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_cut_step_rejects(bad):
    with pytest.raises(ConfigError, match="cut_ratio"):
        cut_step(bad, 100)


def test_schedule_rejects_bad_input():
    with pytest.raises(ConfigError, match="T must be at least 2"):
        NoiseSchedule.create("cosine", 1)
    with pytest.raises(ConfigError, match="valid: linear, cosine"):
        NoiseSchedule.create("sigmoid", 100)


def test_ddim_timesteps():
    steps = ddim_timesteps(1000, 200, 50)
    assert steps[0] == 1000 and all(a > b for a, b in zip(steps, steps[1:])) and steps[-1] > 200
    assert len(steps) == 50
    assert ddim_timesteps(5, 0, 50) == [5, 4, 3, 2, 1]
    assert ddim_timesteps(3, 3, 10) == []


def test_q_sample_marginal():
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule.create("cosine", 1000)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    t = torch.full((200_000,), 500)
    xt = q_sample(x0, t, torch.randn(x0.shape, generator=g), sched.alpha_bar)
    assert float(xt.mean()) == pytest.approx(sched.a(500) * 0.7, abs=0.01)
    assert float(xt.var()) == pytest.approx(sched.s(500) ** 2, rel=0.02)
