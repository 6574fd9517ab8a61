"""``collafuse attack reconstruct --run RUN_DIR [--attacks a,b] [--out FILE]`` (DESIGN.md §8, issue 3 item 4).

Loads the run, hands the attacks the server view (:class:`ViewArrays`) and the
attacker's own resources, then — separately — opens the audit key to score them.
Writes one JSON file (every metric per attack, per client and pooled, with 95 %
intervals) and, beside it, a PNG grid (originals in the first row, one row of
reconstructions per attack) and ``<out>.per_image.npz`` with every per-row value
(a trained run has tens of thousands of payload rows: too many for JSON). Both are written to temporary files
and renamed into place, so a failure leaves nothing half-written. A run with
c = 1 (no server, no payload) gets an explicit "nothing to attack" result and exit 0.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from collafuse import __version__
from collafuse.errors import CollafuseError
from collafuse.fsutil import check_output
from collafuse.jsonio import dumps
from collafuse.runs import Run, image_grid, save_png, to_uint8

from collafuse.attacks.reconstruction.curve import POOL_DESCRIPTION
from collafuse.attacks.chunking import memory_budget_bytes
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, check_cache_dir, default_cache_dir
from collafuse.attacks.reconstruction.engine import RunReconstruction, reconstruct_run
from collafuse.attacks.reconstruction.evaluate import UPPER_BOUNDS, ViewEvaluation
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.scoring import Truth
from collafuse.attacks.reconstruction.view import ViewArrays

GRID_COLUMNS_PER_CLIENT = 3
GRID_MAX_COLUMNS = 12


def default_output(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-reconstruct.json"


def _check_output(out: Path) -> Path:
    """Refuse, before any work, an --out whose JSON, PNG or per-image file cannot be created: a name taken (a
    file, a folder, a symbolic link), a file above it, a read-only or full folder (collafuse.fsutil.check_output)."""
    if out.suffix.lower() != ".json":
        raise CollafuseError(f"--out must end in .json, got {out.name!r}")
    png = out.with_suffix(".png")
    for path in (out, png, per_image_path(out)):
        if os.path.lexists(path):
            raise CollafuseError(f"{path} already exists; choose a new --out")
    check_output(out, "--out")
    return png


def _grid_rows(view: ViewArrays) -> torch.Tensor:
    """A few rows per client, in crossing order, for the picture."""
    picks = []
    for k in torch.unique(view.client):
        picks.append(torch.nonzero(view.client == k).flatten()[:GRID_COLUMNS_PER_CLIENT])
    return torch.cat(picks)[:GRID_MAX_COLUMNS]


def write_grid(ev: ViewEvaluation, truth: Truth, view: ViewArrays, path: Path) -> None:
    """Originals (first row) beside each attack's reconstructions (one row per attack)."""
    rows = _grid_rows(view)
    blocks = [to_uint8(truth.images[rows])] + [to_uint8(r.images[rows]) for r in ev.reconstructions.values()]
    save_png(image_grid(np.concatenate(blocks), rows=len(blocks)), path, scale=3)


def _attack_entry(name: str, ev: ViewEvaluation, seed: int) -> dict:
    sc = ev.scores[name]
    if name in RECONSTRUCTION_ATTACKS:
        spec = RECONSTRUCTION_ATTACKS.get(name)
        threat, summary = spec.threat, spec.summary
    else:  # an upper bound the scorer built from the audit key, not an attack
        threat, summary = UPPER_BOUNDS[name]
    return {
        "threat": threat,
        "summary": summary,
        "pooled": sc.summary_json(seed=seed),
        "clients": sc.by_client(seed),
        **ev.extra.get(name, {}),
        "per_image": f"{name}/<metric> in the .per_image.npz beside this file",
    }


def per_image_arrays(ev: ViewEvaluation, view: ViewArrays, truth: Truth) -> dict[str, np.ndarray]:
    """Every per-row value, keyed ``<attack>/<metric>``, plus ``seq``, the true ``client``, the ``view_client``
    the server saw and ``member_index``."""
    arrays = {"seq": view.seq.numpy(), "client": truth.client.numpy(), "view_client": view.client.numpy(), "member_index": truth.member.numpy()}
    for name, sc in ev.scores.items():
        arrays.update({f"{name}/{metric}": values for metric, values in sc.per_row.items()})
    if ev.payload_label is not None:
        arrays["payload/label"] = ev.payload_label
    return arrays


def per_image_path(out: Path) -> Path:
    return out.with_name(out.stem + ".per_image.npz")


