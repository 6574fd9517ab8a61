"""Run configuration: YAML in, a validated frozen object out (pydantic, unknown keys refused).

``DEFAULT_CONFIG`` is the embedded default every command uses without ``--config``:
class-conditional digits (16×16), 4 IID clients, cosine schedule, T = 1000, c = 0.2.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, TypeAdapter, ValidationError, model_serializer,
    model_validator,
)

from collafuse.errors import ConfigError
from collafuse.safeio import read_yaml, short_repr, short_text

# Strict scalars: YAML's `epochs: true` or `epochs: "2"` is a mistake, not 1 or 2. A float field
# takes an integer (`lr: 1`) but never a bool or a string; an int field never takes 2.0.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
MAX_SEED = 2**63 - 1  # seeds end up in torch generators (64-bit)

# Upper bounds on every size a user controls (configs, grids, manifests, flags), checked before anything is
# allocated, each named with its bound in the refusal. They are sized for a machine with 24 GiB of memory:
MAX_IMAGE_SIZE = 256             # pixels per side
MAX_CHANNELS = 4                 # image channels (gray, RGB, RGBA)
MAX_T = 100_000                  # (T+1) float64 per schedule table (0.8 MB); a DDPM chain is T network calls
MAX_EPOCHS = 10_000              # time, and the transcript: one row per member image and epoch (on disk)
MAX_CLIENTS = 1_000              # each client holds its own model, optimiser and EMA copy in memory
MAX_BATCH = 65_536               # images per step (the feature-map bound below usually binds first)
MAX_REFERENCES = 64              # reference models per target (lira, rmia): each is one client training
MAX_SAMPLES_PER_CLIENT = 1_000   # training's sample grid: per_client images per client in one PNG
MAX_SHARD_BYTES = 4 << 30        # transcript rows buffered in memory (shard_rows per client) before a shard is written
# One first-level feature map (batch × channels[0] × image_size² float32). Training keeps about ten of them
# for the backward pass (≈ 10 GiB at the bound); sampling (256 images a batch, no backward) keeps a few.
MAX_FEATURE_MAP_BYTES = 1 << 30
SAMPLE_BATCH = 256               # collafuse.runs.generate's batch
MAX_SAMPLE_FEATURE_MAP_BYTES = 2 << 30
# Parameters: training holds ~5 float32 copies of each (weights, gradients, two Adam moments, EMA), 20 bytes:
# one model of 300 M parameters is 6 GiB, and all models of a run together (server + every client) at most
# 600 M (12 GiB), leaving the rest of 24 GiB to activations and data. diffusers' default UNet2DModel has 274 M.
MAX_RUN_PARAMS = 600_000_000  # MAX_MODEL_PARAMS (300 M, one model) is collafuse.backends' (it must not import this)
MAX_SNAPSHOT_BYTES = 4 << 30     # training.snapshots keeps a float32 copy of every model per snapshot epoch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Strict):
    # imported: the images live in the run folder itself (collafuse import); such a config cannot be trained from.
    source: Literal["digits", "mnist5k", "lfw", "folder", "npz", "imported"] = "digits"
    path: str | None = None                  # required for folder / npz
    image_size: Int = Field(16, ge=4, le=MAX_IMAGE_SIZE)
    channels: Int = Field(1, ge=1, le=MAX_CHANNELS)
    n_members: Int = Field(1024, ge=1)       # images the clients train on (split among clients)
    # n_members, n_nonmembers and n_aux are bounded by the data (make_splits), whose arrays are bounded on reading
    n_nonmembers: Int = Field(256, ge=0)     # held out, same distribution: membership inference
    n_aux: Int = Field(256, ge=0)            # public auxiliary split for the attacker
    num_clients: Int = Field(4, ge=1, le=MAX_CLIENTS)
    partition: Literal["iid", "label", "dirichlet"] = "iid"
    dirichlet_alpha: Float = Field(0.5, gt=0)
    labels_per_client: Int = Field(2, ge=1, le=10_000)


def _omit_none(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Drop optional keys left at None: configs (and so run and audit hashes) written before they existed stay valid."""
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


