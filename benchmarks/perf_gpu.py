"""The quick audit and the RGB grid's payload cells on CUDA, timed against the CPU in one run (issue 15 item 5).

Prepared for a machine with a GPU (DESIGN §10); nothing in CI runs it. On the GPU machine, from the
repository root, after the preparation below, one call::

    PYTHONUNBUFFERED=1 python3 benchmarks/perf_gpu.py --out /tmp/perf_gpu --results-to "$OUT" | tee "$OUT/perf_gpu.jsonl"

Expected duration on the H200 machine (16 cores): about 6–8 minutes (an estimate, not a measurement:
the quick audit takes 1–2 min on 2 CPU cores; on CUDA its cells run one at a time; the RGB cell's
CPU run is single-threaded, as every audit cell is, trains the attacker's denoiser first (1 500 steps
at 32×32×3, also on one thread) and takes about 3 min). Give the call a
``timeout_s`` of 540: every measurement is printed as soon as it is done, so a run cut short still
returns the quick audit's pair.

Preparation there (its image has PyTorch with CUDA but not these packages; nothing can be fetched
there). Here, once, in the repository root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 opacus==1.6.0

then the device command, with ``carry: [".whl"]``, starts with::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . &&
    export PYTHONPATH=/tmp/site &&

(the second install maps ``attacks/``, ``defenses/`` and ``benchmarks/`` to ``collafuse.*``).

What it runs, in this order, each device with its own fresh cache folder (so each trains its own
systems and attacker denoisers, and the times are comparable):

1. ``python -m collafuse audit --quick --device D`` for D = the first, then the second device
   (``--devices``, default ``cpu,cuda``), one subprocess each, timed (wall seconds of the whole
   command: start-up, every cell, the table and the report). On the CPU the cells run side by side
   (``--jobs``, default the core count), on CUDA one at a time (one GPU): the audit as a user runs it.
2. The payload cells of ``benchmarks/audit/rgb32_grid.yaml`` (``systems`` removed) on each device,
   on a synthetic ``.npz`` of the grid's 12 288 32×32×3 images (blocky random images with random labels;
   ``--rgb-data`` for a real one). The grid's 33 payload cells at 40 epochs take hours on a CPU, so by
   default the script runs a subset: ``--rgb-cuts 0.5 --rgb-defenses none --rgb-epochs 1`` (one cell of
   8 192 payload rows against a pool of 10 240, with the grid's attacks); ``all`` / ``0`` take the grid's.

Output: one JSON line per measurement, ``{"what", "device", "seconds", ...}``, then after each pair one
line comparing the two audits' ``results.json`` row by row (the same cells, threats, targets, attacks
and metrics; ``value``, ``ci_low`` and ``ci_high``), and a final line with the second/first time ratios
and every comparison. Two numbers are equal when ``|a - b| <= max(rtol * max(|a|, |b|), atol)``
(both NaN, or the same infinity, count as equal), with ``rtol = 1e-3`` and ``atol = 1e-4`` by default:
CUDA kernels round floats differently from the CPU's (other summation orders, TF32 off or on), so
bit-equality is not expected; whether trained models stay within that after tens of epochs is what
the run measures (the worst rows are listed). Exit 0 when every comparison is equal, 1 when some is
not (the numbers are still printed), 2 on bad input or when CUDA is asked for but not available.

``--devices cpu,cpu`` checks the script itself on a machine without a GPU: the two CPU runs must
come out equal (each cell is a pure function of its config and seed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("cpu", "cuda")
RTOL, ATOL = 1e-3, 1e-4
RGB_GRID = Path(__file__).resolve().parent / "audit" / "rgb32_grid.yaml"
# A results row is identified by these columns (and its rank among rows that share them).
KEY_COLUMNS = ("cell", "threat", "target", "attack", "metric", "t", "epoch")
VALUE_COLUMNS = ("value", "ci_low", "ci_high")
WORST_LISTED = 5
# The default policy limits T1's payload AUC and utility, which only trained systems measure: the
# payload-only grid is checked against its re-identification limit alone (the verdict is not timed).
PAYLOAD_POLICY = "statistic: value\nlimits:\n  T1:\n    reid_pool: {max: 0.05}\n"


class UsageError(Exception):
    """Bad input: one line, exit 2."""


# ----------------------------------------------------------------------------- comparison (pure)

def _as_float(x: Any) -> float:
    """A results.json number as a float: null → NaN, "inf" / "-inf" → ±inf (as the audit writes them)."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        text = x.strip().lower()
        if text in ("inf", "+inf", "infinity"):
            return math.inf
        if text in ("-inf", "-infinity"):
            return -math.inf
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def pair_difference(a: float, b: float) -> tuple[float, float]:
    """(absolute, relative) difference of two numbers; (0, 0) when both are NaN or the same infinity,
    (inf, inf) when only one is NaN or infinite. Relative: to the larger magnitude (0 when both are 0)."""
    if (math.isnan(a) and math.isnan(b)) or (math.isinf(a) and a == b):
        return 0.0, 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf, math.inf
    diff = abs(a - b)
    scale = max(abs(a), abs(b))
    return diff, (diff / scale if scale > 0 else 0.0)


