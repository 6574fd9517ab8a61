"""Run folders: everything ``collafuse train`` writes, written atomically, and loading it back.

Layout of RUN_DIR::

    config.yaml                 the resolved config (every default filled in)
    run.json                    version, t_hand (the hand-off step), payload kind, clients, classes, wall time, every hook
                                applied (its describe()) and the sha256 of every other file
    train_log.jsonl             one JSON line per epoch: per-side losses (+ hook metrics)
    checkpoints/server.safetensors, checkpoints/client_{k}.safetensors
    checkpoints/snapshots/epoch_{e}/{server,client_k}.safetensors
                                the EMA weights after each epoch of training.snapshots (Run.at_snapshot)
    data.safetensors            the source images/labels and the split indices (ground truth)
    transcript/ …               the server view (see collafuse.transcript)
    audit_key.safetensors       which member each transcript row came from
    samples.png                 one row of collaborative samples per client

A run is built in a hidden sibling folder and renamed into place only when it is
complete, so a failed or interrupted run leaves RUN_DIR untouched.

A run imported from a deployment trained elsewhere (:mod:`collafuse.deployment`) has the same
layout, without train_log.jsonl and samples.png; its run.json also lists the models that were not
handed over (``absent_models``: loaded as None) and says whether an audit key came (``has_audit_key``).

``run.json``'s ``files`` maps every other file's relative path to its sha256.
:meth:`Run.load` refuses a folder in which one of them changed or went missing, and
a checkpoint holding NaN/inf weights. Transcript shards are checked lazily, when an
attack reads them (:class:`~collafuse.transcript.ServerView` compares each with the
index, whose hash is checked here), and ``data.safetensors`` when
:meth:`Run.load_data` opens it, so loading stays fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from collafuse import __version__
from collafuse.config import RunConfig, config_from_dict, config_to_yaml
from collafuse.data import MAX_CLASSES, MAX_IMAGE_VALUES, ImageSet, Splits, draw_canaries, load_source, make_splits, partition
from collafuse.errors import ConfigError, RunError
from collafuse.fsutil import check_output, file_sha256, staged_folder
from collafuse.safeio import parse_yaml, read_bytes, short_repr
from collafuse.backends import MAX_MODEL_PARAMS, Denoiser
from collafuse.hooks import Hooks, model_name
from collafuse.sampling import collaborative_sample
from collafuse.schedule import NoiseSchedule
from collafuse.device import CPU, resolve_device
from collafuse.streams import STREAM_CANARY, STREAM_PARTITION, STREAM_SAMPLE, STREAM_SPLIT, generator_for
from collafuse.training import TrainedSystem, build_model, denoiser_spec, train_system

RUN_MARKER = "run.json"
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.safetensors"
TRANSCRIPT_INDEX = "transcript/index.json"
# Files Run.load does not hash itself: shards (ServerView checks them against the index) and the
# source data (Run.load_data checks it when a scorer opens it).
LAZY_FILES = (DATA_FILE,)
MAX_RUN_JSON_BYTES = 64 << 20  # run.json lists every file's hash: 64 MiB is a million shards
# Files read whole into memory: a checkpoint holds at most MAX_MODEL_PARAMS float32 values, the data at most
# MAX_IMAGE_VALUES float32 pixels and as much again of labels and indices (what can be trained or imported).
MAX_CHECKPOINT_BYTES = MAX_MODEL_PARAMS * 4 + (64 << 20)
MAX_DATA_BYTES = MAX_IMAGE_VALUES * 8 + (64 << 20)
MAX_RUN_FILE_BYTES = 64 << 20  # config.yaml, transcript/index.json


def snapshot_file(epoch: int, name: str) -> str:
    """The run-relative path of model ``name`` ("server", "client_<k>") as it was after ``epoch`` (training.snapshots)."""
    return f"checkpoints/snapshots/epoch_{epoch}/{name}.safetensors"


def file_hashes(run_dir: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``run_dir`` except run.json."""
    return {
        path.relative_to(run_dir).as_posix(): file_sha256(path)
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.relative_to(run_dir).as_posix() != RUN_MARKER
    }


