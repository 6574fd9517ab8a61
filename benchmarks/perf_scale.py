"""Cost of the T1 attacks and of a payload-only audit cell as the work grows (issue 15 item 3, DESIGN §10).

At 32×32×3, N payload rows (or candidates) ∈ {1k, 4k, 16k, 64k} against a pool of 4k, each point
measured in a fresh process; one JSON line per point::

    {"attack": ..., "rows": N, "pool": 4096, "seconds": ..., "peak_rss_mb": ..., "setup_rss_mb": ...}

then one line per attack with the fitted growth exponent of time in N (least squares on log–log;
``time_exponent`` from wall seconds, ``cpu_time_exponent`` from CPU seconds)
and the ratio of peak memory at the largest N to the smallest. Targets: exponent ≤ 1.1 (time grows
at most as rows × pool) and peak ratio ≤ 1.5 (memory does not grow with the rows).

    python benchmarks/perf_scale.py [--quick] [--rows 1000,4000] [--pool 4096] [--attacks oracle,...]

``--quick``: N ∈ {1k, 8k}. What each point runs (the rows stream through in blocks, as a reader of
transcript shards would feed them, so neither the N input rows nor N output images are held; what is
measured is the attack's own working memory, bounded by ``$COLLAFUSE_MEMORY_MB`` (``--memory-mb``,
default 128 here: blocks of about 1k rows against 4k candidates, so that every N from 1k up runs
full blocks), and its time):

- ``oracle``: :func:`oracle.attack` on each block (posterior means) and re-identification through its
  block-wise :class:`PoolLogWeights` (argmax), candidates = the pool;
- ``oracle-all-views``: the group sums of :func:`oracle.block_log_weights` over every row
  (N / pool views of each image), then the groups' posterior argmax;
- ``nn-distance``: :func:`nearest_distance` of N candidates to pool generated samples;
- ``multiview``: linking N rows, in blocks of ≤ pool rows (one epoch each), to pool anchors
  (:func:`multiview.assign_block`: the cost matrix and the Hungarian assignment), flat prior;
- ``payload-lr``: :func:`payload_pool_stats` of the pool against N payloads, combined over blocks
  (running max and log-sum-exp), when the installed signals module has it;
- ``payload-cell``: a whole payload-only audit cell (``rescale``, ``multiview``, ``oracle`` and the
  oracle-all-views bound, scored) on a synthetic 32×32×3 ``.npz`` with pool = members + non-members
  = 4096 and N = members × epochs. The cell simulates, attacks and scores its view a shard at a
  time (:mod:`collafuse.attacks.reconstruction.streamed`); ``view_mb`` says how large the view
  would be if it were held.

Each point reports ``seconds`` (wall) and ``cpu_seconds`` (CPU time of the measured part; the
point runs on one thread, so this is its work whatever else shares the machine) and
``process_cpu_seconds`` (the whole child process), and each fit both exponents.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (3, 32, 32)
T, T_C = 1000, 300  # payloads at c = 0.3 of a cosine schedule
ATTACKS = ("oracle", "oracle-all-views", "nn-distance", "multiview", "payload-lr", "payload-cell")
FULL_ROWS = (1000, 4000, 16000, 64000)
QUICK_ROWS = (1000, 8000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds now. CPU time of the one-threaded point is what the work costs; wall time
    also counts the waits for a core when other processes share the machine."""
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> dict:
    wall, cpu = _clock()
    return {"seconds": wall - start[0], "cpu_seconds": cpu - start[1]}