def within(a: float, b: float, rtol: float, atol: float) -> bool:
    """Equal within float tolerance: |a - b| <= max(rtol * max(|a|, |b|), atol)."""
    diff, _ = pair_difference(a, b)
    if diff == 0.0:
        return True
    return math.isfinite(diff) and diff <= max(rtol * max(abs(a), abs(b)), atol)


def row_keys(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Each row under its identifying columns plus its rank among rows sharing them (rows stay unique)."""
    out: dict[tuple, dict[str, Any]] = {}
    seen: dict[tuple, int] = {}
    for row in rows:
        base = tuple(row.get(c) for c in KEY_COLUMNS)
        rank = seen.get(base, 0)
        seen[base] = rank + 1
        out[(*base, rank)] = row
    return out


@dataclass
class Comparison:
    """Two audits' results.json, row by row."""

    rows: int                      # rows present in both
    only_first: int                # rows of the first run missing in the second
    only_second: int
    values: int                    # numbers compared (value, ci_low, ci_high of every common row)
    outside: int                   # numbers not equal within the tolerance
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    equal: bool                    # same rows and every number within the tolerance
    worst: list[dict[str, Any]] = field(default_factory=list)  # the rows with the largest relative differences

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("max_abs_diff", "max_rel_diff"):
            out[key] = "inf" if math.isinf(out[key]) else out[key]
        return out


def compare_results(first: list[dict[str, Any]], second: list[dict[str, Any]], rtol: float = RTOL,
                    atol: float = ATOL) -> Comparison:
    """Row-by-row comparison of two results tables (results.json rows) of the same grid."""
    a, b = row_keys(first), row_keys(second)
    common = [k for k in a if k in b]
    max_abs = max_rel = 0.0
    outside = values = 0
    scored: list[tuple[float, dict[str, Any]]] = []
    for key in common:
        for column in VALUE_COLUMNS:
            x, y = _as_float(a[key].get(column)), _as_float(b[key].get(column))
            diff, rel = pair_difference(x, y)
            values += 1
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
            if not within(x, y, rtol, atol):
                outside += 1
                scored.append((rel, {**dict(zip(KEY_COLUMNS, key)), "column": column,
                                     "first": a[key].get(column), "second": b[key].get(column)}))
    scored.sort(key=lambda item: item[0], reverse=True)
    only_first, only_second = len(a) - len(common), len(b) - len(common)
    return Comparison(len(common), only_first, only_second, values, outside, max_abs, max_rel, rtol, atol,
                      outside == 0 and only_first == 0 and only_second == 0 and len(common) > 0,
                      [row for _, row in scored[:WORST_LISTED]])


def time_ratio(seconds: dict[str, float], first: str, second: str) -> float:
    """second / first: below 1, the second device is faster."""
    return seconds[second] / seconds[first]


# ----------------------------------------------------------------------------- the RGB grid's payload cells

def _pick(names: str, valid: list, what: str, parse=str) -> list:
    """The comma-separated ``names`` among ``valid`` ("all": every one); an unknown one is bad input."""
    if names == "all":
        return list(valid)
    try:
        picked = [parse(n.strip()) for n in names.split(",") if n.strip()]
    except ValueError:
        raise UsageError(f"--rgb-{what}: cannot read {names!r}") from None
    unknown = [p for p in picked if p not in valid]
    if unknown or not picked:
        raise UsageError(f"--rgb-{what}: {unknown[0] if unknown else names!r} is not in the grid; "
                         f"valid: {', '.join(map(str, valid))} or all")
    return picked


def rgb_payload_grid(grid: dict[str, Any], cuts: str, defenses: str, epochs: int, members: int,
                     data_path: Path) -> dict[str, Any]:
    """The RGB grid with ``systems`` removed and its payload curve narrowed to the chosen cells."""
    curve = dict(grid["payload_curve"])
    curve["cut_ratios"] = _pick(cuts, list(curve["cut_ratios"]), "cuts", float)
    chosen = _pick(defenses, list(curve["defenses"]), "defenses")
    curve["defenses"] = {name: curve["defenses"][name] for name in chosen}
    if epochs:
        curve["epochs"] = epochs
    base = json.loads(json.dumps(grid["base"]))
    if members:  # the grid's proportions: members : non-members : aux = 4 : 1 : 1
        base["data"].update(n_members=members, n_nonmembers=max(1, members // 4), n_aux=max(1, members // 4))
    source = "npz" if data_path.suffix == ".npz" else "folder"
    out = {k: v for k, v in grid.items() if k != "systems"}
    out.update(base=base, payload_curve=curve, datasets={name: {"source": source, "path": str(data_path)}
                                                         for name in grid["datasets"]})
    return out


def synthetic_rgb(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` blocky random RGB images (8×8 colour blocks scaled up to ``size``) with 10 random labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    block = max(1, size // 8)
    small = rng.integers(0, 256, (n, size // block, size // block, 3), dtype=np.uint8)
    images = small.repeat(block, axis=1).repeat(block, axis=2)
    np.savez(path, images=images, labels=rng.integers(0, 10, n))


# ----------------------------------------------------------------------------- running

def run_audit(what: str, device: str, audit_args: list[str], out: Path, cache: Path, jobs: int | None) -> dict:
    """One ``collafuse audit`` subprocess on ``device``, timed; its record (seconds, cells, exit code)."""
    command = [sys.executable, "-m", "collafuse", "audit", *audit_args, "--device", device, "--out", str(out),
               "--cache", str(cache), "--quiet", *(["--jobs", str(jobs)] if jobs else [])]
    env = {**os.environ, "COLLAFUSE_CACHE": str(cache)}  # anything else the cells cache stays in this run's folder
    began = time.perf_counter()
    # Run outside the repository root: there ./collafuse would shadow the installed package, whose
    # collafuse.attacks / .defenses / .benchmarks are mapped from the sibling folders (pyproject).
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - began
    if done.returncode not in (0, 1):  # 0: a setting passes the policy, 1: none does; both are finished audits
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} on {device} exited {done.returncode}: {tail}")
    meta = json.loads((out / "audit.json").read_text())
    return {"what": what, "device": device, "seconds": round(seconds, 2),
            "audit_wall_seconds": meta.get("wall_seconds"), "compute_seconds": meta.get("compute_seconds"),
            "cells": meta["sweep"]["cells"], "jobs": meta.get("jobs"), "devices": meta.get("devices"),
            "exit": done.returncode, "out": str(out)}


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def measure_pair(what: str, audit_args: list[str], devices: list[str], work: Path, jobs: int | None,
                 rtol: float, atol: float, results_to: Path | None) -> tuple[dict[str, float], Comparison]:
    """``what`` on both devices (each with its own fresh cache), timed, and the comparison of the two tables."""
    seconds: dict[str, float] = {}
    tables = []
    for i, device in enumerate(devices):
        label = f"{i + 1}-{device}"
        out, cache = work / f"{what}-{label}", work / f"cache-{what}-{label}"
        record = run_audit(what, device, audit_args, out, cache, jobs)
        emit(record)
        seconds[label] = record["seconds"]
        tables.append(json.loads((out / "results.json").read_text()))
        if results_to is not None:
            shutil.copyfile(out / "results.json", results_to / f"{what}-{label}.results.json")
        shutil.rmtree(cache, ignore_errors=True)  # trained systems: not needed any more, and large
    comparison = compare_results(tables[0], tables[1], rtol, atol)
    emit({"what": what, "comparison": comparison.to_json()})
    return seconds, comparison


def parse_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if len(devices) != 2 or any(d not in DEVICES for d in devices):
        raise UsageError(f"--devices: expected two of {', '.join(DEVICES)} separated by a comma, got {text!r}")
    return devices


def check_cuda(devices: list[str]) -> None:
    import torch

    if "cuda" in devices and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine; run this on a GPU machine, "
                         "or pass --devices cpu,cpu to check the script itself")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; choose a new one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cuda", help="the two devices, first = reference (default cpu,cuda)")
    parser.add_argument("--out", type=Path, default=None, help="work folder: the audits (new or empty; default: a "
                        "new temporary folder, kept)")
    parser.add_argument("--results-to", type=Path, default=None, help="also copy each run's results.json here")
    parser.add_argument("--jobs", type=int, default=None, help="audit --jobs (default: the audit's, the core count)")
    parser.add_argument("--skip-quick", action="store_true", help="leave out the quick audit")
    parser.add_argument("--skip-rgb", action="store_true", help="leave out the RGB grid's payload cells")
    parser.add_argument("--rgb-cuts", default="0.5", help="cut ratios of the RGB payload curve, or all (default 0.5)")
    parser.add_argument("--rgb-defenses", default="none", help="its defense settings, or all (default none)")
    parser.add_argument("--rgb-epochs", type=int, default=1, help="payload epochs; 0: the grid's 40 (default 1)")
    parser.add_argument("--rgb-members", type=int, default=0, help="members (non-members = aux = members / 4); "
                        "0: the grid's 8192 (default)")
    parser.add_argument("--rgb-data", type=Path, default=None, help="a 32x32 RGB .npz or image folder "
                        "(default: synthetic images)")
    parser.add_argument("--rtol", type=float, default=RTOL, help=f"relative tolerance (default {RTOL})")
    parser.add_argument("--atol", type=float, default=ATOL, help=f"absolute tolerance (default {ATOL})")
    args = parser.parse_args(argv)
    try:
        devices = parse_devices(args.devices)
        if args.skip_quick and args.skip_rgb:
            raise UsageError("--skip-quick and --skip-rgb together leave nothing to measure")
        if args.rgb_epochs < 0 or args.rgb_members < 0 or args.rtol < 0 or args.atol < 0:
            raise UsageError("--rgb-epochs, --rgb-members, --rtol and --atol must not be negative")
        if args.rgb_data is not None and not args.rgb_data.exists():
            raise UsageError(f"--rgb-data {args.rgb_data} does not exist")
        if args.results_to is not None and not args.results_to.is_dir():
            raise UsageError(f"--results-to {args.results_to} is not a folder")
        if args.out is not None:
            check_out(args.out)
        rgb_grid = None
        if not args.skip_rgb:
            import yaml

            rgb_grid = rgb_payload_grid(yaml.safe_load(RGB_GRID.read_text()), args.rgb_cuts, args.rgb_defenses,
                                        args.rgb_epochs, args.rgb_members, (args.rgb_data or Path("rgb32.npz")).resolve())
        check_cuda(devices)
    except UsageError as exc:
        print(f"perf_gpu: {exc}", file=sys.stderr)
        return 2
    work = (args.out or Path(tempfile.mkdtemp(prefix="perf_gpu-"))).resolve()  # the audits run from another folder
    work.mkdir(parents=True, exist_ok=True)
    emit({"what": "setup", "devices": devices, "work": str(work), "rtol": args.rtol, "atol": args.atol})
    labels = [f"{i + 1}-{d}" for i, d in enumerate(devices)]
    ratios: dict[str, float] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    try:
        if not args.skip_quick:
            seconds, comparison = measure_pair("quick-audit", ["--quick"], devices, work, args.jobs, args.rtol,
                                               args.atol, args.results_to)
            ratios["quick-audit"] = round(time_ratio(seconds, *labels), 3)
            comparisons["quick-audit"] = comparison.to_json()
        if rgb_grid is not None:
            import yaml

            if args.rgb_data is None:  # the synthetic data set, as many images as the grid's splits take
                data = rgb_grid["base"]["data"]
                npz = work / "rgb32.npz"
                synthetic_rgb(npz, data["n_members"] + data["n_nonmembers"] + data["n_aux"], data["image_size"])
                rgb_grid["datasets"] = {name: {**spec, "path": str(npz)} for name, spec in rgb_grid["datasets"].items()}
            grid_path = work / "rgb32_payload_grid.yaml"
            grid_path.write_text(yaml.safe_dump(rgb_grid, allow_unicode=True, sort_keys=False))
            policy_path = work / "payload_policy.yaml"
            policy_path.write_text(PAYLOAD_POLICY)
            seconds, comparison = measure_pair("rgb32-payload", ["--config", str(grid_path), "--policy", str(policy_path)],
                                               devices, work,
                                               args.jobs, args.rtol, args.atol, args.results_to)
            ratios["rgb32-payload"] = round(time_ratio(seconds, *labels), 3)
            comparisons["rgb32-payload"] = comparison.to_json()
    except RuntimeError as exc:
        print(f"perf_gpu: {exc}", file=sys.stderr)
        return 1
    equal = all(c["equal"] for c in comparisons.values())
    emit({"what": "summary", "devices": devices, "ratio": f"{devices[1]} / {devices[0]} seconds",
          "time_ratios": ratios, "equal_within_tolerance": equal, "rtol": args.rtol, "atol": args.atol,
          "comparisons": comparisons})
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
