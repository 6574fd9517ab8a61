"""Reference models for the calibrated attacks ``lira`` and ``rmia`` (DESIGN.md §4.2).

A reference model is trained by the attacker with the SAME recipe as the target (model
config, epochs, lr, batch size, EMA, label dropout, steps 1..t_c, seed-derived streams) on a
subset of a population pool. For a client model (T3) that is one client training: a client's
loss involves only its own images (:meth:`collafuse.protocol.Client.train_step`), so the server
plays no part. References are cached by a content hash (recipe + training images + seed) under
the attacker cache (``$COLLAFUSE_CACHE/references``, outside every run folder; an audit's ``--cache``).

Each reference training is a task (:class:`ReferenceJob`, :func:`run_reference_task`): the R references
of a target are handed over together (:func:`ensure_references`) to the backend named by
:func:`reference_setup` (``--jobs`` processes, Ray, SLURM), trained once however many targets, cells or
audits ask for them (a lease per key), written atomically and verified on every load (:class:`ReferenceCache`).

The design (Carlini et al. 2022, "Membership inference attacks from first principles", §4.2):
the candidates (members and non-members, N) are split into a random half and its complement for
each PAIR of references, so every candidate is IN exactly ⌊R/2⌋ of R references (an odd last
reference gets one more random half); each reference is filled up to the target's training-set
size from the non-candidate pool (other clients' members, then auxiliary images not used as
population samples). A candidate is therefore never in a reference counted as its OUT model
(``ref_in`` records which is which). The population samples z of RMIA are auxiliary images that
no reference trains on.

Every model (target and references) is queried at ONE fixed set of (t, noise) draws, seeded and
shared, so score differences come from the models, not from the draws (Carlini et al. 2023,
"Extracting training data from diffusion models", §5 used the loss at fixed t the same way).

Signals (N candidates, Z population samples, R references, M steps):

    fixed_loss          (N, M)     per-pixel ‖ε − ε_θ(x_t, t)‖² of the target, mean over K draws
    ref_fixed_loss      (R, N, M)  the same for each reference model
    ref_in              (R, N)     bool, candidate n was in reference r's training set
    pop_fixed_loss      (Z, M)     the target's loss on the population samples
    ref_pop_fixed_loss  (R, Z, M)  each reference's loss on them (z is OUT for every reference)

A reference SERVER model (T2) trains with the server's recipe (:meth:`collafuse.protocol.Server.receive`:
the relative schedule ᾱ'_t = ᾱ_t/ᾱ_{t_c} above the hand-off step) on payloads simulated from its subset:
a model-less sender releases each minibatch as the run's clients do (:meth:`collafuse.protocol.Client.release`,
the run's payload kind and the release hooks of its ``defenses:``, so payload noise, clipping and
single-release shape them as they shaped the target's), one server step per payload, E epochs, EMA weights.
That is what the server would have received had its clients held that subset. Its plan: candidates are
members of every client and held-out images, the pool the members that are not candidates and the
auxiliary images beyond the population; a reference trains on as many images as all clients hold.

Not covered: the run's TRAINING defenses (DP-SGD) are not applied to the references (the attacker's
models are plain; DP targets then differ from their references, which makes the attack conservative),
nor is a relay's mixing of a round (it reorders payloads, it does not change them).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import pickle
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

from collafuse.attacks.membership.signals import ModelView, loss_target_scale, step_grid
from collafuse.attacks.reconstruction.denoiser import default_cache_dir
from collafuse.hooks import hooks_for
from collafuse.protocol import Client, Server
from collafuse.rounds import client_loader, deliver, epoch_rounds, release_round
from collafuse.schedule import NoiseSchedule
from collafuse.device import CPU
from collafuse.tasks import Lease, run_once
from collafuse.streams import (STREAM_CLIENT, STREAM_FIXED_DRAWS, STREAM_LOADER, STREAM_REFERENCES, STREAM_SERVER,
                               generator_for, stream_seed)
from collafuse.training import ModelSpec, WeightAverage, build_model, denoiser_spec

CACHE_SUBDIR = "references"
MAX_POPULATION = 256
REFERENCE_SIGNALS = ("fixed_loss", "ref_fixed_loss", "ref_in", "pop_fixed_loss", "ref_pop_fixed_loss")
VERSION = 1


@dataclass(frozen=True)
class ClientRecipe:
    """How the target client model was trained: everything a reference must repeat."""

    unet: ModelSpec          # native UNetConfig or DiffusersSpec (collafuse.training.denoiser_spec)
    schedule: str
    T: int
    t_max: int
    epochs: int
    batch_size: int
    lr: float
    ema_decay: float
    label_dropout: float
    schedule_args: tuple = ()  # (beta_start, beta_end, betas) of diffusion: (NoiseSchedule.create's extra arguments)

    @classmethod
    def from_run(cls, run) -> "ClientRecipe":
        cfg = run.config
        tr = cfg.training
        return cls(
            unet=denoiser_spec(cfg, "client", run.num_classes),
            # A snapshot's models are those after epoch ``snapshot``: its references train that long.
            schedule=cfg.diffusion.schedule, T=cfg.diffusion.T, t_max=int(run.t_hand),
            schedule_args=(cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.betas),
            epochs=int(getattr(run, "snapshot", None) or tr.epochs),
            batch_size=tr.batch_size, lr=tr.lr, ema_decay=tr.ema_decay, label_dropout=tr.label_dropout,
        )


def train_client_model(recipe: ClientRecipe, images: torch.Tensor, labels: torch.Tensor | None, seed: int,
                       device: torch.device | str = CPU) -> torch.nn.Module:
    """One client training: the core's round (:mod:`collafuse.rounds`) with one client and no server:
    epochs × shuffled minibatches, ``Client.train_step`` on t ∈ [1, t_max], EMA weights.
    images (n, C, H, W) in [-1, 1]; labels (n,) or None. Deterministic given ``seed``."""
    device = torch.device(device)
    schedule, conditional, model, opt, average = _fresh_model(recipe, labels, seed, STREAM_CLIENT, device)
    loader = _loader(images, labels, recipe.batch_size, seed)
    client = Client(0, model, opt, schedule, recipe.t_max, "cut", generator_for(seed, STREAM_CLIENT),
                    label_dropout=recipe.label_dropout, send_labels=conditional, train_t_max=recipe.t_max)
    model.train()
    step = 0
    for _ in range(recipe.epochs):
        for turns in epoch_rounds([loader]):
            step = release_round([client], turns, step, labels=conditional, send=False, device=device).step
            average.update()
    return average.weights.eval()


def _fresh_model(recipe: "ClientRecipe | ServerRecipe", labels: torch.Tensor | None, seed: int, stream: int,
                 device: torch.device):
    """(schedule, conditional, model, Adam, its EMA) of a reference about to train, its weights from ``stream``."""
    schedule = NoiseSchedule.create(recipe.schedule, recipe.T, *recipe.schedule_args)
    model = build_model(recipe.unet, seed, stream).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    return schedule, recipe.unet.num_classes > 0 and labels is not None, model, opt, WeightAverage(model, recipe.ema_decay)


def _loader(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int):
    """A reference's one client loader (:func:`collafuse.rounds.client_loader`; member ids 0..n−1)."""
    ys = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
    return client_loader(torch.arange(len(images)), images, ys, batch_size, generator_for(seed, STREAM_LOADER))


