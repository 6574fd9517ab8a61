"""The attacker's own denoiser (DESIGN.md §4.1, ``tweedie`` and ``ddim``).

Trained once by the attacker on its auxiliary public images over all t, it serves
every cut point, and is cached on disk by a hash of everything it depends on (the
images, the schedule, the config) in a cache folder outside any run folder.

Parametrisation. Work in x0 units: y = p/a = x0 + σ n with σ = s/a. The network F
is wrapped with the preconditioning of Karras et al. (2022, "EDM", Table 1)::

    D(y; σ) = μ + c_skip (y − μ) + c_out F(c_in (y − μ), t)
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²)

with μ, σ_d² the pixel mean and variance of the aux images. D is an estimate of
E[x0 | p]; the equivalent noise prediction is ε̂ = (p − a D)/s, so Tweedie's
x̂ = (p − s ε̂)/a is exactly D. Why not plain ε-prediction: at small t the
ε-target is an amplified copy of a tiny perturbation that small networks cannot
fit, and a poor ε̂ makes (p − s ε̂)/a worse than p/a. With F = 0 (the UNet's
output layer starts at zero), D is the linear shrinkage μ + c_skip (y − μ), whose
MSE σ²σ_d²/(σ²+σ_d²) is already below the σ² of ``rescale``; training learns the rest
with the loss weight 1/c_out² that balances all noise levels.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from collafuse.streams import STREAM_ATTACKER_DENOISER
from collafuse.errors import ConfigError
from collafuse.fsutil import probe_writable
from collafuse.model import UNet, UNetConfig
from collafuse.schedule import NoiseSchedule, q_sample
from collafuse.device import resolve_device
from collafuse.training import build_model

CACHE_ENV = "COLLAFUSE_CACHE"
CACHE_SUBDIR = "attacker-denoiser"


@dataclass(frozen=True)
class DenoiserConfig:
    """How the attacker trains its denoiser (a small UNet; see the module docstring)."""

    channels: tuple[int, ...] = (8, 16)   # UNet widths per level: small, so dense cut-point curves stay cheap
    time_dim: int = 32
    groups: int = 8
    steps: int = 1500                      # optimiser steps
    batch_size: int = 64
    lr: float = 2e-3                       # Adam, decayed linearly to 0
    low_t_fraction: float = 0.3            # share of draws with t log-uniform in [1, T] (small t are hard)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"invalid denoiser config: steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}")
        if not 0.0 <= self.low_t_fraction <= 1.0:
            raise ConfigError(f"low_t_fraction must be in [0, 1], got {self.low_t_fraction}")


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of Karras et al. (2022, Table 1) for noise levels σ (any shape), float64."""
    sigma = sigma.double()
    var = sigma * sigma + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), 1.0 / var.sqrt()


