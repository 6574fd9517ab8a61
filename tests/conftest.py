"""Shared fixtures: tiny configs and tiny runs, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from collafuse.config import config_from_dict


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch and one BLAS thread for the whole suite.

    The models here are tiny: a second thread gains little on an idle machine and,
    on a shared one, two spinning OpenMP threads per process cost 10–100×.
    """
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Point ``$COLLAFUSE_CACHE`` (the attacker denoiser, the audit cache) at a session temp folder.

    Without it a command run without ``--cache`` writes into ``~/.cache/collafuse``. Set in
    ``os.environ`` so that subprocesses (``collafuse audit`` in the end-to-end tests) inherit it;
    a test's own ``monkeypatch.setenv`` still wins and is undone after it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLLAFUSE_CACHE", str(tmp_path_factory.mktemp("collafuse-cache")))
        yield


def tiny_config_dict(**overrides) -> dict:
    """A config that trains in about a second: 128 digits, 2 clients, T = 50, tiny UNets."""
    base = {
        "seed": 1,
        "device": "cpu",
        "data": {"n_members": 128, "n_nonmembers": 32, "n_aux": 32, "num_clients": 2},
        "diffusion": {"T": 50, "cut_ratio": 0.2},
        "server_model": {"channels": [8, 16], "time_dim": 16},
        "client_model": {"channels": [8, 16], "time_dim": 16},
        "training": {"epochs": 2, "batch_size": 32},
        "sampling": {"steps": 10, "per_client": 4},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **value}
        else:
            base[section] = value
    return base


def tiny_config(**overrides):
    return config_from_dict(tiny_config_dict(**overrides))


class _LazyRuns(dict):
    """Tiny runs built on first use and shared by the whole session (training is the slow part)."""

    SPECS = {
        "cut": {},
        "naive": {"training": {"payload": "naive"}},
        "trajectory": {"training": {"payload": "trajectory"}},
        "central": {"diffusion": {"cut_ratio": 0.0}},
        "local": {"diffusion": {"cut_ratio": 1.0}},
    }

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        from collafuse.runs import create_run

        path = create_run(tiny_config(**self.SPECS[name]), self.root / name, progress=False)
        self[name] = path
        return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Runs with the cut, naive and trajectory payloads and the c = 0 / c = 1 baselines."""
    return _LazyRuns(tmp_path_factory.mktemp("runs"))
