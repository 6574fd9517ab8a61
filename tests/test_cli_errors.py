"""Bad input: one clear line on stderr, exit code 2, nothing written (DESIGN §8)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from collafuse.cli import main

from conftest import tiny_config_dict


def _write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_train(tmp_path, capsys, raw: dict | None = None, text: str | None = None, precreate: bool = False):
    cfg = tmp_path / "config.yaml"
    if text is not None:
        cfg.write_text(text)
    else:
        _write_config(tmp_path, raw)
    out = tmp_path / "run"
    if precreate:
        out.mkdir()
    code = main(["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    return code, err, out


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _digits_like(n=64, size=8, channels=None, nan=False, dtype=np.float32):
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    images = rng.random(shape).astype(dtype)
    if nan:
        images[3, 2, 2] = np.nan
    return images


BAD_CASES = {
    "unknown key": (lambda tmp: {**tiny_config_dict(), "epochz": 3}, "unknown config key 'epochz'"),
    "unknown nested key": (
        lambda tmp: tiny_config_dict(training={"epochs": 1, "lr_schedule": "cos"}),
        "unknown config key 'training.lr_schedule'",
    ),
    "cut ratio above 1": (lambda tmp: tiny_config_dict(diffusion={"cut_ratio": 1.5}), "diffusion.cut_ratio"),
    "cut ratio below 0": (lambda tmp: tiny_config_dict(diffusion={"cut_ratio": -0.1}), "diffusion.cut_ratio"),
    "T below 2": (lambda tmp: tiny_config_dict(diffusion={"T": 1}), "diffusion.T"),
    "more clients than images": (
        lambda tmp: tiny_config_dict(data={"n_members": 3, "num_clients": 5}),
        "more clients (5) than member images (3)",
    ),
    "unknown payload kind": (lambda tmp: tiny_config_dict(training={"payload": "raw"}), "training.payload"),
    "missing data folder": (
        lambda tmp: tiny_config_dict(data={"source": "folder", "path": str(tmp / "nope")}),
        "image folder not found",
    ),
    "npz without images": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, pictures=_digits_like())), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "has no 'images' array",
    ),
    "NaN pixels": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like(nan=True))), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "NaN pixels",
    ),
    "wrong channel count": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like(channels=3))), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "3 channel(s) but the config says channels=1",
    ),
    "pixels out of range": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like() * 5)), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "must lie in [0, 1]",
    ),
    "corrupt npz": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str((tmp / "bad.npz").write_bytes(b"not a zip") and tmp / "bad.npz"),
                  "image_size": 8, "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
            conditional=False,
        ),
        "not a readable .npz",
    ),
    "splits larger than the data": (
        lambda tmp: tiny_config_dict(data={"n_members": 1700, "n_nonmembers": 200, "n_aux": 0}),
        "the data has 1797 images",
    ),
    "conditional on unlabelled data": (
        lambda tmp: tiny_config_dict(
            data={"source": "npz", "path": str(_npz(tmp, images=_digits_like())), "image_size": 8,
                  "n_members": 16, "n_nonmembers": 8, "n_aux": 8},
        ),
        "conditional: true needs labelled data",
    ),
    "image size not divisible": (lambda tmp: tiny_config_dict(data={"image_size": 15}), "image_size 15"),
    "negative learning rate": (lambda tmp: tiny_config_dict(training={"lr": -1}), "training.lr"),
    "unknown schedule": (lambda tmp: tiny_config_dict(diffusion={"schedule": "sigmoid"}), "diffusion.schedule"),
    "trajectory with one server step": (
        lambda tmp: tiny_config_dict(diffusion={"T": 50, "cut_ratio": 0.98}, training={"payload": "trajectory"}),
        "at least 2 steps",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("precreate", [False, True])
def test_bad_config_exit_2_and_nothing_written(case, precreate, tmp_path, capsys):
    make, message = BAD_CASES[case]
    code, err, out = _run_train(tmp_path, capsys, raw=make(tmp_path), precreate=precreate)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    if precreate:
        assert out.is_dir() and list(out.iterdir()) == []  # the user's empty folder stays as it was
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_invalid_yaml(tmp_path, capsys):
    code, err, out = _run_train(tmp_path, capsys, text="data: [unclosed\n")
    assert code == 2 and "not valid YAML" in err and not out.exists()


def test_missing_config_file(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")])
    assert code == 2 and "config file not found" in capsys.readouterr().err


def test_refuses_non_empty_output(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = _write_config(tmp_path, tiny_config_dict())
    code = main(["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_sample_bad_inputs(tmp_path, capsys, tiny_runs):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert main(["sample", "--run", str(not_a_run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 2
    assert "not a collafuse run folder" in capsys.readouterr().err
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "4", "--out", str(tmp_path / "s.gif")]) == 2
    assert "--out must end in .png or .npz" in capsys.readouterr().err
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "0", "--out", str(tmp_path / "s.png")]) == 2
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "4", "--client", "9", "--out", str(tmp_path / "s.png")]) == 2
    assert not (tmp_path / "s.png").exists()


def test_corrupt_checkpoint_is_refused(tmp_path, capsys, tiny_runs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_runs["cut"], broken)
    ckpt = broken / "checkpoints" / "server.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["sample", "--run", str(broken), "-n", "2", "--out", str(tmp_path / "s.npz")]) == 2
    assert "checkpoint unreadable" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
