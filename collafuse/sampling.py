"""Collaborative sampling (DESIGN.md §2.3): server T → t_c, hand-off, client t_c → 0.

``reverse_chain`` is the one loop both sides run; the split is two calls to it
with different models and schedules. With t_c = 0 the split sampler is exactly
the plain single-model sampler (same code path, same noise draws).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

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
) -> torch.Tensor:
    """Denoise ``x`` from step ``t_start`` down to ``t_stop`` on the schedule ``alpha_bar`` (index = step).

    DDPM visits every step; DDIM (η = 0) visits ``ddim_steps`` evenly spaced ones and
    always lands exactly on ``t_stop``. Noise for DDPM comes from ``generator`` (CPU).
    ``progress``: a label for a progress bar over the steps (None: no bar).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    b = x.shape[0]
    if sampler == "ddpm":
        for t in tqdm(range(t_start, t_stop, -1), desc=progress, unit="step", disable=progress is None, leave=False):
            t_batch = torch.full((b,), t, dtype=torch.long, device=x.device)
            eps = guided_eps(model, x, t_batch, y, guidance)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = ddpm_step(x, eps, float(alpha_bar[t]), float(alpha_bar[t - 1]), noise, clip_x0)
        return x
    steps = ddim_timesteps(t_start, t_stop, ddim_steps)
    for i, t in enumerate(tqdm(steps, desc=progress, unit="step", disable=progress is None, leave=False)):
        t_next = steps[i + 1] if i + 1 < len(steps) else t_stop
        t_batch = torch.full((b,), t, dtype=torch.long, device=x.device)
        eps = guided_eps(model, x, t_batch, y, guidance)
        x = ddim_step(x, eps, float(alpha_bar[t]), float(alpha_bar[t_next]), clip_x0)
    return x


PAYLOAD_TAIL_Z = 4.0  # a payload pixel leaves a_c·bound ± 4 s_c with probability < 1e-4


def payload_bound(schedule: NoiseSchedule, t_c: int, data_bound: float | None) -> float | None:
    """Range of a payload pixel p = a x0 + s ε with |x0| ≤ bound: a·bound + z·s (z = 4)."""
    if data_bound is None:
        return None
    return schedule.a(t_c) * data_bound + PAYLOAD_TAIL_Z * schedule.s(t_c)


def split_ddim_steps(total: int, T: int, t_c: int) -> tuple[int, int]:
    """Share ``total`` DDIM steps between server and client in proportion to the steps each owns."""
    server_span, client_span = T - t_c, t_c
    if server_span == 0:
        return 0, min(total, client_span)
    if client_span == 0:
        return min(total, server_span), 0
    server = min(server_span, max(1, round(total * server_span / T)))
    client = min(client_span, max(1, total - server))
    return server, client


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
) -> torch.Tensor:
    """Generate a batch (shape (N,C,H,W)) with the split chain; returns images in model space (≈[-1, 1]).

    ``data_bound``: images are known to lie in [-bound, bound], so the client clips x̂0
    to it (None: no clipping anywhere, e.g. for unbounded Gaussian toy data).

    Server: x_T ~ N(0, I) → x̂_{t_c} on its relative schedule ᾱ_t/ᾱ_{t_c}. Its "x0" is
    the payload p = a x0 + s ε, so it clips p̂ to :func:`payload_bound` — without any
    bound, the first steps from ᾱ'_T ≈ 0 amplify denoiser errors by 1/√ᾱ'_T and the
    chain diverges. With t_c = 0 that bound is ``data_bound`` itself.
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
        x = reverse_chain(
            server_model, schedule.relative(t_c), T, t_c, x, generator, y, sampler, server_steps, guidance,
            clip_x0=payload_bound(schedule, t_c, data_bound), progress="server" if progress else None,
        )
    # ---- hand-off: the server sends x̂_{t_c} to the client ----
    if t_c > 0:
        if client_model is None:
            raise ValueError("t_c > 0 needs a client model")
        x = reverse_chain(
            client_model, schedule.alpha_bar, t_c, 0, x, generator, y, sampler, client_steps, guidance,
            clip_x0=data_bound, progress="client" if progress else None,
        )
    return x
