"""Training-step cost of the split protocol, and our denoiser against diffusers' UNet2DModel.

Prints, from one run, with interleaved repetitions and medians:
1. collaborative step time / centralised DDPM step time, where the centralised
   side does the same denoiser evaluations (one step of a client-sized model and one
   of a server-sized model on the same batch, plain ε-prediction). The difference
   is the protocol's own overhead: payload creation, the transcript, the server's
   relative-schedule noising. Target ≤ 1.10.
2. images/s of our UNet against ``diffusers.UNet2DModel`` with the same block widths
   (forward + backward, same batch), when diffusers is installed. Target ≥ 1.5×.
3. the cost of DP-SGD: an Opacus client step over the plain step, for 1 and 4
   timesteps per image (noise multiplicity), from ``perf_dpsgd``.

    python -m collafuse.benchmarks.perf_train [--reps 30] [--batch 64]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from collafuse.config import DEFAULT_CONFIG
from collafuse.data import load_source
from collafuse.model import UNet
from collafuse.protocol import Client, Server
from collafuse.schedule import NoiseSchedule, q_sample
from collafuse.device import CPU
from collafuse.streams import generator_for
from collafuse.training import build_model, unet_config
from collafuse.transcript import TranscriptWriter


def _plain_step(model: UNet, opt: torch.optim.Optimizer, x0, y, schedule: NoiseSchedule, t_hi: int, g) -> None:
    t = torch.randint(1, t_hi + 1, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    loss = (model(q_sample(x0, t, noise, schedule.alpha_bar), t, y) - noise).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def protocol_overhead(reps: int, batch: int) -> tuple[float, float]:
    cfg = DEFAULT_CONFIG
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    t_c = cfg.t_c
    data = load_source("digits", 1, cfg.data.image_size)
    x0, y = data.images[:batch], data.labels[:batch]
    ids = torch.arange(batch)
    k = data.num_classes

    def fresh(side, stream):
        model = build_model(unet_config(side, 1, k), 0, stream)
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)

    c_model, c_opt = fresh(cfg.client_model, 1)
    s_model, s_opt = fresh(cfg.server_model, 2)
    client = Client(0, c_model, c_opt, schedule, t_c, "cut", generator_for(0, 1), send_labels=True)
    server = Server(s_model, s_opt, schedule, t_c, generator_for(0, 2), CPU)
    pc_model, pc_opt = fresh(cfg.client_model, 1)
    ps_model, ps_opt = fresh(cfg.server_model, 2)
    g = generator_for(0, 3)

    with tempfile.TemporaryDirectory() as tmp:
        writer = TranscriptWriter(Path(tmp), "cut", shard_rows=4096)
        step = [0]

        def collaborative():
            client.train_step(x0, y)
            payload = client.release(x0, y, ids, step[0])
            writer.record(payload, ids)
            server.receive(payload)
            step[0] += 1

        def centralised():
            _plain_step(pc_model, pc_opt, x0, y, schedule, t_c, g)
            _plain_step(ps_model, ps_opt, x0, y, schedule, schedule.T, g)

        for _ in range(3):  # warm-up
            collaborative()
            centralised()
        collab, central = [], []
        for _ in range(reps):  # interleaved so drift hits both equally
            collab.append(_median_seconds(collaborative, 1))
            central.append(_median_seconds(centralised, 1))
        writer.close()
    return statistics.median(collab), statistics.median(central)


def denoiser_speed(reps: int, batch: int) -> tuple[float, float] | None:
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    cfg = DEFAULT_CONFIG.server_model
    ours = build_model(unet_config(cfg, 1, 10), 0, 0)
    theirs = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.blocks_per_level, down_block_types=("DownBlock2D",) * len(cfg.channels),
        up_block_types=("UpBlock2D",) * len(cfg.channels), norm_num_groups=cfg.groups, num_class_embeds=11,
    )
    x = torch.randn(batch, 1, 16, 16)
    t = torch.randint(1, 1000, (batch,))
    y = torch.randint(0, 10, (batch,))

    def step_ours():
        ours.zero_grad()
        ours(x, t, y).pow(2).mean().backward()

    def step_theirs():
        theirs.zero_grad()
        theirs(x, t, class_labels=y).sample.pow(2).mean().backward()

    for _ in range(3):
        step_ours()
        step_theirs()
    a, b = [], []
    for _ in range(reps):
        a.append(_median_seconds(step_ours, 1))
        b.append(_median_seconds(step_theirs, 1))
    return batch / statistics.median(a), batch / statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, reps {args.reps}")
    collab, central = protocol_overhead(args.reps, args.batch)
    print(f"collaborative step   {collab * 1e3:8.1f} ms")
    print(f"centralised step     {central * 1e3:8.1f} ms  (same denoiser evaluations)")
    print(f"ratio collaborative/centralised = {collab / central:.3f}  (target <= 1.10)")
    speed = denoiser_speed(args.reps, args.batch)
    if speed is None:
        print("diffusers not installed: denoiser comparison skipped (pip install '.[bench]')")
    else:
        ours, theirs = speed
        print(f"ours {ours:8.1f} img/s, diffusers.UNet2DModel {theirs:8.1f} img/s (train fwd+bwd)")
        print(f"ratio ours/diffusers = {ours / theirs:.2f}  (target >= 1.5)")
    from collafuse.benchmarks.perf_dpsgd import dpsgd_step_ratio

    dp = dpsgd_step_ratio(batch=args.batch, repeats=max(3, args.reps // 4))
    for k, row in dp["dpsgd"].items():
        print(f"DP-SGD client step ({k} timesteps per image) / plain step = {row['ratio_to_plain']:.2f}"
              f"  ({row['step_s'] * 1e3:.1f} ms vs {dp['plain_step_s'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
