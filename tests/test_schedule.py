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


@pytest.mark.parametrize(
    "c,T,expected",
    # round() is round-half-to-even: 2.5 → 2, 3.5 → 4, 4.5 → 4 (pinned; a switch to floor or ceil breaks these).
    [(0.0, 1000, 0), (1.0, 1000, 1000), (0.2, 1000, 200), (0.25, 10, 2), (0.35, 10, 4), (0.45, 10, 4),
     (0.5, 7, 4), (0.125, 100, 12), (0.333, 1000, 333)],
)
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


# Golden values, computed once with this code (float64) and cross-checked against a
# 50-digit mpmath evaluation of the definitions: ᾱ_t = Π_{i≤t}(1 − β_i) with the linear
# β_i = 1e-4 + (0.02 − 1e-4)(i − 1)/(T − 1), and the cosine β_i = min(1 − f(i)/f(i−1), 0.999),
# f(t) = cos²((t/T + 0.008)/1.008 · π/2). Agreement was within 2e-15 relative, except the
# cosine's last two steps (1.6e-13: β is clipped there and the product is ~1e-9).
LINEAR_ALPHA_BAR_1000 = {
    1: 0.9999,
    50: 0.9710157229394402,
    200: 0.6590385082317941,
    500: 0.07858724288177824,
    800: 0.0015320895496479475,
    999: 4.118193638138444e-05,
    1000: 4.0358297653756754e-05,
}
COSINE_ALPHA_BAR_1000 = {
    1: 0.999958715775178,
    50: 0.9920072786842191,
    200: 0.8987059205995089,
    500: 0.4938435904406382,
    800: 0.0940456126766539,
    999: 2.4287669070348544e-06,
    1000: 2.4287669070348567e-09,  # β_1000 is clipped at 0.999: ᾱ_999 · 0.001
}


@pytest.mark.parametrize("name, golden", [("linear", LINEAR_ALPHA_BAR_1000), ("cosine", COSINE_ALPHA_BAR_1000)])
def test_alpha_bar_golden_values(name, golden):
    sched = NoiseSchedule.create(name, 1000)
    for t, value in golden.items():
        assert float(sched.alpha_bar[t]) == pytest.approx(value, rel=1e-9), t


def test_alpha_bar_golden_values_at_another_T():
    # The cosine schedule depends on t/T only (away from the clipped end): T = 100 at t = 20 equals T = 1000 at 200.
    sched = NoiseSchedule.create("cosine", 100)
    golden = {1: 0.9993687184016583, 20: 0.8987059205995087, 50: 0.49384359044063775,
              99: 0.00024285722793500596, 100: 2.4285722793500615e-07}
    for t, value in golden.items():
        assert float(sched.alpha_bar[t]) == pytest.approx(value, rel=1e-9), t
    assert float(sched.alpha_bar[20]) == pytest.approx(COSINE_ALPHA_BAR_1000[200], rel=1e-12)


def test_signal_and_noise_scales_golden_values():
    cosine, linear = NoiseSchedule.create("cosine", 1000), NoiseSchedule.create("linear", 1000)
    # DESIGN §5's design point, to 10 digits (mpmath: 0.94800101297388, 0.31826730809257).
    assert cosine.a(200) == pytest.approx(0.9480010129738834, rel=1e-9)
    assert cosine.s(200) == pytest.approx(0.3182673080925703, rel=1e-9)
    assert linear.a(800) == pytest.approx(0.039141915508160145, rel=1e-9)
    assert linear.s(800) == pytest.approx(0.9992336615878951, rel=1e-9)
    assert cosine.a(200) ** 2 + cosine.s(200) ** 2 == pytest.approx(1.0, abs=1e-15)


def test_relative_schedule_golden_values():
    # ᾱ'_t = ᾱ_t/ᾱ_{t_c}, cross-checked as the ratio of the mpmath ᾱ values above.
    cosine = NoiseSchedule.create("cosine", 1000).relative(200)
    for t, value in {201: 0.998950705570988, 500: 0.5495052153558807, 1000: 2.7025157522214545e-09}.items():
        assert float(cosine[t]) == pytest.approx(value, rel=1e-9), t
    linear = NoiseSchedule.create("linear", 1000).relative(300)
    # One step past the cut: 1 − β_301 = 1 − (1e-4 + 0.0199·300/999), exactly.
    assert float(linear[301]) == pytest.approx(1 - (1e-4 + 0.0199 * 300 / 999), rel=1e-12)
    for t, value in {301: 0.993924024024024, 700: 0.017572561383034296, 1000: 0.00010180697780784294}.items():
        assert float(linear[t]) == pytest.approx(value, rel=1e-9), t
    short = NoiseSchedule.create("cosine", 100).relative(30)
    for t, value in {31: 0.983601306846579, 60: 0.4330983446401065, 100: 3.086211513172393e-07}.items():
        assert float(short[t]) == pytest.approx(value, rel=1e-9), t


@pytest.mark.parametrize(
    "t_start, t_stop, n, expected",
    [
        (1000, 200, 50, list(range(1000, 200, -16))),  # 800/50 = 16 exactly
        (1000, 0, 10, [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]),
        # 100 − 80k/7 = 88.57, 77.14, 65.71, 54.29, 42.86, 31.43 rounded to the nearest step
        (100, 20, 7, [100, 89, 77, 66, 54, 43, 31]),
        (10, 0, 4, [10, 8, 5, 2]),  # 7.5 → 8 and 2.5 → 2: round half to even
        (50, 10, 100, list(range(50, 10, -1))),  # more steps than the span: every step once
    ],
)
def test_ddim_timesteps_golden(t_start, t_stop, n, expected):
    assert ddim_timesteps(t_start, t_stop, n) == expected


def test_q_sample_marginal():
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule.create("cosine", 1000)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    t = torch.full((200_000,), 500)
    xt = q_sample(x0, t, torch.randn(x0.shape, generator=g), sched.alpha_bar)
    assert float(xt.mean()) == pytest.approx(sched.a(500) * 0.7, abs=0.01)
    assert float(xt.var()) == pytest.approx(sched.s(500) ** 2, rel=0.02)