class AttackerDenoiser(nn.Module):
    """D(p, t) ≈ E[x0 | p] and ε̂(p, t) for payloads p = a_t x0 + s_t ε. Shapes: p (B,C,H,W), t (B,)."""

    def __init__(self, unet: UNet, alpha_bar: torch.Tensor, mean: float, sigma_data: float):
        super().__init__()
        self.unet = unet
        self.register_buffer("alpha_bar", alpha_bar.double().clone())
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data), dtype=torch.float64))

    def _coef(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ab = self.alpha_bar[t.long()].reshape(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        c_skip, c_out, c_in = edm_coefficients(s / a, float(self.sigma_data))
        return a, s, c_skip, c_out, c_in

    def raw(self, p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F output, centred y − μ, c_skip, c_out): the pieces of D, for training."""
        a, _, c_skip, c_out, c_in = self._coef(t)
        y = p.double() / a - self.mean
        f = self.unet((c_in * y).float(), t.long())
        return f, y, c_skip, c_out

    def x0(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tweedie's estimate E[x0 | p_t] (B,C,H,W)."""
        f, y, c_skip, c_out = self.raw(p, t)
        return (self.mean + c_skip * y + c_out * f.double()).float()

    def eps(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂ = (p − a D)/s, the noise prediction equivalent to :meth:`x0` (t ≥ 1)."""
        a, s, *_ = self._coef(t)
        return ((p.double() - a * self.x0(p, t).double()) / s).float()


def _unet_config(config: DenoiserConfig, channels: int) -> UNetConfig:
    return UNetConfig(in_channels=channels, channels=tuple(config.channels), time_dim=config.time_dim, groups=config.groups)


def sample_train_steps(n: int, T: int, low_t_fraction: float, generator: torch.Generator, t_values: torch.Tensor | None = None) -> torch.Tensor:
    """Training steps (n,) int64: from ``t_values`` if given, else a mixture of U{1..T} and log-uniform on [1, T]."""
    if t_values is not None:
        return t_values[torch.randint(0, t_values.numel(), (n,), generator=generator)].long()
    uniform = torch.randint(1, T + 1, (n,), generator=generator)
    logu = torch.exp(torch.rand(n, generator=generator, dtype=torch.float64) * math.log(T)).round().long().clamp(1, T)
    pick = torch.rand(n, generator=generator) < low_t_fraction
    return torch.where(pick, logu, uniform)


def train_denoiser(
    images: torch.Tensor,
    schedule: NoiseSchedule,
    config: DenoiserConfig = DenoiserConfig(),
    t_values: torch.Tensor | None = None,
    progress: bool = False,
    device: "str | torch.device | None" = None,
) -> AttackerDenoiser:
    """Train D on public ``images`` (N,C,H,W) in [-1,1] at steps drawn over all t (or ``t_values``).

    Loss: E ‖F − (x0 − μ − c_skip (y − μ))/c_out‖², i.e. the x0-MSE weighted by 1/c_out² (EDM).
    Deterministic given ``config.seed`` (every draw is made on the CPU and moved to ``device``,
    so the batches do not depend on the device). ``device``: None/``auto`` → CUDA when available.
    """
    device = resolve_device(device)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ConfigError(f"the attacker's denoiser needs at least 2 public images (N,C,H,W), got {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(config.seed)
    mean = float(images.double().mean())
    sigma_data = float(images.double().std())
    unet = build_model(_unet_config(config, images.shape[1]), config.seed, STREAM_ATTACKER_DENOISER)
    model = AttackerDenoiser(unet, schedule.alpha_bar, mean, sigma_data).to(device)
    opt = torch.optim.Adam(model.unet.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(1, config.steps))
    model.train()
    for _ in tqdm(range(config.steps), desc="attacker denoiser", disable=not progress, leave=False):
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)
        x0 = images[idx].to(device)
        t = sample_train_steps(config.batch_size, schedule.T, config.low_t_fraction, gen, t_values).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        p = q_sample(x0, t, noise, schedule.alpha_bar)
        f, y, c_skip, c_out = model.raw(p, t)
        target = ((x0.double() - model.mean - c_skip * y) / c_out).float()
        loss = (f - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def default_cache_dir() -> Path:
    """``$COLLAFUSE_CACHE`` if set, else ``~/.cache/collafuse``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "collafuse"


def denoiser_key(images: torch.Tensor, schedule: NoiseSchedule, config: DenoiserConfig) -> str:
    """sha256 over the training images' bytes, the schedule and the config: the cache key."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": asdict(config), "schedule": schedule.name, "T": schedule.T, "v": 1}, sort_keys=True).encode())
    x = images.detach().cpu().float().contiguous()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()[:24]


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_cache_dir(cache_dir: Path | None = None, forbid_under: tuple[Path, ...] = ()) -> Path:
    """The attacker cache folder (``cache_dir``, else ``$COLLAFUSE_CACHE`` or ``~/.cache/collafuse``), refused
    with one line before any training when the denoiser could not be cached there afterwards: inside a run
    folder, below a file, a file itself, read-only or full. Returns the cache root."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in forbid_under:
        if _is_within(root, Path(folder)):
            raise ConfigError(f"the attacker cache {root} must not be inside the run folder {folder}; set ${CACHE_ENV}")
    where = f"the attacker cache (${CACHE_ENV})" if cache_dir is None else "the attacker cache"
    probe_writable(root / CACHE_SUBDIR, where)
    return root


def load_or_train(
    images: torch.Tensor,
    schedule: NoiseSchedule,
    config: DenoiserConfig = DenoiserConfig(),
    cache_dir: Path | None = None,
    forbid_under: tuple[Path, ...] = (),
    progress: bool = False,
    device: "str | torch.device | None" = None,
) -> tuple[AttackerDenoiser, Path, bool]:
    """The cached denoiser for (images, schedule, config), training and caching it on a miss.

    Returns (model, cache file, hit), the model on ``device``. ``forbid_under``: folders the cache
    must not be in (a run folder stays exactly as ``collafuse train`` wrote it).
    """
    device = resolve_device(device)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in forbid_under:
        if _is_within(root, Path(folder)):
            raise ConfigError(f"the attacker cache {root} must not be inside the run folder {folder}; set ${CACHE_ENV}")
    key = denoiser_key(images, schedule, config)
    path = root / CACHE_SUBDIR / f"{key}.safetensors"
    unet_cfg = _unet_config(config, images.shape[1])
    if not path.is_file():
        check_cache_dir(cache_dir, forbid_under)  # before training: a cache that cannot take the result is refused
    if path.is_file():
        try:
            state = load_file(str(path))  # CPU tensors, whichever device trained it
            model = AttackerDenoiser(UNet(unet_cfg), schedule.alpha_bar, 0.0, 1.0)
            model.load_state_dict(state)
            return model.to(device).eval(), path, True
        except (SafetensorError, OSError, RuntimeError):
            pass  # unreadable cache entry: train again and overwrite it
    model = train_denoiser(images, schedule, config, progress=progress, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"config": json.dumps(asdict(config)), "schedule": schedule.name, "T": str(schedule.T)})
    os.replace(tmp, path)
    return model, path, False
