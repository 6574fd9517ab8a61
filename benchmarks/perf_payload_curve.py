"""Wall time of the payload-only leakage curve (issue 3; DESIGN.md §7). Target: ≤ 60 s.

20 cut ratios on digits (the embedded default config: 1,024 members in 4 IID clients,
256 non-members, 256 aux, cosine schedule, T = 1000), every attack but ``inversion``,
one epoch of payloads. The attacker's denoiser is trained once and cached (it serves
every cut point and every later curve); its one-time training is timed separately,
and the curve is timed with the cache warm, as in an audit.

    python -m collafuse.benchmarks.perf_payload_curve [--threads 1] [--cache DIR]
    python -m collafuse.benchmarks.perf_payload_curve --table [--epochs 10]

``--table`` prints instead the leakage table of the issue's closing note: PSNR, SSIM and
re-identification (within the client / within the pool) vs cut ratio 0.1 … 0.9 for
``rescale``, ``tweedie``, ``multiview`` (own linking, with its linkage accuracy, and the
perfect-linking bound), ``oracle`` (one payload) and ``oracle-all-views`` (the ceiling:
the oracle given every view of an image), with the same data and schedule.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from collafuse.attacks.reconstruction.curve import CURVE_ATTACKS, payload_curve
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, load_or_train
from collafuse.attacks.reconstruction.evaluate import ALL_VIEWS, PERFECT
from collafuse.config import DEFAULT_CONFIG
from collafuse.runs import prepare_data
from collafuse.schedule import NoiseSchedule

CUT_RATIOS = tuple(round((i + 0.5) / 20, 3) for i in range(20))  # 0.025, 0.075, …, 0.975
TABLE_CUTS = tuple(round(0.1 * i, 1) for i in range(1, 10))
TABLE_ATTACKS = ("rescale", "tweedie", "multiview", "oracle")  # run; the table adds the two bounds
TABLE_COLUMNS = ("rescale", "tweedie", "multiview", PERFECT, "oracle", ALL_VIEWS)


def leakage_table(rows: list[dict], cuts: tuple[float, ...], attacks: tuple[str, ...]) -> str:
    """Markdown: one line per cut ratio, per attack 'PSNR / SSIM / re-id client / re-id pool' (pooled values)."""
    value = {(r["attack"], r["cut_ratio"], r["metric"]): r["value"] for r in rows if r["scope"] == "pooled"}
    head = "| c (t_c) | " + " | ".join(f"{a}: PSNR dB / SSIM / re-id client / re-id pool" for a in attacks) + " |"
    lines = [head, "|" + "---|" * (len(attacks) + 1)]
    for c in cuts:
        cells = []
        for a in attacks:
            v = [value.get((a, c, m)) for m in ("psnr", "ssim", "reid_client", "reid_pool")]
            cell = " / ".join("-" if x is None else f"{x:.2f}" if i == 0 else f"{x:.3f}" for i, x in enumerate(v))
            if (a, c, "linkage_accuracy") in value:
                cell += f" (linkage {value[(a, c, 'linkage_accuracy')]:.3f})"
            cells.append(cell)
        lines.append(f"| {c} ({round(c * 1000)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    parser.add_argument("--cache", type=Path, default=None, help="attacker cache (default $COLLAFUSE_CACHE or ~/.cache/collafuse)")
    parser.add_argument("--table", action="store_true", help="print the closing-note leakage table instead")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of payloads for --table (default 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        config = DEFAULT_CONFIG
        t0 = time.perf_counter()
        data, splits = prepare_data(config)
        schedule = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.T)
        dcfg = DenoiserConfig(seed=config.seed)
        _, path, hit = load_or_train(data.images[splits.aux], schedule, dcfg, args.cache)
        print(f"attacker denoiser: {'cache hit' if hit else 'trained'} in {time.perf_counter() - t0:.1f} s ({path})")
        if args.table:
            t1 = time.perf_counter()
            result = payload_curve(config, TABLE_CUTS, epochs=args.epochs, attacks=TABLE_ATTACKS, denoiser_config=dcfg,
                                   cache_dir=args.cache, keep_evaluations=False)
            print(f"digits {config.data.image_size}x{config.data.image_size}, {schedule.name} T={schedule.T}, "
                  f"{args.epochs} epoch(s), {len(splits.members)} members in {config.data.num_clients} clients, "
                  f"pool {len(splits.members) + len(splits.nonmembers)}; {time.perf_counter() - t1:.0f} s")
            print(leakage_table(result.rows, TABLE_CUTS, TABLE_COLUMNS))
            return
        attacks = tuple(a for a in CURVE_ATTACKS if a != "inversion")
        t1 = time.perf_counter()
        result = payload_curve(config, CUT_RATIOS, epochs=1, attacks=attacks, denoiser_config=dcfg, cache_dir=args.cache,
                               keep_evaluations=False)
        wall = time.perf_counter() - t1
    print(f"payload-only curve: {len(CUT_RATIOS)} cut ratios x {len(attacks)} attacks ({', '.join(attacks)}), "
          f"1 epoch, {len(splits.members)} payloads per cut, {len(result.rows)} result rows")
    print(f"wall time: {wall:.1f} s  (target <= 60 s; threads={args.threads})")


if __name__ == "__main__":
    main()
