"""``inversion`` (T1, DESIGN.md §4.1): a network the attacker trains on (noised public image → image) pairs.

Unlike ``tweedie``'s denoiser (all t, trained once), this network is a specialist:
it is trained for this view only, on aux images noised at exactly the steps the
view shows (t is public: it crosses with every payload), to regress x0 from the
noised image. It uses the same preconditioned UNet as :mod:`.denoiser`, trained for
``resources.inversion_steps`` steps from ``resources.seed``; it is not cached
because it depends on the view.
"""
from __future__ import annotations

import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, train_denoiser
from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, known_noise_x0, require_attack_inputs,
)

NAME = "inversion"
INVERSION_NET = DenoiserConfig(channels=(8, 16), time_dim=16, batch_size=64)


@reconstruction_attack(NAME, threat="T1", needs=("aux",), summary="regression net trained on noised aux at the view's t")
@torch.no_grad()
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Rows (N,C,H,W) → x̂ (N,C,H,W) from a net trained on aux noised at the view's steps."""
    require_attack_inputs(view, schedule, resources)
    exact = known_noise_x0(view, schedule)
    if exact is not None or len(view) == 0:
        return Reconstruction(NAME, exact if exact is not None else view.tensor.float().clone())
    steps = view.t[view.t > 0]
    out = view.tensor.clone().float()
    if steps.numel() == 0:
        return Reconstruction(NAME, out)
    config = DenoiserConfig(**{**INVERSION_NET.__dict__, "steps": resources.inversion_steps, "seed": resources.seed})
    with torch.enable_grad():
        net = train_denoiser(resources.aux.images, schedule, config, t_values=steps, device=resources.device)
    noisy = view.t > 0
    p, t = view.tensor[noisy], view.t[noisy]
    est = [net.x0(p[i : i + 1024].to(resources.device), t[i : i + 1024].to(resources.device)).cpu() for i in range(0, p.shape[0], 1024)]
    out[noisy] = torch.cat(est)
    return Reconstruction(NAME, out)
