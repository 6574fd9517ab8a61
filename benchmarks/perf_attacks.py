"""Cost of each membership attack against its model-query budget (issue 4, DESIGN.md §4.2).

For every attack: wall time on N candidate images, divided by (model queries per image ×
time of ONE batched denoiser forward on the same N images). A ratio near 1 means the
attack costs what its queries cost and nothing else; the target is ≤ 1.2. Each attack
gets a fresh signal cache, so shared signals are paid by every attack that reads them.

    python benchmarks/perf_attacks.py [--run RUN_DIR] [-n 256] [--threads 1] [--repeats 3]
                                      [--references 2] [--ref-epochs 2] [--clock wall|process]
                                      [--calibrated-only] [--peers 3]

Without ``--run`` the model is a freshly built default-config server UNet ((32, 64),
time_dim 128, 10 classes) on 16×16 digits; with ``--run`` the run's own server model (or
client 0's when c = 1) and its member/non-member images.

The calibrated attacks (``lira``, ``rmia`` and their offline forms) also train R reference models, so
their floor is (R reference trainings + queries): R × the time of ONE reference training (measured
alone, same recipe and subset size) + their queries × the forward time, the population samples' queries
included ((N + Z)/N of the candidates'). They attack a CLIENT model (T3: a reference costs one client
training): the default config's fresh client UNet ((16, 32), time_dim 64) at t ≤ t_c, or with ``--run``
client 0's model and recipe. Reference trainings run ``--ref-epochs`` epochs (a training's cost is
linear in its epochs; the ratio does not depend on it), each repetition in a fresh reference cache.

The peer attacks (``lira-peers``, ``rmia-peers``) train nothing: their floor is the queries of the target and its
P peer client models ((1 + P)·M·K per candidate, and per population sample for rmia-peers), timed on a client model
against ``--peers`` fresh ones (or with ``--run`` client 0 against the run's other client models); source inference
(which client's model holds a member) is timed beside them: (1 + P)·M·K queries per member. The ``-hf`` variants
(FreMIA's filter) read the signals of their unfiltered attacks (the same queries) and ``noise-agg`` makes 5: both
run in the main table.

``--clock process`` times with this process's CPU time instead of the wall clock: on a machine shared with
other jobs the wall clock counts their time slices too, the CPU time (one thread) does not.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.catalog import ATTACKS
from collafuse.attacks.membership.references import (
    MAX_POPULATION, ClientRecipe, ReferencePlan, client_reference_producers, train_client_model,
)
from collafuse.attacks.membership.signals import (
    ModelView, model_signal_cache, payload_signal_cache, sample_signal_cache,
)
from collafuse.config import DEFAULT_CONFIG
from collafuse.data import load_digits16
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule
from collafuse.training import build_model, unet_config


CLOCK = time.perf_counter  # --clock: time.perf_counter (wall) or time.process_time (this process's CPU)


def forward_seconds(view: ModelView, images: torch.Tensor, labels: torch.Tensor | None, repeats: int) -> float:
    """Median time of one batched forward ε_θ(x, t, y) on all the images (after a warm-up)."""
    t = (view.t_min + view.t_max) // 2
    view.eps(images, t, labels)
    times = []
    for _ in range(max(3, repeats)):
        start = CLOCK()
        view.eps(images, t, labels)
        times.append(CLOCK() - start)
    return statistics.median(times)


def reference_setup(args, run=None):
    """(client view, recipe, plan) of the calibrated attacks: a client target, its recipe with
    ``--ref-epochs`` epochs, N candidates, a pool and ≤ 256 population samples from the same data."""
    if run is not None:
        data, splits = run.load_data()
        view = ModelView.client(run.client_models[0], run.schedule, run.t_hand, run.num_classes > 0)
        recipe = ClientRecipe.from_run(run)
        labels_all = data.labels if run.num_classes > 0 else None
        order = torch.cat([splits.members, splits.nonmembers, splits.aux])
    else:
        cfg = DEFAULT_CONFIG
        data = load_digits16(1, cfg.data.image_size)
        schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
        unet = unet_config(cfg.client_model, 1, 10)
        view = ModelView.client(build_model(unet, 0, 3).eval(), schedule, cfg.t_c, True)
        tr = cfg.training
        recipe = ClientRecipe(unet, cfg.diffusion.schedule, cfg.diffusion.T, cfg.t_c, tr.epochs, tr.batch_size, tr.lr,
                              tr.ema_decay, tr.label_dropout)
        labels_all = data.labels
        order = torch.arange(len(data.images))
    recipe = replace(recipe, epochs=args.ref_epochs)
    n, z = args.n, min(MAX_POPULATION, max(0, len(order) - 2 * args.n))
    cand, pool, pop = order[:n], order[n: 2 * n], order[2 * n: 2 * n + z]

    def lab(idx):
        return None if labels_all is None else labels_all[idx]

    plan = ReferencePlan(data.images[cand], lab(cand), data.images[pool], lab(pool), data.images[pop], lab(pop),
                         n_train=n // 2)
    return view, recipe, plan


def reference_costs(args) -> float:
    """Time the calibrated attacks against (R reference trainings + queries); print a row each; the worst ratio."""
    run = None
    if args.run:
        from collafuse.runs import Run

        run = Run.load(args.run)
    view, recipe, plan = reference_setup(args, run)
    settings = SignalSettings(batch_size=len(plan.candidates), references=args.references)
    images, labels = plan.candidates, plan.candidate_labels
    fwd = forward_seconds(view, images, labels, args.repeats)
    trainings = []
    for rep_ in range(args.repeats):  # one reference training alone: half the candidates + pool fill, as the plan
        start = CLOCK()
        train_client_model(recipe, images[: plan.n_train], labels[: plan.n_train] if labels is not None else None, rep_)
        trainings.append(CLOCK() - start)
    train = statistics.median(trainings)
    n, z = len(images), len(plan.population)
    print(f"\ncalibrated attacks on a client model: N = {n} candidates, Z = {z} population samples, R = {args.references} "
          f"references of {plan.n_train} images × {recipe.epochs} epochs; one reference training {train:.2f} s, "
          f"one batched forward {fwd * 1e3:.1f} ms")
    print(f"{'attack':>12} {'queries/img':>11} {'trainings s':>11} {'queries s':>9} {'floor s':>8} {'time s':>8} {'ratio':>6}")
    worst = 0.0
    for name in ATTACKS.needing("references"):
        attack = ATTACKS.get(name)
        walls = []
        for rep_ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache_dir:  # no reference is reused: every repetition trains R
                start = CLOCK()
                fresh = ModelView(view.model, view.schedule, view.origin, view.t_min, view.t_max, view.conditional, view.device)
                cache = model_signal_cache(fresh, images, labels, settings, torch.Generator().manual_seed(rep_))
                cache = cache.with_producers(client_reference_producers(
                    fresh, recipe, plan, args.references, settings.n_steps, settings.n_noise, settings.batch_size,
                    rep_, 1, cache_dir))
                attack.score(cache.require(attack.signals))
                walls.append(CLOCK() - start)
        wall = statistics.median(walls)
        q = attack.queries_per_image(settings, len(cache.get("steps")))
        queries = q * fwd * (n + z) / n  # the population samples are queried by the target and every reference
        floor = args.references * train + queries
        ratio = wall / floor
        worst = max(worst, ratio)
        print(f"{name:>12} {q:>11} {args.references * train:>11.2f} {queries:>9.2f} {floor:>8.2f} {wall:>8.2f} {ratio:>6.2f}")
    return worst


def peer_setup(args, run=None):
    """(target client view, [(client, peer view)], candidates, labels, population, population labels) of the peer
    attacks and of source inference: with ``--run`` its client 0 against its other client models, else a fresh
    default-config client UNet against ``--peers`` fresh ones (other init streams: trained alike, not alike)."""
    if run is not None:
        data, splits = run.load_data()
        cond = run.num_classes > 0
        views = [ModelView.client(m, run.schedule, run.t_hand, cond) for m in run.client_models if m is not None]
        labels_all = data.labels if cond else None
        order = torch.cat([splits.members, splits.nonmembers])
        pop = splits.aux[:MAX_POPULATION]
    else:
        cfg = DEFAULT_CONFIG
        data = load_digits16(1, cfg.data.image_size)
        schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
        unet = unet_config(cfg.client_model, 1, 10)
        views = [ModelView.client(build_model(unet, 0, 3, k).eval(), schedule, cfg.t_c, True) for k in range(1 + args.peers)]
        labels_all = data.labels
        order = torch.arange(args.n)
        pop = torch.arange(args.n, min(len(data.images), args.n + MAX_POPULATION))
    cand = order[: args.n]

    def lab(idx):
        return None if labels_all is None else labels_all[idx]

    return (views[0], list(enumerate(views[1:], 1)), data.images[cand], lab(cand), data.images[pop], lab(pop))


def peer_costs(args) -> float:
    """Time the peer attacks (the other clients' models as OUT references: no training) and source inference
    against their queries; print a row each; the worst ratio. The peer attacks' floor counts the target's and every
    peer's queries on the candidates, and rmia-peers' on the population samples too ((N + Z)/N of them);
    source inference queries every client model (target and peers) at the same M·K fixed draws."""
    from collafuse.attacks.membership.peers import peer_producers
    from collafuse.attacks.membership.source import model_losses
    from collafuse.attacks.membership.signals import step_grid

    run = None
    if args.run:
        from collafuse.runs import Run

        run = Run.load(args.run)
    view, peers, images, labels, population, pop_labels = peer_setup(args, run)
    if not peers:
        print("\npeer attacks: the run has one client model, no peer to time")
        return 0.0
    settings = SignalSettings(batch_size=len(images))
    fwd = forward_seconds(view, images, labels, args.repeats)
    n, z = len(images), len(population)
    print(f"\npeer attacks on a client model: N = {n} candidates, Z = {z} population samples, P = {len(peers)} peer "
          f"models; one batched forward {fwd * 1e3:.1f} ms")
    print(f"{'attack':>16} {'queries/img':>11} {'floor s':>8} {'time s':>8} {'ratio':>6}")
    worst = 0.0
    for name in ATTACKS.needing("peers"):
        attack = ATTACKS.get(name)
        walls, q = [], 0
        for rep_ in range(args.repeats):
            start = CLOCK()
            fresh = ModelView(view.model, view.schedule, view.origin, view.t_min, view.t_max, view.conditional, view.device)
            cache = model_signal_cache(fresh, images, labels, settings, torch.Generator().manual_seed(rep_))
            cache = cache.with_producers(peer_producers(fresh, peers, images, labels, population, pop_labels, "iid",
                                                        settings.n_steps, settings.n_noise, settings.batch_size, rep_, 1))
            q = attack.score(cache.require(attack.signals)).queries_per_image
            walls.append(CLOCK() - start)
        wall = statistics.median(walls)
        floor = q * fwd * ((n + z) / n if "peer_pop_loss" in attack.signals else 1.0)
        worst = max(worst, wall / floor)
        print(f"{name:>16} {q:>11} {floor:>8.2f} {wall:>8.2f} {wall / floor:>6.2f}")
    views = [view, *(p for _, p in peers)]
    steps = step_grid(view.t_min, view.t_max, settings.n_steps)
    walls = []
    for rep_ in range(args.repeats):
        noise = torch.randn((len(steps), settings.n_noise, n, *images.shape[1:]), generator=torch.Generator().manual_seed(rep_))
        start = CLOCK()
        model_losses(views, images, labels, steps, noise, settings.batch_size)
        walls.append(CLOCK() - start)
    wall, q = statistics.median(walls), len(views) * len(steps) * settings.n_noise
    worst = max(worst, wall / (q * fwd))
    print(f"{'source-inference':>16} {q:>11} {q * fwd:>8.2f} {wall:>8.2f} {wall / (q * fwd):>6.2f}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run folder (default: a fresh default-config model)")
    parser.add_argument("-n", type=int, default=256, help="candidate images (one batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per attack (median)")
    parser.add_argument("--references", type=int, default=2, help="reference models of lira / rmia (default 2)")
    parser.add_argument("--ref-epochs", type=int, default=2, help="epochs of each reference training (default 2)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall clock (default) or this process's CPU time (robust on a shared machine)")
    parser.add_argument("--calibrated-only", action="store_true", help="time lira / rmia only (their references)")
    parser.add_argument("--peers", type=int, default=3, help="peer client models of lira-peers / rmia-peers without "
                        "--run (default 3: the default config's 4 clients)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.calibrated_only:
        worst = reference_costs(args)
        print(f"worst ratio {worst:.2f} (target <= 1.2)")
        return 0 if worst <= 1.2 else 1

    if args.run:
        from collafuse.runs import Run

        run = Run.load(args.run)
        data, splits = run.load_data()
        idx = torch.cat([splits.members, splits.nonmembers])[: args.n]
        images = data.images[idx]
        labels = data.labels[idx] if run.num_classes > 0 else None
        schedule, t_c = run.schedule, run.t_hand
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
    print(f"{len(images)} images of {tuple(images.shape[1:])}, {args.threads} thread(s), {args.clock} clock; "
          f"one batched forward: {fwd * 1e3:.1f} ms")
    print(f"{'attack':>12} {'queries/img':>11} {'time s':>8} {'ratio':>6}")
    worst = 0.0
    for name in ATTACKS:
        if name in ATTACKS.needing("references") + ATTACKS.needing("peers"):
            continue  # timed below: against (reference trainings + queries), and against the peers' queries
        attack = ATTACKS.get(name)
        walls = []
        for rep in range(args.repeats):
            start = CLOCK()
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
            walls.append(CLOCK() - start)
        wall = statistics.median(walls)
        q = attack.queries_per_image(settings, m)
        if q:
            ratio = wall / (q * fwd)
            worst = max(worst, ratio)
            print(f"{name:>12} {q:>11} {wall:>8.3f} {ratio:>6.2f}")
        else:
            print(f"{name:>12} {q:>11} {wall:>8.3f}    n/a (no model queries)")
    worst = max(worst, reference_costs(args), peer_costs(args))
    print(f"worst ratio {worst:.2f} (target <= 1.2)")
    return 0 if worst <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