@dataclass(frozen=True)
class ServerRecipe:
    """How the target server model was trained, and how its payloads were made: what a reference repeats.

    t_release: the step the clients release at (c·T); t_hand: where the server's steps begin (t_release,
    or the later step a release hook moves payloads to). defenses: the run's ``defenses:`` as canonical
    JSON (their release hooks are rebuilt from the run config for each reference)."""

    unet: ModelSpec
    schedule: str
    T: int
    t_release: int
    t_hand: int
    payload: str
    epochs: int
    batch_size: int
    lr: float
    ema_decay: float
    label_dropout: float
    defenses: str
    schedule_args: tuple = ()  # as ClientRecipe.schedule_args

    @classmethod
    def from_run(cls, run) -> "ServerRecipe":
        cfg = run.config
        tr = cfg.training
        return cls(
            unet=denoiser_spec(cfg, "server", run.num_classes), schedule=cfg.diffusion.schedule, T=cfg.diffusion.T,
            t_release=int(cfg.t_c), t_hand=int(run.t_hand), payload=tr.payload,
            epochs=int(getattr(run, "snapshot", None) or tr.epochs),
            batch_size=tr.batch_size, lr=tr.lr, ema_decay=tr.ema_decay, label_dropout=tr.label_dropout,
            defenses=json.dumps([dict(d) for d in cfg.defenses], sort_keys=True),
            schedule_args=(cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.betas),
        )


