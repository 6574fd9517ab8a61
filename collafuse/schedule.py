"""Noise schedules, forward noising and reverse steps (DESIGN.md §2.1–§2.3).

Everything here is a pure function of tensors. Schedules are computed in float64
and indexed by the timestep itself: ``alpha_bar[0] == 1`` (clean data) and
``alpha_bar[t]`` for t = 1..T, so no off-by-one hides in the callers.

Every function that needs randomness takes the noise or a ``torch.Generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from collafuse.errors import ConfigError

ScheduleName = Literal["linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine")


def linear_alpha_bar(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t for the linear β schedule of Ho et al. (2020); shape (T+1,), float64."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def cosine_alpha_bar(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t for the cosine schedule of Nichol & Dhariwal (2021, eq. 17); shape (T+1,).

    β_t is clipped at ``max_beta`` as in the paper, so ᾱ_T stays strictly positive.
    """
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    ratio = f[1:] / f[:-1]
    betas = (1.0 - ratio).clamp(max=max_beta)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def cut_step(cut_ratio: float, T: int) -> int:
    """t_c = round(c·T): the client owns steps 1..t_c, the server t_c+1..T (§2.1)."""
    if not 0.0 <= cut_ratio <= 1.0 or math.isnan(cut_ratio):
        raise ConfigError(f"cut_ratio must be in [0, 1], got {cut_ratio}")
    return int(round(cut_ratio * T))


@dataclass(frozen=True)
class NoiseSchedule:
    """A public noise schedule: ᾱ_t for t = 0..T (float64, ``alpha_bar[0] == 1``)."""

    name: str
    T: int
    alpha_bar: torch.Tensor

    @classmethod
    def create(cls, name: str, T: int) -> "NoiseSchedule":
        if T < 2:
            raise ConfigError(f"T must be at least 2, got {T}")
        if name == "linear":
            return cls(name, T, linear_alpha_bar(T))
        if name == "cosine":
            return cls(name, T, cosine_alpha_bar(T))
        raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")

    def a(self, t: int) -> float:
        """a_t = √ᾱ_t, the signal scale at step t."""
        return float(self.alpha_bar[t].sqrt())

    def s(self, t: int) -> float:
        """s_t = √(1-ᾱ_t), the noise scale at step t."""
        return float((1.0 - self.alpha_bar[t]).sqrt())

    def relative(self, t_c: int) -> torch.Tensor:
        """The server's schedule ᾱ'_t = ᾱ_t / ᾱ_{t_c} (§2.2 step 3), shape (T+1,).

        Entries t ≤ t_c are 1: below the cut the server's "data" is the payload itself.
        With t_c = 0 this is exactly ``alpha_bar`` (division by 1.0 is exact).
        """
        rel = self.alpha_bar / self.alpha_bar[t_c]
        rel[: t_c + 1] = 1.0
        return rel


def gather(alpha_bar: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """ᾱ at integer steps ``t`` (shape (B,)), shaped (B, 1, ..., 1) for broadcasting."""
    values = alpha_bar.to(t.device)[t]
    return values.reshape(-1, *([1] * (ndim - 1))).to(dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε for a batch; ``t`` has shape (B,).

    With the server's relative schedule and ``x0`` = payload this is §2.2 step 3.
    """
    ab = gather(alpha_bar, t, x0.ndim, torch.float64)
    out = ab.sqrt() * x0.double() + (1.0 - ab).sqrt() * noise.double()
    return out.to(x0.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1-ᾱ_t) ε̂)/√ᾱ_t (Tweedie's estimate under ε-prediction)."""
    return (x_t - (1.0 - ab_t).sqrt() * eps) / ab_t.sqrt()


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    ab_t: float,
    ab_prev: float,
    noise: torch.Tensor,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """One ancestral step x_t → x_{t-1} (Ho et al. 2020, eqs. 6–7).

    ``ab_t``/``ab_prev`` are ᾱ at t and t-1 of whichever schedule the model was
    trained on (the server passes its relative schedule). Posterior variance is
    β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t, which is 0 on the step that lands on ᾱ = 1.
    ``clip_x0`` bounds x̂0 when the data the chain targets is known to be bounded.
    """
    abt = torch.tensor(ab_t, dtype=torch.float64)
    abp = torch.tensor(ab_prev, dtype=torch.float64)
    beta = 1.0 - abt / abp
    x0_hat = predict_x0(x_t.double(), eps.double(), abt)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    # Posterior mean of q(x_{t-1} | x_t, x0) written with x̂0, so clipping acts on it.
    coef_x0 = abp.sqrt() * beta / (1.0 - abt)
    coef_xt = (1.0 - beta).sqrt() * (1.0 - abp) / (1.0 - abt)
    mean = coef_x0 * x0_hat + coef_xt * x_t.double()
    var = beta * (1.0 - abp) / (1.0 - abt)
    return (mean + var.sqrt() * noise.double()).to(x_t.dtype)


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    ab_t: float,
    ab_next: float,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0; Song et al. 2021, eq. 12) from ᾱ_t to ᾱ_next."""
    abt = torch.tensor(ab_t, dtype=torch.float64)
    abn = torch.tensor(ab_next, dtype=torch.float64)
    x0_hat = predict_x0(x_t.double(), eps.double(), abt)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps = ((x_t.double() - abt.sqrt() * x0_hat) / (1.0 - abt).sqrt()).to(eps.dtype)
    out = abn.sqrt() * x0_hat + (1.0 - abn).sqrt() * eps.double()
    return out.to(x_t.dtype)


def ddim_timesteps(t_start: int, t_stop: int, n_steps: int) -> list[int]:
    """Evenly spaced, strictly decreasing steps from ``t_start`` down to (excluding) ``t_stop``.

    Always starts at ``t_start``; at most ``t_start - t_stop`` steps.
    """
    span = t_start - t_stop
    if span <= 0:
        return []
    n = max(1, min(n_steps, span))
    grid = torch.linspace(t_start, t_stop, n + 1, dtype=torch.float64)[:-1]
    steps = sorted({int(round(float(v))) for v in grid}, reverse=True)
    return [s for s in steps if s > t_stop]
