"""Run configuration: YAML in, a validated frozen object out (pydantic, unknown keys refused).

``DEFAULT_CONFIG`` is the embedded default every command uses without ``--config``:
class-conditional digits (16×16), 4 IID clients, cosine schedule, T = 1000, c = 0.2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collafuse.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Strict):
    source: Literal["digits", "mnist5k", "lfw", "folder", "npz"] = "digits"
    path: str | None = None                  # required for folder / npz
    image_size: int = Field(16, ge=4, le=256)
    channels: int = Field(1, ge=1, le=4)
    n_members: int = Field(1024, ge=1)       # images the clients train on (split among clients)
    n_nonmembers: int = Field(256, ge=0)     # held out, same distribution: membership inference
    n_aux: int = Field(256, ge=0)            # public auxiliary split for the attacker
    num_clients: int = Field(4, ge=1)
    partition: Literal["iid", "label", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    labels_per_client: int = Field(2, ge=1)


class DiffusionConfig(_Strict):
    T: int = Field(1000, ge=2, le=100_000)
    schedule: Literal["linear", "cosine"] = "cosine"
    cut_ratio: float = Field(0.2, ge=0.0, le=1.0)  # t_c = round(c·T); 0 = central, 1 = local-only


class ModelConfig(_Strict):
    channels: tuple[int, ...] = (32, 64)
    blocks_per_level: int = Field(1, ge=1, le=4)
    time_dim: int = Field(128, ge=8)
    groups: int = Field(8, ge=1)


class TrainingConfig(_Strict):
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1)  # classifier-free guidance training
    ema_decay: float = Field(0.995, ge=0, lt=1)    # checkpoints hold this EMA of the weights; 0 = raw weights
    payload: Literal["cut", "trajectory", "naive"] = "cut"
    shard_rows: int = Field(4096, ge=1)            # transcript rows per shard and client


class SamplingConfig(_Strict):
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = Field(100, ge=1)                  # DDIM steps in total (DDPM always runs all T)
    guidance: float = Field(1.0, ge=0)
    per_client: int = Field(20, ge=1)              # grid samples per client at the end of training


class RunConfig(_Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    conditional: bool = True
    data: DataConfig = DataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    server_model: ModelConfig = ModelConfig()
    client_model: ModelConfig = ModelConfig(channels=(16, 32), time_dim=64)  # clients: less compute
    training: TrainingConfig = TrainingConfig()
    sampling: SamplingConfig = SamplingConfig()
    # Defense settings, e.g. [{name: payload-noise, sigma: 0.5}]. The core stores them;
    # collafuse.defenses validates them and turns them into hooks (the core never imports it).
    defenses: tuple[dict[str, Any], ...] = ()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        d = self.data
        if d.num_clients > d.n_members:
            raise ValueError(f"more clients ({d.num_clients}) than member images ({d.n_members})")
        if d.source in ("folder", "npz") and not d.path:
            raise ValueError(f"data.source {d.source!r} needs data.path")
        for side in ("server_model", "client_model"):
            levels = len(getattr(self, side).channels)
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


DEFAULT_CONFIG = RunConfig()


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
    return f"{where}: {msg}{shown}"


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict; raise :class:`ConfigError` with one line naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_format_error(exc)}") from None


def load_config(path: Path | str | None) -> RunConfig:
    """Read a YAML config; ``None`` gives the embedded default."""
    if path is None:
        return DEFAULT_CONFIG
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
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