def _write_atomic(result: dict, out: Path, grid: tuple[ViewEvaluation, Truth, ViewArrays] | None) -> None:
    """JSON, PNG grid and per-image arrays: each written to a temporary name, then renamed (JSON last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp_json = out.with_name(f".{out.name}.partial-{pid}")
    png, npz = out.with_suffix(".png"), per_image_path(out)
    tmp_png = png.with_name(f".{png.stem}.partial-{pid}.png")
    tmp_npz = npz.with_name(f".{npz.stem}.partial-{pid}.npz")
    try:
        tmp_json.write_text(dumps(result, indent=1))
        if grid is not None:
            ev, truth, view = grid
            write_grid(ev, truth, view, tmp_png)
            with open(tmp_npz, "wb") as f:
                np.savez_compressed(f, **per_image_arrays(ev, view, truth))
            os.replace(tmp_png, png)
            os.replace(tmp_npz, npz)
        os.replace(tmp_json, out)
    except BaseException:
        for tmp in (tmp_json, tmp_png, tmp_npz):
            tmp.unlink(missing_ok=True)
        raise


def result_json(run: Run, names: tuple[str, ...], attacked: RunReconstruction, out_path: Path,
                cache_dir: Path | None) -> dict:
    """The ``attack reconstruct`` JSON report of an engine result (the only place it is built)."""
    cfg, schedule = run.config, run.schedule
    base = {
        "command": "attack reconstruct",
        "collafuse_version": __version__,
        "run": str(run.path),
        "threat": "T1",
        "schedule": schedule.name,
        "T": schedule.T,
        "t_hand": run.t_hand,
        "cut_ratio": cfg.diffusion.cut_ratio,
        "payload_kind": cfg.training.payload,
        "attacks_requested": list(names),
    }
    if not attacked.attacked:
        return {**base, "status": attacked.status, "reason": attacked.reason, "rows": 0, "attacks": {}}
    ev, truth, view, seed = attacked.evaluation, attacked.truth, attacked.view, cfg.seed
    sender = truth.client
    lab = ev.payload_label_summary(seed=seed)
    return {
        **base,
        "status": "ok",
        "rows": len(view),
        "clients": sorted(int(k) for k in torch.unique(sender)),
        "epochs": cfg.training.epochs,
        "labels_sent": ev.labels_sent,
        "candidate_pool": {"description": POOL_DESCRIPTION, "size": int(truth.pool.numel())},
        "chance": ev.chance,
        "attacker": {
            "aux_images": attacked.aux_images,
            "denoiser": None if attacked.denoiser is None else attacked.denoiser.to_json(cache_dir or default_cache_dir()),
        },
        "label_inference_payload": None if lab is None else {
            "method": "label sent with the payload" if ev.labels_sent else "classifier trained on aux images noised at the view's steps, reading p/a",
            "pooled": lab.to_json(),
            "clients": {str(int(k)): ev.payload_label_summary(sender.numpy() == int(k), seed).to_json()
                        for k in torch.unique(sender)},
        },
        "intervals": "95 %: t (means) / Wilson (proportions) over rows; cluster bootstrap over images when an image has several rows",
        "png": str(out_path.with_suffix(".png")),
        "per_image_file": str(per_image_path(out_path)),
        "attacks": {name: _attack_entry(name, ev, seed) for name in ev.scores},
    }


def run_command(
    run_dir: Path,
    attacks: str | None,
    out: str | None,
    progress: bool,
    denoiser_config: DenoiserConfig | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
) -> int:
    """Attack a run's server view and score it; returns the exit code (bad input raises CollafuseError).

    ``denoiser_config``/``cache_dir`` override the attacker's denoiser recipe and cache (default:
    :class:`DenoiserConfig` with the run's seed; ``$COLLAFUSE_CACHE`` or ``~/.cache/collafuse``).
    """
    names = RECONSTRUCTION_ATTACKS.parse(attacks)
    run_dir = Path(run_dir)
    memory_budget_bytes()  # $COLLAFUSE_MEMORY_MB: a bad value is one line now, not after the work
    out_path = Path(out) if out else default_output(run_dir)
    _check_output(out_path)  # every output checked before any work
    if RECONSTRUCTION_ATTACKS.needing("denoiser", names):
        check_cache_dir(cache_dir, forbid_under=(run_dir,))  # the attacker's denoiser is cached there after training
    run = Run.load(run_dir, device=device)  # models, the attacker's denoiser and inversion net on this device
    attacked = reconstruct_run(run, names, denoiser_config=denoiser_config, denoiser_cache=cache_dir,
                               forbid_under=(run_dir,), progress=progress)
    if progress and attacked.denoiser is not None:
        verb = "loaded from" if attacked.denoiser.cache_hit else "trained and cached at"
        print(f"attacker denoiser {verb} {attacked.denoiser.cache_file}", flush=True)
    result = result_json(run, names, attacked, out_path, cache_dir)
    if not attacked.attacked:
        _write_atomic(result, out_path, None)
        what = "nothing to attack" if attacked.status == "nothing-to-attack" else attacked.status
        print(f"{what} ({attacked.reason}); result written to {out_path}")
        return 0
    _write_atomic(result, out_path, (attacked.evaluation, attacked.truth, attacked.view))
    if progress:
        for name, sc in attacked.evaluation.scores.items():
            s = sc.summary(seed=run.config.seed)
            print(f"  {name:28s} PSNR {s['psnr'].value:6.2f} dB  SSIM {s['ssim'].value:.3f}  re-id(client) {s['reid_client'].value:.3f}")
    print(f"reconstruction results written to {out_path}")
    return 0
