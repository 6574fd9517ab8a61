"""``tweedie`` (T1, DESIGN.md §4.1): x̂ = (p − s ε̂(p, t))/a with the attacker's own denoiser.

The denoiser (:mod:`.denoiser`) was trained by the attacker on its auxiliary public
images over all t, so one model serves every cut point. x̂ is Tweedie's posterior
mean E[x0 | p] under the aux distribution.
"""
from __future__ import annotations

import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, known_noise_x0, require_attack_inputs, signal_noise,
)

NAME = "tweedie"


@torch.no_grad()
def denoise_in_batches(denoiser: torch.nn.Module, p: torch.Tensor, t: torch.Tensor, device: str, batch: int = 1024) -> torch.Tensor:
    """ε̂(p, t) for rows (N,C,H,W) with steps t (N,), in batches; float32 on the CPU."""
    out = []
    for i in range(0, p.shape[0], batch):
        out.append(denoiser.eps(p[i : i + batch].to(device), t[i : i + batch].to(device)).cpu())
    return torch.cat(out) if out else torch.empty_like(p)


def tweedie_x0(p: torch.Tensor, eps_hat: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x̂ = (p − s ε̂)/a; p, ε̂ (N,C,H,W); a, s broadcastable (N,1,1,1)."""
    return ((p.double() - s * eps_hat.double()) / a).float()


@reconstruction_attack(NAME, threat="T1", needs=("denoiser",), summary="Tweedie posterior mean with the attacker's denoiser")
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Rows (N,C,H,W) → x̂ (N,C,H,W); rows at t = 0 are returned as they are."""
    require_attack_inputs(view, schedule, resources)
    exact = known_noise_x0(view, schedule)
    if exact is not None:
        return Reconstruction(NAME, exact)
    out = view.tensor.clone().float()
    noisy = view.t > 0
    if noisy.any():
        p, t = view.tensor[noisy], view.t[noisy]
        a, s = signal_noise(t, schedule)
        out[noisy] = tweedie_x0(p, denoise_in_batches(resources.denoiser, p, t, resources.device), a, s)
    return Reconstruction(NAME, out)
