"""``dp-sgd``: Opacus DP-SGD for the server model, the client models, or both (DESIGN.md §5).

Covers T2 (server model), T3 (client models) and, when every model that takes
part in sampling is private, T4 (generated images are post-processing of the
models); on the server, also T5 (a co-client's hand-offs are post-processing of
the server model). It does NOT protect the payloads (T1): the server still sees every
payload, and the run's report says so.

What ε means here. The privacy unit is ONE CLIENT IMAGE, add/remove adjacency
(Opacus' convention): the image is in a client's data set or not.

- Clients: each client's loader becomes Opacus' Poisson loader (sample rate
  q_k = 1/len(loader_k)); per-image gradients are clipped to C, summed, noised with
  N(0, (σC)²) and averaged over the expected batch size. ε_k is client k's model.
- Server: the server has no data set; payloads stream in. A payload row is a
  randomised function of exactly one client image, and the client's Poisson
  loader decides which images are in the batch the server trains on, so every
  server step is a Poisson-subsampled Gaussian mechanism over client images: the
  server clips per payload row (= per image), adds noise, and its accountant
  steps with q = max_k q_k for every server step, whichever client sent it (an
  upper bound: an image only takes part in its own client's steps). That is why
  a private server forces the clients' loaders to Poisson sampling even when the
  client models are not private. The payload's own noise is extra randomness not
  credited here.
- Noise multiplicity K: each step draws K (t, ε) pairs per image; the core lays
  them out image-major and Opacus' per-row gradients are averaged over the K rows
  of an image BEFORE clipping (:class:`MultiplicityDPOptimizer`), so one image is
  still one sample and the accounting stays right.
- Poisson sampling can draw an empty batch; the core then still takes the step
  (noise only), so every accounted step really happened.

ε is read from Opacus' accountant (PRV by default, RDP available) after every
epoch (training log) and stored with the run (``describe()``); it equals
:func:`collafuse.defenses.accounting.dpsgd_epsilon` on the same history.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from collafuse.errors import ConfigError
from collafuse.hooks import TrainingHook, model_name
from collafuse.streams import STREAM_DP_LOADER, STREAM_DP_NOISE, stream_seed

from .accounting import ACCOUNTANTS, as_json_number, calibrate_noise_multiplier, dpsgd_epsilon
from .validate import DefenseSpec, check_keys, choice, number

# Opacus' per-sample hooks make torch warn on every backward pass when the input needs no
# gradient (always true here: the input is data). Harmless; silenced for this message only.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed", category=UserWarning)

NAME = "dp-sgd"
TARGETS: tuple[str, ...] = ("server", "clients", "both")
DEFAULT_DELTA = 1e-5
# Random streams of their own (the core uses 0..6).


def threats_for(target: str, t_c: int | None = None, T: int | None = None) -> tuple[str, ...]:
    """Threats a DP-SGD target covers. T4 needs every model in the sampling chain to be private."""
    out = []
    if target in ("server", "both"):
        out.append("T2")
    if target in ("clients", "both"):
        out.append("T3")
    only_server_samples = t_c == 0  # central: the server model alone generates
    only_client_samples = t_c is not None and T is not None and t_c >= T  # local-only
    if target == "both" or (target == "server" and only_server_samples) or (target == "clients" and only_client_samples):
        out.append("T4")
    if target in ("server", "both"):
        # T5: a co-client sees only the server's hand-offs (post-processing of the server model) and its own model,
        # which never saw the other clients' images; DP-SGD on the clients alone does nothing for it.
        out.append("T5")
    return tuple(out)


@dataclass(frozen=True)
class DPSGDSpec(DefenseSpec):
    """``{name: dp-sgd, target: both, C: 1.0, sigma: 1.0 | epsilon: 8, delta: 1e-5, accountant: prv, multiplicity: 1}``.

    Its share of the setting: the noise multiplicity per side, the models' planned ε, the threats of its
    target (T4 by the cut), and in the payload guarantee its δ and its Poisson loader's rounds."""

    target: str = "both"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    accountant: str = "prv"
    multiplicity: int = 1
    name: str = NAME
    acts_on_training = True  # not a field: DP-SGD wraps the training, it touches no payload
    ORDER = 9  # not a release hook

    def threats(self, t_c: int | None = None, T: int | None = None) -> tuple[str, ...]:
        return threats_for(self.target, t_c, T)

    def payload_terms(self, terms, config):
        """δ, and the releases its Poisson loader makes (the IID plan unless the run's own rounds are known)."""
        rounds = terms.poisson_rounds
        if rounds is None:
            rounds = tuple((config.training.epochs * b, 1.0 / b) for _, b in iid_client_batches(config))
        return dataclasses.replace(terms, delta=self.delta, poisson_rounds=rounds)

    def planned_epsilon(self, config) -> dict[str, float]:
        return planned_epsilon(self, config)

    def private(self, role: str) -> bool:
        """Is this side ("server" or "client") trained with DP-SGD?"""
        target = self.target
        return target == "both" or (target, role) in (("server", "server"), ("clients", "client"))

    def noise_multiplicity(self, role: str) -> int:
        """K noise draws per image per step on this side (1 where the side is not private)."""
        return self.multiplicity if self.private(role) else 1

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "DPSGDSpec":
        check_keys(raw, ("target", "C", "sigma", "epsilon", "delta", "accountant", "multiplicity"), where)
        sigma = number(raw, "sigma", where, exclusive_minimum=0.0)
        epsilon = number(raw, "epsilon", where, exclusive_minimum=0.0)
        if (sigma is None) == (epsilon is None):
            raise ConfigError(f"{where}: give exactly one of 'sigma' (noise multiplier) or 'epsilon' (target)")
        return cls(
            target=choice(raw, "target", TARGETS, where, "both"),
            clip_norm=number(raw, "C", where, default=1.0, exclusive_minimum=0.0),
            noise_multiplier=sigma,
            target_epsilon=epsilon,
            delta=number(raw, "delta", where, default=DEFAULT_DELTA, exclusive_minimum=0.0, maximum=0.1),
            accountant=choice(raw, "accountant", ACCOUNTANTS, where, "prv"),
            multiplicity=number(raw, "multiplicity", where, default=1, minimum=1, maximum=64, integer=True),
        )


