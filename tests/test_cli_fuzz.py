"""Fuzz the command line with bad input (issue 11): every case below exits 2 with exactly one
``collafuse: error:`` line on stderr, no traceback, and leaves every file it could reach as it was.

The cases cover every command (train, sample, attack reconstruct, attack membership, audit,
report) and every kind of input: configs, grids and policies (garbage bytes, deep nesting, an
alias bomb, wrong types, unknown and duplicate keys, negative / NaN / huge numbers), data files
(garbage, pickled, lying headers, wrong shapes, NaN), run folders (missing or garbage run.json,
truncated checkpoint, garbage index.json, a NaN shard whose hash matches) and audit folders.
They run in-process (``collafuse.cli.main``); three run as real subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
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
TINY_TEXT = yaml.safe_dump(TINY, sort_keys=False)

# 9 levels of 9 aliases: 9^9 ≈ 387 million strings once expanded, from a few hundred bytes.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
GARBAGE = bytes(range(128, 256)) * 8 + b"\x00\xff\xfe"
DEEP_YAML = "a: " + "[" * 3000 + "]" * 3000 + "\n"
DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> Path:
    """One valid tiny run folder for the run-folder cases (trained once per module)."""
    return create_run(config_from_dict(TINY), tmp_path_factory.mktemp("fuzz") / "run", progress=False)


# ----------------------------------------------------------------------------- helpers

def _write(d: Path, name: str, content: str | bytes) -> str:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_text(text: str | bytes):
    def build(d: Path, run: Path) -> list[str]:
        return ["train", "--config", _write(d, "config.yaml", text), "--out", str(d / "out"), "--quiet"]
    return build


def train_over(**over):
    return train_text(yaml.safe_dump(_merge(TINY, over), sort_keys=False))


def train_lines(*lines: str):
    """The tiny config plus raw YAML lines appended (for what safe_dump cannot write: duplicates, tags)."""
    return train_text(TINY_TEXT + "".join(line + "\n" for line in lines))


def _npz_config(d: Path, data_path: Path, source: str = "npz", conditional: bool = False) -> list[str]:
    raw = _merge(TINY, {"conditional": conditional,
                        "data": {"source": source, "path": str(data_path), "n_members": 8, "n_nonmembers": 4,
                                 "n_aux": 4}})
    return ["train", "--config", _write(d, "config.yaml", yaml.safe_dump(raw)), "--out", str(d / "out"), "--quiet"]


def train_npz(conditional: bool = False, **arrays):
    def build(d: Path, run: Path) -> list[str]:
        np.savez(d / "data.npz", **arrays)
        return _npz_config(d, d / "data.npz", conditional=conditional)
    return build


def train_npz_bytes(make):
    def build(d: Path, run: Path) -> list[str]:
        (d / "data.npz").write_bytes(make())
        return _npz_config(d, d / "data.npz")
    return build


def _npz_lying_header(name: str, real: np.ndarray, claimed: tuple[int, ...], others: dict | None = None) -> bytes:
    """A .npz whose array ``name`` holds ``real`` but whose header claims shape ``claimed``."""
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for key, arr in {**(others or {}), name: real}.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            raw = buf.getvalue()
            if key == name:  # format 1.0: 8 bytes of magic and version, a 2-byte length, the header, the data
                body = raw[10 + struct.unpack("<H", raw[8:10])[0]:]
                header = repr({"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
                               "shape": claimed})
                header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
                raw = raw[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + body
            z.writestr(f"{key}.npy", raw)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def train_folder(files: dict[str, bytes]):
    def build(d: Path, run: Path) -> list[str]:
        folder = d / "images"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        return _npz_config(d, folder, source="folder")
    return build


def _digits(n=32, shape=(8, 8), dtype=np.float32):
    return np.random.default_rng(0).random((n, *shape)).astype(dtype)


def rehash(run_dir: Path) -> None:
    """Make run.json's file hashes match the (tampered) files again, as a careful forger would."""
    info = json.loads((run_dir / "run.json").read_text())
    info["files"] = file_hashes(run_dir)
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def _copy(d: Path, run: Path) -> Path:
    return Path(shutil.copytree(run, d / "run"))


