"""Run folders: everything ``collafuse train`` writes, written atomically, and loading it back.

Layout of RUN_DIR::

    config.yaml                 the resolved config (every default filled in)
    run.json                    version, t_c, payload kind, clients, classes, wall time
    train_log.jsonl             one JSON line per epoch: per-side losses (+ hook metrics)
    checkpoints/server.safetensors, checkpoints/client_{k}.safetensors
    data.safetensors            the source images/labels and the split indices (ground truth)
    transcript/ …               the server view (see collafuse.transcript)
    audit_key.safetensors       which member each transcript row came from
    samples.png                 one row of collaborative samples per client

A run is built in a hidden sibling folder and renamed into place only when it is
complete, so a failed or interrupted run leaves RUN_DIR untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from collafuse import __version__
from collafuse.config import RunConfig, config_from_dict, config_to_yaml
from collafuse.data import ImageSet, Splits, load_source, make_splits, partition
from collafuse.errors import RunError
from collafuse.model import UNet
from collafuse.sampling import collaborative_sample
from collafuse.schedule import NoiseSchedule
from collafuse.training import (
    STREAM_PARTITION, STREAM_SAMPLE, STREAM_SPLIT, Hooks, TrainedSystem, build_model, generator_for,
    resolve_device, train_system, unet_config,
)

RUN_MARKER = "run.json"


def check_output_dir(out: Path) -> None:
    """Refuse to write into a folder that already holds something (never destroy results)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"output folder {out} already exists and is not empty; choose a new one")


def prepare_data(config: RunConfig) -> tuple[ImageSet, Splits]:
    """Load the source and draw the fixed member/non-member/aux splits and client partition."""
    d = config.data
    data = load_source(d.source, d.channels, d.image_size, d.path)
    members, nonmembers, aux = make_splits(
        len(data), d.n_members, d.n_nonmembers, d.n_aux, generator_for(config.seed, STREAM_SPLIT)
    )
    labels = data.labels[members] if data.labels is not None else None
    parts = partition(
        len(members), labels, d.num_clients, d.partition, generator_for(config.seed, STREAM_PARTITION),
        d.dirichlet_alpha, d.labels_per_client,
    )
    return data, Splits(members, nonmembers, aux, tuple(members[p] for p in parts))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-space images (N,C,H,W) ≈ [-1, 1] → uint8 (N,H,W,C)."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 (N,H,W,C) → one (rows·H, cols·W, C) mosaic with a 1-pixel gap."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: "Path | BinaryIO", scale: int = 1) -> None:
    """uint8 (H,W,C) → PNG at ``path`` (a file name or a binary file object)."""
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")


def sample_labels(n: int, num_classes: int) -> torch.Tensor | None:
    return torch.arange(n) % num_classes if num_classes > 0 else None


