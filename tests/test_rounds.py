"""The core's one round (collafuse/rounds.py), the hooks for a config (collafuse.hooks.hooks_for), model names."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import collafuse.defenses
from collafuse.errors import ConfigError
from collafuse.hooks import Hooks, canonical_model_name, hooks_for, model_name, register_hook_builder
from collafuse.rounds import client_loader, epoch_rounds

from conftest import tiny_config


def test_a_seeded_loader_is_not_a_bare_randperm():
    # A seeded DataLoader draws a base seed from its generator every epoch before its permutation, and a
    # second permutation when the epoch ends: re-deriving the order with randperm gets it wrong.
    n, gen = 10, lambda: torch.Generator().manual_seed(5)
    loader = client_loader(torch.arange(n), torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), 4, gen())
    epochs = [torch.cat([ids for ids, _, _ in loader]).tolist() for _ in range(2)]
    g = gen()
    assert epochs[0] != torch.randperm(n, generator=g).tolist()
    g = gen()
    replay = []
    for _ in range(2):
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the base seed
        replay.append(torch.randperm(n, generator=g).tolist())
        torch.randperm(n, generator=g)  # RandomSampler's remainder draw at the end of the epoch
    assert epochs == replay


def test_epoch_rounds_take_one_batch_per_client_until_each_is_done():
    loaders = [client_loader(torch.arange(m), torch.zeros(m, 1, 2, 2), torch.zeros(m, dtype=torch.long), 3,
                             torch.Generator().manual_seed(m)) for m in (7, 3, 5)]
    rounds = [[(k, len(ids)) for k, (ids, _, _) in turns] for turns in epoch_rounds(loaders)]
    assert rounds == [[(0, 3), (1, 3), (2, 3)], [(0, 3), (2, 2)], [(0, 1)]]


def test_hooks_for_is_the_one_builder():
    assert hooks_for(tiny_config()) == Hooks()
    cfg = tiny_config(defenses=[{"name": "payload-noise", "sigma": 0.5}])
    hooks = hooks_for(cfg)
    assert hooks.built_from == Hooks.fingerprint(cfg.defenses)
    assert [h.name for h in hooks.release] == ["payload-noise", "privacy-report"]
    register_hook_builder(collafuse.defenses.build_hooks)  # the same builder again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        register_hook_builder(lambda specs, config: Hooks())


def test_hooks_for_without_the_defenses_package_names_it():
    code = (
        "from collafuse.config import config_from_dict\n"
        "from collafuse.errors import ConfigError\n"
        "from collafuse.hooks import Hooks, hooks_for\n"
        "assert hooks_for(config_from_dict({})) == Hooks()\n"
        "try:\n"
        "    hooks_for(config_from_dict({'defenses': [{'name': 'payload-noise', 'sigma': 0.5}]}))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "collafuse.defenses" in out and "payload-noise" in out
    assert ConfigError  # the error a user sees is one line (exit 2 on the command line)


def test_models_are_named_client_k_and_old_names_are_read():
    assert model_name("server") == "server" and model_name("client", 3) == "client_3"
    assert canonical_model_name("client0") == "client_0" and canonical_model_name("client_12") == "client_12"
    assert canonical_model_name("server") == "server"
    with pytest.raises(ValueError):
        model_name("client")
