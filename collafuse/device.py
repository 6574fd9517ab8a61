"""Where computations run (DESIGN §10): ``device: auto`` means CUDA when available, else the CPU, everywhere."""
from __future__ import annotations

import torch

from collafuse.errors import ConfigError

CPU = torch.device("cpu")  # the one CPU literal outside the config: the fallback of resolve_device and a safe default
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: "str | torch.device | None") -> torch.device:
    """``auto`` (or None) → CUDA when it is available, else the CPU; ``cpu``/``cuda`` as asked (DESIGN §10).

    Every part resolves its device here (training, sampling, attacks, the audit), so ``auto``
    means the same everywhere; an unavailable CUDA is a :class:`ConfigError` (one line, exit 2)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; valid: {', '.join(DEVICE_CHOICES)}") from None
