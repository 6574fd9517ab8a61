"""Fuzz the command line, round three (issue 24): no stale verdict, no lost run, no unbounded size, no hang.

Every case in :data:`CASES` is a hostile input to a command that writes (train, import, export, sample,
attack reconstruct, attack membership, audit, report) and must end in exit code 2 with exactly one
``collafuse: error:`` line on stderr, no traceback, and every watched tree (the case folder, the cache,
the shared run folder, the shared deployment) exactly as it was: refused before any work. The classes:

- output locations: a file where a folder must be, a symbolic link (loop, dangling, to a file, to a
  non-empty folder), a folder where a file belongs, a read-only or full file system, a cache that is a file;
- sizes: --references, T, epochs (config and grid), channels and parameters, image size, batch, shards,
  counts in a manifest and a grid, a diffusers config.json, oversized files, all refused by their bound;
- special files: a named pipe where an image, an .npz or a run file belongs (never opened, never waited on);
- values behind rewritten hashes: NaN, out-of-range and misshapen data, splits and audit keys;
- late validation: $COLLAFUSE_MEMORY_MB, a tampered run folder named by a grid, base keys the grid sets,
  policy limits of ±∞, a hand-edited results.json.

Each case runs in-process under a deadline (SIGALRM), so a hang fails instead of blocking CI; the named
pipe also runs in a real process with a timeout. Read-only and full file systems are simulated (the tests
may run as root, whom permission bits do not stop): ``os.open``/``os.mkdir`` raise EROFS, ``os.write``
raises ENOSPC, for paths below one folder. The stale-verdict case runs end to end.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from collafuse.cli import main
from collafuse.config import config_from_dict
from collafuse.runs import create_run, file_hashes

TINY = {
    "seed": 1,
    "device": "cpu",
    "data": {"image_size": 8, "n_members": 32, "n_nonmembers": 16, "n_aux": 16, "num_clients": 2},
    "diffusion": {"T": 20, "cut_ratio": 0.2},
    "server_model": {"channels": [8, 16], "time_dim": 16},
    "client_model": {"channels": [8, 16], "time_dim": 16},
    "training": {"epochs": 1, "batch_size": 16},
    "sampling": {"steps": 4, "per_client": 2},
}
GRID_OK = ("base: {device: cpu, data: {image_size: 8, n_members: 32, n_nonmembers: 16, n_aux: 16, num_clients: 2},"
           " diffusion: {T: 20}}\npayload_curve: {cut_ratios: [0.2], attacks: [rescale]}\n")
POLICY_OK = "limits:\n  T1: {mse: {min: 0.0}}\n"
RUN_POLICY = "limits:\n  T1: {reid_pool: {max: 0.99}}\n"
DEADLINE_S = 60


@dataclass(frozen=True)
class Shared:
    run: Path          # a valid tiny run folder (never changed by a case)
    deployment: Path   # its export: manifest.yaml and its files (never changed by a case)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("fuzz3")
    run = create_run(config_from_dict(TINY), root / "run", progress=False)
    from collafuse.export import export_run

    return Shared(run, export_run(run, root / "deployment"))


# ----------------------------------------------------------------------------- helpers

def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _config(d: Path, **over) -> str:
    return str(_write(d / "config.yaml", yaml.safe_dump(_merge(TINY, over), sort_keys=False)))


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, symlinks=True))


def rehash(run_dir: Path) -> None:
    """run.json's file hashes made to match the (tampered) files again, as a careful forger would."""
    info = json.loads((run_dir / "run.json").read_text())
    info["files"] = file_hashes(run_dir)
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def _under(path, folder: Path) -> bool:
    try:
        p = Path(os.path.abspath(os.fsdecode(path)))
    except TypeError:
        return False
    return p == folder or folder in p.parents


