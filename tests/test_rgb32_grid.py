"""The 32×32 RGB audit recipe (issue 15 item 4): benchmarks/audit/rgb32_grid.yaml loads, expands and
reads a .npz of RGB images (a tiny generated one here)."""
from __future__ import annotations

from importlib import resources

import numpy as np
import yaml

from collafuse.benchmarks.audit.grid import load_grid
from collafuse.benchmarks.audit.policy import check_against_grid, load_policy
from collafuse.data import load_source


def rgb32_text() -> str:
    return resources.files("collafuse.benchmarks.audit").joinpath("rgb32_grid.yaml").read_text()


def tiny_npz(path, n=40, labels=True):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)}
    if labels:
        arrays["labels"] = np.arange(n) % 4
    np.savez(path, **arrays)
    return path


def grid_at(tmp_path, npz, edit=None):
    raw = yaml.safe_load(rgb32_text())
    assert raw["datasets"]["rgb32"] == {"source": "npz", "path": "rgb32.npz"}
    raw["datasets"]["rgb32"]["path"] = str(npz)
    if edit:
        edit(raw)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return load_grid(path)


def test_the_rgb32_grid_loads_and_expands(tmp_path) -> None:
    grid = grid_at(tmp_path, tiny_npz(tmp_path / "rgb.npz"))
    cells = grid.cells()
    payload = [c for c in cells if c.kind == "payload"]
    systems = [c for c in cells if c.kind == "system"]
    assert len(payload) == 11 * 3 and len(systems) == 3 * 2 + 1 + 2
    for cell in cells:
        d = cell.run_config.data
        assert (d.source, d.image_size, d.channels, d.path) == ("npz", 32, 3, str(tmp_path / "rgb.npz"))
        assert cell.run_config.device == "auto" and cell.run_config.server_model.channels == (64, 128, 256)
    assert {c.cut_ratio for c in systems} == {0.0, 0.2, 0.5, 0.8, 1.0}
    check_against_grid(load_policy(None), grid.spec)  # the default policy applies to it
    images = load_source("npz", 3, 32, str(tmp_path / "rgb.npz"))
    assert tuple(images.images.shape) == (40, 3, 32, 32) and images.num_classes == 4


def test_a_scaled_down_rgb32_payload_cell_runs(tmp_path) -> None:
    from collafuse.benchmarks.audit.cells import compute_cell

    def small(raw):
        raw["base"]["data"].update(n_members=16, n_nonmembers=8, n_aux=8, num_clients=2)
        # (multiview's prior and the label classifier fit 3072 × 3072 covariances: slow for a unit test)
        raw["payload_curve"].update(cut_ratios=[0.5], epochs=2, attacks=["rescale", "oracle"])
        raw["payload_curve"]["defenses"] = {"none": []}
        raw["systems"] = []

    (cell,) = grid_at(tmp_path, tiny_npz(tmp_path / "rgb.npz", labels=False), small).cells()
    out = compute_cell(cell, tmp_path / "cache")
    rows = {(r["attack"], r["metric"]): r["value"] for r in out.rows}
    assert rows[("count", "payload_rows")] == 16 * 2
    assert 0.0 <= rows[("oracle", "reid_pool")] <= 1.0 and "reconstructions.png" in out.artifacts
