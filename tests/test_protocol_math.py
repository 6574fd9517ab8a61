"""Statistical checks of the split protocol against closed forms (DESIGN §2.2, §2.3)."""
import pytest
import torch
from torch import nn

from collafuse.model import UNet, UNetConfig
from collafuse.protocol import server_noising
from collafuse.sampling import collaborative_sample, reverse_chain, server_handoff
from collafuse.schedule import NoiseSchedule, q_sample

MU, VAR0 = 0.4, 0.09  # toy data: x0 ~ N(MU, VAR0) independently per pixel


class IdealDenoiser(nn.Module):
    """E[noise | x_t] for Gaussian data N(mean, var) noised on a schedule ``alpha_bar``.

    x_t = √ᾱ·d + √(1−ᾱ)·n with d ~ N(mean, var) ⇒ E[n | x_t] = √(1−ᾱ)(x_t − √ᾱ·mean)/(ᾱ·var + 1 − ᾱ).
    """

    null_class = 0

    def __init__(self, alpha_bar: torch.Tensor, mean: float, var: float):
        super().__init__()
        self.alpha_bar, self.mean, self.var = alpha_bar, mean, var

    def forward(self, x, t, y=None):
        ab = self.alpha_bar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mean) / (ab * self.var + 1 - ab)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_server_noising_has_the_marginal_of_q(schedule):
    # x_t = √ᾱ'_t p + √(1−ᾱ'_t) η with p = a_c x0 + s_c ε' must be N(a_t x0, s_t²) (§2.2 step 3).
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule.create(schedule, 1000)
    n, t_c = 200_000, 200
    x0 = torch.full((n, 1, 1, 1), -0.6)
    p = q_sample(x0, torch.full((n,), t_c), torch.randn(x0.shape, generator=g), sched.alpha_bar)
    for t in (201, 500, 1000):
        xt = server_noising(p, torch.full((n,), t_c), torch.full((n,), t), torch.randn(x0.shape, generator=g), sched)
        assert float(xt.mean()) == pytest.approx(-0.6 * sched.a(t), abs=0.006)
        assert float(xt.var()) == pytest.approx(sched.s(t) ** 2, rel=0.02)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_split_chain_with_ideal_denoisers_returns_the_data(sampler):
    # Both samplers are discretisations: with T = 1000 (DDIM: 400 steps) the bias is < 3 %,
    # a wrong schedule on either side is off by far more.
    sched = NoiseSchedule.create("cosine", 1000)
    t_c = 300
    a_c, s_c = sched.a(t_c), sched.s(t_c)
    payload_mean, payload_var = a_c * MU, a_c**2 * VAR0 + s_c**2
    server = IdealDenoiser(sched.relative(t_c), payload_mean, payload_var)
    client = IdealDenoiser(sched.alpha_bar, MU, VAR0)
    shape = (2000, 1, 2, 2)

    # The server's chain (trained on its relative schedule) hands off samples distributed as x_{t_c}.
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(shape, generator=g).double()
    handoff = server_handoff(server, sched, t_c, x_T, g, sampler=sampler, server_steps=400, data_bound=None)
    assert float(handoff.mean()) == pytest.approx(payload_mean, abs=0.01)
    assert float(handoff.var()) == pytest.approx(payload_var, rel=0.05)

    # The whole split chain returns the data distribution.
    g = torch.Generator().manual_seed(2)
    x0 = collaborative_sample(server, client, sched, t_c, shape, g, sampler=sampler, ddim_steps=600, data_bound=None)
    assert float(x0.mean()) == pytest.approx(MU, abs=0.01)
    assert float(x0.var()) == pytest.approx(VAR0, rel=0.05)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_c0_split_sampler_equals_plain_sampler(sampler):
    sched = NoiseSchedule.create("cosine", 30)
    torch.manual_seed(0)
    model = UNet(UNetConfig(channels=(8, 16), time_dim=16, num_classes=3)).eval()
    nn.init.normal_(model.out.weight, std=0.05)  # a non-trivial predictor
    y = torch.tensor([0, 1, 2, 0])
    split = collaborative_sample(
        model, None, sched, 0, (4, 1, 8, 8), torch.Generator().manual_seed(5), y, sampler, 10, guidance=1.5
    )
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn((4, 1, 8, 8), generator=g)
    plain = reverse_chain(model, sched.alpha_bar, 30, 0, x_T, g, y, sampler, 10, 1.5, clip_x0=1.0)
    assert torch.equal(split, plain)


def test_c1_sampler_uses_only_the_client():
    sched = NoiseSchedule.create("cosine", 20)
    client = IdealDenoiser(sched.alpha_bar, MU, VAR0)
    x = collaborative_sample(None, client, sched, 20, (2000, 1, 2, 2), torch.Generator().manual_seed(0), sampler="ddpm", data_bound=None)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
