"""From a diffusers deployment to an audit report (docs/DEPLOYMENT.md walks through it).

This script plays both parts, so it runs on a machine with no network:

1. The DEPLOYMENT, built the way diffusion models are built, with diffusers alone: 32×32 RGB images
   (crops of scikit-image's sample photographs, which ship with scikit-image), a ``DDPMScheduler``,
   one ``UNet2DModel`` per client for the low-noise steps 0..CUT and one for the server above the cut.
   Every epoch each client sends the server p = add_noise(x0, ε', CUT) for each of its images and logs
   it; the server trains on those payloads only (its relative schedule ᾱ_t/ᾱ_CUT, as CollaFuse does).
2. The AUDITOR, who is handed the folder: ``collafuse import`` turns it into a run folder and
   ``collafuse audit`` attacks it (a grid whose ``systems.runs`` names the imported run).

    python examples/diffusers_deployment.py --out deployment-demo      # about 20 minutes on 2 cores

writes ``deployment-demo/deployment/`` (what the auditor receives: manifest.yaml and its files),
``deployment-demo/run/`` (the import) and ``deployment-demo/audit/`` (report.html, report.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

SIZE, T, CUT = 32, 1000, 199          # cut step in diffusers' convention: the clients own steps 0..199
CLIENTS, PER_CLIENT, HELD_OUT = 2, 96, 96
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, add_attention=False,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photo_crops(n: int, seed: int) -> np.ndarray:
    """``n`` distinct 32×32 RGB crops (uint8, N×H×W×3) of scikit-image's bundled photographs."""
    from skimage import data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in PHOTOS]
    photos = [p[..., :3] for p in photos if p.ndim == 3]
    crops = []
    while len(crops) < n:
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(48, 160))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = resize(photo[y:y + side, x:x + side], (SIZE, SIZE), anti_aliasing=True)
        crops.append((crop * 255).round().astype(np.uint8))
    return np.stack(crops)


