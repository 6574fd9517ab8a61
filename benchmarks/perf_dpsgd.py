"""Cost of DP-SGD: one client training step with Opacus over the plain step (DESIGN.md §5, §6).

The step is the core's own ``Client.train_step`` (t ~ U{1..t_c}, ε-prediction loss, Adam)
on one minibatch; the private variant wraps the model in Opacus' per-sample-gradient
module and the optimiser in the noise-multiplicity DP optimiser, exactly as the
``dp-sgd`` defense does. Reported: median wall time per step over ``repeats`` steps
after ``warmup`` steps, and the ratio.

    python -m collafuse.benchmarks.perf_dpsgd [--batch 64] [--size 16] [--multiplicity 1 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from collafuse.model import UNet, UNetConfig
from collafuse.protocol import Client
from collafuse.schedule import NoiseSchedule


def _client(private: bool, multiplicity: int, channels: tuple[int, ...], time_dim: int, batch: int) -> Client:
    from collafuse.defenses.dp_sgd import MultiplicityDPOptimizer, PrivateUNet

    torch.manual_seed(0)
    model = UNet(UNetConfig(channels=channels, time_dim=time_dim, num_classes=10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if private:
        model = PrivateUNet(model, loss_reduction="mean")
        opt = MultiplicityDPOptimizer(
            opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, multiplicity=multiplicity,
            generator=torch.Generator().manual_seed(1),
        )
    schedule = NoiseSchedule.create("cosine", 1000)
    return Client(
        0, model, opt, schedule, 200, "cut", torch.Generator().manual_seed(2),
        noise_multiplicity=multiplicity if private else 1,
    )


def step_seconds(client: Client, x0: torch.Tensor, y: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall-clock seconds of ``Client.train_step`` on one batch."""
    for _ in range(warmup):
        client.train_step(x0, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.train_step(x0, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dpsgd_step_ratio(
    batch: int = 64,
    size: int = 16,
    channels: tuple[int, ...] = (32, 64),
    time_dim: int = 64,
    multiplicities: tuple[int, ...] = (1, 4),
    warmup: int = 2,
    repeats: int = 5,
) -> dict:
    """Plain step time, DP-SGD step time for each noise multiplicity K, and their ratios."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 1, size, size, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=gen)
    plain = step_seconds(_client(False, 1, channels, time_dim, batch), x0, y, warmup, repeats)
    out = {
        "batch": batch, "image_size": size, "channels": list(channels), "threads": torch.get_num_threads(),
        "plain_step_s": plain, "dpsgd": {},
    }
    for k in multiplicities:
        dp = step_seconds(_client(True, k, channels, time_dim, batch), x0, y, warmup, repeats)
        out["dpsgd"][f"K={k}"] = {"step_s": dp, "ratio_to_plain": dp / plain}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--multiplicity", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = dpsgd_step_ratio(args.batch, args.size, multiplicities=tuple(args.multiplicity), repeats=args.repeats)
    print(json.dumps(result, indent=1))
    for key, row in result["dpsgd"].items():
        print(f"DP-SGD step ({key}) / plain step = {row['ratio_to_plain']:.2f}x")


if __name__ == "__main__":
    main()
