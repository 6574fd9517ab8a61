"""End-to-end properties of training runs: what the server saw, baselines, determinism."""
import hashlib
from pathlib import Path

import torch
from opacus.validators import ModuleValidator

from collafuse.model import UNet, UNetConfig
from collafuse.runs import Run, create_run
from collafuse.transcript import AuditKey, ServerView

from conftest import tiny_config


def test_unet_passes_opacus_validation():
    for cfg in (UNetConfig(), UNetConfig(num_classes=10), UNetConfig(in_channels=3, channels=(16, 32, 64), blocks_per_level=2)):
        assert ModuleValidator.validate(UNet(cfg), strict=False) == []


def test_unet_shapes_and_conditioning():
    model = UNet(UNetConfig(channels=(8, 16), time_dim=16, num_classes=3))
    torch.nn.init.normal_(model.out.weight, std=0.1)
    x, t = torch.randn(5, 1, 16, 16), torch.randint(1, 100, (5,))
    assert model(x, t).shape == x.shape
    y0, y1 = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    assert not torch.allclose(model(x, t, y0), model(x, t, y1))  # the label reaches the output


def test_naive_payload_reveals_x0_exactly(tiny_runs):
    run_dir = tiny_runs["naive"]
    view = ServerView.open(run_dir).load()
    run = Run.load(run_dir)
    data, _ = run.load_data()
    key = AuditKey.open(run_dir)
    a = run.schedule.alpha_bar[view["t"]].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - run.schedule.alpha_bar[view["t"]]).sqrt().reshape(-1, 1, 1, 1)
    x0_hat = (view["tensor"].double() - s * view["noise"].double()) / a
    order = torch.argsort(key.seq)
    assert torch.equal(key.seq[order], view["seq"])
    truth = data.images[key.member_index[order]].double()
    # Exact up to float32 rounding of the payload, amplified by 1/a_t (a_T ≈ 6e-4 here).
    assert float((x0_hat - truth).abs().max()) < 5e-3
    assert float((x0_hat - truth).abs().mean()) < 1e-4


def test_cut_payloads_never_contain_a_training_image(tiny_runs):
    run_dir = tiny_runs["cut"]
    view = ServerView.open(run_dir).load()
    data, splits = Run.load(run_dir).load_data()
    assert set(view) == {"seq", "step", "t", "tensor", "wire_bytes", "label", "client"}  # no noise, no ids
    t_c = Run.load(run_dir).t_hand
    assert torch.all(view["t"] == t_c)
    members = data.images[splits.members].flatten(1)
    dists = torch.cdist(view["tensor"].flatten(1), members)
    assert float(dists.min()) > 1.0  # every payload is far from every member image


def test_transcript_covers_every_member_once_per_epoch(tiny_runs):
    run_dir = tiny_runs["cut"]
    key = AuditKey.open(run_dir)
    _, splits = Run.load(run_dir).load_data()
    epochs = Run.load(run_dir).config.training.epochs
    counts = torch.bincount(key.member_index, minlength=int(splits.members.max()) + 1)
    assert torch.all(counts[splits.members] == epochs)
    assert int(counts.sum()) == epochs * len(splits.members)
    for k, idx in enumerate(splits.clients):  # each payload's client holds that image
        rows = key.client == k
        assert set(key.member_index[rows].tolist()) == set(idx.tolist())


def test_wire_bytes_are_recorded(tiny_runs):
    view = ServerView.open(tiny_runs["cut"])
    rows = view.load()
    per_row = 1 * 16 * 16 * 4 + 8 + 8  # fp32 image, int64 t, int64 label
    assert torch.all(rows["wire_bytes"] == per_row)
    assert view.wire_bytes == per_row * len(view)


def test_local_only_baseline_has_empty_transcript(tiny_runs):
    view = ServerView.open(tiny_runs["local"])
    assert len(view) == 0 and view.load() == {}
    run = Run.load(tiny_runs["local"])
    assert run.server_model is None and all(m is not None for m in run.client_models)
    assert len(AuditKey.open(tiny_runs["local"]).seq) == 0


def test_central_baseline_sends_raw_images(tiny_runs):
    run = Run.load(tiny_runs["central"])
    assert run.t_hand == 0 and all(m is None for m in run.client_models)
    view = ServerView.open(tiny_runs["central"]).load()
    data, _ = run.load_data()
    key = AuditKey.open(tiny_runs["central"])
    order = torch.argsort(key.seq)
    assert torch.equal(view["tensor"], data.images[key.member_index[order]])  # c = 0: the server sees x0


def test_trajectory_payloads_sit_above_the_cut(tiny_runs):
    run = Run.load(tiny_runs["trajectory"])
    t = ServerView.open(tiny_runs["trajectory"]).load()["t"]
    assert int(t.min()) > run.t_hand and int(t.max()) < run.schedule.T
    assert len(torch.unique(t)) > 5


def _hashes(run_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_same_seed_same_run_different_seed_different(tmp_path, tiny_runs):
    again = create_run(tiny_config(), tmp_path / "again", progress=False)
    assert _hashes(again) == _hashes(tiny_runs["cut"])
    other = create_run(tiny_config(seed=2), tmp_path / "other", progress=False)
    h1, h2 = _hashes(again), _hashes(other)
    assert h1.keys() == h2.keys()
    for name in h1:
        if name.startswith(("checkpoints/", "transcript/")):
            assert h1[name] != h2[name], name


def test_training_reduces_both_losses(tmp_path):
    run = create_run(tiny_config(training={"epochs": 8}), tmp_path / "r", progress=False)
    import json

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8
    assert log[-1]["server_loss"] < log[0]["server_loss"]
    assert all(last < first for first, last in zip(log[0]["client_loss"], log[-1]["client_loss"]))


def test_run_folder_layout(tiny_runs):
    run_dir = tiny_runs["cut"]
    for name in ("config.yaml", "run.json", "train_log.jsonl", "samples.png", "data.safetensors",
                 "audit_key.safetensors", "transcript/index.json", "checkpoints/server.safetensors",
                 "checkpoints/client_0.safetensors", "checkpoints/client_1.safetensors"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.parent.glob(".*partial*"))


def test_weight_average_is_an_exponential_moving_average():
    from collafuse.training import WeightAverage

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg = WeightAverage(model, decay=0.9)
    expected = None  # torch's AveragedModel starts from the weights after the first step
    for value in (3.0, -1.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        avg.update()
        expected = torch.full((1, 2), value) if expected is None else 0.9 * expected + 0.1 * value
    assert torch.allclose(avg.weights.weight, expected)
    assert WeightAverage(model, decay=0.0).weights is model  # 0 = the raw weights
