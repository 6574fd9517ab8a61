"""``oracle`` (T1, DESIGN.md §4.1): the Bayes-optimal ceiling for a pool that holds the true image.

With candidates x_1..x_M and a uniform prior, the posterior given p = a x0 + s ε is
w_i ∝ exp(−‖p − a x_i‖² / 2s²) = exp(−(a²/2s²) ‖p/a − x_i‖²). The reconstruction is
the posterior mean Σ w_i x_i (minimum MSE for that prior) and re-identification is
argmax_i w_i (minimum top-1 error). Not a realistic attacker: it is what every
other attack is compared to. With the noise known (``naive``) the observation is
exact and the posterior puts all its mass on the nearest candidate.

Several epochs. This is the single-payload ceiling the design defines. With many
epochs ``multiview`` pools E payloads of one image, and its re-identification can
then edge past this oracle (digits, 10 epochs, c = 0.3–0.4). A pool posterior over
linked groups did not fix that here: groups that the linker matched are mutually
consistent by construction, so their evidence over-states "same image", and the
linked posterior fell below this one at higher noise.
"""
from __future__ import annotations

import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, rescaled, require_attack_inputs,
)

NAME = "oracle"
EXACT_PRECISION = 1e12  # a²/s² used when the observation is exact (noise known or t = 0)


def posterior_log_weights(y: torch.Tensor, precision: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """log w (N, M) up to a per-row constant: −(precision/2) ‖y_n − x_m‖², with y = p/a (N,C,H,W),
    precision = a²/s² (N,), candidates (M,C,H,W). float64."""
    d2 = torch.cdist(y.reshape(y.shape[0], -1).double(), candidates.reshape(candidates.shape[0], -1).double()).pow(2)
    return -0.5 * precision.double()[:, None] * d2


def posterior_mean(log_w: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Σ_m softmax(log w)_nm x_m, shape (N,C,H,W)."""
    w = torch.softmax(log_w, dim=1)
    return (w @ candidates.reshape(candidates.shape[0], -1).double()).reshape(-1, *candidates.shape[1:]).float()


@RECONSTRUCTION_ATTACKS.register(NAME, threat="T1", needs=("candidates",), summary="Bayes posterior over a pool holding the truth")
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources) -> Reconstruction:
    """Rows (N,C,H,W) → posterior means (N,C,H,W) and log weights (N, M) over ``resources.candidates``."""
    require_attack_inputs(view, schedule, resources)
    y, var = rescaled(view, schedule)
    precision = torch.where(var > 0, 1.0 / var.clamp_min(1e-300), torch.full_like(var, EXACT_PRECISION))
    cand = resources.candidates.double()
    log_w, images = [], []
    for i in range(0, len(view), 2048):
        lw = posterior_log_weights(y[i : i + 2048], precision[i : i + 2048], cand)
        log_w.append(lw.float())
        images.append(posterior_mean(lw, cand))
    m = cand.shape[0]
    return Reconstruction(
        NAME,
        torch.cat(images) if images else torch.empty(0, *view.image_shape),
        pool_log_weights=torch.cat(log_w) if log_w else torch.empty(0, m),
    )