def check_hooks(config: RunConfig, hooks: Hooks) -> None:
    """Refuse hooks that were not built from the config's own ``defenses:`` (config.yaml must not lie)."""
    if not config.defenses and hooks.built_from is None:
        return  # the plain protocol, or hand-made hooks (recorded in run.json)
    if hooks.built_from != Hooks.fingerprint(config.defenses):
        names = ", ".join(str(spec.get("name")) for spec in config.defenses) or "none"
        what = "were not built from them" if hooks.built_from is None else "were built from other defenses"
        raise ConfigError(
            f"the config lists defenses ({names}) but the hooks passed {what}; train with collafuse.api.train "
            "(or pass collafuse.hooks.hooks_for(config) with collafuse.defenses imported)"
        )


def check_output_dir(out: Path, what: str = "output folder") -> Path:
    """Refuse to write into a folder that already holds something (never destroy results), or where nothing
    can be written (below a file, read-only, full); a symbolic link is followed. Returns the folder to write
    (:func:`collafuse.fsutil.check_output`). Checked before any work, so finished work is never thrown away
    because of where it was to be written. A :class:`RunError` (as before: a concurrent writer of the same
    cached system tells it from other errors)."""
    try:
        return check_output(out, what, folder=True)
    except ConfigError as exc:
        raise RunError(str(exc)) from None


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
    clients = tuple(members[p] for p in parts)
    if not config.canaries.count:
        return data, Splits(members, nonmembers, aux, clients)
    canaries, included = draw_canaries(len(data), torch.cat([members, nonmembers, aux]), config.canaries.count,
                                       generator_for(config.seed, STREAM_CANARY))
    return data, Splits(members, nonmembers, aux, clients, canaries, included, config.canaries.client)


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
    system: "TrainedSystem | Run", client: int, n: int, seed: int, batch: int = 256, progress: bool = False,
    device: "str | torch.device | None" = None,
) -> torch.Tensor:
    """``n`` collaborative samples handed to client ``client``, labels cycling through the classes.

    On ``device`` (default: where a loaded :class:`Run` put its models, else the config's device);
    the noise is drawn on the CPU, so the samples do not depend on the device beyond float rounding."""
    cfg = system.config
    device = resolve_device(device if device is not None else getattr(system, "device", None) or cfg.device)
    gen = generator_for(seed, STREAM_SAMPLE, client)
    labels = sample_labels(n, system.num_classes)
    size = cfg.data.image_size
    out = []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        y = labels[start:stop] if labels is not None else None
        out.append(
            collaborative_sample(
                system.server_model, system.client_models[client], system.schedule, system.t_hand,
                (stop - start, cfg.data.channels, size, size), gen, y, cfg.sampling.sampler,
                cfg.sampling.steps, cfg.sampling.guidance if y is not None else 0.0, device, progress=progress,
            ).cpu()
        )
    return torch.cat(out)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or ±inf, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def create_run(
    config: RunConfig, out: Path, hooks: Hooks = Hooks(), progress: bool = True
) -> Path:
    """Train a system and write a complete run folder at ``out`` (atomically).

    ``hooks`` must be built from ``config.defenses`` (:func:`collafuse.hooks.hooks_for`; the
    usual way in is ``collafuse.api.train``): a config that lists defenses with hooks that do
    not come from them is refused, since the run folder would claim a protection that never ran.
    """
    out = Path(out)
    check_hooks(config, hooks)
    if config.defenses and not (hooks.release or hooks.training):
        raise ConfigError("the config lists defenses but no hook was built from them")
    out = check_output_dir(out)
    data, splits = prepare_data(config)  # every data error is raised before anything is written
    with staged_folder(out) as staging:  # stale staging folders of runs killed by SIGKILL are swept first
        started = time.perf_counter()
        with open(staging / "train_log.jsonl", "w") as log_file:
            system = train_system(
                config, data, splits, staging, hooks, progress,
                log_line=lambda e: (log_file.write(json.dumps(e) + "\n"), log_file.flush()),
            )
        train_seconds = time.perf_counter() - started
        (staging / "checkpoints").mkdir()
        models = [("server", system.server_model)] + [(model_name("client", k), m) for k, m in enumerate(system.client_models)]
        states = {f"checkpoints/{name}.safetensors": (name, _state(model)) for name, model in models if model is not None}
        for epoch, snap in system.snapshots.items():
            states.update({snapshot_file(epoch, name): (f"{name} (epoch {epoch})", st) for name, st in snap.items()})
        for rel, (name, state) in states.items():
            bad = _first_non_finite(state)
            if bad is not None:  # a run whose checkpoints Run.load would refuse is not written
                raise RunError(f"training diverged: the {name} model has NaN/inf weights ({bad}); lower training.lr")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(staging / rel))
        write_data_file(staging, data, splits)
        (staging / CONFIG_FILE).write_text(config_to_yaml(config))

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
                    "t_hand": system.t_hand,
                    "T": system.schedule.T,
                    "payload_kind": config.training.payload,
                    "num_clients": len(system.client_models),
                    "num_classes": system.num_classes,
                    "has_server": system.server_model is not None,
                    "train_seconds": round(train_seconds, 2),
                    "hooks": hooks.describe(),  # after training: a DP hook reports the ε it spent
                    "snapshots": sorted(system.snapshots),  # epochs with checkpoints/snapshots/epoch_<e>/
                    "files": file_hashes(staging),
                },
                indent=1,
            )
        )
    return out


