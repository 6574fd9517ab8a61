"""Cost of each membership attack against its model-query budget (issue 4, DESIGN.md §4.2).

For every attack: wall time on N candidate images, divided by (model queries per image ×
time of ONE batched denoiser forward on the same N images). A ratio near 1 means the
attack costs what its queries cost and nothing else; the target is ≤ 1.2. Each attack
gets a fresh signal cache, so shared signals are paid by every attack that reads them.

    python benchmarks/perf_attacks.py [--run RUN_DIR] [-n 256] [--threads 1] [--repeats 3]

Without ``--run`` the model is a freshly built default-config server UNet ((32, 64),
time_dim 128, 10 classes) on 16×16 digits; with ``--run`` the run's own server model (or
client 0's when c = 1) and its member/non-member images.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.signals import (
    ModelView, model_signal_cache, payload_signal_cache, sample_signal_cache,
)
from collafuse.config import DEFAULT_CONFIG
from collafuse.data import load_digits16
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule
from collafuse.training import build_model, unet_config


def forward_seconds(view: ModelView, images: torch.Tensor, labels: torch.Tensor | None, repeats: int) -> float:
    """Median time of one batched forward ε_θ(x, t, y) on all the images (after a warm-up)."""
    t = (view.t_min + view.t_max) // 2
    view.eps(images, t, labels)
    times = []
    for _ in range(max(3, repeats)):
        start = time.perf_counter()
        view.eps(images, t, labels)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run folder (default: a fresh default-config model)")
    parser.add_argument("-n", type=int, default=256, help="candidate images (one batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per attack (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.run:
        from collafuse.runs import Run

        run = Run.load(args.run)
        data, splits = run.load_data()
        idx = torch.cat([splits.members, splits.nonmembers])[: args.n]
        images = data.images[idx]
        labels = data.labels[idx] if run.num_classes > 0 else None
        schedule, t_c = run.schedule, run.t_c
        if run.server_model is not None:
            view = ModelView.server(run.server_model, schedule, t_c, run.num_classes > 0)
        else:
            view = ModelView.client(run.client_models[0], schedule, t_c, run.num_classes > 0)
    else:
        cfg = DEFAULT_CONFIG
        data = load_digits16(1, cfg.data.image_size)
        images, labels = data.images[: args.n], data.labels[: args.n]
        schedule, t_c = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T), cfg.t_c
        model = build_model(unet_config(cfg.server_model, 1, 10), 0, 2).eval()
        view = ModelView.server(model, schedule, t_c, True)

    settings = SignalSettings(batch_size=len(images))
    fwd = forward_seconds(view, images, labels, args.repeats)
    print(f"{len(images)} images of {tuple(images.shape[1:])}, {args.threads} thread(s); "
          f"one batched forward: {fwd * 1e3:.1f} ms")
    print(f"{'attack':>12} {'queries/img':>11} {'wall s':>8} {'ratio':>6}")
    worst = 0.0
    for name in ATTACKS:
        attack = ATTACKS.get(name)
        walls = []
        for rep in range(args.repeats):
            start = time.perf_counter()
            if "T1" in attack.threats:
                client = Client(0, None, None, schedule, t_c, "cut", torch.Generator().manual_seed(rep))
                p = [client.release(images, None, torch.arange(len(images)), s) for s in range(4)]
                cache = payload_signal_cache(images, {"tensor": torch.cat([x.tensor for x in p]),
                                                      "t": torch.cat([x.t for x in p])}, schedule, images[:64])
                m = 0
            elif "T4" in attack.threats:
                cache = sample_signal_cache(images, images.flip(0) + 0.1)
                m = 0
            else:
                fresh = ModelView(view.model, view.schedule, view.origin, view.t_min, view.t_max, view.conditional, view.device)
                cache = model_signal_cache(fresh, images, labels, settings, torch.Generator().manual_seed(rep))
                m = len(cache.get("steps"))
            attack.score(cache.require(attack.signals))
            walls.append(time.perf_counter() - start)
        wall = statistics.median(walls)
        q = attack.queries_per_image(settings, m)
        if q:
            ratio = wall / (q * fwd)
            worst = max(worst, ratio)
            print(f"{name:>12} {q:>11} {wall:>8.3f} {ratio:>6.2f}")
        else:
            print(f"{name:>12} {q:>11} {wall:>8.3f}    n/a (no model queries)")
    print(f"worst ratio {worst:.2f} (target <= 1.2)")
    return 0 if worst <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