def sample_cmd(r: Path, d: Path, *extra: str) -> list[str]:
    return ["sample", "--run", str(r), "-n", "2", "--out", str(d / "s.png"), "--quiet", *extra]


def recon_cmd(r: Path, d: Path, *extra: str) -> list[str]:
    return ["attack", "reconstruct", "--run", str(r), "--attacks", "rescale", "--out", str(d / "rec.json"),
            "--quiet", *extra]


def member_cmd(r: Path, d: Path, *extra: str) -> list[str]:
    return ["attack", "membership", "--run", str(r), "--targets", "payload", "--out", str(d / "mem.json"),
            "--quiet", *extra]


COMMANDS = {"sample": sample_cmd, "reconstruct": recon_cmd, "membership": member_cmd}


def on_run(command: str, tamper=None, *extra: str):
    """``command`` on a copy of the shared run, changed by ``tamper(run_copy)`` first."""
    def build(d: Path, run: Path) -> list[str]:
        target = run
        if tamper is not None:
            target = _copy(d, run)
            tamper(target)
        return COMMANDS[command](target, d, *extra)
    return build


def set_run_json(change):
    def tamper(r: Path) -> None:
        info = json.loads((r / "run.json").read_text())
        change(info)
        (r / "run.json").write_text(json.dumps(info))
    return tamper


def write_file(rel: str, content: str | bytes, rehashed: bool = True):
    def tamper(r: Path) -> None:
        _write(r, rel, content)
        if rehashed:
            rehash(r)
    return tamper


def edit_index(change):
    def tamper(r: Path) -> None:
        path = r / "transcript" / "index.json"
        index = json.loads(path.read_text())
        change(index)
        path.write_text(json.dumps(index))
        rehash(r)
    return tamper


def nan_shard(r: Path) -> None:
    """NaN values in a shard, and the index and run.json updated so that every hash matches."""
    from collafuse.fsutil import file_sha256

    path = r / "transcript" / "index.json"
    index = json.loads(path.read_text())
    shard = index["shards"][0]
    tensors = load_file(str(r / "transcript" / shard["file"]))
    tensors["tensor"][0].fill_(float("nan"))
    save_file(tensors, str(r / "transcript" / shard["file"]))
    shard["sha256"] = file_sha256(r / "transcript" / shard["file"])
    shard["file_bytes"] = (r / "transcript" / shard["file"]).stat().st_size
    path.write_text(json.dumps(index))
    rehash(r)


def truncate(rel: str, keep: int):
    def tamper(r: Path) -> None:
        (r / rel).write_bytes((r / rel).read_bytes()[:keep])
    return tamper


GOOD_POLICY = "limits:\n  T1: {mse: {min: 0.0}}\n"


def audit_grid(text: str | bytes, *extra: str):
    def build(d: Path, run: Path) -> list[str]:
        return ["audit", "--config", _write(d, "grid.yaml", text), "--policy", _write(d, "policy.yaml", GOOD_POLICY),
                "--out", str(d / "audit"), "--cache", str(d / "cache"), "--jobs", "1", "--quiet", *extra]
    return build


def audit_policy(text: str | bytes):
    def build(d: Path, run: Path) -> list[str]:
        return ["audit", "--quick", "--policy", _write(d, "policy.yaml", text), "--out", str(d / "audit"),
                "--cache", str(d / "cache"), "--quiet"]
    return build


def audit_args(*args: str):
    def build(d: Path, run: Path) -> list[str]:
        return ["audit", "--quick", "--cache", str(d / "cache"), "--quiet",
                *[a.replace("{d}", str(d)) for a in args]]
    return build


def report(files: dict[str, str | bytes]):
    def build(d: Path, run: Path) -> list[str]:
        folder = d / "audit"
        folder.mkdir()
        for name, content in files.items():
            _write(folder, name, content)
        return ["report", str(folder)]
    return build


