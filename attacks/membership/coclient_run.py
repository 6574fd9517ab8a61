"""T5 on a loaded run: the server answering a co-client's requests, its candidates, and the scorer side.

The attack itself (:mod:`.coclient`) sees only what client j holds. This module is the rest of the
protocol around it, the way :mod:`.targets` is for T1–T4:

- :func:`server_handoffs`: the server's side. Client j asks for n hand-offs (labels cycling through the
  classes when sampling is conditional, as :func:`collafuse.runs.generate` asks); the server runs its chain
  T → t_c with the run's sampler, its share of the DDIM steps and the guidance of the run's sampling
  config, exactly as in collaborative sampling (:func:`collafuse.sampling.server_handoff`), and sends x̂_{t_c}.
  This is the only place the server model is used, and only through its forward pass.
- :func:`coclient_draws`: those hand-offs finished by client j's own chain (its model, run.client_models[j],
  and no other client's) and, given the attacker's denoiser, by one Tweedie step.
- :func:`coclient_targets`: the ``coclient`` membership targets, one per attacker j (``coclient_<j>``):
  candidates = the members of every OTHER client (balanced against the held-out images, seeded), the
  attacks of :mod:`.coclient` on them; the one-run audit on the canaries when another client holds them.
- :func:`run_extraction`: the scorer side of extraction (which training image belongs to which client).

Random streams (``collafuse.streams``, "membership"): the server's draws for client j's requests
(300, j, 0), client j's own chain (300, j, 1), client j's candidate set (500 + j).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from collafuse.attacks.membership.coclient import (
    CoClientExtraction, Finished, Handoffs, OwnChain, coclient_signal_cache, extraction_by_victim, finish_chain,
    finish_tweedie,
)
from collafuse.attacks.membership.signals import SignalCache
from collafuse.attacks.membership.targets import AuditContext, TargetInstance, canary_candidates
from collafuse.attacks.reconstruction.denoiser import DenoiserConfig, load_or_train
from collafuse.errors import RunError
from collafuse.sampling import server_handoff, split_ddim_steps
from collafuse.streams import STREAM_MEMBERSHIP, generator_for

HANDOFF_STREAM = 300     # (membership, 300, j, 0): the server's draws for client j; (…, 1): client j's own chain
CANDIDATE_STREAM = 500   # (membership, 500 + j): client j's candidate set
HANDOFF_BATCH = 256


def unavailable_reason(run, attacker: int) -> str | None:
    """Why client ``attacker`` of ``run`` has no T5 target, or None."""
    if run.t_hand >= run.schedule.T:
        return "c = 1 (local-only): there is no server and no hand-off"
    if run.server_model is None:
        return "the server model was not given (an imported deployment without it): no hand-off can be drawn"
    if len(run.client_models) < 2:
        return "a single client has no co-client: T5 needs another client's images"
    if run.t_hand > 0 and run.client_models[attacker] is None:
        return f"the client_{attacker} model was not given (an imported deployment without it)"
    return None


def server_handoffs(run, attacker: int, n: int, seed: int) -> Handoffs:
    """``n`` hand-offs x̂_{t_hand} the server sends client ``attacker`` (the server's side of sampling).

    Labels cycle through the classes (conditional runs); the server's chain uses the run's sampler, its
    share of the DDIM steps and the run's guidance, drawn on the CPU stream (300, attacker, 0)."""
    from collafuse.runs import sample_labels

    if n < 1:
        raise ValueError(f"the co-client must ask for at least one hand-off, got {n}")
    cfg = run.config
    server_steps, _ = split_ddim_steps(cfg.sampling.steps, run.schedule.T, run.t_hand)
    gen = generator_for(seed, STREAM_MEMBERSHIP, HANDOFF_STREAM, attacker, 0)
    labels = sample_labels(n, run.num_classes)
    guidance = cfg.sampling.guidance if labels is not None else 0.0
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    out = []
    for start in range(0, n, HANDOFF_BATCH):
        stop = min(n, start + HANDOFF_BATCH)
        x_T = torch.randn((stop - start, *shape), generator=gen).to(run.device)
        y = labels[start:stop].to(run.device) if labels is not None else None
        out.append(server_handoff(run.server_model, run.schedule, run.t_hand, x_T, gen, y, cfg.sampling.sampler,
                                  server_steps, guidance, cfg.training.payload).cpu())
    return Handoffs(torch.cat(out), int(run.t_hand), labels)


def own_chain(run, attacker: int) -> OwnChain:
    """Client ``attacker``'s own chain: its model and its share of the protocol's DDIM steps."""
    cfg = run.config
    _, client_steps = split_ddim_steps(cfg.sampling.steps, run.schedule.T, run.t_hand)
    return OwnChain(run.client_models[attacker] if run.t_hand > 0 else None, run.schedule, cfg.sampling.sampler,
                    client_steps, cfg.sampling.guidance)


def coclient_draws(run, attacker: int, n: int, seed: int, denoiser: torch.nn.Module | None = None) -> Finished:
    """Client ``attacker``'s ``n`` hand-offs, finished by its own chain and (with ``denoiser``) one Tweedie step."""
    handoffs = server_handoffs(run, attacker, n, seed)
    chain = finish_chain(handoffs, own_chain(run, attacker), generator_for(seed, STREAM_MEMBERSHIP, HANDOFF_STREAM,
                                                                           attacker, 1), run.device)
    tweedie = finish_tweedie(handoffs, denoiser) if denoiser is not None else None
    return Finished(attacker, handoffs, chain, tweedie)


def attacker_denoiser(run, seed: int, cache_dir: Path | None = None) -> torch.nn.Module:
    """The attacker's denoiser (DESIGN §4.1 ``tweedie``): trained on the run's public auxiliary split over all t,
    cached by content under ``cache_dir`` (None: ``$COLLAFUSE_CACHE``), on the run's device."""
    data, splits = run.load_data()
    if len(splits.aux) < 2:
        raise RunError("the T5 Tweedie finisher needs the attacker's auxiliary public split; the run has data.n_aux < 2")
    model, _, _ = load_or_train(data.images[splits.aux], run.schedule, DenoiserConfig(seed=seed), cache_dir,
                                forbid_under=(Path(run.path),), device=run.device)
    return model


def server_training_set(run) -> tuple[torch.Tensor, np.ndarray]:
    """Scorer side: the data index of every image the server trained on (through its owner's payloads) and its
    owner, client by client: (K,), (K,)."""
    _, splits = run.load_data()
    index = [splits.training_set(k) for k in range(len(splits.clients))]
    owner = np.concatenate([np.full(len(idx), k, np.int64) for k, idx in enumerate(index)])
    return torch.cat(index), owner


def run_extraction(run, finished: Finished) -> list[CoClientExtraction]:
    """Scorer side: extraction of every other client's images by client j's finished hand-offs, per finisher."""
    data, _ = run.load_data()
    index, owner = server_training_set(run)
    return extraction_by_victim(data.images[index], owner, finished)


def coclient_instance(ctx: AuditContext, attacker: int) -> TargetInstance:
    """The T5 target of client ``attacker``: every other client's members against the held-out images."""
    run = ctx.run
    key = f"coclient_{attacker}"
    reason = unavailable_reason(run, attacker)
    if reason is not None:
        return TargetInstance(key, "coclient", "T5", False, reason, client=attacker)
    data, splits = ctx.data()
    victims = [k for k in range(len(splits.clients)) if k != attacker]
    cand = ctx.candidates(torch.cat([splits.clients[k] for k in victims]), CANDIDATE_STREAM + attacker)
    n = ctx.n_samples or cand.n_members
    known = data.images[splits.training_set(attacker)]  # client j knows the server trained on its own images
    references = data.images[splits.aux]                 # public: known non-members
    sources = float(sum(len(splits.training_set(k)) for k in range(len(splits.clients))))

    @functools.cache
    def draws() -> Finished:  # drawn once per target, shared by the candidates' and the canaries' signals
        return coclient_draws(run, attacker, n, ctx.seed)

    def make(images: torch.Tensor) -> SignalCache:
        return coclient_signal_cache(images, draws(), run.schedule, known, references, sources)

    # The canaries reach the server through the canary client's payloads: another client's T5 target scores them.
    canaries = canary_candidates(ctx) if splits.canary_client != attacker else None
    cfg = run.config
    return TargetInstance(
        key, "coclient", "T5", True, candidates=cand, make_cache=lambda: make(cand.images),
        info={"attacker": attacker, "victims": [f"client_{k}" for k in victims], "handoffs": n,
              "hand_off_step": int(run.t_hand), "sampler": cfg.sampling.sampler, "sampler_steps": cfg.sampling.steps,
              "finisher": "the co-client's own chain (handoff-nn); raw hand-offs (handoff-lr)",
              "sees": "hand-offs only: no payload, no server weights, no other client's model"},
        canaries=canaries, make_canary_cache=None if canaries is None else lambda: make(canaries.images),
        client=attacker,
    )


def coclient_targets(ctx: AuditContext) -> list[TargetInstance]:
    """One T5 target per client of the run, each the attacker against all the others."""
    return [coclient_instance(ctx, j) for j in range(len(ctx.run.client_models))]