class DiffusionConfig(_Strict):
    T: Int = Field(1000, ge=2, le=MAX_T)
    # linear / cosine as in DESIGN §2.1; scaled_linear and trained (explicit betas) come from diffusers
    # scheduler configs (§9; collafuse.schedule.diffusers_schedule_fields maps their names).
    schedule: Literal["linear", "cosine", "scaled_linear", "trained"] = "cosine"
    cut_ratio: Float = Field(0.2, ge=0.0, le=1.0)  # t_c = round(c·T); 0 = central, 1 = local-only
    beta_start: Float | None = Field(None, gt=0, lt=1)  # linear / scaled_linear only; None = the schedule's default
    beta_end: Float | None = Field(None, gt=0, lt=1)
    betas: tuple[Annotated[float, Strict(), Field(gt=0, lt=1)], ...] | None = None  # schedule trained: β_1..β_T

    @model_validator(mode="after")
    def _check_betas(self) -> "DiffusionConfig":
        if (self.schedule == "trained") != (self.betas is not None):
            raise ValueError("diffusion.betas goes with schedule 'trained', and schedule 'trained' needs betas")
        if self.betas is not None and len(self.betas) != self.T:
            raise ValueError(f"diffusion.betas has {len(self.betas)} values but T = {self.T}")
        ranged = self.beta_start is not None or self.beta_end is not None
        if ranged and self.schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"diffusion.beta_start/beta_end apply to the linear and scaled_linear schedules, "
                             f"not {self.schedule!r}")
        if self.beta_start is not None and self.beta_end is not None and self.beta_start > self.beta_end:
            raise ValueError(f"diffusion.beta_start {self.beta_start:g} exceeds beta_end {self.beta_end:g}")
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler) -> dict[str, Any]:
        return _omit_none(handler(self), "beta_start", "beta_end", "betas")


class ModelConfig(_Strict):
    """The native UNet (:mod:`collafuse.model`), the default backend."""

    backend: Literal["native"] = "native"
    channels: tuple[Annotated[int, Strict(), Field(ge=1, le=1024)], ...] = Field((32, 64), min_length=1, max_length=6)
    blocks_per_level: Int = Field(1, ge=1, le=4)
    time_dim: Int = Field(128, ge=8, le=4096)
    groups: Int = Field(8, ge=1, le=1024)

    @property
    def levels(self) -> int:
        """Resolutions the model works at (the image size must be divisible by 2**(levels-1))."""
        return len(self.channels)

    @model_serializer(mode="wrap")
    def _omit_native(self, handler) -> dict[str, Any]:
        data = handler(self)  # `backend: native` is implied: configs written before backends existed stay valid
        data.pop("backend", None)
        return data


_JSON_SCALARS = (str, int, float, bool, type(None))


class DiffusersModelConfig(BaseModel):
    """A ``diffusers.UNet2DModel`` (DESIGN §9): ``backend: diffusers`` plus the model's own keyword arguments
    (block_out_channels, layers_per_block, down_block_types, up_block_types, norm_num_groups, ...).

    ``prediction_type`` is what the network outputs (epsilon, v_prediction or sample); the backend converts
    it to ε, so every part of collafuse sees one ε-prediction interface. ``timesteps`` is the convention of
    the network's timestep input: ``diffusers`` (0..T−1, step t of this project fed as t − 1) or
    ``collafuse`` (1..T). The keyword arguments are checked against UNet2DModel's signature (which needs
    the optional ``diffusers`` extra) and the model is built once when the config is validated.
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    backend: Literal["diffusers"]
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timesteps: Literal["diffusers", "collafuse"] = "diffusers"

    @model_validator(mode="after")
    def _check_kwargs(self) -> "DiffusersModelConfig":
        from collafuse.backends import DIFFUSERS_DERIVED_KEYS, check_unet_kwargs  # diffusers only when asked for

        kwargs = self.unet_kwargs
        for key, value in kwargs.items():
            if key in DIFFUSERS_DERIVED_KEYS:
                raise ValueError(f"{key!r} is set by collafuse (data.channels, data.image_size, conditional); remove it")
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, _JSON_SCALARS) for v in items):
                raise ValueError(f"{key!r} must be a number, string, boolean, null or a list of them")
        if kwargs.get("class_embed_type") is not None:
            raise ValueError("class_embed_type: only the default class embedding (null) is supported, through "
                             "num_class_embeds, which collafuse sets from the labels")
        check_unet_kwargs(kwargs)
        return self

    @property
    def unet_kwargs(self) -> dict[str, Any]:
        """The UNet2DModel keyword arguments given (lists as tuples: diffusers' own config does the same)."""
        extra = self.__pydantic_extra__ or {}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}

    @property
    def levels(self) -> int:
        from collafuse.backends import unet_levels

        return unet_levels(self.unet_kwargs)


