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

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from collafuse import __version__
from collafuse.errors import CollafuseError, RunError
from collafuse.runs import Run, image_grid, save_png, to_uint8
from collafuse.transcript import TRANSCRIPT_DIR, AuditKey, ServerView

from collafuse.attacks.reconstruction.curve import POOL_DESCRIPTION
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, default_cache_dir, load_or_train
from collafuse.attacks.reconstruction.evaluate import UPPER_BOUNDS, ViewEvaluation, evaluate_view
from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
from collafuse.attacks.reconstruction.scoring import Truth
from collafuse.attacks.reconstruction.view import AttackerResources, ViewArrays

GRID_COLUMNS_PER_CLIENT = 3
GRID_MAX_COLUMNS = 12


def _clean(value):
    """JSON-safe: NaN/±inf → None, numpy scalars → Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def default_output(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-reconstruct.json"


def _check_output(out: Path) -> Path:
    if out.suffix.lower() != ".json":
        raise CollafuseError(f"--out must end in .json, got {out.name!r}")
    png = out.with_suffix(".png")
    for path in (out, png, per_image_path(out)):
        if path.exists():
            raise CollafuseError(f"{path} already exists; choose a new --out")
    return png


def resolve_truth_rows(view: ViewArrays, key: AuditKey) -> tuple[torch.Tensor, torch.Tensor]:
    """Scorer side: (member index, true sender) of every view row, by ``seq``, each (N,).

    The sender comes from the key, not the view: an id-free release (a defense) hides it from
    the server, but re-identification within a client and per-client results use the truth.
    Refuses a key that does not match the transcript.
    """
    if key.seq.numel() != len(view):
        raise RunError(f"the audit key has {key.seq.numel()} rows but the transcript has {len(view)}")
    order = torch.argsort(key.seq)
    seq_sorted = key.seq[order]
    pos = torch.searchsorted(seq_sorted, view.seq).clamp(max=max(0, seq_sorted.numel() - 1))
    if not bool((seq_sorted[pos] == view.seq).all()):
        raise RunError("the audit key does not match the transcript (sequence numbers differ)")
    return key.member_index[order][pos], key.client[order][pos]


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
        "pooled": sc.summary(seed=seed),
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
        tmp_json.write_text(json.dumps(_clean(result), indent=1, allow_nan=False))
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


def run_command(
    run_dir: Path,
    attacks: str | None,
    out: str | None,
    progress: bool,
    denoiser_config: DenoiserConfig | None = None,
    cache_dir: Path | None = None,
) -> int:
    """Attack a run's server view and score it; returns the exit code (bad input raises CollafuseError).

    ``denoiser_config``/``cache_dir`` override the attacker's denoiser recipe and cache (default:
    :class:`DenoiserConfig` with the run's seed; ``$COLLAFUSE_CACHE`` or ``~/.cache/collafuse``).
    """
    names = RECONSTRUCTION_ATTACKS.parse(attacks)
    run_dir = Path(run_dir)
    run = Run.load(run_dir)
    out_path = Path(out) if out else default_output(run_dir)
    _check_output(out_path)
    cfg, schedule = run.config, run.schedule
    base = {
        "command": "attack reconstruct",
        "collafuse_version": __version__,
        "run": str(run_dir),
        "threat": "T1",
        "schedule": schedule.name,
        "T": schedule.T,
        "t_c": run.t_c,
        "cut_ratio": cfg.diffusion.cut_ratio,
        "payload_kind": cfg.training.payload,
        "attacks_requested": list(names),
    }
    has_transcript = (run_dir / TRANSCRIPT_DIR).is_dir()
    view = ViewArrays.from_server_view(ServerView.open(run_dir)) if run.server_model is not None and has_transcript else None
    if view is None or len(view) == 0:
        if run.server_model is not None and not has_transcript:
            raise RunError(f"{run_dir}: the run has a server but no transcript folder")
        reason = (
            f"c = {cfg.diffusion.cut_ratio} (t_c = {run.t_c} = T): every client works alone; no payload crossed to a server"
            if run.t_c >= schedule.T else "the transcript holds no payload rows"
        )
        _write_atomic({**base, "status": "nothing-to-attack", "reason": reason, "rows": 0, "attacks": {}}, out_path, None)
        print(f"nothing to attack ({reason}); result written to {out_path}")
        return 0

    data, splits = run.load_data()
    aux = data.subset(splits.aux)
    member, sender = resolve_truth_rows(view, AuditKey.open(run_dir))  # scorer side only
    pool = torch.cat([splits.members, splits.nonmembers])
    truth = Truth(member, sender, data.images, data.labels, {k: idx for k, idx in enumerate(splits.clients)}, pool, POOL_DESCRIPTION)

    denoiser, cache_file = None, None
    dcfg = denoiser_config or DenoiserConfig(seed=cfg.seed)
    if {"tweedie", "ddim"} & set(names):
        if len(aux) < 2:
            raise RunError("tweedie/ddim need the attacker's auxiliary public split; the run has data.n_aux < 2")
        denoiser, cache_file, hit = load_or_train(aux.images, schedule, dcfg, cache_dir, forbid_under=(run_dir,), progress=progress)
        if progress:
            print(f"attacker denoiser {'loaded from' if hit else 'trained and cached at'} {cache_file}", flush=True)
    if "inversion" in names and len(aux) < 2:
        raise RunError("inversion needs the attacker's auxiliary public split; the run has data.n_aux < 2")
    resources = AttackerResources(
        aux=aux if len(aux) else None, denoiser=denoiser, candidates=data.images[pool],
        epochs=cfg.training.epochs, seed=cfg.seed,
    )
    ev = evaluate_view(view, schedule, truth, resources, names, data.num_classes, progress=progress)
    seed = cfg.seed
    lab = ev.payload_label_summary(seed=seed)
    result = {
        **base,
        "status": "ok",
        "rows": len(view),
        "clients": sorted(int(k) for k in torch.unique(sender)),
        "epochs": cfg.training.epochs,
        "labels_sent": ev.labels_sent,
        "candidate_pool": {"description": POOL_DESCRIPTION, "size": int(pool.numel())},
        "chance": ev.chance,
        "attacker": {
            "aux_images": len(aux),
            "denoiser": None if denoiser is None else {"cache_file": str(cache_file), "config": asdict(dcfg), "cache_root": str(cache_dir or default_cache_dir())},
        },
        "label_inference_payload": None if lab is None else {
            "method": "label sent with the payload" if ev.labels_sent else "classifier trained on aux images noised at the view's steps, reading p/a",
            "pooled": lab,
            "clients": {str(int(k)): ev.payload_label_summary(sender.numpy() == int(k), seed) for k in torch.unique(sender)},
        },
        "intervals": "95 %: t (means) / Wilson (proportions) over rows; cluster bootstrap over images when an image has several rows",
        "png": str(out_path.with_suffix(".png")),
        "per_image_file": str(per_image_path(out_path)),
        "attacks": {name: _attack_entry(name, ev, seed) for name in ev.scores},
    }
    _write_atomic(result, out_path, (ev, truth, view))
    if progress:
        for name, sc in ev.scores.items():
            s = sc.summary(seed=seed)
            print(f"  {name:28s} PSNR {s['psnr']['value']:6.2f} dB  SSIM {s['ssim']['value']:.3f}  re-id(client) {s['reid_client']['value']:.3f}")
    print(f"reconstruction results written to {out_path}")
    return 0
