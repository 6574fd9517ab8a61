"""``collafuse attack reconstruct`` end to end on tiny trained runs, bad input, and the denoiser cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.attacks.reconstruction.command import run_command
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, denoiser_key, load_or_train
from collafuse.cli import main
from collafuse.config import config_from_dict
from collafuse.errors import ConfigError
from collafuse.runs import create_run
from collafuse.schedule import NoiseSchedule
from collafuse.transcript import TRANSCRIPT_DIR, ServerView

TINY = {"channels": [8, 16], "time_dim": 16}
FAST_DENOISER = DenoiserConfig(channels=(8, 16), time_dim=16, steps=15, batch_size=16)


def tiny_config(cut_ratio: float, payload: str = "cut"):
    return config_from_dict({
        "data": {"n_members": 64, "n_nonmembers": 32, "n_aux": 64, "num_clients": 2},
        "diffusion": {"T": 100, "cut_ratio": cut_ratio},
        "server_model": TINY, "client_model": TINY,
        "training": {"epochs": 2, "batch_size": 32, "payload": payload},
        "sampling": {"per_client": 2, "steps": 4},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        name: create_run(tiny_config(c, kind), root / name, progress=False)
        for name, c, kind in [("cut", 0.2, "cut"), ("local", 1.0, "cut"), ("naive", 0.3, "naive")]
    }


def test_reconstruct_writes_json_and_png_per_attack_per_client(runs, tmp_path, capsys) -> None:
    out = tmp_path / "res" / "cut.json"
    code = main(["attack", "reconstruct", "--run", str(runs["cut"]), "--attacks", "rescale,multiview,oracle", "--out", str(out), "--quiet"])
    assert code == 0
    assert "written to" in capsys.readouterr().out
    result = json.loads(out.read_text())
    view = ServerView.open(runs["cut"])
    assert result["status"] == "ok" and result["rows"] == len(view) == 2 * 64
    assert result["t_hand"] == 20 and result["threat"] == "T1" and result["labels_sent"] is True
    assert set(result["attacks"]) == {"rescale", "multiview", "multiview-perfect-linking", "oracle", "oracle-all-views"}
    for bound in ("multiview-perfect-linking", "oracle-all-views"):  # scorer-side bounds, labelled as such
        assert result["attacks"][bound]["threat"] == "T1 (upper bound: uses the true linking from the audit key)"
    assert result["attacks"]["oracle-all-views"]["summary"] == "Bayes posterior over the pool given every view of the image (true linking)"
    assert result["attacks"]["oracle"]["threat"] == "T1"
    assert result["candidate_pool"]["size"] == 96 and result["candidate_pool"]["description"]
    for name, entry in result["attacks"].items():
        for scope in [entry["pooled"], entry["clients"]["0"], entry["clients"]["1"]]:
            for metric in ("mse", "psnr", "ssim", "reid_client", "reid_pool", "label"):
                iv = scope[metric]
                assert iv["low"] <= iv["value"] <= iv["high"], (name, metric, iv)
                assert iv["method"] == "cluster-bootstrap"  # every image crossed twice (2 epochs)
    with np.load(out.with_name("cut.per_image.npz")) as per_image:
        assert per_image["seq"].shape == per_image["member_index"].shape == (result["rows"],)
        for name in result["attacks"]:
            for metric in ("mse", "psnr", "ssim", "reid_client", "reid_pool", "label"):
                assert per_image[f"{name}/{metric}"].shape == (result["rows"],)
        assert per_image["rescale/psnr"].mean() == pytest.approx(result["attacks"]["rescale"]["pooled"]["psnr"]["value"])
    assert result["attacks"]["multiview"]["linkage_accuracy"] > 0.9  # c = 0.2: the two views of an image link (measured 0.97)
    assert result["label_inference_payload"]["pooled"]["value"] == 1.0  # conditional: the label crossed in clear
    png = out.with_suffix(".png")
    with Image.open(png) as img:
        rows = 1 + len(result["attacks"])  # originals + one row per reconstruction
        assert img.height == (rows * 17 + 1) * 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["cut.json", "cut.per_image.npz", "cut.png"]  # no temp files


def test_naive_payloads_leak_everything_through_the_command(runs, tmp_path) -> None:
    out = tmp_path / "naive.json"
    assert run_command(runs["naive"], "rescale,multiview,oracle", str(out), progress=False) == 0
    result = json.loads(out.read_text())
    with np.load(out.with_name("naive.per_image.npz")) as per_image:
        for name, entry in result["attacks"].items():
            assert per_image[f"{name}/psnr"].min() >= 60.0, name
            assert entry["pooled"]["reid_client"]["value"] == 1.0 and entry["pooled"]["reid_pool"]["value"] == 1.0


def test_local_only_run_has_nothing_to_attack(runs, tmp_path, capsys) -> None:
    out = tmp_path / "local.json"
    assert main(["attack", "reconstruct", "--run", str(runs["local"]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "nothing-to-attack" and result["attacks"] == {} and result["rows"] == 0
    assert "t_c = 100 = T" in result["reason"]
    assert "nothing to attack" in capsys.readouterr().out
    assert not out.with_suffix(".png").exists()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("collafuse: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_gives_one_line_and_exit_code_2(runs, tmp_path, capsys) -> None:
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert main(["attack", "reconstruct", "--run", str(not_a_run)]) == 2
    assert "not a collafuse run folder" in _one_error_line(capsys)

    assert main(["attack", "reconstruct", "--run", str(runs["cut"]), "--attacks", "rescale,nope"]) == 2
    assert "valid: rescale, tweedie, ddim, inversion, multiview, oracle" in _one_error_line(capsys)

    broken = tmp_path / "broken"
    shutil.copytree(runs["cut"], broken)
    shard = sorted((broken / TRANSCRIPT_DIR).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "broken.json"
    assert main(["attack", "reconstruct", "--run", str(broken), "--attacks", "rescale", "--out", str(out)]) == 2
    assert "truncated" in _one_error_line(capsys)
    assert not out.exists() and not out.with_suffix(".png").exists()

    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    assert main(["attack", "reconstruct", "--run", str(runs["cut"]), "--attacks", "rescale", "--out", str(taken)]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert taken.read_text() == "{}"


def test_denoiser_is_cached_outside_the_run_and_reused(runs, tmp_path, monkeypatch, capsys) -> None:
    cache = tmp_path / "cache"
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    assert run_command(runs["cut"], "tweedie,ddim", str(out1), False, denoiser_config=FAST_DENOISER, cache_dir=cache) == 0
    files = list((cache / "attacker-denoiser").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert run_command(runs["cut"], "tweedie", str(out2), False, denoiser_config=FAST_DENOISER, cache_dir=cache) == 0
    assert files[0].stat().st_mtime_ns == stamp  # served from the cache, not retrained
    with np.load(tmp_path / "a.per_image.npz") as a, np.load(tmp_path / "b.per_image.npz") as b:
        np.testing.assert_array_equal(a["tweedie/mse"], b["tweedie/mse"])
    assert not any(p.suffix == ".safetensors" and "denoiser" in p.name for p in runs["cut"].rglob("*"))

    with pytest.raises(ConfigError, match="must not be inside the run folder"):
        run_command(runs["cut"], "tweedie", str(tmp_path / "c.json"), False, denoiser_config=FAST_DENOISER, cache_dir=runs["cut"] / "cache")
    monkeypatch.setenv("COLLAFUSE_CACHE", str(runs["cut"] / "cache"))
    assert main(["attack", "reconstruct", "--run", str(runs["cut"]), "--attacks", "tweedie", "--out", str(tmp_path / "d.json")]) == 2
    assert "COLLAFUSE_CACHE" in _one_error_line(capsys)
    assert not (runs["cut"] / "cache").exists()


def test_load_or_train_hits_by_config_hash(tmp_path) -> None:
    schedule = NoiseSchedule.create("cosine", 50)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = DenoiserConfig(channels=(8, 16), time_dim=16, steps=5, batch_size=8)
    m1, path1, hit1 = load_or_train(images, schedule, cfg, tmp_path)
    m2, path2, hit2 = load_or_train(images, schedule, cfg, tmp_path)
    assert (hit1, hit2) == (False, True) and path1 == path2
    p, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 25, 50])
    with torch.no_grad():
        torch.testing.assert_close(m1.x0(p, t), m2.x0(p, t))
    assert denoiser_key(images, schedule, cfg) != denoiser_key(images, schedule, DenoiserConfig(channels=(8, 16), time_dim=16, steps=6, batch_size=8))
    assert denoiser_key(images, schedule, cfg) != denoiser_key(images + 0.01, schedule, cfg)
    path1.write_bytes(b"not a safetensors file")  # a damaged cache entry is retrained, not trusted
    _, _, hit3 = load_or_train(images, schedule, cfg, tmp_path)
    assert hit3 is False
