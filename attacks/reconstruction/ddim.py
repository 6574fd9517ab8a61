"""``ddim`` (T1, DESIGN.md §4.1): deterministic multi-step denoising t → 0 with the attacker's denoiser.

Each row starts at its own step t and visits K = ``resources.ddim_steps`` evenly
spaced steps t·(K−j)/K (rounded) down to 0, with the DDIM (η = 0) update of Song
et al. (2021, eq. 12) written per row: x_next = √ᾱ_next x̂0 + √(1−ᾱ_next) ε̂, with x̂0
clipped to [-1, 1] (the data range is public). With K = 1 this is ``tweedie`` clipped.
"""
from __future__ import annotations

import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, known_noise_x0, require_attack_inputs, signal_noise,
)

NAME = "ddim"


def ddim_grid(t: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Per-row step grid (n_steps+1, N) int64: round(t·(K−j)/K) for j = 0..K (last row is 0)."""
    j = torch.arange(n_steps + 1, dtype=torch.float64)[:, None]
    return (t.double()[None] * (n_steps - j) / n_steps).round().long()


def ddim_update(x0_hat: torch.Tensor, eps_hat: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    """x_next = √ᾱ_next x̂0 + √(1−ᾱ_next) ε̂ (η = 0); ab_next broadcastable (N,1,1,1)."""
    return (ab_next.sqrt() * x0_hat.double() + (1.0 - ab_next).sqrt() * eps_hat.double()).float()


@reconstruction_attack(NAME, threat="T1", needs=("denoiser",), summary="deterministic DDIM from t to 0")
@torch.no_grad()
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Rows (N,C,H,W) → x̂ (N,C,H,W) after ``resources.ddim_steps`` DDIM steps per row."""
    require_attack_inputs(view, schedule, resources)
    exact = known_noise_x0(view, schedule)
    if exact is not None:
        return Reconstruction(NAME, exact)
    den, dev = resources.denoiser, resources.device
    out = []
    for i in range(0, len(view), 1024):
        x = view.tensor[i : i + 1024].float().clone()  # never write into the view
        grid = ddim_grid(view.t[i : i + 1024], resources.ddim_steps)
        for j in range(resources.ddim_steps):
            t_cur, t_next = grid[j], grid[j + 1]
            moving = t_cur > t_next  # rows whose grid has already reached its end stay put
            if not moving.any():
                continue
            xm, tm = x[moving], t_cur[moving]
            x0_hat = den.x0(xm.to(dev), tm.to(dev)).cpu().clamp(-1.0, 1.0)
            a, s = signal_noise(tm, schedule)
            eps_hat = (xm.double() - a * x0_hat.double()) / s
            ab_next = schedule.alpha_bar[t_next[moving]].reshape(-1, 1, 1, 1)
            x[moving] = ddim_update(x0_hat, eps_hat, ab_next)
        out.append(x)
    return Reconstruction(NAME, torch.cat(out) if out else view.tensor.float().clone())