def _model_backend(raw: Any) -> str:
    if isinstance(raw, dict):
        return raw.get("backend", "native")
    return getattr(raw, "backend", "native")


# One ε-prediction model per side; `backend` picks the implementation (absent: native).
AnyModelConfig = Annotated[
    Union[Annotated[ModelConfig, Tag("native")], Annotated[DiffusersModelConfig, Tag("diffusers")]],
    Discriminator(_model_backend, custom_error_type="backend", custom_error_message="backend must be native or diffusers"),
]
_MODEL_ADAPTER: TypeAdapter = TypeAdapter(AnyModelConfig)


class TrainingConfig(_Strict):
    epochs: Int = Field(60, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(64, ge=1, le=MAX_BATCH)
    lr: Float = Field(1e-3, gt=0)
    label_dropout: Float = Field(0.1, ge=0, lt=1)  # classifier-free guidance training
    ema_decay: Float = Field(0.995, ge=0, lt=1)    # checkpoints hold this EMA of the weights; 0 = raw weights
    payload: Literal["cut", "trajectory", "naive"] = "cut"
    shard_rows: Int = Field(4096, ge=1, le=1 << 24)  # transcript rows per shard and client (bytes: below)
    # Epochs after which every model's EMA weights are also kept (checkpoints/snapshots/epoch_<e>/):
    # leakage against training length (`attack membership` attacks each snapshot). Empty: none.
    snapshots: tuple[Int, ...] = ()

    @model_validator(mode="after")
    def _check_snapshots(self) -> "TrainingConfig":
        s = self.snapshots
        if s and (s[0] < 1 or s[-1] > self.epochs or any(a >= b for a, b in zip(s, s[1:]))):
            raise ValueError(f"snapshots must be distinct epochs in increasing order, each in 1..{self.epochs} "
                             f"(training.epochs), got {list(s)}")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_snapshots(self, handler) -> dict[str, Any]:
        # Absent when empty: configs (and so run and audit hashes) written before snapshots existed stay valid.
        data = handler(self)
        if not self.snapshots:
            data.pop("snapshots", None)
        return data


class SamplingConfig(_Strict):
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: Int = Field(100, ge=1, le=MAX_T)        # DDIM steps in total (DDPM always runs all T)
    guidance: Float = Field(1.0, ge=0)
    per_client: Int = Field(20, ge=1, le=MAX_SAMPLES_PER_CLIENT)  # grid samples per client at the end of training


class CanaryConfig(_Strict):
    """The one-run audit's canaries (Steinke, Nasr & Jagielski 2023): ``count`` images drawn from a pool
    held out of every split, each put into client ``client``'s training set independently with
    probability ½. Which ones went in is written only with the splits (scorer-side), never to the server."""

    count: Int = Field(0, ge=0, le=1_000_000)
    client: Int = Field(0, ge=0, le=MAX_CLIENTS)


class RunConfig(_Strict):
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    conditional: Bool = True
    data: DataConfig = DataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    server_model: AnyModelConfig = ModelConfig()
    client_model: AnyModelConfig = ModelConfig(channels=(16, 32), time_dim=64)  # clients: less compute
    training: TrainingConfig = TrainingConfig()
    sampling: SamplingConfig = SamplingConfig()
    # Defense settings, e.g. [{name: payload-noise, sigma: 0.5}]. The core stores them;
    # collafuse.defenses validates them and turns them into hooks (the core never imports it).
    defenses: tuple[dict[str, Any], ...] = ()
    canaries: CanaryConfig = CanaryConfig()

    @model_serializer(mode="wrap")
    def _omit_no_canaries(self, handler) -> dict[str, Any]:
        # Absent without canaries: configs (and so run and audit hashes) written before canaries existed stay valid.
        data = handler(self)
        if not self.canaries.count:
            data.pop("canaries", None)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        d = self.data
        if self.canaries.count and self.canaries.client >= d.num_clients:
            raise ValueError(f"canaries.client {self.canaries.client} does not exist ({d.num_clients} clients)")
        if d.num_clients > d.n_members:
            raise ValueError(f"more clients ({d.num_clients}) than member images ({d.n_members})")
        if d.source in ("folder", "npz") and not d.path:
            raise ValueError(f"data.source {d.source!r} needs data.path")
        for side in ("server_model", "client_model"):
            levels = getattr(self, side).levels
            if d.image_size % (2 ** (levels - 1)):
                raise ValueError(
                    f"{side}: image_size {d.image_size} must be divisible by 2**(levels-1) = {2 ** (levels - 1)}"
                )
        t_c = round(self.diffusion.cut_ratio * self.diffusion.T)
        if self.training.payload == "trajectory" and self.diffusion.T - t_c < 2:
            raise ValueError("payload 'trajectory' needs the server to own at least 2 steps (T - t_c >= 2)")
        for i, spec in enumerate(self.defenses):
            if not isinstance(spec.get("name"), str):
                raise ValueError(f"defenses[{i}] needs a 'name'")
        return self

    @property
    def t_c(self) -> int:
        return int(round(self.diffusion.cut_ratio * self.diffusion.T))


def _first_width(model: "ModelConfig | DiffusersModelConfig") -> int:
    if isinstance(model, ModelConfig):
        return model.channels[0]
    widths = model.unet_kwargs.get("block_out_channels")
    if widths is None:
        from collafuse.backends import unet_default

        widths = unet_default("block_out_channels")
    return int(widths[0])


def model_parameters(config: "RunConfig", side: str) -> int:
    """How many parameters one side's model of ``config`` has, counted on PyTorch's meta device (nothing
    allocated, a few milliseconds): the exact count, for the size bounds."""
    model = config.server_model if side == "server" else config.client_model
    return _parameters(model.model_dump_json(), config.data.channels, config.data.image_size, config.conditional)


@functools.lru_cache(maxsize=256)
def _parameters(model_json: str, channels: int, image_size: int, conditional: bool) -> int:
    import torch

    model = _MODEL_ADAPTER.validate_json(model_json)
    classes = 10 if conditional else 0  # the class embedding is small: any count does for the bound
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if isinstance(model, ModelConfig):
            from collafuse.model import UNet, UNetConfig

            built = UNet(UNetConfig(in_channels=channels, channels=tuple(model.channels),
                                    blocks_per_level=model.blocks_per_level, time_dim=model.time_dim,
                                    groups=model.groups, num_classes=classes))
        else:
            from collafuse.backends import DiffusersSpec, new_unet

            built = new_unet(DiffusersSpec(in_channels=channels, sample_size=image_size, num_classes=classes,
                                           unet_kwargs=tuple(sorted(model.unet_kwargs.items()))))
    return sum(p.numel() for p in built.parameters())


def check_sizes(config: "RunConfig") -> None:
    """Refuse (ValueError: the validator's one line) a config whose memory would not fit the bounds above,
    before anything is allocated: a shard, a first-level feature map while training or sampling, the
    parameters of each model and of all of them, the snapshots' copies."""
    d, tr = config.data, config.training
    row = d.channels * d.image_size * d.image_size * 4 * (2 if tr.payload == "naive" else 1)  # + the noise
    per_image = (config.diffusion.T - config.t_c) if tr.payload == "trajectory" else 1
    rows = (d.n_members + config.canaries.count) * tr.epochs * per_image
    held = min(d.num_clients * tr.shard_rows, rows) if config.t_c < config.diffusion.T else 0
    if held * row > MAX_SHARD_BYTES:
        raise ValueError(f"the transcript buffers up to {held} payload rows of {row / 2**10:.0f} KiB "
                         f"({held * row / 2**30:.3g} GiB: training.shard_rows {tr.shard_rows} per client) before "
                         f"writing its shards; at most {MAX_SHARD_BYTES >> 30} GiB: lower training.shard_rows")
    sides = [side for side, owns in (("server", config.t_c < config.diffusion.T), ("client", config.t_c > 0)) if owns]
    for side in sides:
        width = _first_width(getattr(config, f"{side}_model"))
        plane = width * d.image_size * d.image_size * 4
        for what, batch, bound in (("training.batch_size", tr.batch_size, MAX_FEATURE_MAP_BYTES),
                                   ("a sampling batch", SAMPLE_BATCH, MAX_SAMPLE_FEATURE_MAP_BYTES)):
            if batch * plane > bound:
                raise ValueError(
                    f"{side}_model: {what} {batch} × {width} channels × {d.image_size}×{d.image_size} pixels is "
                    f"{batch * plane / 2**30:.3g} GiB per feature map; at most {bound / 2**30:.3g} GiB: use fewer "
                    "channels, smaller images or a smaller batch")
    counts = {}
    for side in sides:
        try:
            counts[side] = model_parameters(config, side)
        except ConfigError:  # a model that cannot be built is refused, with its own reason, when it is built
            counts[side] = 0
    from collafuse.backends import MAX_MODEL_PARAMS

    for side, n in counts.items():
        if n > MAX_MODEL_PARAMS:
            raise ValueError(f"{side}_model has {n / 1e6:.1f} M parameters; at most {MAX_MODEL_PARAMS // 10**6} M "
                             "per model (training keeps about 20 bytes per parameter)")
    total = counts.get("server", 0) + counts.get("client", 0) * d.num_clients
    if total > MAX_RUN_PARAMS:
        raise ValueError(f"the server and {d.num_clients} clients have {total / 1e6:.1f} M parameters together; at "
                         f"most {MAX_RUN_PARAMS // 10**6} M: fewer clients or smaller models")
    if len(tr.snapshots) * total * 4 > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"training.snapshots keeps {len(tr.snapshots)} copies of {total / 1e6:.1f} M parameters "
                         f"({len(tr.snapshots) * total * 4 / 2**30:.3g} GiB); at most {MAX_SNAPSHOT_BYTES >> 30} GiB")