def release_hooks(config) -> tuple:
    """The release hooks of a run config's ``defenses:`` (those acting on payloads), as training builds them
    (:func:`collafuse.hooks.hooks_for`: the one builder, registered by the defenses package)."""
    return tuple(hooks_for(config).release)


def train_server_model(recipe: ServerRecipe, hooks: tuple, images: torch.Tensor, labels: torch.Tensor | None,
                       seed: int, device: torch.device | str = CPU):
    """One server training on payloads simulated from ``images`` (n, C, H, W) in [-1, 1]: the core's round
    (:mod:`collafuse.rounds`) with one model-less sender (the run's payload kind; ``hooks``: the run's
    release hooks) whose payloads pass to ``Server.receive`` (its relative schedule above ``t_hand``),
    epochs × shuffled minibatches, EMA weights. No relay: one sender's round is never mixed. Deterministic
    given ``seed``."""
    device = torch.device(device)
    schedule, conditional, model, opt, average = _fresh_model(recipe, labels, seed, STREAM_SERVER, device)
    server = Server(model, opt, schedule, recipe.t_hand, generator_for(seed, STREAM_SERVER), device, recipe.label_dropout)
    sender = Client(0, None, None, schedule, recipe.t_release, recipe.payload, generator_for(seed, STREAM_CLIENT),
                    release_hooks=hooks, send_labels=conditional)
    loader = _loader(images, labels, recipe.batch_size, seed)
    model.train()
    step = 0
    for _ in range(recipe.epochs):
        for turns in epoch_rounds([loader]):
            released = release_round([sender], turns, step, labels=conditional, device=device)
            step = released.step
            for message in deliver((), released, 0, None):
                server.receive(message.payload)
                average.update()
    return average.weights.eval()


