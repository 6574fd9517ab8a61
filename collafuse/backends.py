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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from collafuse.errors import ConfigError
from collafuse.safeio import short_repr

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
    """Refuse keyword arguments UNet2DModel does not take, or sizes past the bounds (ValueError: the config
    validator's one line)."""
    try:
        known = _signature_keys()
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"UNet2DModel takes no argument {unknown[0]!r}; valid: {', '.join(known)}")
    check_unet_bounds(kwargs)


# Parameters of one model, for every backend (collafuse.config checks a run's models against it, counted on the
# meta device): training holds ~5 float32 copies of each (weights, gradients, two Adam moments, EMA), 20 bytes,
# so 300 M is 6 GiB of a 24 GiB machine. diffusers' default UNet2DModel has 274 M.
MAX_MODEL_PARAMS = 300_000_000

# Size bounds of a UNet2DModel's arguments (a config.json is user input), checked before anything is built.
# The model as a whole is bounded by its parameter count (MAX_MODEL_PARAMS above, counted on the
# meta device); these bound each argument first, so the count itself stays cheap.
MAX_UNET_LEVELS = 8
MAX_UNET_WIDTH = 4096           # diffusers' default UNet2DModel tops out at 896, Stable Diffusion's at 1280
MAX_UNET_LAYERS = 16
MAX_UNET_SCALAR = 1 << 16       # attention_head_dim, norm_num_groups, time_embedding_dim, num_train_timesteps


def unet_default(name: str) -> Any:
    """The default of one UNet2DModel argument (needs the diffusers extra)."""
    return inspect.signature(_unet2d().__init__).parameters[name].default


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_unet_bounds(kwargs: dict[str, Any]) -> None:
    """Refuse (ValueError, with the bound) UNet2DModel arguments whose sizes are past the bounds above."""
    widths = kwargs.get("block_out_channels")
    if widths is not None:
        if not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_UNET_LEVELS:
            raise ValueError(f"block_out_channels must list 1..{MAX_UNET_LEVELS} widths, got {short_repr(widths, 80)}")
        if not all(_whole(w) and 1 <= w <= MAX_UNET_WIDTH for w in widths):
            raise ValueError(f"block_out_channels must be integers in 1..{MAX_UNET_WIDTH}, got {short_repr(widths, 80)}")
    for key in ("down_block_types", "up_block_types"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) > MAX_UNET_LEVELS):
            raise ValueError(f"{key} must list at most {MAX_UNET_LEVELS} block types")
    layers = kwargs.get("layers_per_block")
    if layers is not None:
        items = layers if isinstance(layers, (list, tuple)) else [layers]
        if not all(_whole(v) and 1 <= v <= MAX_UNET_LAYERS for v in items):
            raise ValueError(f"layers_per_block must be an integer in 1..{MAX_UNET_LAYERS}, got {short_repr(layers, 80)}")
    for key in ("attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "time_embedding_dim",
                "num_train_timesteps", "sample_size", "in_channels", "out_channels", "num_class_embeds"):
        value = kwargs.get(key)
        items = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(_whole(v) and 1 <= v <= MAX_UNET_SCALAR for v in items):
            raise ValueError(f"{key} must be an integer in 1..{MAX_UNET_SCALAR}, got {short_repr(value, 80)}")


def check_unet_size(arguments: dict[str, Any], where: str) -> None:
    """Refuse (:class:`ConfigError`) a UNet2DModel whose arguments (a config.json's, derived keys included)
    are past the bounds, or whose parameter count, counted on the meta device, is past
    :data:`MAX_MODEL_PARAMS`: before its weights are read or anything is allocated."""
    try:
        check_unet_bounds(arguments)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cls = _unet2d()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            unet = cls(**arguments)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"{where}: UNet2DModel refused the config ({str(exc).splitlines()[0]})") from None
    count = sum(p.numel() for p in unet.parameters())
    if count > MAX_MODEL_PARAMS:
        raise ConfigError(f"{where}: the model has {count / 1e6:.1f} M parameters; at most "
                          f"{MAX_MODEL_PARAMS // 10**6} M per model (training keeps about 20 bytes per parameter)")


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
    split_unet_config(config, str(folder / DIFFUSERS_CONFIG))  # unknown keys, before anything is built
    check_unet_size({k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")},
                    str(folder / DIFFUSERS_CONFIG))  # the bounds, before the weights are read
    check_weights_size(weights)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{weights}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
    return config, state


def check_weights_size(path: Path) -> None:
    """Refuse a safetensors weights file larger than the largest model allowed (float32, with header room)
    before reading it: the whole file is read into memory."""
    limit = MAX_MODEL_PARAMS * 4 + (64 << 20)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if size > limit:
        raise ConfigError(f"{path}: {size / 2**30:.3g} GiB of weights; at most {limit / 2**30:.3g} GiB "
                          f"({MAX_MODEL_PARAMS // 10**6} M float32 parameters)")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small file (size-capped), or one ConfigError line."""
    if os.path.lexists(path) and not path.is_file():  # a folder or a named pipe: never opened
        raise ConfigError(f"{what} {path} is not a regular file")
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
