"""Deployments trained elsewhere (DESIGN.md §9): ``collafuse import MANIFEST`` and ``collafuse export``.

A *deployment manifest* (YAML, paths relative to it) names what an auditor is given::

    schedule: {diffusers_config: scheduler/scheduler_config.json}   # or {T: 1000, schedule: cosine}
    timestep_convention: diffusers   # t in 0..T-1 (default with diffusers_config); collafuse: 1..T
    cut_step: 199                    # in the manifest's convention
    models:
      server: {diffusers: models/server}          # a save_pretrained folder, {native: ...}, or null
      clients: [{diffusers: models/client_0}, null]   # one entry per client, null = not available
    transcript: transcript.npz   # tensor (N,C,H,W), t (N,), client (N,), step (N,); label, noise optional
    audit_key: audit_key.npz     # member_index (N,) into members; client (N,) true sender; optional
    data:
      members: members.npz       # images, labels optional, client (M,), client_position (M,) optional
      nonmembers: nonmembers.npz
      aux: aux.npz               # optional: the attacker's public data

Optional keys: ``payload`` (cut, trajectory, naive), ``seed``, ``conditional``, ``training`` and
``sampling`` (the deployment's recipe: reference-model attacks repeat it), ``data.num_classes``.

:func:`read_manifest` checks everything (every inconsistency is one :class:`ConfigError` or
:class:`DataError` line) before :func:`import_deployment` writes anything; the result is an ordinary
run folder (:mod:`collafuse.runs`) whose run.json lists the models that were not given
(``absent_models``) and whether an audit key came (``has_audit_key``). :func:`export_run` writes the
inverse layout, so that import(export(run)) gives the same numbers from every attack.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from safetensors.torch import save_file

from collafuse import __version__
from collafuse.backends import (
    DIFFUSERS_CONFIG, DiffusersDenoiser, check_weights_size, read_json_object, read_unet_folder, split_unet_config,
)
from collafuse.config import (
    MAX_CHANNELS, MAX_CLIENTS, MAX_IMAGE_SIZE, MAX_T, ModelConfig, RunConfig, config_from_dict, config_to_yaml,
)
from collafuse.data import ImageSet, Splits, images_to_model_space, read_npz
from collafuse.errors import ConfigError, DataError
from collafuse.fsutil import staged_folder
from collafuse.jsonio import dumps
from collafuse.payload import Payload
from collafuse.safeio import read_yaml, short_repr
from collafuse.schedule import NoiseSchedule, diffusers_schedule_fields
from collafuse.training import build_model, denoiser_spec
from collafuse.transcript import TranscriptWriter

MANIFEST_FILE = "manifest.yaml"
NATIVE_CONFIG = "config.json"
NATIVE_WEIGHTS = "model.safetensors"
Int = Annotated[int, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ScheduleEntry(_Strict):
    diffusers_config: str | None = None
    T: Int | None = Field(None, ge=2, le=MAX_T)  # the schedule's tables are allocated from it
    schedule: Literal["linear", "cosine", "scaled_linear"] | None = None
    beta_start: float | None = None
    beta_end: float | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "ScheduleEntry":
        if (self.diffusers_config is None) == (self.T is None):
            raise ValueError("schedule: give either diffusers_config or T (with schedule)")
        if self.diffusers_config is not None and (self.schedule or self.beta_start or self.beta_end):
            raise ValueError("schedule: diffusers_config already fixes the schedule; drop schedule/beta_start/beta_end")
        return self


class ModelEntry(_Strict):
    diffusers: str | None = None
    native: str | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # default: the scheduler config's
    timesteps: Literal["diffusers", "collafuse"] | None = None  # the network's timestep input; default: the manifest's

    @model_validator(mode="after")
    def _one_folder(self) -> "ModelEntry":
        if (self.diffusers is None) == (self.native is None):
            raise ValueError("a model entry needs exactly one of 'diffusers: FOLDER' or 'native: FOLDER' (or null)")
        return self

    @property
    def folder(self) -> str:
        return self.diffusers if self.diffusers is not None else self.native  # type: ignore[return-value]


class ModelsEntry(_Strict):
    server: ModelEntry | None
    clients: list[ModelEntry | None] = Field(min_length=1, max_length=MAX_CLIENTS)


class DataEntry(_Strict):
    members: str
    nonmembers: str
    aux: str | None = None
    num_classes: Int | None = Field(None, ge=1, le=10_000)


class Manifest(_Strict):
    schedule: ScheduleEntry
    timestep_convention: Literal["diffusers", "collafuse"] | None = None
    cut_step: Int = Field(ge=-1, le=MAX_T)
    models: ModelsEntry
    transcript: str
    audit_key: str | None = None
    data: DataEntry
    payload: Literal["cut", "trajectory", "naive"] = "cut"
    seed: Int = Field(0, ge=0, le=2**63 - 1)
    conditional: Annotated[bool, Strict()] | None = None
    training: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None

    @property
    def offset(self) -> int:
        """Add to a manifest step to get this project's step (diffusers counts from 0)."""
        convention = self.timestep_convention or ("diffusers" if self.schedule.diffusers_config else "collafuse")
        return 1 if convention == "diffusers" else 0