class PrivateUNet(GradSampleModule):
    """Opacus' per-sample-gradient wrapper that still answers the UNet's ``null_class``."""

    @property
    def null_class(self) -> int:
        return self._module.null_class


def private_model(model: torch.nn.Module, role: str) -> PrivateUNet:
    """``model`` wrapped for per-sample gradients, or one ConfigError line naming the layer Opacus cannot
    handle (a diffusers backend may hold one: DESIGN §9)."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ConfigError(f"dp-sgd: Opacus cannot train the {role} model privately: {str(problems[0]).splitlines()[0]}")
    try:
        return PrivateUNet(model, loss_reduction="mean")
    except NotImplementedError as exc:
        raise ConfigError(f"dp-sgd: Opacus cannot train the {role} model privately: {str(exc).splitlines()[0]}") from None


class MultiplicityDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer that first averages the K per-row gradients of each image (noise multiplicity).

    Rows are image-major: rows i·K … i·K+K−1 belong to image i. A step with no
    per-sample gradient at all (an empty Poisson batch) is a noise-only step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, multiplicity: int = 1, **kwargs: Any):
        super().__init__(optimizer, **kwargs)
        self.multiplicity = multiplicity

    def pre_step(self, closure=None):
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            elif self.multiplicity > 1:
                g = gs if isinstance(gs, torch.Tensor) else torch.cat(gs, 0)
                p.grad_sample = g.reshape(-1, self.multiplicity, *p.shape).mean(1)
        return super().pre_step(closure)


def fold_multiplicity(per_row: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """(B·K, …) per-row gradients, image-major → (B, …) per-image means. The pure core of the optimiser above."""
    return per_row.reshape(-1, multiplicity, *per_row.shape[1:]).mean(1)


class _Side:
    """One private side's state: its optimiser, sample rate, accountant."""

    def __init__(self, optimizer: MultiplicityDPOptimizer, sample_rate: float, accountant: str):
        self.optimizer = optimizer
        self.sample_rate = sample_rate
        self.accountant = create_accountant(mechanism=accountant)
        optimizer.attach_step_hook(self._account)

    def _account(self, optimizer: DPOptimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant.history]