DEFAULT_CONFIG = RunConfig()


_MODEL_SECTIONS = ("server_model", "client_model")
_BACKENDS = ("native", "diffusers")


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    # A model section's location carries the union's tag (server_model.native.channels): drop it.
    loc = [p for i, p in enumerate(err["loc"]) if not (i and err["loc"][i - 1] in _MODEL_SECTIONS and p in _BACKENDS)]
    where = short_text(".".join(str(p) for p in loc), 200) or "config"
    msg = short_text(err["msg"].removeprefix("Value error, "), 300)
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {short_repr(got)})"
    return f"{where}: {msg}{shown}"


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict; raise :class:`ConfigError` with one line naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_format_error(exc)}") from None
    except RecursionError:  # a self-referencing dict handed in through the Python API
        raise ConfigError("config error: the config is nested too deeply") from None
    try:
        check_sizes(config)  # after the fields: it builds the models on the meta device to count them
    except ValueError as exc:
        raise ConfigError(f"config error: {short_text(str(exc), 400)}") from None
    return config


def load_config(path: Path | str | None) -> RunConfig:
    """Read a YAML config (any readable file, a pipe too); ``None`` gives the embedded default.

    An empty file is the default config; anything but a mapping is refused.
    """
    if path is None:
        return DEFAULT_CONFIG
    raw, _text = read_yaml(Path(path), "config", ConfigError)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got a YAML {type(raw).__name__}")
    return config_from_dict(raw)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def replace(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy with some fields changed, validated again: ``replace(cfg, training={'epochs': 2})``."""
    raw = config.model_dump(mode="json")
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(raw)
