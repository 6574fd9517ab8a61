"""``dp-sgd``: per-image clipping after noise multiplicity, Opacus' ε = a direct accountant call, and less leakage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from collafuse.config import config_from_dict
from collafuse.data import ImageSet, Splits, load_digits16
from collafuse.defenses import build_hooks
from collafuse.defenses.accounting import dpsgd_epsilon
from collafuse.defenses.dp_sgd import MultiplicityDPOptimizer, PrivateUNet, _Side, fold_multiplicity
from collafuse.model import UNet, UNetConfig
from collafuse.schedule import NoiseSchedule, q_sample
from collafuse.training import train_system

from conftest import tiny_config


SCHEDULE = NoiseSchedule.create("cosine", 50)


def _tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(channels=(8, 16), time_dim=16))
    torch.nn.init.normal_(model.out.weight, std=0.05)  # not the zero predictor: gradients reach every layer
    return model


def _per_image_grads(model: UNet, x0, t, noise, k: int) -> list[torch.Tensor]:
    """Slow, obvious oracle: for each image, ∇ of the mean over its K rows of ‖ε − ε_θ(x_t, t)‖²/d, flattened."""
    grads = []
    for i in range(x0.shape[0]):
        rows = slice(i * k, (i + 1) * k)
        x_t = q_sample(x0[i : i + 1].repeat(k, 1, 1, 1), t[rows], noise[rows], SCHEDULE.alpha_bar)
        loss = (model(x_t, t[rows]) - noise[rows]).pow(2).mean()
        g = torch.autograd.grad(loss, list(model.parameters()))
        grads.append(torch.cat([x.flatten() for x in g]))
    return grads


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_noise_multiplicity_is_averaged_per_image_before_clipping(clip):
    k, b = 3, 4
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.randint(1, 51, (b * k,), generator=gen)
    noise = torch.randn(b * k, 1, 8, 8, generator=gen)
    oracle_model = _tiny_unet()
    per_image = _per_image_grads(oracle_model, x0, t, noise, k)
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in per_image]
    expected = torch.stack(clipped).sum(0) / b

    model = PrivateUNet(_tiny_unet(), loss_reduction="mean")
    opt = MultiplicityDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=b, multiplicity=k,
    )
    x_t = q_sample(x0.repeat_interleave(k, 0), t, noise, SCHEDULE.alpha_bar)  # image-major rows, as the core lays them out
    loss = (model(x_t, t) - noise).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.pre_step()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    if clip < 1:
        # Clipping each ROW and then averaging (the wrong order) gives something else.
        assert not torch.allclose(fold_multiplicity(torch.stack(per_image).repeat_interleave(k, 0), k), torch.stack(clipped))


def test_an_empty_poisson_batch_is_a_counted_noise_only_step():
    model = PrivateUNet(_tiny_unet(), loss_reduction="mean")
    before = [p.detach().clone() for p in model.parameters()]
    opt = MultiplicityDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    steps = []
    opt.attach_step_hook(lambda o: steps.append(o.noise_multiplier))
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert steps == [1.0]
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(model.parameters(), before))
    assert moved > 0  # the noise was added


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    config = tiny_config(
        data={"image_size": 8},
        training={"epochs": 2},
        defenses=[{"name": "dp-sgd", "epsilon": 8.0, "target": "both", "C": 1.0, "multiplicity": 2, "accountant": "rdp"}],
    )
    hooks = build_hooks(config.defenses, config)
    out = tmp_path_factory.mktemp("dp")
    log = []
    from collafuse.runs import prepare_data

    data, splits = prepare_data(config)
    system = train_system(config, data, splits, out, hooks, progress=False, log_line=log.append)
    return config, hooks.training[0], log, system


def test_opacus_epsilon_equals_a_direct_accountant_call(dp_run):
    config, hook, log, _ = dp_run
    info = json.loads(json.dumps(hook.describe()))  # what run.json stores
    # The history, rebuilt without the hook: 64 images per client, batches of 32 → q = 1/2, 2 batches per epoch.
    q, batches, epochs = 0.5, 2, config.training.epochs
    expected_steps = {"server": epochs * batches * 2, "client_0": epochs * batches, "client_1": epochs * batches}
    for key, steps in expected_steps.items():
        sigma = info["noise_multiplier"][key]
        direct = dpsgd_epsilon([(sigma, q, steps)], 1e-5, "rdp")
        assert info["epsilon"][key] == pytest.approx(direct, rel=1e-6)
        assert 7.5 < info["epsilon"][key] <= 8.0  # calibrated to the target
        assert info["history"][key] == [[sigma, q, steps]]
    assert info["protects_payloads"] is False and info["threats"] == ["T2", "T3", "T4", "T5"]
    # ε is logged after every epoch and only grows.
    eps = [entry["dp-sgd.server.epsilon"] for entry in log]
    assert len(eps) == epochs and eps[0] < eps[1] == pytest.approx(info["epsilon"]["server"])
    clients = [entry["dp-sgd.client_0.epsilon"] for entry in log]  # clients are client_<k> everywhere
    assert clients[-1] == pytest.approx(info["epsilon"]["client_0"])


def test_prv_accountant_of_a_side_equals_a_direct_call():
    opt = MultiplicityDPOptimizer(
        torch.optim.SGD(_tiny_unet().parameters(), lr=0.0), noise_multiplier=1.3, max_grad_norm=1.0,
        expected_batch_size=4,
    )
    side = _Side(opt, 0.25, "prv")
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        opt.step()
    assert side.history() == [(1.3, 0.25, 30)]
    assert side.accountant.get_epsilon(delta=1e-5) == pytest.approx(dpsgd_epsilon([(1.3, 0.25, 30)], 1e-5, "prv"), rel=1e-9)


def test_dp_models_still_train_and_unwrap(dp_run):
    _, _, log, system = dp_run
    assert type(system.server_model) is UNet and all(type(m) is UNet for m in system.client_models)
    assert all(entry["server_loss"] is not None and entry["server_loss"] < 5 for entry in log)


def _canary_gap(private: bool, out_dir: Path) -> float:
    """How much including one outlier image ("canary") lowers the client model's loss on it: the
    signal a loss-threshold membership attack (T3) reads. Two trainings with every seed shared."""
    digits = load_digits16(1, 8)
    canary = torch.ones(1, 1, 8, 8)
    canary[..., ::2, ::2] = -1.0  # a checkerboard: nothing like a digit
    images = torch.cat([digits.images[:24], canary])
    data = ImageSet(images, None, 0)
    defenses = [{"name": "dp-sgd", "sigma": 2.0, "C": 0.05, "target": "clients", "accountant": "rdp"}] if private else []
    raw = {
        "seed": 3, "device": "cpu", "conditional": False,
        "data": {"image_size": 8, "n_members": 24, "n_nonmembers": 0, "n_aux": 0, "num_clients": 1},
        "diffusion": {"T": 50, "cut_ratio": 1.0},
        "client_model": {"channels": [8, 16], "time_dim": 16},
        "server_model": {"channels": [8, 16], "time_dim": 16},
        "training": {"epochs": 120, "batch_size": 25, "lr": 3e-3},
        "defenses": defenses,
    }
    losses = []
    for members in (torch.arange(25), torch.arange(24)):
        config = config_from_dict(raw)
        splits = Splits(members, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), (members,))
        hooks = build_hooks(config.defenses, config) if private else None
        from collafuse.training import Hooks

        system = train_system(config, data, splits, out_dir / f"{len(members)}", hooks or Hooks(), progress=False)
        model = system.client_models[0].eval()
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(1, 15, (256,), generator=gen)
        noise = torch.randn(256, 1, 8, 8, generator=gen)
        with torch.no_grad():
            x_t = q_sample(canary.repeat(256, 1, 1, 1), t, noise, SCHEDULE.alpha_bar)
            losses.append(float((model(x_t, t) - noise).pow(2).mean()))
    return losses[1] - losses[0]  # loss without the canary − loss with it


def test_dp_sgd_shrinks_the_membership_signal_of_a_canary(tmp_path):
    plain, private = _canary_gap(False, tmp_path / "plain"), _canary_gap(True, tmp_path / "private")
    assert plain > 0.03
    assert private < plain / 4