@dataclass
class Deployment:
    """A validated deployment, in memory, ready to be written as a run folder."""

    config: RunConfig
    data: ImageSet
    splits: Splits
    states: dict[str, dict[str, torch.Tensor]]  # "server" / "client_<k>" → the wrapped model's state dict
    absent: tuple[str, ...]                     # models the manifest gave as null
    messages: list[tuple[Payload, torch.Tensor, torch.Tensor]]  # (payload, member ids, true senders)
    has_audit_key: bool
    manifest_sha256: str


def _resolve(base: Path, rel: str, what: str) -> Path:
    path = Path(rel)
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise ConfigError(f"manifest: {what} not found: {path}")
    return path


def _parse_manifest(path: Path) -> tuple[Manifest, str]:
    raw, text = read_yaml(path, "manifest", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a manifest must be a mapping, got {type(raw).__name__}")
    try:
        return Manifest.model_validate(raw), text
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: unknown manifest key '{where}'") from None
        got = "" if err["type"] == "value_error" else f" (got {short_repr(err.get('input'), 60)})"
        raise ConfigError(f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}{got}") from None


def _schedule_fields(m: Manifest, base: Path) -> tuple[dict[str, Any], str]:
    """(diffusion: fields, the scheduler's prediction_type)."""
    if m.schedule.diffusers_config is None:
        fields: dict[str, Any] = {"T": m.schedule.T, "schedule": m.schedule.schedule or "cosine"}
        fields.update({k: v for k, v in (("beta_start", m.schedule.beta_start), ("beta_end", m.schedule.beta_end))
                       if v is not None})
        return fields, "epsilon"
    cfg_path = _resolve(base, m.schedule.diffusers_config, "scheduler config")
    scheduler = read_json_object(cfg_path, "scheduler config")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ConfigError(f"{cfg_path}: prediction_type {prediction!r} is not supported (epsilon, v_prediction, sample)")
    try:
        return diffusers_schedule_fields(scheduler), prediction
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None


def _read_model(entry: ModelEntry, base: Path, name: str, prediction: str, timesteps: str,
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(the model section of the run config, its weights, the derived facts: channels, size, classes)."""
    folder = _resolve(base, entry.folder, f"{name} model folder")
    if entry.native is not None:
        cfg = read_json_object(folder / NATIVE_CONFIG, f"{name} model config")
        weights = folder / NATIVE_WEIGHTS
        if not weights.is_file():
            raise ConfigError(f"{folder}: no {NATIVE_WEIGHTS} (a native model folder holds {NATIVE_CONFIG} and it)")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        native = {k: v for k, v in cfg.items() if k not in ("in_channels", "sample_size", "num_classes", "backend")}
        try:  # the section's bounds (channels, levels), before the weights are read
            ModelConfig.model_validate(native)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(f"{folder / NATIVE_CONFIG}: {where}: {err['msg'].removeprefix('Value error, ')} "
                              f"(got {short_repr(err.get('input'), 60)})") from None
        check_weights_size(weights)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{weights}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
        facts = {k: cfg.pop(k, None) for k in ("in_channels", "sample_size", "num_classes")}
        cfg.pop("backend", None)
        return {"backend": "native", **cfg}, state, facts
    cfg, state = read_unet_folder(folder)
    kwargs, derived = split_unet_config(cfg, str(folder / DIFFUSERS_CONFIG))
    if derived.get("out_channels", derived.get("in_channels")) != derived.get("in_channels"):
        raise ConfigError(f"{folder}: out_channels {derived.get('out_channels')} differs from in_channels "
                          f"{derived.get('in_channels')} (a learned-variance model is not supported)")
    size = derived.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else size
    embeds = derived.get("num_class_embeds")
    facts = {"in_channels": derived.get("in_channels", 3), "sample_size": size,
             "num_classes": None if embeds is None else int(embeds) - 1}
    section = {"backend": "diffusers", "prediction_type": entry.prediction_type or prediction,
               "timesteps": entry.timesteps or timesteps, **kwargs}
    return section, state, facts


def _image_shape(path: Path):
    """A :func:`read_npz` check: an image array's header within the run config's bounds (image size, channels),
    before the array is loaded."""
    def check(name: str, shape: tuple[int, ...]) -> None:
        if name not in ("images", "tensor", "noise"):
            return
        if len(shape) not in ((3, 4) if name == "images" else (4,)):
            raise DataError(f"{path}: {name} has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
        dims = shape[1:]
        channels = min(dims) if len(dims) == 3 else 1
        if max(dims) > MAX_IMAGE_SIZE or channels > MAX_CHANNELS:
            raise DataError(f"{path}: {name} of shape {shape}: images are at most {MAX_IMAGE_SIZE}×{MAX_IMAGE_SIZE} "
                            f"pixels with at most {MAX_CHANNELS} channels")
    return check


def _images(path: Path, role: str, need_client: bool) -> dict[str, Any]:
    arrays = read_npz(path, ("images", "client") if need_client else ("images",),
                      ("labels", "client", "client_position"), check=_image_shape(path))
    images = images_to_model_space(arrays["images"], None, str(path))
    n = images.shape[0]
    out: dict[str, Any] = {"images": images}
    for name in ("labels", "client", "client_position"):
        if name in arrays:
            value = arrays[name]
            if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
                raise DataError(f"{path}: {name} must be ({n},) integers, got {value.dtype} {tuple(value.shape)}")
            if value.size and value.min() < 0:
                raise DataError(f"{path}: {name} must be non-negative")
            out[name] = torch.from_numpy(value.astype(np.int64))
    if role != "members":
        out.pop("client", None)
        out.pop("client_position", None)
    return out


def _check_images(parts: dict[str, dict[str, Any]], base_paths: dict[str, Path]) -> tuple[int, int]:
    shapes = {role: tuple(p["images"].shape[1:]) for role, p in parts.items()}
    c, h, w = shapes["members"]
    if h != w:
        raise DataError(f"{base_paths['members']}: images must be square, got {h}×{w}")
    for role, shape in shapes.items():
        if shape != (c, h, w):
            raise DataError(f"{base_paths[role]}: images are {shape} (C,H,W) but the members are {(c, h, w)}")
    return c, h


def _check_model_facts(facts: dict[str, Any], name: str, channels: int, size: int) -> None:
    if facts.get("in_channels") not in (None, channels):
        raise ConfigError(f"manifest: the {name} model takes {facts['in_channels']} channel(s) but the data has {channels}")
    if facts.get("sample_size") not in (None, size):
        raise ConfigError(f"manifest: the {name} model's sample_size is {facts['sample_size']} but the images are "
                          f"{size}×{size}")


def _messages(rows: dict[str, torch.Tensor], member: torch.Tensor, sender: torch.Tensor, kind: str
              ) -> list[tuple[Payload, torch.Tensor, torch.Tensor]]:
    """Consecutive rows with the same (client, step) are one message, in file order (the crossing order)."""
    client, step = rows["client"], rows["step"]
    n = client.numel()
    if n == 0:
        return []
    cuts = torch.nonzero((client[1:] != client[:-1]) | (step[1:] != step[:-1])).flatten() + 1
    bounds = [0, *cuts.tolist(), n]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        payload = Payload(
            client_id=int(client[a]), step=int(step[a]), kind=kind, t=rows["t"][a:b].clone(),
            tensor=rows["tensor"][a:b].clone(),
            label=rows["label"][a:b].clone() if "label" in rows else None,
            noise=rows["noise"][a:b].clone() if "noise" in rows else None,
        )
        out.append((payload, member[a:b], sender[a:b]))
    return out


def _transcript(path: Path, m: Manifest, T: int, t_c: int, shape: tuple[int, int, int], num_clients: int,
                member_client: torch.Tensor, key_path: Path | None, num_classes: int) -> tuple[list, bool]:
    optional = ("label", "noise")
    arrays = read_npz(path, ("tensor", "t", "client", "step"), optional, check=_image_shape(path))
    tensor = arrays["tensor"]
    if tensor.ndim != 4 or tuple(tensor.shape[1:]) != shape:
        raise DataError(f"{path}: tensor must be (N, {', '.join(map(str, shape))}) like the images, got {tuple(tensor.shape)}")
    if not np.issubdtype(tensor.dtype, np.floating):
        raise DataError(f"{path}: tensor must be floating point, got {tensor.dtype}")
    if not np.isfinite(tensor).all():
        raise DataError(f"{path}: tensor holds NaN or infinite values")
    n = tensor.shape[0]
    rows: dict[str, torch.Tensor] = {"tensor": torch.from_numpy(tensor.astype(np.float32))}
    for name in ("t", "client", "step", "label"):
        if name not in arrays:
            continue
        value = arrays[name]
        if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
            raise DataError(f"{path}: {name} must be ({n},) integers, got {value.dtype} {tuple(value.shape)}")
        rows[name] = torch.from_numpy(value.astype(np.int64))
    if "noise" in arrays:
        if arrays["noise"].shape != tensor.shape or not np.isfinite(arrays["noise"]).all():
            raise DataError(f"{path}: noise must be finite with the tensor's shape {tuple(tensor.shape)}")
        rows["noise"] = torch.from_numpy(arrays["noise"].astype(np.float32))
    if m.payload == "naive" and "noise" not in rows:
        raise DataError(f"{path}: payload naive sends the noise: the transcript needs a 'noise' array")
    if m.payload != "naive" and "noise" in rows:
        raise DataError(f"{path}: only the naive payload sends the noise; drop 'noise' or set payload: naive")
    if n and t_c >= T:
        raise DataError(f"{path}: cut_step {m.cut_step} leaves no server step, but the transcript has {n} rows")
    t = rows["t"] + m.offset
    if n and (int(t.min()) < 1 or int(t.max()) > T):
        bad = int(torch.nonzero((t < 1) | (t > T))[0])
        raise DataError(f"{path}: row {bad}: t = {int(rows['t'][bad])} is outside the schedule "
                        f"({1 - m.offset}..{T - m.offset} in the manifest's convention)")
    if m.payload == "cut" and n and bool((t != t_c).any()):
        bad = int(torch.nonzero(t != t_c)[0])
        raise DataError(f"{path}: row {bad}: a cut payload at t = {int(rows['t'][bad])}, but the cut step is "
                        f"{m.cut_step} (every cut payload sits at the cut step)")
    if m.payload != "cut" and n and bool((t <= t_c).any()):
        bad = int(torch.nonzero(t <= t_c)[0])
        raise DataError(f"{path}: row {bad}: a {m.payload} payload at t = {int(rows['t'][bad])}, at or below the "
                        f"cut step {m.cut_step} (the server owns the steps above it)")
    rows["t"] = t
    client = rows["client"]
    has_data = torch.bincount(member_client, minlength=num_clients)
    if n and (int(client.min()) < 0 or int(client.max()) >= num_clients or bool((has_data[client] == 0).any())):
        bad = int(torch.nonzero((client < 0) | (client >= num_clients))[0]) if (
            int(client.min()) < 0 or int(client.max()) >= num_clients) else int(torch.nonzero(has_data[client] == 0)[0])
        raise DataError(f"{path}: row {bad}: client {int(client[bad])} has no member images "
                        f"(the data holds clients 0..{num_clients - 1}; see data.members' client)")
    if n and bool((rows["step"] < 0).any()):
        raise DataError(f"{path}: step must be non-negative")
    if n and "label" in rows:
        label = rows["label"]
        outside = ((label < 0) | (label >= num_classes)) if num_classes else label < 0
        if bool(outside.any()):
            bad = int(torch.nonzero(outside)[0])
            classes = f"the models' classes 0..{num_classes - 1}" if num_classes else "non-negative labels"
            raise DataError(f"{path}: row {bad}: label {int(label[bad])} is outside {classes}")
    member = torch.full((n,), -1, dtype=torch.int64)
    sender = client.clone()
    if key_path is not None:
        key = read_npz(key_path, ("member_index",), ("client",))
        for name, value in key.items():
            if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
                raise DataError(f"{key_path}: {name} must be ({n},) integers (one per transcript row), "
                                f"got {value.dtype} {tuple(value.shape)}")
        member = torch.from_numpy(key["member_index"].astype(np.int64))
        if n and (int(member.min()) < 0 or int(member.max()) >= member_client.numel()):
            raise DataError(f"{key_path}: member_index must lie in 0..{member_client.numel() - 1} (rows of data.members)")
        if "client" in key:
            sender = torch.from_numpy(key["client"].astype(np.int64))
        wrong = member_client[member] != sender
        if n and bool(wrong.any()):
            bad = int(torch.nonzero(wrong)[0])
            raise DataError(f"{key_path}: row {bad}: member {int(member[bad])} belongs to client "
                            f"{int(member_client[member[bad]])} but the row was sent by client {int(sender[bad])}")
    return _messages(rows, member, sender, m.payload), key_path is not None


def read_manifest(path: Path | str) -> Deployment:
    """Validate a deployment manifest and everything it names; nothing is written (DESIGN §9)."""
    import hashlib

    path = Path(path)
    m, text = _parse_manifest(path)
    base = path.parent
    diffusion, prediction = _schedule_fields(m, base)
    T = int(diffusion["T"])
    t_c = m.cut_step + m.offset
    if not 0 <= t_c <= T:
        raise ConfigError(f"{path}: cut_step {m.cut_step} is outside the schedule ({-m.offset}..{T - m.offset} in the "
                          "manifest's convention)")
    schedule = NoiseSchedule.create(diffusion["schedule"], T, diffusion.get("beta_start"), diffusion.get("beta_end"),
                                    diffusion.get("betas"))
    del schedule  # built once so a bad schedule is refused here, before any data is read
    timesteps = "diffusers" if m.offset == 1 else "collafuse"

    num_clients = len(m.models.clients)
    paths = {"members": _resolve(base, m.data.members, "data.members"),
             "nonmembers": _resolve(base, m.data.nonmembers, "data.nonmembers")}
    if m.data.aux is not None:
        paths["aux"] = _resolve(base, m.data.aux, "data.aux")
    parts = {role: _images(p, role, role == "members" and num_clients > 1) for role, p in paths.items()}
    channels, size = _check_images(parts, paths)
    members = parts["members"]
    n_members = members["images"].shape[0]
    member_client = members.get("client", torch.zeros(n_members, dtype=torch.int64))
    if int(member_client.max()) >= num_clients:
        raise DataError(f"{paths['members']}: client {int(member_client.max())} does not exist "
                        f"(models.clients lists {num_clients})")
    empty = [k for k in range(num_clients) if not bool((member_client == k).any())]
    if empty:
        raise DataError(f"{paths['members']}: client {empty[0]} has no member images")

    # Models: server and clients (one architecture for all clients: the run config has one client model).
    sections: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    classes: set[int | None] = set()
    entries = [("server", m.models.server)] + [(f"client_{k}", e) for k, e in enumerate(m.models.clients)]
    if t_c >= T and m.models.server is not None:
        raise ConfigError(f"{path}: cut_step {m.cut_step} leaves the server no step, but models.server is given")
    if t_c == 0 and any(e is not None for e in m.models.clients):
        raise ConfigError(f"{path}: cut_step {m.cut_step} leaves the clients no step, but client models are given")
    for name, entry in entries:
        if entry is None:
            continue
        section, state, facts = _read_model(entry, base, name, prediction, timesteps)
        _check_model_facts(facts, name, channels, size)
        classes.add(facts.get("num_classes"))
        side = "server" if name == "server" else "client"
        if side in sections and sections[side] != section:
            raise ConfigError(f"{path}: {name} has another architecture than client_0; every client must share one")
        sections[side] = section
        states[name] = state
    num_classes = {c for c in classes if c}
    if len(num_classes) > 1 or (num_classes and None in classes) or (num_classes and 0 in classes):
        raise ConfigError(f"{path}: the models disagree on class conditioning (classes: {sorted(map(str, classes))})")
    k = num_classes.pop() if num_classes else 0
    conditional = k > 0 if m.conditional is None else m.conditional
    if conditional and k == 0:
        raise ConfigError(f"{path}: conditional: true but no model has a class embedding")
    labels = [parts[r].get("labels") for r in parts]
    if conditional and any(lab is None for lab in labels):
        missing = next(r for r in parts if parts[r].get("labels") is None)
        raise DataError(f"{paths[missing]}: the models are class-conditional; every data file needs 'labels'")
    data_classes = m.data.num_classes or k or (max(int(lab.max()) for lab in labels) + 1 if all(
        lab is not None and lab.numel() for lab in labels) else 0)
    for role in parts:
        lab = parts[role].get("labels")
        if lab is not None and lab.numel() and int(lab.max()) >= max(data_classes, 1) and (conditional or m.data.num_classes):
            raise DataError(f"{paths[role]}: label {int(lab.max())} is outside the {data_classes} classes")

    raw_config: dict[str, Any] = {
        "seed": m.seed, "conditional": conditional,
        "data": {"source": "imported", "image_size": size, "channels": channels, "n_members": n_members,
                 "n_nonmembers": parts["nonmembers"]["images"].shape[0],
                 "n_aux": parts["aux"]["images"].shape[0] if "aux" in parts else 0, "num_clients": num_clients},
        "diffusion": {**diffusion, "cut_ratio": t_c / T},
        "training": {**(m.training or {}), "payload": m.payload},
    }
    for side in ("server", "client"):
        if side in sections:
            raw_config[f"{side}_model"] = sections[side]
    if m.sampling is not None:
        raw_config["sampling"] = m.sampling
    if "payload" in (m.training or {}):
        raise ConfigError(f"{path}: training.payload: give the payload kind as the manifest's 'payload' key")
    config = config_from_dict(raw_config)
    if config.t_c != t_c:
        raise ConfigError(f"{path}: cut_step {m.cut_step} is not representable as a cut ratio of T = {T}")

    # Weights: built into the backend the run config names, so Run.load reads them back the same way.
    wrapped: dict[str, dict[str, torch.Tensor]] = {}
    for name, state in states.items():
        side = "server" if name == "server" else "client"
        model = build_model(denoiser_spec(config, side, k if conditional else 0), config.seed)
        target = model.unet if isinstance(model, DiffusersDenoiser) else model
        try:
            target.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"manifest: the {name} model's weights do not match its config "
                              f"({str(exc).splitlines()[0]})") from None
        bad = [key for key, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ConfigError(f"manifest: the {name} model holds NaN/inf weights ({bad[0]})")
        wrapped[name] = {key: v.detach().cpu().contiguous() for key, v in model.state_dict().items()}
    absent = tuple(name for name, entry in entries if entry is None and (
        (name == "server" and t_c < T) or (name != "server" and t_c > 0)))

    # Data: members, then non-members, then aux, in file order; each client's training set in client_position order.
    images = torch.cat([parts[r]["images"] for r in parts])
    all_labels = torch.cat(labels) if all(lab is not None for lab in labels) else None
    data = ImageSet(images, all_labels, data_classes)
    offsets = np.cumsum([0] + [parts[r]["images"].shape[0] for r in parts])
    index = {r: torch.arange(int(offsets[i]), int(offsets[i + 1])) for i, r in enumerate(parts)}
    position = members.get("client_position", torch.arange(n_members))
    clients = []
    for c in range(num_clients):
        mine = torch.nonzero(member_client == c).flatten()
        clients.append(mine[torch.argsort(position[mine], stable=True)])
    splits = Splits(index["members"], index["nonmembers"], index.get("aux", torch.empty(0, dtype=torch.long)),
                    tuple(clients))

    key_path = _resolve(base, m.audit_key, "audit_key") if m.audit_key is not None else None
    transcript_path = _resolve(base, m.transcript, "transcript")
    messages, has_key = _transcript(transcript_path, m, T, t_c, (channels, size, size), num_clients, member_client,
                                    key_path, k if conditional else 0)
    if conditional and messages and messages[0][0].label is None:
        raise DataError(f"{transcript_path}: the models are class-conditional, so the server received labels: "
                        "the transcript needs a 'label' array")
    return Deployment(config, data, splits, wrapped, absent, messages, has_key,
                      hashlib.sha256(text.encode()).hexdigest())


def write_run(dep: Deployment, out: Path) -> Path:
    """Write ``dep`` as a run folder at ``out``, atomically (a hidden staging folder renamed into place)."""
    from collafuse.runs import CONFIG_FILE, RUN_MARKER, check_output_dir, file_hashes, write_data_file

    out = check_output_dir(Path(out))
    with staged_folder(out) as staging:
        writer = TranscriptWriter(staging, dep.config.training.payload, dep.config.training.shard_rows)
        for payload, member, sender in dep.messages:
            writer.record(payload, member, sender)
        writer.close(write_audit_key=dep.has_audit_key)
        (staging / "checkpoints").mkdir()
        for name, state in dep.states.items():
            save_file(state, str(staging / "checkpoints" / f"{name}.safetensors"))
        write_data_file(staging, dep.data, dep.splits)
        (staging / CONFIG_FILE).write_text(config_to_yaml(dep.config))
        num_classes = dep.data.num_classes if dep.config.conditional else 0
        (staging / RUN_MARKER).write_text(dumps({
            "collafuse_version": __version__, "t_hand": dep.config.t_c, "T": dep.config.diffusion.T,
            "payload_kind": dep.config.training.payload, "num_clients": dep.config.data.num_clients,
            "num_classes": num_classes, "has_server": dep.config.t_c < dep.config.diffusion.T,
            "train_seconds": None, "hooks": [], "snapshots": [],
            "imported": {"manifest_sha256": dep.manifest_sha256},
            "absent_models": list(dep.absent), "has_audit_key": dep.has_audit_key,
            "files": file_hashes(staging),
        }, indent=1))
    return out


def import_deployment(manifest: Path | str, out: Path | str) -> Path:
    """``collafuse import``: validate the manifest and everything it names, then write a run folder."""
    from collafuse.runs import check_output_dir

    out = check_output_dir(Path(out))  # before the (possibly long) reading: an existing folder is never touched
    return write_run(read_manifest(manifest), out)


__all__ = ["Manifest", "Deployment", "read_manifest", "write_run", "import_deployment", "MANIFEST_FILE",
           "NATIVE_CONFIG", "NATIVE_WEIGHTS"]