def reference_key(recipe: "ClientRecipe | ServerRecipe", images: torch.Tensor, labels: torch.Tensor | None, seed: int) -> str:
    """sha256 over the recipe, the training images' and labels' bytes and the seed: the cache key."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "seed": int(seed), "v": VERSION}, sort_keys=True).encode())
    x = images.detach().cpu().float().contiguous()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_or_train_client(recipe: ClientRecipe, images: torch.Tensor, labels: torch.Tensor | None, seed: int,
                         cache_dir: Path | None = None, device: torch.device | str = CPU) -> tuple[torch.nn.Module, bool]:
    """The cached reference client model for (recipe, images, labels, seed); trained and cached on a miss.
    Returns (model in eval mode, hit)."""
    return _load_or_train(ReferenceJob(recipe, images, labels, seed), cache_dir, device)


def load_or_train_server(recipe: ServerRecipe, hooks: tuple, images: torch.Tensor, labels: torch.Tensor | None,
                         seed: int, cache_dir: Path | None = None,
                         device: torch.device | str = CPU) -> tuple[torch.nn.Module, bool]:
    """The cached reference server model (:func:`train_server_model`); its key holds the defenses (recipe)."""
    return _load_or_train(ReferenceJob(recipe, images, labels, seed, tuple(hooks)), cache_dir, device)


def _load_or_train(job: "ReferenceJob", cache_dir: Path | None, device) -> tuple[torch.nn.Module, bool]:
    cache = ReferenceCache.under(cache_dir)
    hit = cache.ensure(job, device) == CACHED
    return cache.load_verified(job, device), hit


# --------------------------------------------------------------------------- reference trainings as tasks
#
# Every reference model is one task: a pure function of a :class:`ReferenceJob` (recipe, training images,
# labels, seed, and a server's release hooks) whose result is a file in the content-addressed cache, keyed
# by :func:`reference_key`. Whoever needs it (an attack in this process, a cell on a worker, a task of a
# backend) calls :meth:`ReferenceCache.ensure`: a verified file is used as it is; otherwise the caller
# claims the key with a lease file (created with O_EXCL, so one claimant wins) and trains, or finds it
# claimed by a live process and waits (or, for a backend task, leaves it to that process). A lease whose
# holder died (same host: its pid is gone or belongs to a later process; another host: no heartbeat for
# two minutes; :class:`collafuse.tasks.Lease`) is broken and the key trained again, so a killed worker
# costs one reference, never a wrong or partial one. The model is written to a temporary name, flushed
# and renamed into place (the cache never holds a partial model) and carries the sha256 of its tensors
# and its key, checked on every load (a file that does not verify is trained again and replaced). Every training appends one line to
# ``trainings.jsonl`` beside the models (key, kind, host, pid, seconds).
#
# Trainings run on one torch / BLAS thread wherever they run (this process, a pool worker, Ray, SLURM),
# so a reference's bytes do not depend on who trained it.

CACHED, TRAINED, BUSY = "cached", "trained", "busy"
JOURNAL = "trainings.jsonl"
METADATA = "collafuse.reference"  # the model file's one metadata entry: key, sha256 of the tensors, kind, recipe
JOB_SUFFIX = ".job"        # a reference job handed to a backend through a spool folder (pickle)


@dataclass(frozen=True)
class ReferenceJob:
    """One reference training: everything it depends on. ``hooks``: a server reference's release hooks
    (the run's ``defenses:``; their parameters are in the recipe, hence in the key). ``device``: where the
    requester runs ("cuda": a backend task asks for a GPU)."""

    recipe: "ClientRecipe | ServerRecipe"
    images: torch.Tensor
    labels: torch.Tensor | None
    seed: int
    hooks: tuple = ()
    device: str = CPU.type

    @property
    def kind(self) -> str:
        return "server" if isinstance(self.recipe, ServerRecipe) else "client"

    @functools.cached_property
    def key(self) -> str:
        return reference_key(self.recipe, self.images, self.labels, self.seed)

    def train(self, device: torch.device | str = CPU) -> torch.nn.Module:
        """The trained model (EMA weights, eval mode), on one torch / BLAS thread."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                if self.kind == "server":
                    return train_server_model(self.recipe, self.hooks, self.images, self.labels, self.seed, device)
                return train_client_model(self.recipe, self.images, self.labels, self.seed, device)
        finally:
            torch.set_num_threads(previous)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReferenceCache:
    """The reference models of one cache folder (``<attacker cache>/references``): verified loads, leases,
    atomic writes, the training journal."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def under(cls, cache_dir: Path | str | None = None) -> "ReferenceCache":
        """The references of the attacker cache ``cache_dir`` (None: the setup's, else the default)."""
        base = cache_dir if cache_dir is not None else current_setup().cache_dir
        return cls(Path(base if base is not None else default_cache_dir()) / CACHE_SUBDIR)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def lease_path(self, key: str) -> Path:
        return self.root / f"{key}.lease"

    # ------------------------------------------------------------------ reading
    def load(self, job: ReferenceJob, device: torch.device | str = CPU) -> torch.nn.Module | None:
        """The cached model of ``job`` in eval mode, or None when absent or when the file does not verify
        (unreadable, another key's, changed since written, non-finite weights, another architecture)."""
        path = self.path(job.key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError):
            return None
        try:
            about = json.loads(meta.get(METADATA, "null"))
        except ValueError:
            return None
        if not isinstance(about, dict) or about.get("key") != job.key or about.get("sha256") != tensors_digest(tensors):
            return None
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            return None
        model = build_model(job.recipe.unet, job.seed)  # any init: every weight is replaced by the cached ones
        try:
            model.load_state_dict(tensors)
        except RuntimeError:
            return None
        return model.to(device).eval()

    def load_verified(self, job: ReferenceJob, device: torch.device | str = CPU) -> torch.nn.Module:
        model = self.load(job, device)
        if model is None:
            raise RuntimeError(f"reference model {self.path(job.key)} does not verify after it was written")
        return model

    def has(self, job: ReferenceJob) -> bool:
        """A file exists for the key (cheap; :meth:`load` verifies it)."""
        return self.path(job.key).is_file()

    # ------------------------------------------------------------------ training, once
    def ensure(self, job: ReferenceJob, device: torch.device | str = CPU, wait: bool = True) -> str:
        """Make sure the cache holds ``job``'s verified model: CACHED (it did), TRAINED (this call trained
        it) or, with ``wait`` False, BUSY (a live process holds its lease: it is that process's to train)."""
        outcome = run_once(self.lease_path(job.key), lambda: self.has(job) and self.load(job) is not None,
                           lambda: self._train_and_write(job, device), wait=wait,
                           on_broken=lambda holder: _remove_partial(self.path(job.key), holder))
        return {"cached": CACHED, "done": TRAINED, "busy": BUSY}[outcome]

    def wait_for(self, job: ReferenceJob, settled: Callable[[], bool], device: torch.device | str = CPU,
                 poll_s: float = 0.2) -> str:
        """Wait until a task delivers ``job``'s model; trains it here only when no task will (``settled()``
        and no live holder): a task that failed, or whose worker died and was not run again."""
        while True:
            if self.has(job) and self.load(job) is not None:
                return CACHED
            holder = Lease.read(self.lease_path(job.key))
            if (holder is None or holder.dead()) and settled():
                return self.ensure(job, device, wait=True)
            time.sleep(poll_s)

    def _train_and_write(self, job: ReferenceJob, device) -> None:
        started = time.perf_counter()
        model = job.train(device)
        seconds = time.perf_counter() - started
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        path = self.path(job.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            about = {"key": job.key, "sha256": tensors_digest(tensors), "kind": job.kind, "recipe": asdict(job.recipe)}
            # one metadata entry (safetensors orders several at random): the same model, the same bytes
            save_file(tensors, str(tmp), metadata={METADATA: json.dumps(about, sort_keys=True, default=str)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        line = json.dumps({"key": job.key, "kind": job.kind, "host": socket.gethostname(), "pid": os.getpid(),
                           "seconds": round(seconds, 3), "at": round(time.time(), 3)})
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def trainings(self) -> list[dict]:
        """The journal: one entry per training ever finished in this cache folder."""
        try:
            text = (self.root / JOURNAL).read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _remove_partial(path: Path, holder: Lease) -> None:
    """The temporary model file a dead holder (of this host) may have left while writing."""
    if holder.host == socket.gethostname():
        path.with_name(f".{path.name}.partial-{holder.pid}").unlink(missing_ok=True)


class ReferenceTasks(Protocol):
    """Where reference trainings are handed to a backend: ``announce`` schedules them as tasks (best
    effort: the caller trains whatever no task delivers). ``settled(key)``: the backend will not train
    that key any more (its task finished, failed or was never announced)."""

    def announce(self, jobs: list[ReferenceJob], cache: ReferenceCache) -> None: ...

    def settled(self, key: str) -> bool: ...


@dataclass(frozen=True)
class ReferenceSetup:
    """How this process obtains reference models: ``cache_dir`` (the attacker cache, None: the default),
    ``tasks`` (None: trained here, one after another) and ``helps``: this process also trains the announced
    references no task has claimed yet (a cell on a worker: it holds a slot anyway), or only waits for the
    tasks (``attack membership --jobs N``: N workers train, this process waits, and trains only what a
    task failed to deliver)."""

    cache_dir: Path | None = None
    tasks: ReferenceTasks | None = None
    helps: bool = True


_SETUP: contextvars.ContextVar[ReferenceSetup] = contextvars.ContextVar("reference_setup", default=ReferenceSetup())


def current_setup() -> ReferenceSetup:
    return _SETUP.get()


@contextlib.contextmanager
def reference_setup(cache_dir: Path | str | None = None, tasks: ReferenceTasks | None = None,
                    helps: bool = True) -> Iterator[ReferenceSetup]:
    """Within the block, reference models are cached under ``cache_dir`` and their trainings announced to
    ``tasks``: the one hook by which a backend (``--jobs``, Ray, SLURM) runs them side by side."""
    setup = ReferenceSetup(None if cache_dir is None else Path(cache_dir), tasks, helps)
    token = _SETUP.set(setup)
    try:
        yield setup
    finally:
        _SETUP.reset(token)


def ensure_references(jobs: list[ReferenceJob], device: torch.device | str = CPU,
                      cache: ReferenceCache | None = None) -> ReferenceCache:
    """Every job's model in the cache, trained once: the missing ones are announced to the setup's tasks,
    then this process trains each one no task has claimed yet (the last first, while the tasks take them
    from the front) and waits for the rest. Returns the cache."""
    cache = cache or ReferenceCache.under()
    missing = [job for job in jobs if cache.load(job) is None]
    setup = current_setup()
    tasks = setup.tasks
    if missing and tasks is not None:
        tasks.announce(missing, cache)
    if tasks is not None and not setup.helps:
        for job in missing:
            cache.wait_for(job, lambda key=job.key: tasks.settled(key), device)
        return cache
    for job in reversed(missing):
        cache.ensure(job, device, wait=False)
    for job in missing:
        cache.ensure(job, device, wait=True)
    return cache


def run_reference_task(job: "ReferenceJob | str", cache_root: str, wait: bool = False) -> str:
    """A backend's task: ``job`` (or the path of a pickled one in a spool folder) trained into the cache
    folder ``cache_root`` unless it is there or a live process holds its lease. On the job's device when
    this machine has it, else the CPU."""
    if not isinstance(job, ReferenceJob):
        with open(job, "rb") as f:
            job = pickle.load(f)
    device = job.device if (job.device != "cuda" or torch.cuda.is_available()) else CPU.type
    return ReferenceCache(Path(cache_root)).ensure(job, device, wait=wait)


@dataclass(frozen=True)
class SpoolTasks:
    """Announces reference jobs by writing them (pickled, atomically) into ``folder``, which the driver of a
    sweep watches and turns into tasks of its backend (:func:`run_reference_task`)."""

    folder: Path

    def announce(self, jobs: list[ReferenceJob], cache: ReferenceCache) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            path = self.folder / f"{job.key}{JOB_SUFFIX}"
            if path.exists():
                continue
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            try:
                tmp.write_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def settled(self, key: str) -> bool:
        """A cell cannot see the driver's tasks: it trains whatever no live process holds (it helps)."""
        return True


def inclusion_design(n: int, n_refs: int, generator: torch.Generator) -> np.ndarray:
    """(R, N) bool: per pair of references a random half of the N candidates and its complement, so
    every candidate is IN exactly ⌊R/2⌋ references (an odd last reference: one more random half)."""
    if n_refs < 1:
        raise ValueError(f"n_refs must be >= 1, got {n_refs}")
    design = np.zeros((n_refs, n), dtype=bool)
    for r in range(0, n_refs, 2):
        half = torch.randperm(n, generator=generator)[: n // 2].numpy()
        design[r, half] = True
        if r + 1 < n_refs:
            design[r + 1] = ~design[r]
    return design


@dataclass(frozen=True)
class ReferencePlan:
    """What the references of one target train on. candidates (N, …), pool (P, …): non-candidate
    images to fill a reference up to ``n_train``; population (Z, …): RMIA's z, trained on by none."""

    candidates: torch.Tensor
    candidate_labels: torch.Tensor | None
    pool: torch.Tensor
    pool_labels: torch.Tensor | None
    population: torch.Tensor
    population_labels: torch.Tensor | None
    n_train: int


def reference_training_sets(plan: ReferencePlan, design: np.ndarray, generator: torch.Generator):
    """Per reference: (images, labels, in-mask over candidates). A reference with more IN candidates
    than ``n_train`` drops random ones (the mask says so); fewer are filled from the pool."""
    out = []
    for r in range(design.shape[0]):
        idx = np.flatnonzero(design[r])
        if len(idx) > plan.n_train:
            idx = np.sort(idx[torch.randperm(len(idx), generator=generator)[: plan.n_train].numpy()])
        mask = np.zeros(design.shape[1], dtype=bool)
        mask[idx] = True
        fill = min(plan.n_train - len(idx), len(plan.pool))
        extra = torch.randperm(len(plan.pool), generator=generator)[:fill]
        ti = torch.from_numpy(idx)
        images = torch.cat([plan.candidates[ti], plan.pool[extra]])
        labels = None
        if plan.candidate_labels is not None:
            labels = torch.cat([plan.candidate_labels[ti], plan.pool_labels[extra]])
        out.append((images, labels, mask))
    return out


def fixed_losses(view: ModelView, images: torch.Tensor, labels: torch.Tensor | None, steps: list[int],
                 noise: torch.Tensor, batch_size: int) -> np.ndarray:
    """Per-pixel mean ‖η* − ε_θ(a_t x + s_t ε, t)‖² at the fixed draws ``noise`` (M, K, N, C, H, W):
    (N, M), the mean over the K draws of each step. η* = ε for a client model; for the server, the
    posterior mean of its regression target, (√(1−ᾱ'_t)/s_t)·ε (as the ``loss`` signal)."""
    ab = view.schedule.alpha_bar
    abm = view.alpha_bar_model
    x0 = images.float()
    n = x0.shape[0]
    out = np.zeros((n, len(steps)), dtype=np.float64)
    for j, t in enumerate(steps):
        a_t, s_t = float(ab[t].sqrt()), float((1.0 - ab[t]).sqrt())
        scale = loss_target_scale(float(ab[t]), float(abm[t]))
        for k in range(noise.shape[1]):
            x_t = a_t * x0 + s_t * noise[j, k]
            for i in range(0, n, batch_size):
                sl = slice(i, min(n, i + batch_size))
                y = labels[sl] if labels is not None else None
                err = (view.eps(x_t[sl], t, y) - scale * noise[j, k, sl]).pow(2).flatten(1).mean(1)
                out[sl, j] += err.double().numpy() / noise.shape[1]
    return out


def client_reference_producers(
    view: ModelView, recipe: ClientRecipe, plan: ReferencePlan, n_refs: int, n_steps: int, n_noise: int,
    batch_size: int, seed: int, stream: int, cache_dir: Path | None = None,
) -> dict[str, Callable]:
    """Signal producers (for :meth:`SignalCache.with_producers`) of one client target's reference
    signals; the references are trained (or loaded) only when a signal is first asked for."""

    def job(images, labels, ref_seed) -> ReferenceJob:
        return ReferenceJob(recipe, images, labels, ref_seed, (), torch.device(view.device).type)

    def view_of(model) -> ModelView:
        return ModelView.client(model, view.schedule, recipe.t_max, view.conditional, view.device)

    return reference_producers(view, job, view_of, plan, n_refs, n_steps, n_noise, batch_size, seed, stream, cache_dir)


def server_reference_producers(
    view: ModelView, recipe: ServerRecipe, hooks: tuple, plan: ReferencePlan, n_refs: int, n_steps: int,
    n_noise: int, batch_size: int, seed: int, stream: int, cache_dir: Path | None = None,
) -> dict[str, Callable]:
    """The same for the server target (T2): reference server models trained on simulated payloads."""

    def job(images, labels, ref_seed) -> ReferenceJob:
        return ReferenceJob(recipe, images, labels, ref_seed, tuple(hooks), torch.device(view.device).type)

    def view_of(model) -> ModelView:
        return ModelView.server(model, view.schedule, recipe.t_hand, view.conditional, view.device)

    return reference_producers(view, job, view_of, plan, n_refs, n_steps, n_noise, batch_size, seed, stream, cache_dir)


def reference_producers(
    view: ModelView, job: Callable[[torch.Tensor, torch.Tensor | None, int], ReferenceJob],
    view_of: Callable[[torch.nn.Module], ModelView], plan: ReferencePlan,
    n_refs: int, n_steps: int, n_noise: int, batch_size: int, seed: int, stream: int, cache_dir: Path | None = None,
) -> dict[str, Callable]:
    """The reference signals of one target ``view``: ``job(images, labels, seed)`` is the training of one
    reference on that subset, ``view_of(model)`` its queries; target and references share the fixed draws.
    The R trainings are handed over together (:func:`ensure_references`: tasks of the setup's backend,
    each trained once), then every reference is loaded from the cache and queried."""
    steps = step_grid(view.t_min, view.t_max, n_steps)
    shape = plan.candidates.shape[1:]

    def draws(n: int, which: int) -> torch.Tensor:
        g = generator_for(seed, STREAM_FIXED_DRAWS, stream, which)
        return torch.randn((len(steps), n_noise, n, *shape), generator=g)

    def produce(cache) -> dict[str, np.ndarray]:
        noise_x = draws(len(plan.candidates), 0)
        noise_z = draws(len(plan.population), 1)
        design = inclusion_design(len(plan.candidates), n_refs, generator_for(seed, STREAM_REFERENCES, stream, 0))
        sets = reference_training_sets(plan, design, generator_for(seed, STREAM_REFERENCES, stream, 1))
        jobs = [job(images, labels, stream_seed(seed, STREAM_REFERENCES, stream, 2, r))
                for r, (images, labels, _mask) in enumerate(sets)]
        models = ensure_references(jobs, view.device, ReferenceCache.under(cache_dir))
        fl = fixed_losses(view, plan.candidates, plan.candidate_labels, steps, noise_x, batch_size)
        pl = fixed_losses(view, plan.population, plan.population_labels, steps, noise_z, batch_size)
        ref_x, ref_z, ref_in = [], [], []
        for ref_job, (_images, _labels, mask) in zip(jobs, sets):
            rview = view_of(models.load_verified(ref_job, view.device))
            ref_x.append(fixed_losses(rview, plan.candidates, plan.candidate_labels, steps, noise_x, batch_size))
            ref_z.append(fixed_losses(rview, plan.population, plan.population_labels, steps, noise_z, batch_size))
            ref_in.append(mask)
        return {"fixed_loss": fl, "pop_fixed_loss": pl, "ref_fixed_loss": np.stack(ref_x),
                "ref_pop_fixed_loss": np.stack(ref_z), "ref_in": np.stack(ref_in)}

    return {name: produce for name in REFERENCE_SIGNALS}


def server_plan(data, splits, candidates_index: torch.Tensor, candidates) -> ReferencePlan:
    """The reference plan of the server's target: pool = the members that are not candidates, then the
    auxiliary images beyond the population; population = the first ≤ 256 auxiliary images; a reference
    trains on as many images as all clients together (``splits.members``)."""
    aux = splits.aux
    n_z = min(len(aux), MAX_POPULATION)
    taken = set(candidates_index.tolist())
    rest = torch.tensor([int(i) for i in splits.members.tolist() if int(i) not in taken], dtype=torch.long)
    pool_idx = torch.cat([rest, aux[n_z:].long()])
    return _plan(data, candidates, pool_idx, aux[:n_z], int(len(splits.members)))


def client_plan(data, splits, client: int, candidates) -> ReferencePlan:
    """The reference plan of client ``client``'s target: pool = other clients' members then the
    auxiliary images beyond the population; population = the first ≤ 256 auxiliary images."""
    aux = splits.aux
    n_z = min(len(aux), MAX_POPULATION)
    others = [idx for k, idx in enumerate(splits.clients) if k != client]
    pool_idx = torch.cat([*others, aux[n_z:]]) if (others or len(aux) > n_z) else torch.empty(0, dtype=torch.long)
    return _plan(data, candidates, pool_idx.long(), aux[:n_z], int(len(splits.clients[client])))


def _plan(data, candidates, pool_idx: torch.Tensor, population_idx: torch.Tensor, n_train: int) -> ReferencePlan:
    """A :class:`ReferencePlan` from indices into the run's data (labels only when the candidates have them)."""
    def lab(idx):
        return None if candidates.labels is None else data.labels[idx]

    return ReferencePlan(
        candidates=candidates.images, candidate_labels=candidates.labels,
        pool=data.images[pool_idx], pool_labels=lab(pool_idx),
        population=data.images[population_idx], population_labels=lab(population_idx),
        n_train=n_train,
    )


def target_reference_producers(ctx, client: int, view: ModelView, candidates) -> dict[str, Callable]:
    """The reference signals of client ``client``'s T3 target in an
    :class:`~collafuse.attacks.membership.targets.AuditContext` (its seed, settings and data)."""
    data, splits = ctx.data()
    s = ctx.settings
    return client_reference_producers(
        view, ClientRecipe.from_run(ctx.run), client_plan(data, splits, client, candidates), s.references,
        s.n_steps, s.n_noise, s.batch_size, ctx.seed, 1 + client,
    )


def server_target_reference_producers(ctx, view: ModelView, candidates, member_index: torch.Tensor) -> dict[str, Callable]:
    """The reference signals of the server's T2 target in an ``AuditContext`` (``member_index``: the member
    candidates' indices into the data, so the pool leaves them out)."""
    data, splits = ctx.data()
    s = ctx.settings
    return server_reference_producers(
        view, ServerRecipe.from_run(ctx.run), release_hooks(ctx.run.config),
        server_plan(data, splits, member_index, candidates), s.references, s.n_steps, s.n_noise, s.batch_size,
        ctx.seed, 0,
    )