def read_only(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Below ``folder``, creating a file or a folder fails with EROFS (a read-only file system)."""
    real_open, real_mkdir = os.open, os.mkdir
    folder = Path(os.path.abspath(folder))

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and _under(path, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if _under(path, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    mp.setattr(os, "open", fake_open)
    mp.setattr(os, "mkdir", fake_mkdir)


def full_disk(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Below ``folder``, writing a byte fails with ENOSPC (a full file system); creating empty files works."""
    real_write = os.write
    folder = Path(os.path.abspath(folder))

    def fake_write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target and _under(target, folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    mp.setattr(os, "write", fake_write)
    real_open = builtins.open

    def fake_builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") and _under(file, folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    mp.setattr(builtins, "open", fake_builtin_open)
    mp.setattr(io, "open", fake_builtin_open)


# ----------------------------------------------------------------------------- commands

def train_cmd(d: Path, sh: Shared, out: Path) -> list[str]:
    return ["train", "--config", _config(d), "--out", str(out), "--quiet"]


def import_cmd(d: Path, sh: Shared, out: Path) -> list[str]:
    return ["import", str(sh.deployment / "manifest.yaml"), "--out", str(out)]


def export_cmd(d: Path, sh: Shared, out: Path) -> list[str]:
    return ["export", str(sh.run), "--out", str(out)]


def sample_cmd(d: Path, sh: Shared, out: Path, run: Path | None = None) -> list[str]:
    return ["sample", "--run", str(run or sh.run), "-n", "2", "--out", str(out), "--quiet"]


def recon_cmd(d: Path, sh: Shared, out: Path, run: Path | None = None, attacks: str = "rescale") -> list[str]:
    return ["attack", "reconstruct", "--run", str(run or sh.run), "--attacks", attacks, "--out", str(out), "--quiet"]


def member_cmd(d: Path, sh: Shared, out: Path, run: Path | None = None, *extra: str) -> list[str]:
    return ["attack", "membership", "--run", str(run or sh.run), "--targets", "payload", "--out", str(out),
            "--quiet", *extra]


def audit_cmd(d: Path, sh: Shared, out: Path, grid: str = GRID_OK, policy: str = POLICY_OK, *extra: str) -> list[str]:
    return ["audit", "--config", str(_write(d / "grid.yaml", grid)), "--policy", str(_write(d / "policy.yaml", policy)),
            "--out", str(out), "--cache", str(d / "audit-cache"), "--jobs", "1", "--quiet", *extra]


# command → (its argv for an output path, the name of a new output there)
WRITERS = {
    "train": (train_cmd, "run"), "import": (import_cmd, "imported"), "export": (export_cmd, "exported"),
    "sample": (sample_cmd, "s.png"), "reconstruct": (recon_cmd, "r.json"), "membership": (member_cmd, "m.json"),
    "audit": (audit_cmd, "audit"),
}


def report_folder(d: Path, files: dict[str, str | bytes] | None = None) -> Path:
    folder = d / "audit"
    for name, content in {"audit.json": "{}", "results.json": "[]", **(files or {})}.items():
        _write(folder / name, content)
    return folder


# ----------------------------------------------------------------------------- class 2: output locations

def parent_is_file(command: str):
    def build(d, sh, mp):
        make, name = WRITERS[command]
        blocker = _write(d / "notes.txt", "mine")
        return make(d, sh, blocker / name)
    return build


def on_read_only(command: str):
    def build(d, sh, mp):
        make, name = WRITERS[command]
        (d / "ro").mkdir()
        argv = make(d, sh, d / "ro" / name)
        read_only(mp, d / "ro")
        return argv
    return build


def on_full_disk(command: str):
    def build(d, sh, mp):
        make, name = WRITERS[command]
        (d / "full").mkdir()
        argv = make(d, sh, d / "full" / name)
        full_disk(mp, d / "full")
        return argv
    return build


def report_on(kind: str):
    def build(d, sh, mp):
        folder = report_folder(d)
        (read_only if kind == "ro" else full_disk)(mp, folder)
        return ["report", str(folder)]
    return build


def link_to(command: str, target: str):
    """``--out`` a symbolic link: to a non-empty folder, to a file, to itself (a loop), or to nothing."""
    def build(d, sh, mp):
        make, name = WRITERS[command]
        link = d / name
        if target == "full folder":
            _write(d / "elsewhere" / "keep.txt", "mine")
            link.symlink_to(d / "elsewhere")
        elif target == "file":
            link.symlink_to(_write(d / "elsewhere.txt", "mine"))
        elif target == "loop":
            link.symlink_to(link)
        elif target == "folder":
            (d / "elsewhere").mkdir()
            link.symlink_to(d / "elsewhere")
        else:  # dangling
            link.symlink_to(d / "nowhere" / "x")
        return make(d, sh, link)
    return build


def folder_named(command: str, name: str | None = None):
    """A folder where the command writes a file (its --out, or a file beside it)."""
    def build(d, sh, mp):
        make, out_name = WRITERS[command]
        (d / (name or out_name)).mkdir()
        _write(d / (name or out_name) / "keep.txt", "mine")
        return make(d, sh, d / out_name)
    return build


def report_with(files: dict[str, str | bytes], folders: tuple[str, ...] = ()):
    def build(d, sh, mp):
        folder = report_folder(d, files)
        for name in folders:
            _write(folder / name / "keep.txt", "mine")
        return ["report", str(folder)]
    return build


def audit_resume_with(folders: tuple[str, ...] = (), files: dict[str, str] | None = None):
    """An earlier audit's folder, with something in the way of what the audit writes at its end."""
    def build(d, sh, mp):
        out = d / "audit"
        _write(out / "audit.json", "{}")
        for name in folders:
            _write(out / name / "keep.txt", "mine")
        for name, content in (files or {}).items():
            _write(out / name, content)
        return audit_cmd(d, sh, out)
    return build


def cache_is_file(command: str):
    """$COLLAFUSE_CACHE (or --cache) is a regular file: the cache written after the work cannot be."""
    def build(d, sh, mp):
        cache = _write(d / "cache-file", "not a folder")
        mp.setenv("COLLAFUSE_CACHE", str(cache))
        if command == "reconstruct":
            return recon_cmd(d, sh, d / "r.json", attacks="tweedie")
        if command == "membership":
            return member_cmd(d, sh, d / "m.json", None, "--attacks", "rmia", "--references", "2")
        if command == "audit --cache":
            argv = audit_cmd(d, sh, d / "audit")
            argv[argv.index("--cache") + 1] = str(cache / "below")
            return argv
        argv = audit_cmd(d, sh, d / "audit")  # the default cache: $COLLAFUSE_CACHE/audit
        i = argv.index("--cache")
        return argv[:i] + argv[i + 2:]
    return build


def cache_read_only(d, sh, mp):
    (d / "ro-cache").mkdir()
    mp.setenv("COLLAFUSE_CACHE", str(d / "ro-cache"))
    read_only(mp, d / "ro-cache")
    return recon_cmd(d, sh, d / "r.json", attacks="tweedie")


OUTPUT_CASES = {
    **{f"{c} --out below a regular file": (parent_is_file(c), "notes.txt") for c in WRITERS},
    **{f"{c} --out on a read-only file system": (on_read_only(c), "Read-only file system") for c in WRITERS},
    **{f"{c} --out on a full disk": (on_full_disk(c), "No space left on device") for c in WRITERS},
    "report on a read-only file system": (report_on("ro"), "Read-only file system"),
    "report on a full disk": (report_on("full"), "No space left on device"),
    "train --out a link to a non-empty folder": (link_to("train", "full folder"), "not empty"),
    "train --out a link loop": (link_to("train", "loop"), "loops"),
    "import --out a link to a file": (link_to("import", "file"), "not a folder"),
    "export --out a link loop": (link_to("export", "loop"), "loops"),
    "sample --out a dangling link": (link_to("sample", "dangling"), "already exists"),
    "reconstruct --out a link to a folder": (link_to("reconstruct", "folder"), "already exists"),
    "membership --out a dangling link": (link_to("membership", "dangling"), "already exists"),
    "audit --out a link to a file": (link_to("audit", "file"), "not a folder"),
    "train --out a regular file": (lambda d, sh, mp: train_cmd(d, sh, _write(d / "run", "mine")), "not a folder"),
    "sample --out a folder": (folder_named("sample"), "already exists"),
    "reconstruct --out a folder": (folder_named("reconstruct"), "already exists"),
    "reconstruct its PNG a folder": (folder_named("reconstruct", "r.png"), "already exists"),
    "reconstruct its per-image file a folder": (folder_named("reconstruct", "r.per_image.npz"), "already exists"),
    "membership --out a folder": (folder_named("membership"), "already exists"),
    "report report.html a folder": (report_with({}, ("report.html",)), "report.html"),
    "report report.md a folder": (report_with({}, ("report.md",)), "report.md"),
    "report figures a file": (report_with({"figures": "mine"}), "figures"),
    "audit resume: results.json a folder": (audit_resume_with(("results.json",)), "results.json"),
    "audit resume: report.html a folder": (audit_resume_with(("report.html",)), "report.html"),
    "audit resume: cells a file": (audit_resume_with(files={"cells": "mine"}), "cells"),
    "reconstruct tweedie: $COLLAFUSE_CACHE a file": (cache_is_file("reconstruct"), "attacker cache"),
    "reconstruct tweedie: $COLLAFUSE_CACHE read-only": (cache_read_only, "Read-only file system"),
    "membership rmia: $COLLAFUSE_CACHE a file": (cache_is_file("membership"), "reference-model cache"),
    "audit: $COLLAFUSE_CACHE a file": (cache_is_file("audit"), "--cache"),
    "audit: --cache below a file": (cache_is_file("audit --cache"), "--cache"),
}


# ----------------------------------------------------------------------------- class 3: sizes

def train_over(**over):
    return lambda d, sh, mp: train_cmd_over(d, over)


def train_cmd_over(d: Path, over: dict) -> list[str]:
    return ["train", "--config", _config(d, **over), "--out", str(d / "run"), "--quiet"]


def audit_grid(text: str, policy: str = POLICY_OK, *extra: str):
    return lambda d, sh, mp: audit_cmd(d, sh, d / "audit", text, policy, *extra)


def _manifest(d: Path, sh: Shared) -> tuple[Path, dict]:
    folder = _copy(sh.deployment, d / "deployment")
    return folder, yaml.safe_load((folder / "manifest.yaml").read_text())


def manifest_edit(change):
    """import of a copy of the shared deployment, changed by ``change(folder, manifest)`` first."""
    def build(d, sh, mp):
        folder, manifest = _manifest(d, sh)
        change(folder, manifest)
        (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        return ["import", str(folder / "manifest.yaml"), "--out", str(d / "imported")]
    return build


def _npz_claiming(name: str, claimed: tuple[int, ...], **real: np.ndarray) -> bytes:
    """A .npz whose array ``name`` holds 8 bytes but whose header claims ``claimed`` (uint8), beside ``real``."""
    buf = io.BytesIO()
    header = repr({"descr": "|u1", "fortran_order": False, "shape": claimed})
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + b"\0" * 8
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}.npy", raw)
        for key, value in real.items():
            array = io.BytesIO()
            np.lib.format.write_array(array, value)
            z.writestr(f"{key}.npy", array.getvalue())
    return buf.getvalue()


def diffusers_server(unet_config: dict):
    """The manifest's server model: a diffusers folder whose config.json is ``unet_config`` (weights: 8 bytes)."""
    def change(folder: Path, manifest: dict) -> None:
        model = folder / "models" / "server_d"
        _write(model / "config.json", json.dumps({"_class_name": "UNet2DModel", **unet_config}))
        _write(model / "diffusion_pytorch_model.safetensors", b"\0" * 8)
        manifest["models"]["server"] = {"diffusers": "models/server_d"}
    return change


def native_server_config(**fields):
    def change(folder: Path, manifest: dict) -> None:
        path = folder / "models" / "server" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return change


def sparse(path: Path, size: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)


def big_weights(folder: Path, manifest: dict) -> None:
    sparse(folder / "models" / "server" / "model.safetensors", 3 << 30)  # sparse: no disk used


def many_clients(folder: Path, manifest: dict) -> None:
    manifest["models"]["clients"] = [None] * 1001


def big_images(folder: Path, manifest: dict) -> None:
    np.savez(folder / "members.npz", images=np.zeros((4, 300, 300), np.uint8), client=np.arange(4) % 2)


def lying_images(folder: Path, manifest: dict) -> None:
    (folder / "members.npz").write_bytes(_npz_claiming("images", (70_000, 64, 64), client=np.arange(32) % 2))


def huge_T(folder: Path, manifest: dict) -> None:
    manifest["schedule"] = {"T": 10**12, "schedule": "cosine"}


def big_checkpoint(d, sh, mp):
    run = _copy(sh.run, d / "run")
    sparse(run / "checkpoints" / "server.safetensors", 2 << 30)  # read whole, so refused by its size first
    return sample_cmd(d, sh, d / "s.png", run)


def big_run_json(d, sh, mp):
    run = _copy(sh.run, d / "run")
    sparse(run / "run.json", 100 << 20)
    return sample_cmd(d, sh, d / "s.png", run)


SIZE_CASES = {
    "membership --references 10^9": (lambda d, sh, mp: member_cmd(d, sh, d / "m.json", None, "--references",
                                                                  "1000000000"), "2..64"),
    "membership --references 65": (lambda d, sh, mp: member_cmd(d, sh, d / "m.json", None, "--references", "65"),
                                   "2..64"),
    "config epochs 10^9": (train_over(training={"epochs": 10**9}), "training.epochs"),
    "config T 100001": (train_over(diffusion={"T": 100_001}), "100000"),
    "config 1001 clients": (train_over(data={"num_clients": 1001, "n_members": 1100, "n_nonmembers": 0,
                                             "n_aux": 0}), "data.num_clients"),
    "config 500 M parameters": (train_over(server_model={"channels": [1024] * 4, "blocks_per_level": 4,
                                                         "time_dim": 16}), "parameters"),
    "config clients' parameters together": (train_over(
        data={"num_clients": 900, "n_members": 1000, "n_nonmembers": 0, "n_aux": 0},
        client_model={"channels": [256, 512], "time_dim": 16}), "parameters together"),
    "config feature map of a batch": (train_over(data={"image_size": 256}, training={"batch_size": 60_000},
                                                 client_model={"channels": [64, 64], "time_dim": 16}), "GiB per feature map"),
    "config transcript shards in memory": (train_over(data={"image_size": 256}, training={"shard_rows": 1 << 24,
                                                                                            "epochs": 10_000}),
                                           "shard_rows"),
    "config sample grid 10^6 per client": (train_over(sampling={"per_client": 10**6}), "sampling.per_client"),
    "config batch 10^9": (train_over(training={"batch_size": 10**9}), "training.batch_size"),
    "grid base epochs 10^9": (audit_grid(GRID_OK.replace("diffusion: {T: 20}}", "diffusion: {T: 20}, "
                                                          "training: {epochs: 1000000000}}")
                                         + "systems: {cut_ratios: [0.5]}\n"), "training.epochs"),
    "grid payload_curve epochs 10^9": (audit_grid(GRID_OK.replace("attacks: [rescale]}", "attacks: [rescale], "
                                                                  "epochs: 1000000000}")), "payload_curve.epochs"),
    "grid samples_per_client 10^9": (audit_grid(GRID_OK + "systems: {cut_ratios: [0.5], samples_per_client: "
                                                "1000000000}\n"), "samples_per_client"),
    "grid references 10^9": (audit_grid(GRID_OK + "systems: {cut_ratios: [0.5], references: 1000000000}\n"),
                             "references"),
    "grid of 10100 cells": (audit_grid(GRID_OK.replace("cut_ratios: [0.2]", "cut_ratios: [" + ", ".join(
        f"{i / 100:.2f}" for i in range(101)) + "]") + "seeds: [" + ", ".join(map(str, range(100))) + "]\n"),
                            "10100 cells"),
    "audit --jobs 10^5": (audit_grid(GRID_OK, POLICY_OK, "--jobs", "100000"), "--jobs"),
    "manifest T 10^12": (manifest_edit(huge_T), "schedule.T"),
    "manifest 1001 clients": (manifest_edit(many_clients), "models.clients"),
    "manifest 300x300 images": (manifest_edit(big_images), "at most 256×256"),
    "manifest images claiming 2.9e8 values": (manifest_edit(lying_images), "values"),
    "manifest diffusers block_out_channels 65536": (manifest_edit(diffusers_server(
        {"block_out_channels": [65536, 65536], "down_block_types": ["DownBlock2D"] * 2,
         "up_block_types": ["UpBlock2D"] * 2})), "block_out_channels"),
    "manifest diffusers 2 G parameters": (manifest_edit(diffusers_server(
        {"block_out_channels": [4096] * 4, "layers_per_block": 4, "down_block_types": ["DownBlock2D"] * 4,
         "up_block_types": ["UpBlock2D"] * 4, "sample_size": 8, "in_channels": 1, "out_channels": 1})), "parameters"),
    "manifest native channels 4096": (manifest_edit(native_server_config(channels=[4096, 4096])), "channels"),
    "manifest weights file of 3 GiB": (manifest_edit(big_weights), "GiB of weights"),
    "sample run.json of 100 MiB": (big_run_json, "larger than"),
    "sample a 2 GiB checkpoint": (big_checkpoint, "at most 1.18 GiB"),
    "train .npz images claiming 2.9e8 values": (lambda d, sh, mp: train_npz_bytes(d, _npz_claiming(
        "images", (70_000, 64, 64))), "values"),
}


def train_npz_bytes(d: Path, content: bytes | None, source: str = "npz") -> list[str]:
    path = d / "data.npz"
    if content is not None:
        path.write_bytes(content)
    return train_cmd_over(d, {"data": {"source": source, "path": str(path), "n_members": 8, "n_nonmembers": 4,
                                       "n_aux": 4}})


# ----------------------------------------------------------------------------- class 4: special files

def fifo_in_image_folder(d, sh, mp):
    (d / "images").mkdir()
    os.mkfifo(d / "images" / "a.png")  # nobody ever writes to it: opening it blocking would hang forever
    return train_cmd_over(d, {"data": {"source": "folder", "path": str(d / "images"), "n_members": 8,
                                       "n_nonmembers": 4, "n_aux": 4}})


def fifo_npz(d, sh, mp):
    os.mkfifo(d / "data.npz")
    return train_npz_bytes(d, None)


def fifo_in_manifest(name: str):
    def change(folder: Path, manifest: dict) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return change


def fifo_in_run(d, sh, mp):
    run = _copy(sh.run, d / "run")
    (run / "samples.png").unlink()
    os.mkfifo(run / "samples.png")
    return sample_cmd(d, sh, d / "s.png", run)


FIFO_CASES = {
    "train: a FIFO named a.png in the image folder": (fifo_in_image_folder, "named pipe"),
    "train: data.path a FIFO": (fifo_npz, "named pipe"),
    "import: members.npz a FIFO": (manifest_edit(fifo_in_manifest("members.npz")), "named pipe"),
    "import: the server's config.json a FIFO": (manifest_edit(fifo_in_manifest("models/server/config.json")),
                                                "config.json"),
    "sample: a run file replaced by a FIFO": (fifo_in_run, "samples.png"),
}


# ----------------------------------------------------------------------------- class 5: values behind the hashes

def edit_data(change):
    """data.safetensors changed by ``change(tensors)``, and run.json's hashes rewritten to match."""
    def tamper(run: Path) -> None:
        path = run / "data.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"num_classes": "10"})
        rehash(run)
    return tamper


def edit_key(change):
    def tamper(run: Path) -> None:
        path = run / "audit_key.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
        rehash(run)
    return tamper


def nan_weights(run: Path) -> None:
    path = run / "checkpoints" / "server.safetensors"
    tensors = load_file(str(path))
    next(v for v in tensors.values() if v.is_floating_point()).fill_(float("nan"))
    save_file(tensors, str(path))
    rehash(run)


def on_tampered(command: str, tamper):
    def build(d, sh, mp):
        run = _copy(sh.run, d / "run")
        tamper(run)
        if command == "reconstruct":
            return recon_cmd(d, sh, d / "r.json", run)
        if command == "membership":
            return member_cmd(d, sh, d / "m.json", run)
        if command == "sample":
            return sample_cmd(d, sh, d / "s.png", run)
        if command == "export":
            return ["export", str(run), "--out", str(d / "exported")]
        grid = f"systems:\n  runs: [{run}]\n  attacks: {{T1: [rescale]}}\n  samples_per_client: 8\n"
        return audit_cmd(d, sh, d / "audit", grid, RUN_POLICY)
    return build


def _set(key: str, value):
    def change(t: dict) -> None:
        t[key] = value(t[key]) if callable(value) else value
    return change


NAN_IMAGES = edit_data(_set("images", lambda x: x.index_fill(0, torch.tensor([0]), float("nan"))))
VALUE_CASES = {
    "reconstruct: NaN images behind rewritten hashes": (on_tampered("reconstruct", NAN_IMAGES), "NaN"),
    "membership: images outside [-1, 1]": (on_tampered("membership", edit_data(_set("images", lambda x: x * 3))),
                                           "outside [-1, 1]"),
    "reconstruct: labels outside the classes": (on_tampered("reconstruct", edit_data(_set(
        "labels", lambda x: x + 50))), "labels"),
    "reconstruct: a split index outside the images": (on_tampered("reconstruct", edit_data(_set(
        "split.aux", lambda x: x + 10**6))), "split.aux"),
    "reconstruct: split.members of another size": (on_tampered("reconstruct", edit_data(_set(
        "split.members", lambda x: x[:-1]))), "split.members"),
    "membership: RGB images in a grayscale run": (on_tampered("membership", edit_data(_set(
        "images", lambda x: x.repeat(1, 3, 1, 1)))), "images must be"),
    "reconstruct: audit key naming image 10^6": (on_tampered("reconstruct", edit_key(_set(
        "member_index", lambda x: x + 10**6))), "audit key"),
    "export: NaN images behind rewritten hashes": (on_tampered("export", NAN_IMAGES), "NaN"),
    "audit: a named run with NaN images": (on_tampered("audit", NAN_IMAGES), "NaN"),
    "sample: NaN weights behind rewritten hashes": (on_tampered("sample", nan_weights), "NaN/inf"),
}


# ----------------------------------------------------------------------------- class 6: late validation

def with_env(name: str, value: str, make):
    def build(d, sh, mp):
        mp.setenv(name, value)
        return make(d, sh)
    return build


def flip_byte(run: Path) -> None:
    path = run / "checkpoints" / "server.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))


def drop_run_json(run: Path) -> None:
    (run / "run.json").unlink()


def results(rows) -> dict[str, str]:
    return {"results.json": json.dumps(rows)}


ROW = {"cell": "payload|digits|c=0.20|cut|none|seed=0", "config_hash": "0" * 16, "kind": "payload",
       "dataset": "digits", "cut_ratio": 0.2, "t_c": 4, "defense": "none", "payload_kind": "cut", "epochs": 1,
       "seed": 0, "threat": "T1", "target": "payload", "attack": "rescale", "metric": "mse", "value": 0.1,
       "ci_low": 0.05, "ci_high": 0.15, "t": None, "epoch": None}


def row(**changes) -> dict:
    return {**ROW, **changes}


LATE_CASES = {
    "audit $COLLAFUSE_MEMORY_MB=0": (with_env("COLLAFUSE_MEMORY_MB", "0", lambda d, sh: audit_cmd(d, sh, d / "audit")),
                                     "COLLAFUSE_MEMORY_MB"),
    "audit --quick $COLLAFUSE_MEMORY_MB=inf": (with_env("COLLAFUSE_MEMORY_MB", "inf", lambda d, sh: [
        "audit", "--quick", "--out", str(d / "audit"), "--cache", str(d / "c"), "--quiet"]), "COLLAFUSE_MEMORY_MB"),
    "reconstruct $COLLAFUSE_MEMORY_MB=abc": (with_env("COLLAFUSE_MEMORY_MB", "abc", lambda d, sh: recon_cmd(
        d, sh, d / "r.json")), "COLLAFUSE_MEMORY_MB"),
    "membership $COLLAFUSE_MEMORY_MB=-5": (with_env("COLLAFUSE_MEMORY_MB", "-5", lambda d, sh: member_cmd(
        d, sh, d / "m.json")), "COLLAFUSE_MEMORY_MB"),
    "audit: a named run with one byte flipped": (on_tampered("audit", flip_byte), "changed after"),
    "audit: a named run without run.json": (on_tampered("audit", drop_run_json), "not a run folder"),
    "grid base.seed banana": (audit_grid(GRID_OK.replace("base: {", "base: {seed: banana, ")), "base.seed"),
    "grid base.defenses": (audit_grid(GRID_OK.replace("base: {", "base: {defenses: [], ")), "base.defenses"),
    "grid base.diffusion.cut_ratio": (audit_grid(GRID_OK.replace("diffusion: {T: 20}", "diffusion: {T: 20, "
                                                                 "cut_ratio: 0.5}")), "base.diffusion.cut_ratio"),
    "grid base.training.payload": (audit_grid(GRID_OK.replace("base: {", "base: {training: {payload: naive}, ")),
                                   "base.training.payload"),
    "policy max .inf": (audit_grid(GRID_OK, "limits:\n  T1: {mse: {max: .inf}}\n"), "finite"),
    "policy min -.inf": (audit_grid(GRID_OK, "limits:\n  T1: {mse: {min: -.inf}}\n"), "finite"),
    "report results.json: unknown metric": (report_with(results([row(metric="leak")])), "unknown metric"),
    "report results.json: a metric outside its groups": (report_with(results([row(threat="utility", metric="auc")])),
                                                         "not measured under"),
    "report results.json: value 'NaN'": (report_with(results([row(value="NaN")])), "value"),
    "report results.json: value true": (report_with(results([row(value=True)])), "value"),
    "report results.json: value Infinity": (report_with({"results.json": json.dumps([row()]).replace(
        '"value": 0.1', '"value": Infinity')}), "not finite"),
    "report results.json: cut_ratio 5": (report_with(results([row(cut_ratio=5)])), "cut_ratio"),
    "report results.json: an object, not rows": (report_with(results({"rows": [ROW]})), "list of rows"),
    "report results.json: a row without a metric": (report_with(results([{k: v for k, v in ROW.items()
                                                                          if k != "metric"}])), "metric"),
    "report results.json: t -3": (report_with(results([row(metric="auc_at_t", threat="T2", t=-3)])), "whole number"),
}

CASES = {**OUTPUT_CASES, **SIZE_CASES, **FIFO_CASES, **VALUE_CASES, **LATE_CASES}


# ----------------------------------------------------------------------------- the harness

class CaseTimeout(BaseException):
    """A case ran past its deadline (a hang): not an Exception, so nothing on the way swallows it."""


@contextlib.contextmanager
def deadline(seconds: int):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` (kind, size, mtime, link target), links and pipes included, never followed."""
    out: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            out[folder] = ("dir",)
            for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                link = os.readlink(path) if os.path.islink(path) else None
                out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, link)
    return out


def test_enough_cases_over_every_class_and_command():
    assert len(CASES) >= 80
    assert len(OUTPUT_CASES) >= 40 and len(SIZE_CASES) >= 20 and len(FIFO_CASES) >= 4
    assert len(VALUE_CASES) >= 8 and len(LATE_CASES) >= 15
    names = " ".join(CASES)
    for command in ("train", "import", "export", "sample", "reconstruct", "membership", "audit", "report"):
        assert names.count(command) >= 4, command


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2_before_any_work(name, shared, tmp_path, monkeypatch, capsys):
    build, phrase = CASES[name]
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(case)
    with monkeypatch.context() as mp:
        argv = build(case, shared, mp)
        before = snapshot(tmp_path, shared.run, shared.deployment)
        capsys.readouterr()
        with deadline(DEADLINE_S):
            code = main(argv)
    _out, err = capsys.readouterr()
    lines = err.strip("\n").splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: "), err[-2000:]
    assert "Traceback" not in err and len(lines[0]) <= 2100
    if phrase is not None:
        assert phrase in lines[0], lines[0]
    assert snapshot(tmp_path, shared.run, shared.deployment) == before


# ----------------------------------------------------------------------------- beside the table

def test_a_fifo_in_an_image_folder_is_one_line_in_a_real_process_not_a_hang(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    argv = fifo_in_image_folder(case, None, None)
    env = {**os.environ, "COLLAFUSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "collafuse", *argv], capture_output=True, text=True, env=env,
                          cwd=case, timeout=DEADLINE_S, check=False)
    lines = proc.stderr.strip("\n").splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "named pipe" in lines[0], proc.stderr[-2000:]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["an empty folder", "nothing yet"])
def test_train_follows_an_out_link_deliberately_and_keeps_the_run(target, tmp_path, capsys):
    """A symbolic link as --out is followed: the run is written where it points, never trained and thrown away."""
    real = tmp_path / "real" / "run"
    if target == "an empty folder":
        real.mkdir(parents=True)
    else:
        real.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["train", "--config", _config(tmp_path), "--out", str(link), "--quiet"]) == 0
    assert f"run written to {real}" in capsys.readouterr().out
    assert (real / "run.json").is_file() and link.is_symlink() and os.readlink(link) == str(real)
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_an_interrupted_sweeps_workers_release_their_semaphores(tmp_path):
    """Workers end through Python on SIGTERM (runner._init_worker), so no 'leaked semaphore' warning follows
    an interrupted audit, a SIGTERM or a full disk (tqdm's lock in a worker leaked one before)."""
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        def work(x):
            from pathlib import Path
            from tqdm import tqdm
            for _ in tqdm(range(2), disable=True):  # tqdm takes a multiprocessing lock in the worker
                pass
            Path(f"ready{x}").touch()
            time.sleep(60)

        if __name__ == "__main__":
            from collafuse.benchmarks.audit.runner import _init_worker
            pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=_init_worker)
            futures = [pool.submit(work, i) for i in range(2)]
            from pathlib import Path
            while not (Path("ready0").exists() and Path("ready1").exists()):
                time.sleep(0.05)
            procs = list(pool._processes.values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(timeout=30)  # the executor's own thread may reap a worker first: no exit code to compare
            print("workers ended")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=DEADLINE_S, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked semaphore" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _audit_named_run(tmp_path: Path, run: Path, capsys) -> tuple[int, str, str]:
    grid = _write(tmp_path / "grid.yaml", f"systems:\n  runs: [{run}]\n  attacks: {{T1: [rescale]}}\n"
                                          "  samples_per_client: 8\n")
    policy = _write(tmp_path / "policy.yaml", RUN_POLICY)
    code = main(["audit", "--config", str(grid), "--policy", str(policy), "--out", str(tmp_path / "audit"),
                 "--cache", str(tmp_path / "cache"), "--jobs", "1", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_named_run_changed_after_its_audit_never_gets_the_old_verdict(shared, tmp_path, capsys):
    """The stale PASS of issue 24: audit a run folder, flip one byte of its server checkpoint, audit again."""
    run = _copy(shared.run, tmp_path / "deployment")
    code, out, err = _audit_named_run(tmp_path, run, capsys)
    assert code in (0, 1) and "1 cells computed, 0 reused" in out, err
    cells = sorted((tmp_path / "audit" / "cells").glob("*.json"))
    first = json.loads(cells[0].read_text())

    flip_byte(run)  # as found after the audit: the hashes in run.json no longer match
    before = snapshot(tmp_path / "audit")
    code, out, err = _audit_named_run(tmp_path, run, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "checkpoints/server.safetensors was changed" in lines[0], err
    assert "reused" not in out and snapshot(tmp_path / "audit") == before  # refused before any work

    rehash(run)  # a forger who also rewrote run.json: another content, another key
    code, out, err = _audit_named_run(tmp_path, run, capsys)
    assert code in (0, 1) and "1 cells computed, 0 reused" in out, (out, err)
    assert "changed since its cell" in err and "recomputing it" in err and err.count("\n") == 1, err
    second = max((tmp_path / "audit" / "cells").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert json.loads(second.read_text())["cell"]["run_sha256"] != first["cell"]["run_sha256"]
    meta = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert [c["config_hash"] for c in meta["cells"]] == [second.stem]

    code, out, err = _audit_named_run(tmp_path, run, capsys)  # unchanged since: reused, silently
    assert code in (0, 1) and "0 cells computed, 1 reused" in out and err == "", err


def test_refused_audits_leave_no_folder_behind(tmp_path, capsys, monkeypatch):
    """Validation before the audit folder exists: nothing created, not even an empty cells/."""
    monkeypatch.setenv("COLLAFUSE_MEMORY_MB", "0")
    argv = audit_cmd(tmp_path, None, tmp_path / "new" / "audit")
    assert main(argv) == 2
    assert not (tmp_path / "new").exists() and not (tmp_path / "audit-cache").exists()
    capsys.readouterr()


def test_a_named_run_changed_between_the_grid_and_the_sweep_is_refused(shared, tmp_path):
    """runner.reverify_run: the folder is checked against its key again when the sweep starts."""
    from collafuse.errors import ConfigError

    from collafuse.benchmarks.audit.grid import SystemsSpec, existing_run_cell
    from collafuse.benchmarks.audit.runner import reverify_run

    run = _copy(shared.run, tmp_path / "deployment")
    cell = existing_run_cell(str(run), SystemsSpec(runs=(str(run),), attacks={"T1": ("rescale",)}))
    reverify_run(cell)  # unchanged: nothing to say
    flip_byte(run)
    with pytest.raises(ConfigError, match="checkpoints/server.safetensors was changed"):
        reverify_run(cell)
    rehash(run)
    with pytest.raises(ConfigError, match="changed after the grid was read"):
        reverify_run(cell)
