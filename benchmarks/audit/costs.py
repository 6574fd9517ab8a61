"""What a configuration costs the client, from its run config alone (DESIGN.md §6; no training).

- :func:`denoiser_flops`: FLOPs of one UNet forward pass on one image (torch's FlopCounterMode);
- :func:`sampling_evaluations`: denoiser evaluations per generated image on each side, exactly
  as :func:`collafuse.sampling.collaborative_sample` runs them;
- :func:`compute_costs`: the client's shares of evaluations and FLOPs in training and sampling,
  GFLOPs per side, payload bytes per image per epoch.

What the defenses change (the hand-off step t' after payload noise, the wire bytes of a
payload row, DP-SGD's noise multiplicity) is read from the defenses' own typed value,
:func:`collafuse.defenses.defense_effects`, never re-derived from config keys here.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from collafuse.config import ModelConfig, RunConfig
from collafuse.defenses import defense_effects
from collafuse.sampling import split_ddim_steps
from collafuse.schedule import ddim_timesteps
from collafuse.training import ModelSpec, build_model, model_spec

__all__ = ["denoiser_flops", "sampling_evaluations", "compute_costs"]


@functools.lru_cache(maxsize=64)
def _unet_forward_flops(config: ModelSpec, image_size: int) -> int:
    model = build_model(config, 0).eval()
    x = torch.zeros(1, config.in_channels, image_size, image_size)
    t = torch.ones(1, dtype=torch.long)
    y = torch.zeros(1, dtype=torch.long) if config.num_classes > 0 else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return int(counter.get_total_flops())


def denoiser_flops(model_config: ModelConfig, channels: int, image_size: int, num_classes: int) -> int:
    """FLOPs of ONE forward pass of the UNet on ONE image (batch 1), measured by torch's FlopCounterMode.

    FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and
    matrix products (the linear layers); GroupNorm, SiLU, additions, nearest
    upsampling and the class-embedding lookup are not counted (a few per cent at
    most). So the count does not depend on ``num_classes``.
    """
    if not isinstance(model_config, ModelConfig):
        # The conversion of v / x0 outputs to ε is elementwise (not counted); the network's FLOPs do not change.
        model_config = model_config.model_copy(update={"prediction_type": "epsilon"})
    return _unet_forward_flops(model_spec(model_config, channels, image_size, num_classes), image_size)


def sampling_evaluations(T: int, t_hand: int, sampler: str, steps: int, guided: bool) -> tuple[int, int]:
    """(server, client) denoiser evaluations per generated image, exactly as ``collaborative_sample`` runs them.

    DDPM: the server visits T..t_hand+1 and the client t_hand..1. DDIM: the steps are
    shared by ``split_ddim_steps`` and each side visits ``ddim_timesteps`` of its span.
    Classifier-free guidance (``guided``: labels given and guidance ≠ 0) evaluates the
    conditional and the unconditional ε at every step: twice the images per call.
    """
    if sampler == "ddpm":
        server, client = T - t_hand, t_hand
    elif sampler == "ddim":
        server_steps, client_steps = split_ddim_steps(steps, T, t_hand)
        server = len(ddim_timesteps(T, t_hand, server_steps)) if t_hand < T else 0
        client = len(ddim_timesteps(t_hand, 0, client_steps)) if t_hand > 0 else 0
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid: ddpm, ddim")
    factor = 2 if guided else 1
    return factor * server, factor * client


def _share(client: float, server: float) -> float:
    return client / (client + server) if client + server > 0 else 0.0


def compute_costs(config: RunConfig) -> dict[str, float]:
    """What a configuration costs the client, from the config alone (DESIGN.md §6).

    Training, per image per epoch: the client evaluates its UNet once on the image
    (t_c > 0) and the server once on its payload (t_c < T); DP-SGD's noise
    multiplicity K evaluates K rows per image on each private side. A backward pass
    costs ≈ 2× the forward on both sides, so the FLOPs share is the forward share and a
    training step costs ≈ 3 forwards (Opacus' per-sample gradients add more; not
    modelled). Sampling, per generated image: the evaluations of
    :func:`sampling_evaluations` at the hand-off step (the defenses' ``release_step``).

    Keys: ``client_eval_share_train``, ``client_flops_share_train``,
    ``client_eval_share_sample``, ``client_flops_share_sample`` (c = 0 → 0,
    c = 1 → 1); ``client_gflops_train_per_image_epoch``, ``server_gflops_train_per_image_epoch``;
    ``client_gflops_sample``, ``server_gflops_sample`` (per generated image);
    ``client_forward_gflops``, ``server_forward_gflops`` (one forward, one image);
    ``client_evals_sample``, ``server_evals_sample``; ``hand_off_step``;
    ``payload_bytes_per_image_epoch`` (one release per image per epoch — in
    expectation under DP-SGD's Poisson sampling; 0 when c = 1, raw-image-sized rows
    when c = 0).
    """
    T, t_c = config.diffusion.T, config.t_c
    has_client, has_server = t_c > 0, t_c < T
    d = config.data
    # The class embedding is a lookup FlopCounterMode does not count; any class count gives the same FLOPs.
    num_classes = 1 if config.conditional else 0
    f_client = denoiser_flops(config.client_model, d.channels, d.image_size, num_classes) if has_client else 0
    f_server = denoiser_flops(config.server_model, d.channels, d.image_size, num_classes) if has_server else 0
    effects = defense_effects(config.defenses, config)
    k = effects.noise_multiplicity
    evals_client_train = k["client"] if has_client else 0
    evals_server_train = k["server"] if has_server else 0

    t_hand = effects.release_step
    s = config.sampling
    guided = config.conditional and s.guidance != 0.0
    evals_server_sample, evals_client_sample = sampling_evaluations(T, t_hand, s.sampler, s.steps, guided)

    return {
        "client_eval_share_train": _share(evals_client_train, evals_server_train),
        "client_flops_share_train": _share(evals_client_train * f_client, evals_server_train * f_server),
        "client_eval_share_sample": _share(evals_client_sample, evals_server_sample),
        "client_flops_share_sample": _share(evals_client_sample * f_client, evals_server_sample * f_server),
        "client_gflops_train_per_image_epoch": 3.0 * evals_client_train * f_client / 1e9,
        "server_gflops_train_per_image_epoch": 3.0 * evals_server_train * f_server / 1e9,
        "client_gflops_sample": evals_client_sample * f_client / 1e9,
        "server_gflops_sample": evals_server_sample * f_server / 1e9,
        "client_forward_gflops": f_client / 1e9,
        "server_forward_gflops": f_server / 1e9,
        "client_evals_sample": float(evals_client_sample),
        "server_evals_sample": float(evals_server_sample),
        "hand_off_step": float(t_hand),
        "payload_bytes_per_image_epoch": float(effects.payload_row_bytes) if has_server else 0.0,
    }
