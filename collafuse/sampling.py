"""Collaborative sampling (DESIGN.md §2.3): server T → t_c, hand-off, client t_c → 0.

``reverse_chain`` is the one loop both sides run; the split is two calls to it
with different models and schedules. With t_c = 0 the split sampler is exactly
the plain single-model sampler (same code path, same noise draws).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from collafuse.protocol import server_eps_scale
from collafuse.schedule import NoiseSchedule, ddim_step, ddim_timesteps, ddpm_step

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")


def guided_eps(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    """ε̂ with classifier-free guidance: (1+w)·ε(x,t,y) − w·ε(x,t,∅); plain ε(x,t,y) when w = 0 or y is None."""
    if y is None or guidance == 0.0:
        return model(x, t, y)
    null = torch.full_like(y, model.null_class)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = eps.chunk(2)
    return (1.0 + guidance) * cond - guidance * uncond


@torch.no_grad()
def reverse_chain(
    model: nn.Module,
    alpha_bar: torch.Tensor,
    t_start: int,
    t_stop: int,
    x: torch.Tensor,
    generator: torch.Generator,
    y: torch.Tensor | None = None,
    sampler: str = "ddpm",
    ddim_steps: int = 50,
    guidance: float = 0.0,
    clip_x0: float | None = None,
    progress: str | None = None,
    eps_scale: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Denoise ``x`` from step ``t_start`` down to ``t_stop`` on the schedule ``alpha_bar`` (index = step).

    DDPM visits every step; DDIM (η = 0) visits ``ddim_steps`` evenly spaced ones and
    always lands exactly on ``t_stop``; ``eta`` > 0 makes its steps stochastic (η = 1: ancestral on that
    grid). Noise for DDPM and a stochastic DDIM comes from ``generator`` (CPU).
    ``eps_scale`` (shape (T+1,), or None for 1): a per-step factor on the model's output, for a model
    trained on another parameterisation of the same marginals (the server: :func:`server_eps_scale`).
    ``progress``: a label for a progress bar over the steps (None: no bar).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    b = x.shape[0]
    if sampler == "ddpm":
        for t in tqdm(range(t_start, t_stop, -1), desc=progress, unit="step", disable=progress is None, leave=False):
            t_batch = torch.full((b,), t, dtype=torch.long, device=x.device)
            eps = _scaled(guided_eps(model, x, t_batch, y, guidance), eps_scale, t)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = ddpm_step(x, eps, float(alpha_bar[t]), float(alpha_bar[t - 1]), noise, clip_x0)
        return x
    steps = ddim_timesteps(t_start, t_stop, ddim_steps)
    for i, t in enumerate(tqdm(steps, desc=progress, unit="step", disable=progress is None, leave=False)):
        t_next = steps[i + 1] if i + 1 < len(steps) else t_stop
        t_batch = torch.full((b,), t, dtype=torch.long, device=x.device)
        eps = _scaled(guided_eps(model, x, t_batch, y, guidance), eps_scale, t)
        noise = torch.randn(x.shape, generator=generator).to(x.device) if eta > 0 else None
        x = ddim_step(x, eps, float(alpha_bar[t]), float(alpha_bar[t_next]), clip_x0, eta, noise)
    return x


def _scaled(eps: torch.Tensor, eps_scale: torch.Tensor | None, t: int) -> torch.Tensor:
    return eps if eps_scale is None else eps * float(eps_scale[t])


SERVER_ETA = 1.0      # the server's DDIM steps before a hand-off are ancestral (see server_handoff)
MIN_STEP_SHARE = 0.2  # each side of a split chain gets at least this share of the DDIM steps


def split_ddim_steps(total: int, T: int, t_c: int) -> tuple[int, int]:
    """Share ``total`` DDIM steps between server and client: in proportion to the steps each owns, but
    each side at least ⌈total/5⌉ (as far as its span allows).

    Proportional shares starve the side with the short span (c = 0.9 with 25 steps left the server 2
    steps, c = 0.05 left the client 1), yet each side runs a whole denoising chain across a wide
    range of noise levels: the server's spans signal-to-noise from ≈ 0 up to the hand-off's. A floor of
    a fifth keeps both chains at a usable resolution; the measurements behind it are in
    docs/PERFORMANCE.md (issue 19).
    """
    server_span, client_span = T - t_c, t_c
    if server_span == 0:
        return 0, min(total, client_span)
    if client_span == 0:
        return min(total, server_span), 0
    if total < 2:
        return 1, 1  # one step each: both sides must run
    floor = max(1, math.ceil(MIN_STEP_SHARE * total))
    server = min(max(round(total * server_span / T), floor), total - floor, server_span)
    client = min(total - server, client_span)
    server = min(server_span, total - client)  # hand back what the client's span cannot use
    return server, client


@torch.no_grad()
def server_handoff(
    server_model: nn.Module, schedule: NoiseSchedule, t_c: int, x_T: torch.Tensor, generator: torch.Generator,
    y: torch.Tensor | None = None, sampler: str = "ddpm", server_steps: int = 50, guidance: float = 0.0,
    payload_kind: str = "cut", data_bound: float | None = 1.0, progress: bool = False,
) -> torch.Tensor:
    """The server's chain T → t_c from ``x_T``: the hand-off x̂_{t_c}, distributed like a payload a x0 + s ε.

    The server's state x_t has the full marginal q(x_t | x0) whatever its training parameterisation
    (§2.2 step 3), so its chain runs on the FULL schedule ᾱ_t with its noise prediction turned into the
    full ε̂ (:func:`~collafuse.protocol.server_eps_scale`) and x̂0 clipped to the data bound. On its own
    relative schedule ᾱ_t/ᾱ_{t_c} the chain would clip the "data" p̂ only to the loose payload range
    a·bound + 4s and start at near-zero signal-to-noise, where one deterministic step amplifies the
    model's error by 1/√ᾱ'_T (Lin et al. 2024): few DDIM steps then handed off saturated noise. On the
    full schedule the same error is bounded by a_{next}·bound, and the last DDPM step adds the posterior
    noise of x_{t_c} instead of handing off a posterior mean.

    A hand-off must be a SAMPLE of the payload distribution, so with ``ddim`` the server's steps are
    ancestral (η = :data:`SERVER_ETA` = 1 on the DDIM grid): a deterministic chain carries the server
    model's errors all the way to the hand-off (on the default recipe it widened the hand-off by 4–7 %
    and a classifier told it from payloads with AUC up to 0.73), where fresh noise at each step
    contracts them (docs/PERFORMANCE.md, "The server's hand-off"). With t_c = 0 there is no hand-off:
    the scale is exactly 1, η is 0, and the chain is the plain single-model sampler.
    """
    scale = None if t_c == 0 else server_eps_scale(schedule, t_c, payload_kind)
    eta = SERVER_ETA if t_c > 0 else 0.0
    return reverse_chain(
        server_model, schedule.alpha_bar, schedule.T, t_c, x_T, generator, y, sampler, server_steps, guidance,
        clip_x0=data_bound, progress="server" if progress else None, eps_scale=scale, eta=eta,
    )


@torch.no_grad()
def collaborative_sample(
    server_model: nn.Module | None,
    client_model: nn.Module | None,
    schedule: NoiseSchedule,
    t_c: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    y: torch.Tensor | None = None,
    sampler: str = "ddpm",
    ddim_steps: int = 50,
    guidance: float = 0.0,
    device: torch.device | str | None = None,
    data_bound: float | None = 1.0,
    progress: bool = False,
    payload_kind: str = "cut",
) -> torch.Tensor:
    """Generate a batch (shape (N,C,H,W)) with the split chain; returns images in model space (≈[-1, 1]).

    ``data_bound``: images are known to lie in [-bound, bound], so both sides clip x̂0
    to it (None: no clipping anywhere, e.g. for unbounded Gaussian toy data).
    ``payload_kind``: how the server was trained (the run's ``training.payload``), which fixes how its
    prediction maps onto the full schedule (:func:`server_handoff`).
    """
    T = schedule.T
    server_steps, client_steps = split_ddim_steps(ddim_steps, T, t_c)
    if device is None:  # where the models are (the noise is drawn on the generator's device, then moved)
        params = [p for m in (server_model, client_model) if m is not None for p in m.parameters()][:1]
        device = params[0].device if params else generator.device
    x = torch.randn(shape, generator=generator).to(device)
    y = y.to(device) if y is not None else None
    if t_c < T:
        if server_model is None:
            raise ValueError("t_c < T needs a server model")
        x = server_handoff(server_model, schedule, t_c, x, generator, y, sampler, server_steps, guidance,
                           payload_kind, data_bound, progress)
    # ---- hand-off: the server sends x̂_{t_c} to the client ----
    if t_c > 0:
        if client_model is None:
            raise ValueError("t_c > 0 needs a client model")
        x = reverse_chain(
            client_model, schedule.alpha_bar, t_c, 0, x, generator, y, sampler, client_steps, guidance,
            clip_x0=data_bound, progress="client" if progress else None,
        )
    return x