GRID_OK = "base: {device: cpu}\npayload_curve: {cut_ratios: [0.2], attacks: [rescale]}\n"

# name → (builder, a phrase the one error line must contain, or None where any clear line will do)
CASES = {
    # ---- train: the config file itself
    "config garbage bytes": (train_text(GARBAGE), "not UTF-8 text"),
    "config NUL bytes": (train_text("seed: 1\x00\n"), "not valid YAML"),
    "config UTF-16": (train_text(TINY_TEXT.encode("utf-16")), "not UTF-8 text"),
    "config deep flow nesting": (train_text(DEEP_YAML), "nested deeper than"),
    "config deep mapping nesting": (train_text("a: " + "{a: " * 3000 + "1" + "}" * 3000), "nested deeper than"),
    "config deep block nesting": (train_text("".join("  " * i + "a:\n" for i in range(400))), "nested deeper than"),
    "config alias bomb": (train_text(ALIAS_BOMB), "aliases are expanded"),
    "config recursive alias": (train_text("defenses: &a [*a]\n"), "refers to a node that contains it"),
    "config too large": (train_text("# " + "x" * (2 << 20) + "\n"), "larger than"),
    "config 5000-digit integer": (train_lines("x: " + "9" * 5000), "not valid YAML"),
    "config impossible date": (train_lines("x: 2001-13-45"), "not valid YAML"),
    "config YAML syntax": (train_text("data: [unclosed\n"), "not valid YAML"),
    "config tab indentation": (train_text("data:\n\timage_size: 8\n"), "not valid YAML"),
    "config two documents": (train_text(TINY_TEXT + "---\nseed: 2\n"), "not valid YAML"),
    "config top-level list": (train_text("- 1\n- 2\n"), "must be a mapping"),
    "config top-level scalar": (train_text("42\n"), "must be a mapping"),
    "config unknown key": (train_over(epochz=3), "unknown config key 'epochz'"),
    "config unknown nested key": (train_over(training={"lr_schedule": "cos"}), "training.lr_schedule"),
    "config duplicate key": (train_lines("seed: 2"), "duplicate key 'seed'"),
    "config duplicate nested key": (train_text("training:\n  epochs: 1\n  epochs: 2\n"), "duplicate key 'epochs'"),
    "config epochs true": (train_over(training={"epochs": True}), "training.epochs"),
    "config epochs string": (train_over(training={"epochs": "2"}), "training.epochs"),
    "config epochs float": (train_over(training={"epochs": 1.5}), "training.epochs"),
    "config epochs negative": (train_over(training={"epochs": -1}), "training.epochs"),
    "config seed negative": (train_over(seed=-1), "seed"),
    "config seed huge": (train_over(seed=2**64), "seed"),
    "config duplicate device": (train_lines("device: cpu"), "duplicate key 'device'"),
    "config seed date": (train_text(TINY_TEXT.replace("seed: 1", "seed: 2001-01-01")), "seed"),
    "config lr NaN": (train_text(TINY_TEXT.replace("epochs: 1", "epochs: 1\n  lr: .nan")), "training.lr"),
    "config lr string": (train_over(training={"lr": "fast"}), "training.lr"),
    "config cut ratio inf": (train_text(TINY_TEXT.replace("cut_ratio: 0.2", "cut_ratio: .inf")), "cut_ratio"),
    "config cut ratio bool": (train_over(diffusion={"cut_ratio": True}), "cut_ratio"),
    "config conditional yes": (train_over(conditional="yes"), "conditional"),
    "config image size huge": (train_over(data={"image_size": 10**9}), "image_size"),
    "config image size float": (train_over(data={"image_size": 8.0}), "image_size"),
    "config T huge": (train_over(diffusion={"T": 10**12}), "diffusion.T"),
    "config members huge": (train_over(data={"n_members": 10**9}), "the data has 1797 images"),
    "config channel zero": (train_over(server_model={"channels": [8, 0]}), "server_model.channels"),
    "config channels string": (train_over(client_model={"channels": "wide"}), "client_model.channels"),
    "config section scalar": (train_over(training=5), "training"),
    "config defenses scalar": (train_over(defenses=5), "defenses"),
    "config unknown defense": (train_over(defenses=[{"name": "no-such-defense"}]), "no-such-defense"),
    "config unknown device": (train_over(device="tpu"), "device"),
    "config is a folder": (lambda d, run: ["train", "--config", str(d), "--out", str(d / "out")], "is a folder"),
    "config missing": (lambda d, run: ["train", "--config", str(d / "nope.yaml"), "--out", str(d / "out")],
                       "config file not found"),
    "train no --out": (lambda d, run: ["train"], "--out"),
    # ---- train: the data it points to
    "npz garbage": (train_npz_bytes(lambda: GARBAGE), "not a readable .npz"),
    "npz plain npy": (lambda d, run: (np.save(d / "x.npy", _digits()), _npz_config(d, d / "x.npy"))[1],
                      "not a readable .npz"),
    "npz pickled objects": (train_npz(images=np.array([{"a": 1}, None], dtype=object)), "pickled"),
    "npz labels claim 10^13": (train_npz_bytes(lambda: _npz_lying_header(
        "labels", np.zeros(32, np.int64), (10**13,), {"images": _digits()})), "labels"),
    "npz images truncated": (train_npz_bytes(lambda: _npz_lying_header(
        "images", _digits(), (32000, 8, 8))), "truncated or corrupt"),
    "npz channel-first RGB for 1 channel": (train_npz(images=_digits(shape=(3, 8, 8))),
                                            "3 channel(s) but the config says channels=1"),
    "npz NaN pixels": (train_npz(images=np.where(np.arange(32 * 64).reshape(32, 8, 8) == 5, np.nan, 0.5)),
                       "NaN pixels"),
    "npz inf pixels": (train_npz(images=np.full((32, 8, 8), np.inf)), "infinite"),
    "npz 2-D images": (train_npz(images=np.zeros((32, 8))), "shape"),
    "npz 5-D images": (train_npz(images=np.zeros((32, 8, 8, 1, 1))), "shape"),
    "npz complex images": (train_npz(images=np.zeros((32, 8, 8), complex)), "numeric"),
    "npz string images": (train_npz(images=np.full((32, 8, 8), "abc")), "numeric"),
    "npz float labels": (train_npz(conditional=True, images=_digits(), labels=np.zeros(32)), "labels"),
    "npz labels wrong length": (train_npz(conditional=True, images=_digits(), labels=np.zeros(3, int)), "labels"),
    "npz labels huge": (train_npz(conditional=True, images=_digits(), labels=np.full(32, 10**9)), "classes"),
    "folder 20000x20000 PNG": (train_folder({"a.png": png_header(20000, 20000)}), "too large"),
    "folder garbage PNG": (train_folder({"a.png": GARBAGE}), "not a readable image"),
    "folder no images": (train_folder({"notes.txt": b"hello"}), "holds no PNG/JPEG"),
    # ---- sample, attack reconstruct, attack membership: run folders
    "sample run missing": (lambda d, run: sample_cmd(d / "nope", d), "not a collafuse run folder"),
    "sample run.json garbage": (on_run("sample", write_file("run.json", GARBAGE, rehashed=False)), "run.json"),
    "sample run.json deep": (on_run("sample", write_file("run.json", DEEP_JSON, rehashed=False)), "run.json"),
    "sample run.json list": (on_run("sample", write_file("run.json", "[1, 2]", rehashed=False)), "run.json"),
    "sample run.json t_hand out of range": (on_run("sample", set_run_json(lambda i: i.update(t_hand=999))), "t_hand"),
    "sample run.json no has_server": (on_run("sample", set_run_json(lambda i: i.pop("has_server"))), "has_server"),
    "sample config.yaml deep (hash matches)": (on_run("sample", write_file("config.yaml", DEEP_YAML)), "nested deeper"),
    "sample truncated checkpoint": (on_run("sample", truncate("checkpoints/server.safetensors", 100)), "checkpoints"),
    "sample seed negative": (lambda d, run: sample_cmd(run, d, "--seed", "-1"), "--seed"),
    "sample seed huge": (lambda d, run: sample_cmd(run, d, "--seed", str(2**70)), "--seed"),
    "sample n zero": (lambda d, run: sample_cmd(run, d)[:4] + ["0", "--out", str(d / "s.png")], "-n"),
    "sample n huge": (lambda d, run: sample_cmd(run, d)[:4] + ["999999999999", "--out", str(d / "s.png")], "-n"),
    "sample n not a number": (lambda d, run: sample_cmd(run, d)[:4] + ["abc", "--out", str(d / "s.png")], "-n"),
    "sample client out of range": (lambda d, run: sample_cmd(run, d, "--client", "7"), "--client"),
    "sample out .gif": (lambda d, run: sample_cmd(run, d)[:6] + [str(d / "s.gif")], ".png or .npz"),
    "reconstruct index.json garbage": (on_run("reconstruct", write_file("transcript/index.json", GARBAGE)),
                                       "index.json"),
    "reconstruct index.json deep": (on_run("reconstruct", write_file("transcript/index.json", DEEP_JSON)),
                                    "index.json"),
    "reconstruct index.json list": (on_run("reconstruct", write_file("transcript/index.json", "[]")), "index"),
    "reconstruct index.json shard outside": (on_run("reconstruct", edit_index(
        lambda i: i["shards"][0].update(file="../run.json"))), "shard file name"),
    "reconstruct index.json rows string": (on_run("reconstruct", edit_index(lambda i: i.update(rows="many"))), "rows"),
    "reconstruct NaN shard (hash matches)": (on_run("reconstruct", nan_shard), "NaN"),
    "reconstruct attacks empty": (lambda d, run: recon_cmd(run, d)[:4] + ["--attacks", ""], "empty"),
    "reconstruct attacks unknown": (lambda d, run: recon_cmd(run, d)[:4] + ["--attacks", "nope"], "nope"),
    "reconstruct unknown option": (lambda d, run: recon_cmd(run, d, "--bogus"), "--bogus"),
    "membership attacks empty": (lambda d, run: member_cmd(run, d, "--attacks", ""), "empty"),
    "membership targets empty": (lambda d, run: member_cmd(run, d)[:4] + ["--targets", ""], "empty"),
    "membership targets unknown": (lambda d, run: member_cmd(run, d)[:4] + ["--targets", "everything"], "everything"),
    "membership index.json garbage": (on_run("membership", write_file("transcript/index.json", GARBAGE)),
                                      "index.json"),
    "membership NaN shard (hash matches)": (on_run("membership", nan_shard), "NaN"),
    # ---- audit: grids, policies, arguments
    "grid garbage bytes": (audit_grid(GARBAGE), "not UTF-8 text"),
    "grid deep nesting": (audit_grid(DEEP_YAML), "nested deeper than"),
    "grid alias bomb": (audit_grid(ALIAS_BOMB), "aliases are expanded"),
    "grid base.data scalar": (audit_grid("base: {data: 5}\npayload_curve: {cut_ratios: [0.2], attacks: [rescale]}\n"),
                              "base.data"),
    "grid duplicate key": (audit_grid(GRID_OK + "base: {seed: 2}\n"), "duplicate key 'base'"),
    "grid unknown key": (audit_grid(GRID_OK + "sistems: []\n"), "sistems"),
    "grid negative seed": (audit_grid(GRID_OK + "seeds: [-1]\n"), "seed"),
    "grid batch size true": (audit_grid("base: {training: {batch_size: true}}\n"
                                    "payload_curve: {cut_ratios: [0.2], attacks: [rescale]}\n"), "training.batch_size"),
    "grid systems scalar": (audit_grid(GRID_OK + "systems: 5\n"), "systems"),
    "grid top-level list": (audit_grid("[1, 2]\n"), "mapping"),
    "grid missing": (lambda d, run: ["audit", "--config", str(d / "nope.yaml"), "--out", str(d / "a")],
                     "grid file not found"),
    "policy garbage bytes": (audit_policy(GARBAGE), "not UTF-8 text"),
    "policy deep nesting": (audit_policy("limits: " + "{a: " * 3000 + "1" + "}" * 3000), "nested deeper than"),
    "policy duplicate key": (audit_policy("limits:\n  T1: {auc: {max: 0.6}}\n  T1: {auc: {max: 0.9}}\n"),
                             "duplicate key 'T1'"),
    "policy limit not a number": (audit_policy("limits:\n  T1: {auc: {max: high}}\n"), "must be a number"),
    "policy list": (audit_policy("- limits\n"), "mapping"),
    "audit jobs zero": (audit_args("--jobs", "0", "--out", "{d}/audit"), "--jobs"),
    "audit unknown backend": (audit_args("--backend", "mpi", "--out", "{d}/audit"), "mpi"),
    "audit out is a file": (lambda d, run: ["audit", "--quick", "--out", _write(d, "taken.txt", "mine")],
                            "not a folder"),
    "audit jobs not a number": (audit_args("--jobs", "many", "--out", "{d}/audit"), "--jobs"),
    # ---- report: audit folders
    "report folder missing": (lambda d, run: ["report", str(d / "nope")], None),
    "report audit.json garbage": (report({"audit.json": GARBAGE, "results.json": "[]"}), None),
    "report audit.json deep": (report({"audit.json": DEEP_JSON, "results.json": "[]"}), None),
    "report audit.json list": (report({"audit.json": "[1]", "results.json": "[]"}), None),
    "report audit.json a string": (report({"audit.json": '"done"', "results.json": "[]"}), None),
    "report results.json garbage": (report({"audit.json": "{}", "results.json": GARBAGE}), None),
    "report results.json rows wrong": (report({"audit.json": "{}", "results.json": '[{"x": 1}]'}), None),
}


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file (size, mtime) and folder under ``roots``: what "untouched" is checked against."""
    out: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            out[folder] = ("dir",)
            for name in files:
                st = os.stat(os.path.join(folder, name))
                out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_enough_cases_over_every_command():
    assert len(CASES) >= 60
    names = " ".join(CASES)
    for word in ("config", "npz", "folder", "sample", "reconstruct", "membership", "grid", "policy", "audit", "report"):
        assert word in names


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, shared_run, tmp_path, monkeypatch, capsys):
    build, phrase = CASES[name]
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(case_dir)
    argv = build(case_dir, shared_run)
    before = _snapshot(tmp_path, shared_run)
    capsys.readouterr()
    code = main(argv)
    _out, err = capsys.readouterr()
    lines = err.strip("\n").splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: "), err[-2000:]
    assert "Traceback" not in err and len(lines[0]) <= 2100
    if phrase is not None:
        assert phrase in lines[0], lines[0]
    assert _snapshot(tmp_path, shared_run) == before


SUBPROCESS_CASES = {
    "train garbage config": ("config garbage bytes", "not UTF-8 text"),
    "audit deep grid": ("grid deep nesting", "nested deeper than"),
    "sample -n abc": ("sample n not a number", "invalid int value"),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_bad_input_in_a_real_process_has_no_traceback(name, shared_run, tmp_path):
    case, phrase = SUBPROCESS_CASES[name]
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = CASES[case][0](case_dir, shared_run)
    env = {**os.environ, "COLLAFUSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    before = _snapshot(tmp_path, shared_run)
    proc = subprocess.run([sys.executable, "-m", "collafuse", *argv], capture_output=True, text=True, env=env,
                          cwd=case_dir, timeout=120, check=False)
    lines = proc.stderr.strip("\n").splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("collafuse: error: ") and phrase in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _snapshot(tmp_path, shared_run) == before