def _pool(pool: int, seed: int = 0):
    import torch

    return torch.rand((pool, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _payload_rows(start: int, stop: int, cand, schedule, client=None):
    """Rows start..stop of a cut view: row i shows pool image i mod M, at t_c, fresh noise per block."""
    import torch
    from collafuse.attacks.reconstruction.view import ViewArrays

    member = torch.arange(start, stop) % cand.shape[0]
    gen = torch.Generator().manual_seed(1 + start)
    ab = float(schedule.alpha_bar[T_C])
    p = math.sqrt(ab) * cand[member] + math.sqrt(1 - ab) * torch.randn((stop - start, *SHAPE), generator=gen)
    n = stop - start
    client = torch.zeros(n, dtype=torch.long) if client is None else client
    return ViewArrays(p.float(), torch.full((n,), T_C), client, torch.arange(start, stop), torch.arange(start, stop)), member


def point_oracle(n: int, pool: int) -> dict:
    from collafuse.attacks.chunking import rows_per_chunk
    from collafuse.attacks.reconstruction import oracle
    from collafuse.attacks.reconstruction.view import AttackerResources

    from collafuse.schedule import NoiseSchedule

    schedule, cand = NoiseSchedule.create("cosine", T), _pool(pool)
    resources = AttackerResources(candidates=cand)
    size = rows_per_chunk(pool, oracle.BYTES_PER_PAIR)
    setup, began, hits = _rss_mb(), _clock(), 0
    for start in range(0, n, size):
        view, member = _payload_rows(start, min(n, start + size), cand, schedule)
        out = oracle.attack(view, schedule, resources)
        hits += int((out.pool_log_weights.argmax(1) == member).sum())
    return {**_elapsed(began), "setup_rss_mb": setup, "reid": hits / n}


def point_all_views(n: int, pool: int) -> dict:
    import torch
    from collafuse.attacks.chunking import rows_per_chunk
    from collafuse.attacks.reconstruction import oracle

    from collafuse.schedule import NoiseSchedule

    schedule, cand = NoiseSchedule.create("cosine", T), _pool(pool)
    cd = cand.double()
    size = rows_per_chunk(pool, oracle.BYTES_PER_PAIR)
    group_lw = torch.zeros(pool, pool, dtype=torch.float64)  # (images, candidates): the pool's size, whatever N
    setup, began = _rss_mb(), _clock()
    for start in range(0, n, size):
        view, member = _payload_rows(start, min(n, start + size), cand, schedule)
        group_lw.index_add_(0, member, oracle.block_log_weights(view, schedule, cd, slice(None)))
    seen = min(n, pool)  # images with at least one view
    group_lw -= group_lw.max(1, keepdim=True).values
    reid = float((group_lw[:seen].argmax(1) == torch.arange(seen)).double().mean())
    return {**_elapsed(began), "setup_rss_mb": setup, "reid": reid}


def point_nn_distance(n: int, pool: int) -> dict:
    import numpy as np
    from collafuse.attacks.chunking import rows_per_chunk
    from collafuse.attacks.membership.signals import nearest_distance

    samples = _pool(pool, seed=1).reshape(pool, -1).numpy()
    size = rows_per_chunk(pool, 12)
    setup, began, total = _rss_mb(), _clock(), 0.0
    for start in range(0, n, size):
        m = min(n, start + size) - start
        cand = np.random.default_rng(start).uniform(-1, 1, (m, samples.shape[1])).astype(np.float32)
        total += float(nearest_distance(cand, samples).sum())
    return {**_elapsed(began), "setup_rss_mb": setup, "mean_nn_dist": total / n}


def point_multiview(n: int, pool: int) -> dict:

    from collafuse.attacks.reconstruction.multiview import assign_block
    from collafuse.attacks.reconstruction.view import rescaled

    from collafuse.schedule import NoiseSchedule

    schedule, cand = NoiseSchedule.create("cosine", T), _pool(pool)
    anchors, _ = _payload_rows(0, pool, cand, schedule)
    y, var = rescaled(anchors, schedule)
    mean, prec = y.reshape(pool, -1).clone(), 1.0 / var.double()
    del y, anchors
    setup, began, right = _rss_mb(), _clock(), 0
    for start in range(pool, pool + n, pool):  # one epoch block of ≤ pool rows at a time
        view, member = _payload_rows(start, min(pool + n, start + pool), cand, schedule)
        yb, vb = rescaled(view, schedule)
        r, c = assign_block(yb.reshape(len(view), -1), vb, mean, prec)
        right += int((c == member[r]).sum())
    return {**_elapsed(began), "setup_rss_mb": setup, "linkage_accuracy": right / n}


def point_payload_lr(n: int, pool: int) -> dict:
    import numpy as np
    from collafuse.attacks.chunking import rows_per_chunk
    from collafuse.attacks.membership import signals

    from collafuse.schedule import NoiseSchedule

    if not hasattr(signals, "payload_pool_stats"):
        return {"skipped": "this signals module has no payload_pool_stats (issue 14's chunked payload-lr)"}
    schedule, cand = NoiseSchedule.create("cosine", T), _pool(pool)
    x = cand.reshape(pool, -1).numpy()
    size = rows_per_chunk(pool, 32)
    setup, began = _rss_mb(), _clock()
    best, fused = np.full(pool, -np.inf), np.full(pool, -np.inf)
    for start in range(0, n, size):
        view, _ = _payload_rows(start, min(n, start + size), cand, schedule)
        m = len(view)
        a = np.full(m, math.sqrt(float(schedule.alpha_bar[T_C])))
        s = np.full(m, math.sqrt(1 - float(schedule.alpha_bar[T_C])))
        b, f = signals.payload_pool_stats(x, view.tensor.reshape(m, -1).numpy(), a, s)
        best, fused = np.maximum(best, b), np.logaddexp(fused, f)
    return {**_elapsed(began), "setup_rss_mb": setup}


def point_payload_cell(n: int, pool: int) -> dict:
    import numpy as np
    import yaml
    from collafuse.benchmarks.audit.cells import compute_cell
    from collafuse.benchmarks.audit.grid import load_grid

    members = min(1000, pool // 4)
    epochs = max(1, round(n / members))
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "rgb32.npz"
        rng = np.random.default_rng(0)
        np.savez(npz, images=rng.integers(0, 256, (pool + 256, 32, 32, 3), dtype=np.uint8))
        grid = {
            "base": {"device": "auto", "data": {"image_size": 32, "channels": 3, "n_members": members,
                                                "n_nonmembers": pool - members, "n_aux": 256, "num_clients": 2},
                     "diffusion": {"T": T}},
            "datasets": {"rgb32": {"source": "npz", "path": str(npz)}},
            "payload_curve": {"cut_ratios": [T_C / T], "epochs": epochs, "attacks": ["rescale", "multiview", "oracle"]},
        }
        (Path(tmp) / "grid.yaml").write_text(yaml.safe_dump(grid))
        (cell,) = load_grid(Path(tmp) / "grid.yaml").cells()
        setup, began = _rss_mb(), _clock()
        out = compute_cell(cell, Path(tmp) / "cache")
        took = _elapsed(began)
    rows = {(r["attack"], r["metric"]): r["value"] for r in out.rows}
    n_rows = int(rows[("count", "payload_rows")])
    return {**took, "setup_rss_mb": setup, "rows": n_rows, "view_mb": n_rows * 3072 * 4 / 2**20,
            "reid_pool_oracle": rows.get(("oracle", "reid_pool"))}


POINTS = {"oracle": point_oracle, "oracle-all-views": point_all_views, "nn-distance": point_nn_distance,
          "multiview": point_multiview, "payload-lr": point_payload_lr, "payload-cell": point_payload_cell}


def run_point(attack: str, n: int, pool: int) -> dict:
    """In this process (the child): one measurement, on one torch/BLAS thread."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        out = {"attack": attack, "rows": n, "pool": pool, **POINTS[attack](n, pool)}
    out["peak_rss_mb"] = _rss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the whole child: imports and setup too
    return out


def measure(attack: str, n: int, pool: int, timeout: float, memory_mb: float) -> dict:
    """One point in a fresh process: its own peak RSS, nothing inherited from earlier points."""
    cmd = [sys.executable, __file__, "--point", attack, str(n), str(pool)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLLAFUSE_MEMORY_MB": str(memory_mb),
           # A fixed mmap threshold: glibc's dynamic one would put the freed blocks' successors on a
           # fragmenting heap whose RSS creeps up over the first blocks (about 1.3×, then flat).
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20))}
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"attack": attack, "rows": n, "pool": pool, "error": f"over {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"attack": attack, "rows": n, "pool": pool, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def log_log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (the growth exponent)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)


def growth(points: list[dict]) -> dict:
    """Growth exponents in N of wall seconds and (when measured) CPU seconds, and peak RSS at the
    largest N over the smallest."""
    ok = sorted((p for p in points if "seconds" in p), key=lambda p: p["rows"])
    if len(ok) < 2:
        return {}
    rows = [p["rows"] for p in ok]
    out = {"time_exponent": round(log_log_slope(rows, [p["seconds"] for p in ok]), 3)}
    if all("cpu_seconds" in p for p in ok):
        out["cpu_time_exponent"] = round(log_log_slope(rows, [p["cpu_seconds"] for p in ok]), 3)
    return {**out, "peak_ratio": round(ok[-1]["peak_rss_mb"] / ok[0]["peak_rss_mb"], 3), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {1k, 8k} only")
    parser.add_argument("--rows", default=None, help="comma-separated N (default 1000,4000,16000,64000)")
    parser.add_argument("--pool", type=int, default=4096)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--memory-mb", type=float, default=128.0,
                        help="$COLLAFUSE_MEMORY_MB of the points (default 128: 1,024 rows per block against "
                             "4,096 candidates, so every N >= 1k runs full blocks)")
    parser.add_argument("--point", nargs=3, metavar=("ATTACK", "ROWS", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        attack, n, pool = args.point
        print(json.dumps(run_point(attack, int(n), int(pool))), flush=True)
        return 0
    rows = [int(r) for r in args.rows.split(",")] if args.rows else list(QUICK_ROWS if args.quick else FULL_ROWS)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in POINTS]
    if unknown:
        parser.error(f"unknown attack {unknown[0]!r}; valid: {', '.join(POINTS)}")
    for attack in attacks:
        points = []
        for n in rows:
            p = measure(attack, n, args.pool, args.timeout, args.memory_mb)
            p["memory_mb"] = args.memory_mb
            if "seconds" in p:
                for key in ("seconds", "cpu_seconds", "process_cpu_seconds"):
                    if key in p:
                        p[key] = round(p[key], 3)
                p["peak_rss_mb"] = round(p["peak_rss_mb"], 1)
                p["setup_rss_mb"] = round(p["setup_rss_mb"], 1)
            print(json.dumps(p), flush=True)
            points.append(p)
            if "skipped" in p:
                break
        fit = growth(points)
        if fit:
            print(json.dumps({"attack": attack, "pool": args.pool, **fit}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
