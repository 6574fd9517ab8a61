"""The ε-prediction backends (DESIGN.md §9): one interface, ``model(x_t, t, y) → ε``, two implementations.

- ``native``: :class:`collafuse.model.UNet` (built from a :class:`~collafuse.model.UNetConfig`).
- ``diffusers``: a ``diffusers.UNet2DModel`` wrapped by :class:`DiffusersDenoiser` (built from a
  :class:`DiffusersSpec`). The wrapper is what every other part sees: it takes this project's step
  t ∈ 1..T, feeds the network its own convention (diffusers counts 0..T−1, so step t is fed as t − 1),
  passes labels as ``class_labels`` with the null class ``num_classes`` for guidance, and converts
  the network's ``prediction_type`` to ε with the schedule the model was trained on:

      v_prediction:  v = a_t ε − s_t x0          ⇒  ε = a_t v + s_t x_t
      sample:        x̂0                          ⇒  ε = (x_t − a_t x̂0) / s_t

  (a_t = √ᾱ_t, s_t = √(1 − ᾱ_t); Salimans & Ho 2022 for v). For the server ᾱ is its relative schedule.

``diffusers`` is an optional extra: this module imports it only inside the functions that need it,
so nothing imports it unless a diffusers backend is asked for. Models are read from and written to
the diffusers folder layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) by this module
alone, without ``from_pretrained``: never a hub, never a pickle.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from collafuse.errors import ConfigError

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_CONFIG_BYTES = 1 << 20
MISSING_EXTRA = "backend: diffusers needs the optional extra: pip install 'collafuse[diffusers]'"
# Keys of UNet2DModel that collafuse sets itself: from data.channels, data.image_size and the classes.
DIFFUSERS_DERIVED_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds")


class Denoiser(Protocol):
    """What every part of collafuse calls: ε̂ = model(x_t, t, y), t in 1..T, y None or (B,) labels;
    ``null_class`` is the label of "no class" (classifier-free guidance)."""

    @property
    def null_class(self) -> int: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


def _unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return UNet2DModel


def _signature_keys() -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(_unet2d().__init__).parameters if p != "self")


def check_unet_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments UNet2DModel does not take (ValueError: the config validator's one line)."""
    try:
        known = _signature_keys()
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"UNet2DModel takes no argument {unknown[0]!r}; valid: {', '.join(known)}")


def unet_levels(kwargs: dict[str, Any]) -> int:
    """How many resolutions a UNet2DModel with these arguments has (its default block_out_channels has 4)."""
    channels = kwargs.get("block_out_channels")
    if channels is None:
        channels = inspect.signature(_unet2d().__init__).parameters["block_out_channels"].default
    return len(channels)


@dataclass(frozen=True)
class DiffusersSpec:
    """Everything needed to build one side's diffusers denoiser (hashable, JSON-able: references cache it)."""

    in_channels: int
    sample_size: int
    num_classes: int                        # 0 = unconditional; else num_class_embeds = num_classes + 1 (null)
    unet_kwargs: tuple[tuple[str, Any], ...]
    prediction_type: str = "epsilon"
    timestep_offset: int = 1                # 1: the network counts 0..T−1 (diffusers); 0: 1..T
    alpha_bar: tuple[float, ...] | None = None  # the side's ᾱ_0..ᾱ_T; needed unless prediction_type is epsilon

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"unknown prediction_type {self.prediction_type!r}; valid: epsilon, v_prediction, sample")
        if self.prediction_type != "epsilon" and self.alpha_bar is None:
            raise ConfigError(f"prediction_type {self.prediction_type!r} needs the model's schedule to convert to ε")

    def unet_arguments(self) -> dict[str, Any]:
        args = dict(self.unet_kwargs)
        args.update(sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.in_channels)
        if self.num_classes > 0:
            args["num_class_embeds"] = self.num_classes + 1
        return args