def build_deployment(folder: Path, epochs: int, seed: int = 0) -> None:
    """Train a two-client split deployment with diffusers and write what an auditor would be given."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    images = photo_crops(CLIENTS * PER_CLIENT + 2 * HELD_OUT, seed)
    members, nonmembers, aux = np.split(images, [CLIENTS * PER_CLIENT, CLIENTS * PER_CLIENT + HELD_OUT])
    x0 = torch.from_numpy(members).permute(0, 3, 1, 2).float() / 127.5 - 1
    owner = np.repeat(np.arange(CLIENTS), PER_CLIENT)
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    ab = scheduler.alphas_cumprod  # ᾱ at diffusers steps 0..T-1
    clients = [UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, **UNET) for _ in range(CLIENTS)]
    server = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, **UNET)
    optimisers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (*clients, server)]
    sent, sent_t, sent_client, sent_step, sent_member = [], [], [], [], []
    step = 0
    for epoch in range(epochs):
        for k, model in enumerate(clients):
            mine = np.flatnonzero(owner == k)
            for batch in np.array_split(np.random.default_rng(seed + 97 * epoch + k).permutation(mine), 3):
                x = x0[batch]
                noise, t = torch.randn_like(x), torch.randint(0, CUT + 1, (len(x),))
                loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x, noise, t), t).sample, noise)
                optimisers[k].zero_grad()
                loss.backward()
                optimisers[k].step()
                # The payload crosses to the server: the only thing it ever sees of these images.
                payload = scheduler.add_noise(x, torch.randn_like(x), torch.full((len(x),), CUT))
                sent += [payload]
                sent_t += [np.full(len(x), CUT)]
                sent_client += [np.full(len(x), k)]
                sent_step += [np.full(len(x), step)]
                sent_member += [batch]
                # The server trains on the payload with its relative schedule above the cut.
                t_s = torch.randint(CUT + 1, T, (len(x),))
                rel = (ab[t_s] / ab[CUT]).reshape(-1, 1, 1, 1)
                eta = torch.randn_like(x)
                x_t = rel.sqrt() * payload + (1 - rel).sqrt() * eta
                loss = torch.nn.functional.mse_loss(server(x_t, t_s).sample, eta)
                optimisers[-1].zero_grad()
                loss.backward()
                optimisers[-1].step()
                step += 1
        print(f"deployment: epoch {epoch + 1}/{epochs} trained", flush=True)
    folder.mkdir(parents=True)
    scheduler.save_config(str(folder / "scheduler"))
    server.save_pretrained(str(folder / "models" / "server"))
    for k, model in enumerate(clients):
        model.save_pretrained(str(folder / "models" / f"client_{k}"))
    np.savez(folder / "transcript.npz", tensor=torch.cat(sent).detach().numpy(), t=np.concatenate(sent_t),
             client=np.concatenate(sent_client), step=np.concatenate(sent_step))
    np.savez(folder / "audit_key.npz", member_index=np.concatenate(sent_member))
    np.savez(folder / "members.npz", images=members, client=owner)
    np.savez(folder / "nonmembers.npz", images=nonmembers)
    np.savez(folder / "aux.npz", images=aux)
    manifest = {
        "schedule": {"diffusers_config": "scheduler/scheduler_config.json"},
        "timestep_convention": "diffusers",
        "cut_step": CUT,
        "models": {"server": {"diffusers": "models/server"},
                   "clients": [{"diffusers": f"models/client_{k}"} for k in range(CLIENTS)]},
        "transcript": "transcript.npz",
        "audit_key": "audit_key.npz",
        "data": {"members": "members.npz", "nonmembers": "nonmembers.npz", "aux": "aux.npz"},
        # The deployment's recipe, for the attacks that train reference models like it.
        "training": {"epochs": epochs, "batch_size": PER_CLIENT // 3, "lr": 1e-3, "ema_decay": 0.0},
        "sampling": {"sampler": "ddim", "steps": 50, "per_client": 8},
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


GRID = {
    "name": "diffusers deployment audit",
    "systems": {
        "runs": ["../run"],
        "attacks": {"T1": ["oracle", "tweedie", "payload-lr"], "T2": ["loss", "sima"],
                    "T3": ["loss", "sima", "pia"], "T4": ["nn-distance"]},
        "samples_per_client": 32,
    },
}


# The deployment's images carry no labels, so the default policy's utility limit (class accuracy of the
# samples) cannot be measured: this policy limits the four threats only.
POLICY = {"statistic": "value", "limits": {"T1": {"reid_pool": {"max": 0.05}, "auc": {"max": 0.6}},
                                          "T2": {"auc": {"max": 0.6}}, "T3": {"auc": {"max": 0.6}},
                                          "T4": {"auc": {"max": 0.6}}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the deployment")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    timings = {}
    started = time.perf_counter()
    build_deployment(args.out / "deployment", args.epochs)
    timings["build the deployment (diffusers)"] = time.perf_counter() - started
    collafuse = [sys.executable, "-m", "collafuse"]
    started = time.perf_counter()
    subprocess.run([*collafuse, "import", str(args.out / "deployment" / "manifest.yaml"), "--out",
                    str(args.out / "run")], check=True)
    timings["collafuse import"] = time.perf_counter() - started
    grid = args.out / "grid" / "grid.yaml"
    grid.parent.mkdir()
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    policy = args.out / "grid" / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    started = time.perf_counter()
    audit = subprocess.run([*collafuse, "audit", "--config", str(grid), "--policy", str(policy),
                            "--out", str(args.out / "audit")])
    timings["collafuse audit"] = time.perf_counter() - started
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    print(f"report: {args.out / 'audit' / 'report.html'}")
    return 0 if audit.returncode in (0, 1) else audit.returncode


if __name__ == "__main__":
    raise SystemExit(main())
