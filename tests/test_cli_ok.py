"""The commands that work: train → sample as PNG and as .npz, python -m collafuse."""
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from collafuse.cli import main
from collafuse.data import load_npz

from conftest import tiny_config_dict


def test_sample_png_and_npz(tmp_path, tiny_runs):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "12", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0
    assert main(["sample", "--run", str(tiny_runs["cut"]), "-n", "12", "--out", str(npz), "--client", "1"]) == 0
    with np.load(npz) as d:
        assert d["images"].shape == (12, 16, 16, 1) and d["images"].dtype == np.uint8
        assert d["labels"].tolist() == [i % 10 for i in range(12)]
    # The .npz we write is a valid input for our own npz loader.
    assert len(load_npz(npz, 1, 16)) == 12
    # Sampling is reproducible under the run's seed.
    again = tmp_path / "again.npz"
    main(["sample", "--run", str(tiny_runs["cut"]), "-n", "12", "--out", str(again), "--client", "1"])
    with np.load(npz) as a, np.load(again) as b:
        assert np.array_equal(a["images"], b["images"])


def test_train_from_npz_and_module_entry_point(tmp_path):
    rng = np.random.default_rng(0)
    images = (rng.random((40, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(40) % 4)
    raw = tiny_config_dict(
        data={"source": "npz", "path": str(tmp_path / "d.npz"), "image_size": 8, "n_members": 16,
              "n_nonmembers": 8, "n_aux": 8, "num_clients": 2, "partition": "label"},
        training={"epochs": 1, "batch_size": 8},
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "collafuse", "train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "run.json").is_file()


def test_train_warns_about_threats_left_uncovered(tmp_path, capsys):
    raw = tiny_config_dict(training={"epochs": 1})
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "warning: no configured defense addresses T1, T2, T3, T4, T5" in capsys.readouterr().err
    raw["defenses"] = [{"name": "payload-noise", "sigma": 0.5}]
    (tmp_path / "noised.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "noised.yaml"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "T1" not in err.split("addresses", 1)[1]
