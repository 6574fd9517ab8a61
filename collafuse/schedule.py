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

ScheduleName = Literal["linear", "cosine", "scaled_linear", "trained"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "scaled_linear", "trained")
# diffusers' beta_schedule names → ours (DESIGN §9). squaredcos_cap_v2 is the cosine schedule of
# Nichol & Dhariwal with s = 0.008 and β capped at 0.999, exactly ``cosine_alpha_bar``.
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def linear_alpha_bar(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t for the linear β schedule of Ho et al. (2020); shape (T+1,), float64."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def scaled_linear_alpha_bar(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t for diffusers' ``scaled_linear`` schedule (Stable Diffusion's): β linear in √β; shape (T+1,)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def alpha_bar_from_betas(betas: "torch.Tensor | list[float] | tuple[float, ...]") -> torch.Tensor:
    """ᾱ_t for explicit β_1..β_T (diffusers' ``trained_betas``), each in (0, 1); shape (T+1,)."""
    b = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    if b.numel() < 2 or not bool(torch.isfinite(b).all()) or bool((b <= 0).any()) or bool((b >= 1).any()):
        raise ConfigError("trained betas must be at least 2 finite values, each strictly between 0 and 1")
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - b, 0)])


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
    def create(
        cls, name: str, T: int, beta_start: float | None = None, beta_end: float | None = None,
        betas: "tuple[float, ...] | None" = None,
    ) -> "NoiseSchedule":
        """``linear`` (β from ``beta_start`` to ``beta_end``, default 1e-4 → 0.02), ``cosine``,
        ``scaled_linear`` (default 0.00085 → 0.012) or ``trained`` (explicit ``betas``, T of them)."""
        if T < 2:
            raise ConfigError(f"T must be at least 2, got {T}")
        if name == "linear":
            return cls(name, T, linear_alpha_bar(T, *_betas_range(beta_start, beta_end, 1e-4, 0.02)))
        if name == "scaled_linear":
            return cls(name, T, scaled_linear_alpha_bar(T, *_betas_range(beta_start, beta_end, 0.00085, 0.012)))
        if name == "cosine":
            return cls(name, T, cosine_alpha_bar(T))
        if name == "trained":
            if betas is None or len(betas) != T:
                raise ConfigError(f"schedule 'trained' needs exactly T = {T} betas, got {0 if betas is None else len(betas)}")
            return cls(name, T, alpha_bar_from_betas(betas))
        raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")

    @classmethod
    def from_config(cls, diffusion) -> "NoiseSchedule":
        """The schedule a run's ``diffusion:`` section names (:class:`collafuse.config.DiffusionConfig`)."""
        return cls.create(diffusion.schedule, diffusion.T, diffusion.beta_start, diffusion.beta_end, diffusion.betas)

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


def _betas_range(start: float | None, end: float | None, default_start: float, default_end: float) -> tuple[float, float]:
    start = default_start if start is None else float(start)
    end = default_end if end is None else float(end)
    if not (0.0 < start <= end < 1.0):
        raise ConfigError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got {start:g}, {end:g}")
    return start, end


def diffusers_schedule_fields(scheduler_config: dict) -> dict:
    """The ``diffusion:`` fields (schedule, T, beta_start, beta_end, betas) of a diffusers scheduler config.

    Reads ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end`` and ``trained_betas``
    (which, when given, wins, as in diffusers). A config that rescales to zero terminal SNR is refused:
    ᾱ_T = 0 makes x̂0 = (x_T − s_T ε̂)/a_T undefined, and every attack here uses it. Other keys (sampling
    choices such as ``timestep_spacing`` or ``clip_sample``) do not change the forward process.
    """
    if not isinstance(scheduler_config, dict):
        raise ConfigError("a scheduler config must be a JSON object")
    T = scheduler_config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or not 2 <= T <= 100_000:
        raise ConfigError(f"scheduler config: num_train_timesteps must be an integer in 2..100000, got {T!r}")
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise ConfigError("scheduler config: rescale_betas_zero_snr makes ᾱ_T = 0, which no attack here can use")
    trained = scheduler_config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained):
            raise ConfigError("scheduler config: trained_betas must be a list of numbers")
        if len(trained) != T:
            raise ConfigError(f"scheduler config: trained_betas has {len(trained)} values but num_train_timesteps is {T}")
        alpha_bar_from_betas(trained)  # checks each β
        return {"T": T, "schedule": "trained", "betas": [float(b) for b in trained]}
    name = scheduler_config.get("beta_schedule", "linear")
    if name not in DIFFUSERS_BETA_SCHEDULES:
        raise ConfigError(f"scheduler config: beta_schedule {name!r} is not supported; valid: "
                          f"{', '.join(DIFFUSERS_BETA_SCHEDULES)} (or trained_betas)")
    fields: dict = {"T": T, "schedule": DIFFUSERS_BETA_SCHEDULES[name]}
    if name != "squaredcos_cap_v2":  # diffusers ignores beta_start/beta_end for the cosine schedule too
        start = scheduler_config.get("beta_start", 0.0001)
        end = scheduler_config.get("beta_end", 0.02)
        for key, value in (("beta_start", start), ("beta_end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"scheduler config: {key} must be a number, got {value!r}")
        _betas_range(start, end, 0.0, 0.0)
        fields.update(beta_start=float(start), beta_end=float(end))
    return fields


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
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step from ᾱ_t to ᾱ_next (Song et al. 2021, eq. 12).

    ``eta`` = 0: the deterministic step. ``eta`` > 0 adds fresh ``noise`` with
    σ = η·√((1−ᾱ_next)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_next) (eq. 16) and keeps the marginals: η = 1 is ancestral
    sampling on the strided grid (the DDPM posterior between the two steps).
    """
    abt = torch.tensor(ab_t, dtype=torch.float64)
    abn = torch.tensor(ab_next, dtype=torch.float64)
    x0_hat = predict_x0(x_t.double(), eps.double(), abt)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps = ((x_t.double() - abt.sqrt() * x0_hat) / (1.0 - abt).sqrt()).to(eps.dtype)
    if eta == 0.0:
        out = abn.sqrt() * x0_hat + (1.0 - abn).sqrt() * eps.double()
        return out.to(x_t.dtype)
    if noise is None:
        raise ValueError("a stochastic DDIM step (eta > 0) needs its noise")
    sigma = eta * ((1.0 - abn) / (1.0 - abt)).sqrt() * (1.0 - abt / abn).sqrt()
    direction = (1.0 - abn - sigma**2).clamp_min(0.0).sqrt()
    out = abn.sqrt() * x0_hat + direction * eps.double() + sigma * noise.double()
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