def write_data_file(folder: Path, data: ImageSet, splits: Splits) -> None:
    """``data.safetensors``: the source images, labels and split indices (what scorers read as the truth)."""
    stored = {"images": data.images.contiguous()}
    if data.labels is not None:
        stored["labels"] = data.labels.contiguous()
    stored.update({f"split.{name}": idx.contiguous() for name, idx in splits.to_dict().items()})
    save_file(stored, str(folder / DATA_FILE), metadata={"num_classes": str(data.num_classes)})


def _check_manifest(path: Path, info: dict) -> dict[str, str]:
    """run.json's ``files`` (relative path → sha256), checked for shape; refuses a run without one."""
    files = info.get("files")
    if files is None:
        raise RunError(f"{path}: run.json records no file hashes: written by an older collafuse; re-train it")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise RunError(f"{path}: run.json 'files' must map relative paths to sha256 digests")
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or rel == RUN_MARKER:
            raise RunError(f"{path}: run.json 'files' names a path outside the run folder: {rel!r}")
    return files


def verify_run_folder(path: Path | str) -> tuple[bytes, dict[str, str]]:
    """(run.json's bytes, its ``files``: relative path → sha256) of the run folder at ``path``, after hashing
    every file it lists now (not lazily, as :meth:`Run.load` does for shards and data): a missing or changed
    file is one :class:`RunError` line. What an audit keys a named run folder by (its whole content)."""
    path = Path(path)
    marker = path / RUN_MARKER
    if not path.is_dir() or not marker.is_file():
        raise RunError(f"{path} is not a collafuse run folder (no {RUN_MARKER})")
    raw = read_bytes(marker, RUN_MARKER, RunError, MAX_RUN_JSON_BYTES)
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RunError(f"{path}: {RUN_MARKER} unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(info, dict):
        raise RunError(f"{path}: {RUN_MARKER} must hold a JSON object")
    files = _check_manifest(path, info)
    for rel in sorted(files):
        _verify_file(path, files, rel)
    return raw, files


def _missing_or_unlisted(path: Path, files: dict[str, str], rel: str) -> None:
    if rel not in files:
        raise RunError(f"{path}: run.json records no hash for {rel}; the run folder was changed after it was written")
    if os.path.lexists(path / rel) and not (path / rel).is_file():  # a folder or a named pipe: never opened
        raise RunError(f"{path}: {rel} is not a regular file; the run folder was changed after it was written")
    if not (path / rel).is_file():
        raise RunError(f"{path}: {rel} is missing; the run folder was changed after it was written")


def _changed(path: Path, rel: str) -> RunError:
    return RunError(f"{path}: {rel} was changed after the run was written (its sha256 differs from run.json); "
                    "restore it or re-train")


def _read_verified(path: Path, files: dict[str, str], rel: str, max_bytes: int = MAX_RUN_FILE_BYTES) -> bytes:
    """The bytes of ``rel``, refused unless their sha256 is the one run.json recorded (read once: no race).
    The file is read whole, so one larger than ``max_bytes`` is refused before it is read."""
    _missing_or_unlisted(path, files, rel)
    try:
        size = (path / rel).stat().st_size
        if size > max_bytes:
            raise RunError(f"{path}: {rel} is {size / 2**30:.3g} GiB; at most {max_bytes / 2**30:.3g} GiB: "
                           "it is not what collafuse wrote")
        data = (path / rel).read_bytes()
    except OSError as exc:
        raise RunError(f"{path}: {rel} unreadable ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != files[rel]:
        raise _changed(path, rel)
    return data


def _verify_file(path: Path, files: dict[str, str], rel: str) -> None:
    _missing_or_unlisted(path, files, rel)
    try:
        digest = file_sha256(path / rel)
    except OSError as exc:
        raise RunError(f"{path}: {rel} unreadable ({exc.strerror or exc})") from None
    if digest != files[rel]:
        raise _changed(path, rel)


def _shards_checked_later(index_bytes: bytes | None) -> dict[str, str]:
    """``{transcript/<file>: sha256}`` of the shards the (verified) index lists: ServerView checks each on read."""
    if index_bytes is None:
        return {}
    try:
        index = json.loads(index_bytes)
        return {f"transcript/{s['file']}": s["sha256"] for s in index["shards"]
                if isinstance(s["file"], str) and isinstance(s["sha256"], str)}
    except (ValueError, KeyError, TypeError, RecursionError):
        return {}  # a garbled index is refused by ServerView; here every shard is simply hashed now


def _verify_run_files(path: Path, files: dict[str, str], already: set[str]) -> None:
    """Every recorded file exists; each is hashed now unless it is checked when it is opened."""
    index = _read_verified(path, files, TRANSCRIPT_INDEX) if TRANSCRIPT_INDEX in files else None
    later = _shards_checked_later(index)
    for rel, digest in files.items():
        if rel in already or rel == TRANSCRIPT_INDEX:
            continue
        if rel in LAZY_FILES or later.get(rel) == digest:
            _missing_or_unlisted(path, files, rel)
        else:
            _verify_file(path, files, rel)


def _load_model(path: Path, files: dict[str, str], rel: str, config: RunConfig, side: str, num_classes: int,
                device: torch.device) -> Denoiser:
    model = build_model(denoiser_spec(config, side, num_classes), config.seed)
    raw = _read_verified(path, files, rel, MAX_CHECKPOINT_BYTES)
    try:
        state = load_bytes(raw)  # safetensors: tensors only, nothing is unpickled
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RunError(f"checkpoint unreadable: {path / rel} ({str(exc).splitlines()[0]})") from None
    bad = _first_non_finite(state)
    if bad is not None:
        raise RunError(f"checkpoint {path / rel} holds NaN/inf weights ({bad}); the run is unusable, re-train it")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunError(f"checkpoint does not match the config: {path / rel} ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()  # loaded on the CPU (map location), then moved: a CUDA run opens anywhere


def _run_metadata(path: Path, info: dict, config: RunConfig) -> tuple[int, int, int, bool]:
    """(t_hand, num_classes, num_clients, has_server) from run.json, checked against the config. The hand-off
    step is ``t_hand`` (run folders written before it had its own name call it ``t_c``)."""
    try:
        t_hand = int(info["t_hand"] if "t_hand" in info else info["t_c"])
        num_classes, n, T = int(info["num_classes"]), int(info["num_clients"]), int(info["T"])
        has_server = info["has_server"]
    except KeyError as exc:
        raise RunError(f"{path}: run.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise RunError(f"{path}: run.json metadata unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(has_server, bool):
        raise RunError(f"{path}: run.json has_server must be true or false, got {has_server!r}")
    if T != config.diffusion.T:
        raise RunError(f"{path}: run.json says T = {T} but config.yaml says T = {config.diffusion.T}")
    if not 0 <= t_hand <= T or (has_server and t_hand == T):
        raise RunError(f"{path}: run.json t_hand = {t_hand} is outside 0..{T - 1 if has_server else T}")
    if n != config.data.num_clients:
        raise RunError(f"{path}: run.json says {n} clients but config.yaml says {config.data.num_clients}")
    if has_server != (config.t_c < T):
        raise RunError(f"{path}: run.json has_server = {has_server} contradicts cut_ratio {config.diffusion.cut_ratio}")
    if num_classes < 0:
        raise RunError(f"{path}: run.json num_classes must be >= 0, got {num_classes}")
    return t_hand, num_classes, n, has_server


def _absent_models(path: Path, info: dict, num_clients: int) -> frozenset[str]:
    """The models run.json says were not given (``absent_models``: an imported deployment); absent: none."""
    absent = info.get("absent_models", [])
    valid = {"server", *(f"client_{k}" for k in range(num_clients))}
    if not isinstance(absent, list) or not all(isinstance(a, str) and a in valid for a in absent):
        raise RunError(f"{path}: run.json absent_models must list model names (server, client_<k>), "
                       f"got {short_repr(absent, 60)}")
    return frozenset(absent)


def _snapshot_epochs(path: Path, info: dict, config: RunConfig) -> tuple[int, ...]:
    """The epochs run.json lists under ``snapshots`` (absent: none), checked against the config's training.snapshots."""
    epochs = info.get("snapshots", [])
    if not isinstance(epochs, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in epochs) \
            or tuple(epochs) != tuple(config.training.snapshots):
        raise RunError(f"{path}: run.json snapshots {short_repr(epochs, 60)} do not match config.yaml's "
                       f"training.snapshots {list(config.training.snapshots)}")
    return tuple(epochs)


@dataclass
class Run:
    """A finished run loaded from disk: config, schedule, models and (for scorers) the data."""

    path: Path
    config: RunConfig
    schedule: NoiseSchedule
    t_hand: int  # the hand-off step: where payloads sit and sampling hands off (config.t_c, later under payload noise)
    num_classes: int
    server_model: Denoiser | None
    client_models: list[Denoiser | None]
    info: dict
    device: torch.device = CPU  # where the models were loaded (Run.load's ``device``), not config.device
    snapshot: int | None = None  # the training.snapshots epoch whose weights the models are (None: the final ones)

    @classmethod
    def load(cls, path: Path | str, device: "str | torch.device | None" = None) -> "Run":
        """Load a run folder, refusing one whose files differ from the hashes in run.json or whose
        checkpoints hold NaN/inf weights (:class:`RunError`, one line naming the file).

        ``device`` (``auto``/None, ``cpu``, ``cuda``) is resolved here, on the loading machine, not
        taken from ``config.device`` (where the run was trained): a CUDA run opens on a CPU machine."""
        path = Path(path)
        target = resolve_device(device)  # an unavailable CUDA: ConfigError before anything is read
        marker = path / RUN_MARKER
        if not path.is_dir() or not marker.is_file():
            raise RunError(f"{path} is not a collafuse run folder (no {RUN_MARKER})")
        raw_info = read_bytes(marker, RUN_MARKER, RunError, MAX_RUN_JSON_BYTES)  # bounded: a huge file is refused
        try:
            info = json.loads(raw_info)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RunError(f"{path}: {RUN_MARKER} unreadable ({str(exc).splitlines()[0]})") from None
        if not isinstance(info, dict):
            raise RunError(f"{path}: {RUN_MARKER} must hold a JSON object")
        files = _check_manifest(path, info)
        raw_config = _read_verified(path, files, CONFIG_FILE)
        try:
            config = config_from_dict(parse_yaml(raw_config.decode("utf-8"), str(path / CONFIG_FILE), RunError))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RunError(f"{path}: {CONFIG_FILE} unreadable ({str(exc).splitlines()[0]})") from None
        t_hand, num_classes, n, has_server = _run_metadata(path, info, config)
        absent = _absent_models(path, info, n)  # an imported deployment may lack some models (DESIGN §9)
        ckpts = [("checkpoints/server.safetensors", "server")] if has_server and "server" not in absent else []
        if t_hand > 0:
            ckpts += [(f"checkpoints/client_{k}.safetensors", "client") for k in range(n) if f"client_{k}" not in absent]
        for epoch in _snapshot_epochs(path, info, config):  # recorded and present; hashed with the rest below
            for rel, _ in ckpts:
                _missing_or_unlisted(path, files, snapshot_file(epoch, PurePosixPath(rel).stem))
        _verify_run_files(path, files, {CONFIG_FILE, *(rel for rel, _ in ckpts)})
        models = {rel: _load_model(path, files, rel, config, side, num_classes, target) for rel, side in ckpts}
        schedule = NoiseSchedule.from_config(config.diffusion)
        server = models.get("checkpoints/server.safetensors")
        clients = [models.get(f"checkpoints/client_{k}.safetensors") for k in range(n)]
        return cls(path, config, schedule, t_hand, num_classes, server, clients, info, target)

    @property
    def snapshot_epochs(self) -> tuple[int, ...]:
        """The epochs of training.snapshots this run kept (checked against run.json at load)."""
        return tuple(self.config.training.snapshots)

    def at_snapshot(self, epoch: int) -> "Run":
        """This run with the models as they were after ``epoch`` (one of :attr:`snapshot_epochs`), on the same
        device: the same config, data, transcript and schedule, so attacks on it measure leakage against
        training length. Each checkpoint is read once and refused unless its sha256 is run.json's."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch not in self.snapshot_epochs:
            kept = ", ".join(map(str, self.snapshot_epochs)) or "none (training.snapshots is empty)"
            raise RunError(f"{self.path}: no snapshot at epoch {epoch!r}; snapshots kept: {kept}")
        files = _check_manifest(self.path, self.info)

        def load(name: str, side: str) -> Denoiser:
            return _load_model(self.path, files, snapshot_file(epoch, name), self.config, side, self.num_classes,
                               self.device)

        server = load("server", "server") if self.server_model is not None else None
        clients = [load(f"client_{k}", "client") if m is not None else None for k, m in enumerate(self.client_models)]
        return replace(self, server_model=server, client_models=clients, snapshot=epoch)

    def load_data(self) -> tuple[ImageSet, Splits]:
        """The source images and the split indices: ground truth for scoring, not for attacks.

        Hash-checked against run.json here (not in :meth:`load`: the source can be large)."""
        files = _check_manifest(self.path, self.info)
        raw = _read_verified(self.path, files, DATA_FILE, MAX_DATA_BYTES)
        path = self.path / DATA_FILE
        try:
            stored = load_bytes(raw)
            num_classes = int(_safetensors_metadata(raw)["num_classes"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise RunError(f"run data unreadable: {path} ({exc})") from None
        data, splits = _checked_data(path, stored, num_classes, self)  # the hash says who wrote it, not that it is sane
        _check_audit_key(self.path, len(data), len(self.client_models))
        return data, splits


def _checked_data(path: Path, stored: dict[str, torch.Tensor], num_classes: int, run: "Run") -> tuple[ImageSet, Splits]:
    """The run's source data and splits from ``data.safetensors``, refused (one :class:`RunError` line) unless
    every value is what training wrote: finite images in [-1, 1] of the config's shape, labels in range, split
    indices in range with the config's sizes, the clients' parts covering the members. Checked after the hash
    check: a folder whose hashes were rewritten over edited data is refused here, not by a traceback later."""
    d = run.config.data

    def bad(what: str) -> RunError:
        return RunError(f"run data {path}: {what}; the run folder was edited, re-train or re-import it")

    images = stored.get("images")
    if images is None:
        raise bad("no 'images' tensor")
    shape = (d.channels, d.image_size, d.image_size)
    if images.dtype != torch.float32 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise bad(f"images must be float32 (N, {', '.join(map(str, shape))}), got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    if not bool(torch.isfinite(images).all()):
        raise bad("images hold NaN or infinite values")
    if n and float(images.abs().max()) > 1.0 + 1e-5:
        raise bad(f"images lie outside [-1, 1] (largest magnitude {float(images.abs().max()):.4g})")
    if not 0 <= num_classes <= MAX_CLASSES:
        raise bad(f"num_classes must be in 0..{MAX_CLASSES}, got {num_classes}")
    labels = stored.get("labels")
    if labels is not None:
        if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
            raise bad(f"labels must be int64 ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if n and (int(labels.min()) < 0 or (num_classes and int(labels.max()) >= num_classes)):
            raise bad(f"labels must lie in 0..{max(num_classes, 1) - 1}")
    elif run.num_classes > 0:
        raise bad(f"the run is class-conditional ({run.num_classes} classes) but the data has no labels")
    sizes = {"members": d.n_members, "nonmembers": d.n_nonmembers, "aux": d.n_aux}
    names = [*sizes, *(f"client_{k}" for k in range(d.num_clients))]
    parts: dict[str, torch.Tensor] = {}
    for name in [*names, *(k.removeprefix("split.") for k in stored if k.startswith("split.canar"))]:
        idx = stored.get(f"split.{name}")
        if idx is None:
            raise bad(f"no split.{name}")
        if name == "canaries_in":
            if idx.dtype not in (torch.bool, torch.uint8, torch.int64) or idx.ndim != 1:
                raise bad(f"split.{name} must be a 1-D flag tensor")
        elif idx.dtype != torch.int64 or idx.ndim != 1:
            raise bad(f"split.{name} must be 1-D int64 indices, got {idx.dtype} {tuple(idx.shape)}")
        elif name != "canary_client" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise bad(f"split.{name} indexes outside the {n} images")
        if name in sizes and idx.numel() != sizes[name]:
            raise bad(f"split.{name} holds {idx.numel()} indices but config.yaml says {sizes[name]}")
        parts[name] = idx
    extra = sorted(k for k in stored if k.startswith("split.client_") and k.removeprefix("split.") not in parts)
    if extra:
        raise bad(f"{extra[0]} names a client the config does not have ({d.num_clients} clients)")
    clients = torch.cat([parts[f"client_{k}"] for k in range(d.num_clients)])
    if not torch.equal(clients.sort().values, parts["members"].sort().values):
        raise bad("the clients' splits do not partition the members")
    if "canaries" in parts:
        flags, client = parts.get("canaries_in"), parts.get("canary_client")
        if flags is None or client is None or flags.numel() != parts["canaries"].numel() or client.numel() != 1 \
                or not 0 <= int(client[0]) < d.num_clients:
            raise bad("split.canaries_in / split.canary_client do not match split.canaries")
    splits = Splits.from_dict(parts)
    return ImageSet(images, labels, num_classes), splits


def _check_audit_key(run_dir: Path, n_images: int, n_clients: int) -> None:
    """The audit key's values (scorer side): one member image and one client per row, each in range, and
    sequence numbers that occur once. Absent (an import without one): nothing to check."""
    from collafuse.transcript import AUDIT_KEY_FILE

    path = run_dir / AUDIT_KEY_FILE
    if not path.is_file():
        return
    try:
        from safetensors.torch import load_file

        key = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"audit key unreadable: {path} ({str(exc).splitlines()[0]})") from None
    seq, member, client = key.get("seq"), key.get("member_index"), key.get("client")
    if seq is None or member is None or client is None:
        raise RunError(f"audit key {path}: needs seq, member_index and client")
    rows = seq.numel()
    for name, value in (("seq", seq), ("member_index", member), ("client", client)):
        if value.dtype != torch.int64 or tuple(value.shape) != (rows,):
            raise RunError(f"audit key {path}: {name} must be int64 ({rows},), got {value.dtype} {tuple(value.shape)}")
    if rows and (int(member.min()) < 0 or int(member.max()) >= n_images or int(client.min()) < 0
                 or int(client.max()) >= n_clients or torch.unique(seq).numel() != rows):
        raise RunError(f"audit key {path}: member_index, client or seq out of range (the run has {n_images} "
                       f"images and {n_clients} clients; seq must not repeat)")


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (8-byte header length, then JSON)."""
    size = int.from_bytes(raw[:8], "little")
    if not 0 < size <= len(raw) - 8:
        raise ValueError("bad safetensors header")
    return json.loads(raw[8 : 8 + size]).get("__metadata__") or {}
