"""The denoiser ε_θ(x_t, t, y): a small UNet that Opacus can train (no BatchNorm).

GroupNorm + SiLU residual blocks, a sinusoidal time embedding, optional class
conditioning with one extra "null" class for classifier-free guidance, and skip
connections between matching resolutions. No attention: at 16×16–32×32 it costs
more than it helps, and every layer here has an Opacus per-sample-gradient rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from collafuse.errors import ConfigError


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)  # width per resolution level, top to bottom
    blocks_per_level: int = 1             # residual blocks per level on the way down
    time_dim: int = 128                   # width of the time (and class) embedding
    groups: int = 8                       # GroupNorm groups; must divide every width
    num_classes: int = 0                  # 0 = unconditional; else index num_classes is "null"

    def __post_init__(self) -> None:
        if not self.channels:
            raise ConfigError("model channels must not be empty")
        for width in self.channels:
            if width <= 0 or width % self.groups != 0:
                raise ConfigError(f"model channel width {width} must be positive and divisible by groups={self.groups}")
        if self.blocks_per_level < 1:
            raise ConfigError(f"blocks_per_level must be >= 1, got {self.blocks_per_level}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps (Vaswani et al. 2017), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """ε-prediction UNet. ``forward(x, t, y)``: x (B,C,H,W), t (B,) int, y (B,) int or None.

    H and W must be divisible by 2**(len(channels)-1).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, groups, emb_dim = config.channels, config.groups, config.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None
        self.stem = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_widths = []
        width = ch[0]
        for level, out in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(width, out, emb_dim, groups))
                width = out
            self.down.append(blocks)
            skip_widths.append(width)
            last = level == len(ch) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.mid = ResBlock(width, width, emb_dim, groups)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(ch))):
            self.up.append(ResBlock(width + skip_widths[level], ch[level], emb_dim, groups))
            width = ch[level]
            self.upsample.append(nn.Conv2d(width, width, 3, padding=1) if level > 0 else nn.Identity())

        self.out_norm = nn.GroupNorm(groups, width)
        self.out = nn.Conv2d(width, config.in_channels, 3, padding=1)
        # Start as the zero predictor, a common stabiliser for ε-prediction.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y)
        h = self.stem(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up, skip in zip(self.up, self.upsample, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