class DPSGD(TrainingHook):
    """Wraps the chosen sides with Opacus (see the module docstring)."""

    name = NAME

    def __init__(self, spec: DPSGDSpec, *, epochs: int, num_clients: int, seed: int, t_c: int, T: int):
        self.spec = spec
        self.epochs = epochs
        self.num_clients = num_clients
        self.seed = seed
        self.t_c, self.T = t_c, T
        self.server: _Side | None = None
        self.clients: dict[int, _Side] = {}
        self.client_rates: dict[int, float] = {}
        self.client_batches: dict[int, int] = {}
        self.client_sizes: dict[int, int] = {}
        self.noise_multipliers: dict[str, float] = {}
        self._server_pending: tuple | None = None

    # -- the core's calls --
    def noise_multiplicity(self, role: str) -> int:
        return self.spec.noise_multiplicity(role)

    def wrap(self, role, model, optimizer, loader):
        if len(self.client_batches) >= self.num_clients:
            raise RuntimeError("a dp-sgd hook keeps one run's accountants; build new hooks for another run")
        if role == "server":
            if not self.spec.private("server"):
                return model, optimizer, loader
            model = private_model(model, "server")
            dp_opt = self._optimizer(optimizer, 0, expected_batch_size=1)
            # σ and the sample rate depend on the clients' loaders, which are wrapped next.
            self._server_pending = (dp_opt,)
            return model, dp_opt, loader
        k = len(self.client_batches)
        if loader is not None:
            batches = len(loader)
            self.client_batches[k] = batches
            self.client_sizes[k] = len(loader.dataset)
            self.client_rates[k] = 1.0 / batches
            loader = DPDataLoader.from_data_loader(
                loader, generator=torch.Generator().manual_seed(stream_seed(self.seed, STREAM_DP_LOADER, k))
            )
        if self.spec.private("client") and model is not None:
            model = private_model(model, f"client {k}")
            q = self.client_rates[k]
            dp_opt = self._optimizer(optimizer, k + 1, expected_batch_size=max(1, round(q * self.client_sizes[k])))
            sigma = self._sigma(model_name("client", k), q, self.epochs * self.client_batches[k])
            dp_opt.noise_multiplier = sigma
            self.clients[k] = _Side(dp_opt, q, self.spec.accountant)
        if len(self.client_batches) == self.num_clients and self._server_pending is not None:
            self._finish_server()
        return model, optimizer if k not in self.clients else self.clients[k].optimizer, loader

    def metrics(self, role, owner):
        side = self.server if role == "server" else self.clients.get(owner)
        if side is None:
            return {}
        history = tuple(side.history())
        # Clients with the same history share one (slow) accountant evaluation per epoch.
        return {
            "epsilon": _epsilon_of(history, self.spec.delta, self.spec.accountant),
            "steps": sum(steps for _, _, steps in history),
        }

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "target": self.spec.target,
            "threats": list(threats_for(self.spec.target, self.t_c, self.T)),
            "protects_payloads": False,
            "note": "DP-SGD bounds what the MODELS reveal; the payloads (T1) are not protected by it",
            "C": self.spec.clip_norm,
            "delta": self.spec.delta,
            "accountant": self.spec.accountant,
            "multiplicity": self.spec.multiplicity,
            "target_epsilon": self.spec.target_epsilon,
            "noise_multiplier": dict(self.noise_multipliers),
            "sample_rate": {model_name("client", k): q for k, q in self.client_rates.items()},
            "epsilon": {},
            "history": {},
        }
        sides = ([("server", self.server)] if self.server is not None else []) + [
            (model_name("client", k), side) for k, side in sorted(self.clients.items())
        ]
        for key, side in sides:
            info["epsilon"][key] = as_json_number(side.accountant.get_epsilon(delta=self.spec.delta))
            info["history"][key] = [list(h) for h in side.history()]
        return info

    def poisson_rounds(self) -> tuple[tuple[int, float], ...] | None:
        """(releases, q) per client as its Poisson loader made them over the run (None before any loader)."""
        if not self.client_batches:
            return None
        return tuple((self.epochs * b, 1.0 / b) for b in self.client_batches.values())

    # -- helpers --
    def _optimizer(self, optimizer, stream: int, expected_batch_size: int) -> MultiplicityDPOptimizer:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, STREAM_DP_NOISE, stream))
        return MultiplicityDPOptimizer(
            optimizer,
            noise_multiplier=self.spec.noise_multiplier or 0.0,
            max_grad_norm=self.spec.clip_norm,
            expected_batch_size=expected_batch_size,
            multiplicity=self.spec.multiplicity,
            generator=gen,
        )

    def _sigma(self, key: str, sample_rate: float, steps: int) -> float:
        if self.spec.noise_multiplier is not None:
            sigma = self.spec.noise_multiplier
        else:
            sigma = calibrated_sigma(self.spec, sample_rate, steps, key)
        self.noise_multipliers[key] = sigma
        return sigma

    def _finish_server(self) -> None:
        (dp_opt,) = self._server_pending
        self._server_pending = None
        q = max(self.client_rates.values())
        steps = self.epochs * sum(self.client_batches.values())
        dp_opt.noise_multiplier = self._sigma("server", q, steps)
        sizes = [self.client_rates[k] * self.client_sizes[k] for k in self.client_rates]
        dp_opt.expected_batch_size = max(1, round(sum(sizes) / len(sizes)))
        self.server = _Side(dp_opt, q, self.spec.accountant)