def generate(
    system: "TrainedSystem | Run", client: int, n: int, seed: int, batch: int = 256, progress: bool = False
) -> torch.Tensor:
    """``n`` collaborative samples handed to client ``client``, labels cycling through the classes."""
    cfg = system.config
    device = resolve_device(cfg.device)
    gen = generator_for(seed, STREAM_SAMPLE, client)
    labels = sample_labels(n, system.num_classes)
    size = cfg.data.image_size
    out = []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        y = labels[start:stop] if labels is not None else None
        out.append(
            collaborative_sample(
                system.server_model, system.client_models[client], system.schedule, system.t_c,
                (stop - start, cfg.data.channels, size, size), gen, y, cfg.sampling.sampler,
                cfg.sampling.steps, cfg.sampling.guidance if y is not None else 0.0, device, progress=progress,
            ).cpu()
        )
    return torch.cat(out)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def create_run(
    config: RunConfig, out: Path, hooks: Hooks = Hooks(), progress: bool = True
) -> Path:
    """Train a system and write a complete run folder at ``out`` (atomically)."""
    out = Path(out)
    check_output_dir(out)
    data, splits = prepare_data(config)  # every data error is raised before anything is written
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        started = time.perf_counter()
        with open(staging / "train_log.jsonl", "w") as log_file:
            system = train_system(
                config, data, splits, staging, hooks, progress,
                log_line=lambda e: (log_file.write(json.dumps(e) + "\n"), log_file.flush()),
            )
        train_seconds = time.perf_counter() - started
        (staging / "checkpoints").mkdir()
        if system.server_model is not None:
            save_file(_state(system.server_model), str(staging / "checkpoints" / "server.safetensors"))
        for k, model in enumerate(system.client_models):
            if model is not None:
                save_file(_state(model), str(staging / "checkpoints" / f"client_{k}.safetensors"))
        stored = {"images": data.images.contiguous()}
        if data.labels is not None:
            stored["labels"] = data.labels
        stored.update({f"split.{name}": idx.contiguous() for name, idx in splits.to_dict().items()})
        save_file(stored, str(staging / "data.safetensors"), metadata={"num_classes": str(data.num_classes)})
        (staging / "config.yaml").write_text(config_to_yaml(config))

        per_client = config.sampling.per_client
        rows = [
            to_uint8(generate(system, k, per_client, config.seed, progress=progress))
            for k in range(len(system.client_models))
        ]
        save_png(image_grid(np.concatenate(rows), rows=len(rows)), staging / "samples.png", scale=2)

        (staging / RUN_MARKER).write_text(
            json.dumps(
                {
                    "collafuse_version": __version__,
                    "t_c": system.t_c,
                    "T": system.schedule.T,
                    "payload_kind": config.training.payload,
                    "num_clients": len(system.client_models),
                    "num_classes": system.num_classes,
                    "has_server": system.server_model is not None,
                    "train_seconds": round(train_seconds, 2),
                    "hooks": [h.describe() for h in hooks.release] + [h.describe() for h in hooks.training],
                },
                indent=1,
            )
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _load_model(path: Path, config: RunConfig, side: str, num_classes: int) -> UNet:
    model_cfg = config.server_model if side == "server" else config.client_model
    model = build_model(unet_config(model_cfg, config.data.channels, num_classes), config.seed)
    try:
        state = load_file(str(path))  # safetensors: tensors only, nothing is unpickled
        model.load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RunError(f"checkpoint unreadable or does not match the config: {path} ({str(exc).splitlines()[0]})") from None
    return model.to(resolve_device(config.device)).eval()


@dataclass
class Run:
    """A finished run loaded from disk: config, schedule, models and (for scorers) the data."""

    path: Path
    config: RunConfig
    schedule: NoiseSchedule
    t_c: int
    num_classes: int
    server_model: UNet | None
    client_models: list[UNet | None]
    info: dict

    @classmethod
    def load(cls, path: Path | str) -> "Run":
        path = Path(path)
        marker = path / RUN_MARKER
        if not path.is_dir() or not marker.is_file():
            raise RunError(f"{path} is not a collafuse run folder (no {RUN_MARKER})")
        try:
            info = json.loads(marker.read_text())
            config = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
            t_c, num_classes, n = int(info["t_c"]), int(info["num_classes"]), int(info["num_clients"])
        except (OSError, json.JSONDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{path}: run metadata unreadable ({str(exc).splitlines()[0]})") from None
        schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
        ckpt = path / "checkpoints"
        server = _load_model(ckpt / "server.safetensors", config, "server", num_classes) if info["has_server"] else None
        clients = [
            _load_model(ckpt / f"client_{k}.safetensors", config, "client", num_classes) if t_c > 0 else None
            for k in range(n)
        ]
        return cls(path, config, schedule, t_c, num_classes, server, clients, info)

    def load_data(self) -> tuple[ImageSet, Splits]:
        """The source images and the split indices: ground truth for scoring, not for attacks."""
        path = self.path / "data.safetensors"
        try:
            stored = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                num_classes = int(f.metadata()["num_classes"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise RunError(f"run data unreadable: {path} ({exc})") from None
        data = ImageSet(stored["images"], stored.get("labels"), num_classes)
        splits = Splits.from_dict({k.removeprefix("split."): v for k, v in stored.items() if k.startswith("split.")})
        return data, splits
