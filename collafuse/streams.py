"""Every random stream of the project, in one table (issue 20): nothing reads the global RNG.

A stream is a path of integers under the run's (or the attacker's) seed: its generator is seeded by
numpy's ``SeedSequence([seed, *path])`` (:func:`stream_seed`), so streams are independent, and adding one
never shifts another. :data:`STREAMS` names every path the code uses; ``tests/test_streams.py`` refuses a
path named twice and a stream id defined anywhere else. A caller may extend a path with its own
sub-indices (a client's index, an image's index), as the table's comments say.
"""
from __future__ import annotations

import numpy as np
import torch

STREAMS: dict[str, tuple[int, ...]] = {
    # the core: a run's own draws (sub-index: the client k where one is per client)
    "split": (0,),             # members / non-members / aux
    "partition": (1,),         # the clients' shares of the members
    "server": (2,),            # the server's training draws (t, η, label dropout)
    "client": (3,),            # client k's training and release draws (k)
    "loader": (4,),            # client k's batch order (k)
    "init": (5,),              # model weights (the model's own sub-path: server (2,), client (3, k))
    "sample": (6,),            # collaborative sampling for client k (k)
    "relay": (7,),             # an id-free release's shuffle of a round
    "canary": (8,),            # which held-out images are canaries and which go in
    # the attacker's models and draws (never a training stream)
    "init.attacker-denoiser": (5, 1001),  # the attacker's denoiser weights (built through "init")
    "membership": (1004,),     # candidate sets (target), signal noise (100 + target), T4 samples (200),
                               # dataset inference (400, target kind, client)
                               # T5 co-client j: the server's hand-offs (300, j, 0), its own chain (300, j, 1),
                               # its candidates (500 + j)
    "references.draws": (1_004_300,),    # reference attacks' fixed (t, noise) draws
    "references": (1_004_400,),          # reference-model designs, training sets and trainings
    # defenses
    "single-release": (1001,),  # one fixed noise draw per image (image index)
    "dp-noise": (1101,),        # DP-SGD's noise (its role's sub-index)
    "dp-loader": (1102,),       # DP-SGD's Poisson loader of client k (k)
    # the audit's own measurements
    "classifier.init": (2001,),     # the evaluation classifier's weights
    "classifier.shuffle": (2002,),  # its batch order
    "handoff": (3001,),             # the hand-off check: hand-offs (0), payload rows (1), the classifier (2)
}

STREAM_SPLIT, STREAM_PARTITION, STREAM_SERVER, STREAM_CLIENT, STREAM_LOADER, STREAM_INIT, STREAM_SAMPLE = (
    STREAMS[n][0] for n in ("split", "partition", "server", "client", "loader", "init", "sample"))
STREAM_RELAY, STREAM_CANARY = STREAMS["relay"][0], STREAMS["canary"][0]
STREAM_ATTACKER_DENOISER = STREAMS["init.attacker-denoiser"][1]  # under STREAM_INIT, through build_model
STREAM_MEMBERSHIP = STREAMS["membership"][0]
STREAM_FIXED_DRAWS, STREAM_REFERENCES = STREAMS["references.draws"][0], STREAMS["references"][0]
STREAM_SINGLE_RELEASE = STREAMS["single-release"][0]
STREAM_DP_NOISE, STREAM_DP_LOADER = STREAMS["dp-noise"][0], STREAMS["dp-loader"][0]
STREAM_CLS_INIT, STREAM_CLS_SHUFFLE = STREAMS["classifier.init"][0], STREAMS["classifier.shuffle"][0]
STREAM_HANDOFF = STREAMS["handoff"][0]


def stream_seed(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for one random stream under ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator_for(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one stream (:func:`stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, *stream))


def loader_generators(seed: int, num_clients: int) -> list[torch.Generator]:
    """Each client's loader stream (:func:`collafuse.rounds.client_loaders` shuffles client k's data with the k-th)."""
    return [generator_for(seed, STREAM_LOADER, k) for k in range(num_clients)]
