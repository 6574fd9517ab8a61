"""``collafuse export RUN_DIR --out DIR`` (DESIGN.md §9): a run folder as a deployment manifest layout.

The inverse of :mod:`collafuse.deployment`'s import: ``DIR/manifest.yaml`` with the scheduler as a
diffusers ``scheduler_config.json``, each model in diffusers layout (``save_pretrained``) where the
backend is diffusers and as ``config.json`` + ``model.safetensors`` where it is native, the transcript
and audit key as ``.npz`` (diffusers' step numbering), and the images as float64 in [0, 1], so that
2y − 1 gives every float32 pixel back exactly: import(export(run)) gives the same numbers from every attack.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from collafuse.backends import DiffusersDenoiser, write_unet_folder
from collafuse.config import RunConfig
from collafuse.deployment import MANIFEST_FILE, NATIVE_CONFIG, NATIVE_WEIGHTS
from collafuse.errors import ConfigError
from collafuse.fsutil import staged_folder
from collafuse.jsonio import dumps
from collafuse.model import UNet
from collafuse.device import CPU


# --- export --------------------------------------------------------------------------------------------


def _scheduler_config(config: RunConfig) -> dict[str, Any]:
    """The diffusers DDPMScheduler config of a run's schedule (the inverse of diffusers_schedule_fields)."""
    d = config.diffusion
    out: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": d.T, "prediction_type": "epsilon"}
    if d.schedule == "cosine":
        out["beta_schedule"] = "squaredcos_cap_v2"
    elif d.schedule == "trained":
        out["trained_betas"] = list(d.betas or ())
    else:
        out["beta_schedule"] = d.schedule
        start, end = (1e-4, 0.02) if d.schedule == "linear" else (0.00085, 0.012)
        out["beta_start"] = d.beta_start if d.beta_start is not None else start
        out["beta_end"] = d.beta_end if d.beta_end is not None else end
    return out


def _write_model(model: torch.nn.Module, folder: Path, config: RunConfig) -> dict[str, Any]:
    """One model in its folder (diffusers layout, or a native UNet's config + safetensors); its manifest entry."""
    if isinstance(model, DiffusersDenoiser):
        write_unet_folder(model, folder)
        return {"diffusers": f"models/{folder.name}",
                "prediction_type": model.spec.prediction_type,
                "timesteps": "diffusers" if model.spec.timestep_offset == 1 else "collafuse"}
    assert isinstance(model, UNet)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / NATIVE_CONFIG).write_text(dumps({
        "backend": "native", "channels": list(cfg.channels), "blocks_per_level": cfg.blocks_per_level,
        "time_dim": cfg.time_dim, "groups": cfg.groups, "in_channels": cfg.in_channels,
        "sample_size": config.data.image_size, "num_classes": cfg.num_classes,
    }, indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / NATIVE_WEIGHTS))
    return {"native": f"models/{folder.name}"}


def _as_unit_float64(images: torch.Tensor) -> np.ndarray:
    """Model-space images (N,C,H,W) in [-1, 1] → float64 in [0, 1], exactly invertible (2y − 1 = x)."""
    return ((images.double() + 1.0) / 2.0).numpy()


def export_run(run_dir: Path | str, out: Path | str) -> Path:
    """``collafuse export``: a run folder → ``out/manifest.yaml`` and its files (DESIGN §9), atomically."""
    from collafuse.runs import Run, check_output_dir
    from collafuse.transcript import AUDIT_KEY_FILE, AuditKey, ServerView

    out = check_output_dir(Path(out))  # before any work: free or empty, a folder above it, writable
    run = Run.load(run_dir, device=CPU)  # only written to files: the CPU is where that happens
    cfg = run.config
    if run.info.get("hooks"):
        names = ", ".join(str(h.get("name", "?")) for h in run.info["hooks"] if isinstance(h, dict)) or "hooks"
        raise ConfigError(f"{run.path}: the run was trained with defenses ({names}); export writes undefended "
                          "deployments only (a defense's effect has no manifest form)")
    if cfg.canaries.count:
        raise ConfigError(f"{run.path}: a run with canaries (the one-run audit) cannot be exported")
    data, splits = run.load_data()
    T, t_c = run.schedule.T, run.t_hand
    with staged_folder(out) as staging:
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(dumps(_scheduler_config(cfg), indent=1))
        models: dict[str, Any] = {"server": None, "clients": []}
        absent = set(run.info.get("absent_models", []))
        if run.server_model is not None and "server" not in absent:
            models["server"] = _write_model(run.server_model, staging / "models" / "server", cfg)
        for k, model in enumerate(run.client_models):
            models["clients"].append(
                _write_model(model, staging / "models" / f"client_{k}", cfg)
                if model is not None else None)
        # Members in the run's member order; each member's client and its position in that client's training set.
        members = splits.members
        where = {int(i): j for j, i in enumerate(members.tolist())}
        client = np.zeros(len(members), np.int64)
        position = np.zeros(len(members), np.int64)
        for c, idx in enumerate(splits.clients):
            for p, i in enumerate(idx.tolist()):
                client[where[i]], position[where[i]] = c, p
        files: dict[str, Any] = {}
        for role, idx in (("members", members), ("nonmembers", splits.nonmembers), ("aux", splits.aux)):
            if role == "aux" and not len(idx):
                continue
            arrays: dict[str, np.ndarray] = {"images": _as_unit_float64(data.images[idx])}
            if data.labels is not None:
                arrays["labels"] = data.labels[idx].numpy()
            if role == "members":
                arrays.update(client=client, client_position=position)
            np.savez(staging / f"{role}.npz", **arrays)
            files[role] = f"{role}.npz"
        rows = ServerView.open(run.path).load() if t_c < T else {}  # sorted by seq: the crossing order
        n = int(rows["seq"].numel()) if rows else 0
        c, h = cfg.data.channels, cfg.data.image_size
        transcript = {
            "tensor": rows["tensor"].numpy() if n else np.zeros((0, c, h, h), np.float32),
            "t": (rows["t"] - 1).numpy() if n else np.zeros(0, np.int64),  # the diffusers convention
            "client": rows["client"].numpy() if n else np.zeros(0, np.int64),
            "step": rows["step"].numpy() if n else np.zeros(0, np.int64),
        }
        for name in ("label", "noise"):
            if n and name in rows:
                transcript[name] = rows[name].numpy()
        np.savez(staging / "transcript.npz", **transcript)
        manifest: dict[str, Any] = {
            "schedule": {"diffusers_config": "scheduler/scheduler_config.json"},
            "timestep_convention": "diffusers",
            "cut_step": t_c - 1,
            "models": models,
            "transcript": "transcript.npz",
        }
        if (run.path / AUDIT_KEY_FILE).is_file():  # absent only for a deployment imported without one
            key = AuditKey.open(run.path)
            pos = torch.argsort(key.seq)
            member_row = {int(i): j for j, i in enumerate(members.tolist())}
            np.savez(staging / "audit_key.npz",
                     member_index=np.array([member_row[int(i)] for i in key.member_index[pos].tolist()], np.int64),
                     client=key.client[pos].numpy())
            manifest["audit_key"] = "audit_key.npz"
        manifest["data"] = {**files, "num_classes": data.num_classes} if data.num_classes else files
        manifest.update(payload=cfg.training.payload, seed=cfg.seed, conditional=cfg.conditional,
                        training={k: v for k, v in cfg.training.model_dump(mode="json").items()
                                  if k not in ("payload", "snapshots")},  # final models only
                        sampling=cfg.sampling.model_dump(mode="json"))
        (staging / MANIFEST_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out