class DiffusersDenoiser(nn.Module):
    """A ``UNet2DModel`` behind collafuse's ε-prediction interface (see the module docstring)."""

    def __init__(self, spec: DiffusersSpec, unet: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.unet = unet if unet is not None else new_unet(spec)
        if spec.alpha_bar is not None:  # not in the state dict: it is the schedule, not a weight
            self.register_buffer("alpha_bar", torch.tensor(spec.alpha_bar, dtype=torch.float64), persistent=False)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        labels = None
        if self.num_classes > 0:
            labels = y if y is not None else torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.unet(x, t - self.spec.timestep_offset, class_labels=labels).sample
        if self.spec.prediction_type == "epsilon":
            return out
        ab = self.alpha_bar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return eps_from_prediction(out, x, ab, self.spec.prediction_type)


def eps_from_prediction(out: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, kind: str) -> torch.Tensor:
    """ε from a network output of ``kind`` at x_t = √ᾱ x0 + √(1−ᾱ) ε (``alpha_bar_t`` broadcastable to x_t)."""
    a, s = alpha_bar_t.sqrt(), (1.0 - alpha_bar_t).sqrt()
    if kind == "epsilon":
        return out
    if kind == "v_prediction":  # v = a ε − s x0 (Salimans & Ho 2022) ⇒ a v + s x_t = (a² + s²) ε = ε
        return a * out + s * x_t
    if kind == "sample":  # the network predicts x0
        return (x_t - a * out) / s
    raise ValueError(f"unknown prediction_type {kind!r}")


def new_unet(spec: DiffusersSpec) -> nn.Module:
    """A freshly initialised UNet2DModel (the caller seeds torch); a bad architecture is one ConfigError line."""
    cls = _unet2d()
    try:
        return cls(**spec.unet_arguments())
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"backend diffusers: UNet2DModel refused the config ({str(exc).splitlines()[0]})") from None


# --- the diffusers folder layout (save_pretrained's files) ---------------------------------------------


def read_unet_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json as a dict, state dict)`` of a UNet2DModel folder, refusing pickles and other classes.

    Raises :class:`ConfigError` with one line naming the folder and what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model folder not found: {folder}")
    weights = folder / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConfigError(f"{folder}: holds {pickles[0]} (a pickle) instead of {DIFFUSERS_WEIGHTS}; pickles are "
                              "never loaded: re-save with save_pretrained(..., safe_serialization=True)")
        raise ConfigError(f"{folder}: no {DIFFUSERS_WEIGHTS} (a diffusers save_pretrained folder is expected)")
    config = read_json_object(folder / DIFFUSERS_CONFIG, "model config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{folder}: {DIFFUSERS_CONFIG} describes a {config.get('_class_name')!r}; only UNet2DModel "
                          "is supported")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{weights}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
    return config, state


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small file (size-capped), or one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {what} larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return value


def split_unet_config(config: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A UNet2DModel config.json → (the architecture keyword arguments, the derived keys it fixed).

    Private keys (``_class_name``, ``_diffusers_version``, ...) are dropped; a key UNet2DModel does
    not take is refused (it could change the architecture)."""
    known = set(_signature_keys())
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(public) - known)
    if unknown:
        raise ConfigError(f"{where}: UNet2DModel takes no argument {unknown[0]!r} (saved by another diffusers version?)")
    derived = {k: public.pop(k) for k in DIFFUSERS_DERIVED_KEYS if k in public}
    if public.get("class_embed_type") is not None:
        raise ConfigError(f"{where}: class_embed_type {public['class_embed_type']!r} is not supported "
                          "(class conditioning goes through num_class_embeds)")
    public.pop("class_embed_type", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in public.items()}, derived


def write_unet_folder(model: DiffusersDenoiser, folder: Path) -> None:
    """The inner UNet2DModel in the diffusers layout (config.json + safetensors), readable by ``from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(str(folder), safe_serialization=True)