@functools.lru_cache(maxsize=64)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Opacus' ε for a history (the same call its accountant makes), cached."""
    return dpsgd_epsilon(list(history), delta, accountant)


def calibrated_sigma(spec: DPSGDSpec, sample_rate: float, steps: int, key: str = "model") -> float:
    """σ for the spec's target ε (Opacus' search); a ConfigError if Opacus cannot reach it."""
    try:
        return calibrate_noise_multiplier(spec.target_epsilon, spec.delta, sample_rate, steps, spec.accountant)
    except ValueError as exc:
        raise ConfigError(
            f"dp-sgd: target epsilon {spec.target_epsilon:g} at delta {spec.delta:g} is not reachable for the {key} "
            f"({steps} steps at sample rate {sample_rate:.4g}; Opacus: {str(exc).splitlines()[0]})"
        ) from None


def iid_client_batches(config) -> list[tuple[int, int]]:
    """(images, batches per epoch) per client as the core makes them for an IID partition (exact for 'iid')."""
    n, k, b = config.data.n_members, config.data.num_clients, config.training.batch_size
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [(size, -(-size // min(b, size))) for size in sizes]


def planned_epsilon(spec: DPSGDSpec, config) -> dict[str, float]:
    """ε each private model will have spent after training, from the config alone ("server", "client_0", …).

    With a target ε, that target (Opacus calibrates σ to spend at most it); with a given σ,
    Opacus' accountant on the core's loader plan for an IID partition (:func:`iid_client_batches`;
    exact for 'iid', as the reachability check of :func:`build`). A trained run's own
    accountant (``describe()``) is the number to trust afterwards.
    """
    t_c, T, epochs = config.t_c, config.diffusion.T, config.training.epochs
    per_client = iid_client_batches(config)

    def spent(sample_rate: float, steps: int) -> float:
        if spec.target_epsilon is not None:
            return float(spec.target_epsilon)
        return _epsilon_of(((float(spec.noise_multiplier), sample_rate, steps),), spec.delta, spec.accountant)

    out: dict[str, float] = {}
    if spec.private("server") and t_c < T:
        out["server"] = spent(max(1.0 / b for _, b in per_client), epochs * sum(b for _, b in per_client))
    if spec.private("client") and t_c > 0:
        for k, (_, batches) in enumerate(per_client):
            out[model_name("client", k)] = spent(1.0 / batches, epochs * batches)
    return out


def build(spec: DPSGDSpec, config) -> DPSGD:
    t_c, T = config.t_c, config.diffusion.T
    if spec.target == "clients" and t_c == 0:
        raise ConfigError("dp-sgd target 'clients' but cut_ratio is 0: there are no client models")
    if spec.target == "server" and t_c >= T:
        raise ConfigError("dp-sgd target 'server' but cut_ratio is 1: there is no server model")
    if spec.target_epsilon is not None:
        # Reachability is checked before anything is written (exact for an IID partition;
        # other partitions are checked again on the real loaders when training starts).
        per_client = iid_client_batches(config)
        epochs = config.training.epochs
        if spec.target in ("clients", "both") and t_c > 0:
            for size, batches in per_client:
                calibrated_sigma(spec, 1.0 / batches, epochs * batches, "clients")
        if spec.target in ("server", "both") and t_c < T:
            q = max(1.0 / batches for _, batches in per_client)
            calibrated_sigma(spec, q, epochs * sum(b for _, b in per_client), "server")
    return DPSGD(spec, epochs=config.training.epochs, num_clients=config.data.num_clients, seed=config.seed, t_c=t_c, T=T)
