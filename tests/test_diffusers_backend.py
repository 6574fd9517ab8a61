"""The diffusers backend (DESIGN §9): schedules from scheduler configs, the ε interface, training with it."""
import json

import numpy as np
import pytest
import torch

from collafuse.backends import DiffusersDenoiser, DiffusersSpec, eps_from_prediction
from collafuse.config import config_from_dict
from collafuse.errors import ConfigError
from collafuse.sampling import collaborative_sample, reverse_chain
from collafuse.schedule import NoiseSchedule, diffusers_schedule_fields, q_sample
from collafuse.training import build_model, denoiser_spec

from conftest import tiny_config_dict

import diffusers  # noqa: F401  (the test extra installs it: these tests never skip)

# A UNet2DModel small enough to train in seconds on a CPU.
TINY_UNET = {"backend": "diffusers", "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
             "add_attention": False}


def diffusers_config(**overrides) -> dict:
    raw = {**tiny_config_dict(), "server_model": dict(TINY_UNET), "client_model": dict(TINY_UNET)}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


SCHEDULER_CONFIGS = [
    {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"num_train_timesteps": 500, "beta_schedule": "linear", "beta_start": 0.0005, "beta_end": 0.03},
    {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
    {"num_train_timesteps": 50, "trained_betas": np.linspace(1e-3, 0.2, 50).tolist()},
]


@pytest.mark.parametrize("scheduler_config", SCHEDULER_CONFIGS, ids=lambda c: c.get("beta_schedule", "trained"))
def test_schedule_and_index_mapping_match_ddpm_scheduler_add_noise(scheduler_config):
    """diffusers step k (0..T−1) is this project's step k + 1: x_{k+1} = add_noise(x0, ε, k) to float precision."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**scheduler_config)
    fields = diffusers_schedule_fields(json.loads(json.dumps(dict(scheduler.config))))
    ours = NoiseSchedule.create(fields["schedule"], fields["T"], fields.get("beta_start"), fields.get("beta_end"),
                                fields.get("betas"))
    T = fields["T"]
    assert ours.T == T == scheduler_config["num_train_timesteps"]
    torch.testing.assert_close(ours.alpha_bar[1:].float(), scheduler.alphas_cumprod, rtol=2e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((6, 3, 4, 4), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    steps = torch.tensor([0, 1, T // 3, T // 2, T - 2, T - 1])
    theirs = scheduler.add_noise(x0, noise, steps)
    torch.testing.assert_close(q_sample(x0, steps + 1, noise, ours.alpha_bar), theirs, rtol=1e-5, atol=1e-5)  # float32 in diffusers
    # An off-by-one would be far off at the noisy end and at the first step.
    assert not torch.allclose(q_sample(x0, steps, noise, ours.alpha_bar)[:2], theirs[:2], atol=1e-4)


def test_squaredcos_cap_v2_is_the_cosine_schedule_and_bad_configs_are_refused():
    fields = diffusers_schedule_fields({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    assert fields == {"T": 1000, "schedule": "cosine"}
    for bad, words in [
        ({"beta_schedule": "sigmoid"}, "not supported"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
        ({"beta_start": "a"}, "beta_start"),
        ({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}, "strictly between"),
        ({"rescale_betas_zero_snr": True}, "zero"),
    ]:
        with pytest.raises(ConfigError, match=words):
            diffusers_schedule_fields(bad)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_convert_to_the_noise(kind):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn((5, 2, 3, 3), generator=g), torch.randn((5, 2, 3, 3), generator=g)
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.002]).double().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(eps_from_prediction(target.double(), x_t, ab, kind), eps.double())


def test_the_wrapper_feeds_diffusers_timesteps_and_labels_with_a_null_class():
    spec = DiffusersSpec(in_channels=1, sample_size=8, num_classes=3,
                         unet_kwargs=tuple(sorted({k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in TINY_UNET.items() if k != "backend"}.items())))
    model = build_model(spec, 0).eval()
    assert isinstance(model, DiffusersDenoiser) and model.null_class == 3
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 40]), torch.tensor([0, 2])
    with torch.no_grad():
        direct = model.unet(x, t - 1, class_labels=y).sample
        assert torch.equal(model(x, t, y), direct)
        assert torch.equal(model(x, t, None), model.unet(x, t - 1, class_labels=torch.tensor([3, 3])).sample)
        assert not torch.allclose(model(x, t, y), model.unet(x, t, class_labels=y).sample)  # the offset matters
    collafuse_spec = DiffusersSpec(**{**spec.__dict__, "timestep_offset": 0})
    other = build_model(collafuse_spec, 0).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x, t, y), model.unet(x, t, class_labels=y).sample)


def test_model_sections_validate_diffusers_arguments():
    for bad, words in [
        ({"backend": "diffusers", "sample_size": 8}, "set by collafuse"),
        ({"backend": "diffusers", "in_channels": 3}, "set by collafuse"),
        ({"backend": "diffusers", "num_class_embeds": 11}, "set by collafuse"),
        ({"backend": "diffusers", "block_channels": [8]}, "takes no argument 'block_channels'"),
        ({"backend": "diffusers", "class_embed_type": "timestep"}, "class_embed_type"),
        ({"backend": "diffusers", "prediction_type": "score"}, "prediction_type"),
        ({"backend": "diffusers", "layers_per_block": {"a": 1}}, "layers_per_block"),
        ({"backend": "tensorflow"}, "backend"),
    ]:
        raw = tiny_config_dict()
        raw["server_model"] = bad  # the whole section (tiny_config_dict merges into the native one)
        with pytest.raises(ConfigError, match=words):
            config_from_dict(raw)
    # Native sections stay as they were (no `backend` key in the YAML: old configs and hashes unchanged).
    native = config_from_dict(tiny_config_dict())
    assert "backend" not in native.model_dump(mode="json")["server_model"]
    with pytest.raises(ConfigError, match="server_model.channels"):
        config_from_dict(tiny_config_dict(server_model={"channels": [0, 16]}))
    # A UNet2DModel that cannot be built is one line when it is built.
    cfg = config_from_dict({**tiny_config_dict(), "server_model": {**TINY_UNET, "norm_num_groups": 5}})
    with pytest.raises(ConfigError, match="UNet2DModel refused"):
        build_model(denoiser_spec(cfg, "server", 0), 0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_c0_split_sampler_equals_plain_sampler_with_a_diffusers_model(sampler):
    cfg = config_from_dict(diffusers_config(diffusion={"T": 30, "cut_ratio": 0.0}, data={"image_size": 8}))
    model = build_model(denoiser_spec(cfg, "server", 3), 0).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    sched = NoiseSchedule.from_config(cfg.diffusion)
    y = torch.tensor([0, 1, 2, 0])
    split = collaborative_sample(model, None, sched, 0, (4, 1, 8, 8), torch.Generator().manual_seed(5), y, sampler,
                                 10, guidance=1.5)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn((4, 1, 8, 8), generator=g)
    plain = reverse_chain(model, sched.alpha_bar, 30, 0, x_T, g, y, sampler, 10, 1.5, clip_x0=1.0)
    assert torch.equal(split, plain)


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory):
    from collafuse.runs import create_run

    cfg = config_from_dict(diffusers_config())
    return create_run(cfg, tmp_path_factory.mktemp("diffusers") / "run", progress=False)


def test_a_diffusers_run_trains_loads_and_its_payloads_have_the_marginal_of_q(diffusers_run):
    from collafuse.runs import Run
    from collafuse.transcript import AuditKey, ServerView

    run = Run.load(diffusers_run, device="cpu")
    assert all(isinstance(m, DiffusersDenoiser) for m in [run.server_model, *run.client_models])
    log = [json.loads(line) for line in (diffusers_run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(v) for e in log for k, v in e.items() if isinstance(v, float))
    # What crossed: cut payloads p = a x0 + s ε' with fresh noise (DESIGN §2.2 step 2).
    rows, key = ServerView.open(diffusers_run).load(), AuditKey.open(diffusers_run)
    data, _ = run.load_data()
    member = key.member_index[torch.argsort(key.seq)]
    t_c = run.t_hand
    assert bool((rows["t"] == t_c).all())
    noise = (rows["tensor"] - run.schedule.a(t_c) * data.images[member]) / run.schedule.s(t_c)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(noise.var()) == pytest.approx(1.0, rel=0.03)
    # The saved weights are the trained ones: the loaded model answers as the run's own checkpoint.
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = run.client_models[0](x, torch.tensor([1, 5, t_c]), torch.tensor([0, 1, 2]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all()) and float(out.abs().mean()) > 0


def test_sample_and_export_work_on_a_diffusers_run(diffusers_run, tmp_path):
    from diffusers import UNet2DModel

    from collafuse.cli import main

    assert main(["sample", "--run", str(diffusers_run), "-n", "4", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["images"].shape == (4, 16, 16, 1) and npz["images"].dtype == np.uint8
    assert main(["export", str(diffusers_run), "--out", str(tmp_path / "exported")]) == 0
    # The exported client is a plain diffusers model: from_pretrained reads it (locally, safetensors).
    unet = UNet2DModel.from_pretrained(str(tmp_path / "exported" / "models" / "client_0"), use_safetensors=True)
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 16


def test_dp_sgd_trains_a_diffusers_client(tmp_path):
    from collafuse.api import train

    raw = diffusers_config(training={"epochs": 1},
                           defenses=[{"name": "dp-sgd", "target": "clients", "sigma": 1.0, "C": 1.0}])
    run = train(raw, tmp_path / "dp")
    spent = [h for h in run.info["hooks"] if h.get("name") == "dp-sgd"]
    assert spent and all(np.isfinite(v) for v in spent[0]["epsilon"].values())


def test_nothing_imports_diffusers_unless_a_diffusers_backend_is_asked_for(tmp_path):
    import subprocess
    import sys

    code = """
import sys
import collafuse.api, collafuse.cli, collafuse.deployment, collafuse.runs
import collafuse.attacks.membership.engine, collafuse.attacks.reconstruction.engine, collafuse.benchmarks.audit.cells
from collafuse.config import config_from_dict
from collafuse.training import build_model, denoiser_spec
cfg = config_from_dict({"server_model": {"channels": [8, 16], "time_dim": 16}})
build_model(denoiser_spec(cfg, "server", 10), 0)
assert "diffusers" not in sys.modules, "diffusers imported for a native config"
config_from_dict({"server_model": {"backend": "diffusers", "block_out_channels": [8, 16]}})
assert "diffusers" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_opacus_unsupported_layer_is_named_in_one_line():
    from collafuse.defenses.dp_sgd import private_model

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="cannot train the client 0 model privately: .*BatchNorm"):
        private_model(model, "client 0")
    assert private_model(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4)), "server")


def test_samples_of_a_trained_diffusers_system_beat_chance_with_the_judge(tmp_path):
    """Server and clients both UNet2DModel, trained by `collafuse train`: its samples are recognisably their
    class (chance 0.1; measured 0.92 and 0.84 per client with this recipe, 8×8 digits)."""
    from collafuse.api import train
    from collafuse.benchmarks.sample_quality import conditional_sample_accuracy

    unet = {**TINY_UNET, "block_out_channels": [16, 32], "norm_num_groups": 8}
    raw = {**tiny_config_dict(data={"image_size": 8, "n_members": 384, "n_nonmembers": 64, "n_aux": 64},
                              training={"epochs": 25, "batch_size": 32, "lr": 0.002},
                              sampling={"steps": 20, "per_client": 2, "guidance": 2.0}),
           "seed": 0, "server_model": unet, "client_model": unet}
    raw["diffusion"] = {"T": 50, "cut_ratio": 0.2}
    quality = conditional_sample_accuracy(train(raw, tmp_path / "run"), per_class=10)
    assert quality["judge_accuracy_on_real_members"] > 0.8  # the judge itself is competent
    assert min(quality["sample_accuracy_per_client"]) >= 0.5, quality
