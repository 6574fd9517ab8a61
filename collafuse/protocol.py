"""The two roles of split diffusion (DESIGN.md §2.2); the message between them is in :mod:`collafuse.payload`.

A :class:`Client` owns the low-noise steps 1..t_c and its raw images; a
:class:`Server` owns t_c+1..T. The only thing that ever reaches the server is a
frozen :class:`~collafuse.payload.Payload`; ``Server.receive`` refuses anything
else. Which member image a payload came from is NOT part of the payload: the
client hands those ids to the audit key separately (see :mod:`collafuse.transcript`).
"""
from __future__ import annotations

import torch
from torch import nn

from collafuse.hooks import ReleaseHook
from collafuse.payload import Payload
from collafuse.schedule import NoiseSchedule, gather, q_sample


def _drop_mask(y: torch.Tensor | None, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """Which labels to drop, each with probability p (None, and no draw, without labels or with p = 0)."""
    if y is None or p <= 0:
        return None
    return torch.rand(y.shape, generator=generator) < p


def _apply_drop(y: torch.Tensor | None, drop: torch.Tensor | None, null_class: int) -> torch.Tensor | None:
    return y if drop is None else torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


def _drop_labels(y: torch.Tensor | None, null_class: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    return _apply_drop(y, _drop_mask(y, p, generator), null_class)


class Client:
    """A data holder: trains ε_client on t ∈ {1..t_c} and releases payloads (§2.2 steps 1–2)."""

    def __init__(
        self,
        client_id: int,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        schedule: NoiseSchedule,
        t_c: int,
        payload_kind: str,
        generator: torch.Generator,
        release_hooks: tuple[ReleaseHook, ...] = (),
        label_dropout: float = 0.0,
        send_labels: bool = False,
        train_t_max: int | None = None,
        noise_multiplicity: int = 1,
        replay_draws: bool = False,
    ):
        self.client_id = client_id
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.t_c = t_c
        self.payload_kind = payload_kind
        self.generator = generator
        self.release_hooks = release_hooks
        self.label_dropout = label_dropout
        self.send_labels = send_labels
        # The client's model covers 1..train_t_max: t_c, or the later hand-off step t'
        # when a release hook moves the payloads there (payload noise).
        self.train_t_max = t_c if train_t_max is None else train_t_max
        self.noise_multiplicity = noise_multiplicity
        # A model-less client that still takes every draw of a training step (a simulation of a trained
        # client: its payloads then come from the same point of its random stream, draw for draw).
        self.replay_draws = replay_draws

    def _randn(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(device)

    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None) -> float | None:
        """One client step: t ~ U{1..t_c}, loss ‖ε − ε_client(x_t, t, y)‖². None if the client owns no step
        or has no model (a model-less client built with ``replay_draws`` still takes the step's draws)."""
        if self.t_c == 0 or (self.model is None and not self.replay_draws):
            return None
        if self.noise_multiplicity > 1:
            # K noise draws per image, rows image-major; the mean loss is the mean of the
            # per-image means, which DP-SGD folds back to one gradient per image.
            x0 = x0.repeat_interleave(self.noise_multiplicity, 0)
            y = y.repeat_interleave(self.noise_multiplicity, 0) if y is not None else None
        b = x0.shape[0]
        t = torch.randint(1, self.train_t_max + 1, (b,), generator=self.generator).to(x0.device)
        noise = self._randn(x0.shape, x0.device)
        drop = _drop_mask(y, self.label_dropout, self.generator)
        if self.model is None:
            return None  # a simulated client: the draws are taken, nothing trains
        x_t = q_sample(x0, t, noise, self.schedule.alpha_bar)
        y_in = _apply_drop(y, drop, self.model.null_class)
        loss = (self.model(x_t, t, y_in) - noise).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def idle_step(self) -> None:
        """A step on an empty batch (Poisson sampling): a DP optimiser still adds its noise and
        counts the step; a plain optimiser has no gradient and changes nothing."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()

    def release(self, x0: torch.Tensor, y: torch.Tensor | None, member_ids: torch.Tensor, step: int) -> Payload:
        """Build the payload for this minibatch (§2.2 step 2 and the other kinds of §2.2).

        ``member_ids`` never leave the client inside the payload: hooks may use them
        (e.g. a per-image seed) and the caller writes them to the audit key.
        """
        for hook in self.release_hooks:
            x0 = hook.prepare(x0, member_ids)
        b, T = x0.shape[0], self.schedule.T
        if self.payload_kind == "cut":
            t = torch.full((b,), self.t_c, dtype=torch.long)
        elif self.payload_kind == "trajectory":
            # Strictly below T so the server can still noise further on its relative schedule.
            t = torch.randint(self.t_c + 1, T, (b,), generator=self.generator)
        else:  # naive
            t = torch.randint(self.t_c + 1, T + 1, (b,), generator=self.generator)
        noise = None
        for hook in self.release_hooks:
            noise = hook.draw_noise(x0, member_ids, t, self.generator) if noise is None else noise
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.generator)
        noise = noise.to(x0.device)
        t = t.to(x0.device)
        p = q_sample(x0, t, noise, self.schedule.alpha_bar)
        payload = Payload(
            client_id=self.client_id,
            step=step,
            kind=self.payload_kind,
            t=t.cpu(),
            tensor=p.detach().cpu(),
            label=None if (y is None or not self.send_labels) else y.detach().cpu(),
            noise=noise.detach().cpu() if self.payload_kind == "naive" else None,
        )
        for hook in self.release_hooks:
            payload = hook.transform(payload, self.generator)
        return payload


class Server:
    """The shared party: trains ε_server on t ∈ (t_c, T] from payloads only (§2.2 step 3)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: NoiseSchedule,
        t_hand: int,
        generator: torch.Generator,
        device: torch.device,
        label_dropout: float = 0.0,
        noise_multiplicity: int = 1,
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.t_hand = t_hand  # the hand-off step: the server owns (t_hand, T]
        self.generator = generator
        self.device = device
        self.label_dropout = label_dropout
        self.noise_multiplicity = noise_multiplicity

    def idle_step(self) -> None:
        """See :meth:`Client.idle_step`: the server's step for an empty client batch."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()

    def receive(self, payload: Payload) -> float:
        """Train one step on a payload and return the loss. Nothing but a Payload gets in."""
        if not isinstance(payload, Payload):
            raise TypeError(f"the server only receives Payload messages, got {type(payload).__name__}")
        p = payload.values().to(self.device, torch.float32)
        y = payload.label.to(self.device) if payload.label is not None else None
        y = _drop_labels(y, self.model.null_class, self.label_dropout, self.generator) if y is not None else None
        t_p, sent_noise = payload.t, payload.noise
        if self.noise_multiplicity > 1:
            # K noise draws per payload row, rows image-major (see Client.train_step).
            k = self.noise_multiplicity
            p, t_p = p.repeat_interleave(k, 0), t_p.repeat_interleave(k, 0)
            y = y.repeat_interleave(k, 0) if y is not None else None
            sent_noise = sent_noise.repeat_interleave(k, 0) if sent_noise is not None else None
        b, T = p.shape[0], self.schedule.T
        if payload.kind == "naive":
            # The client told us the noise: plain ε-prediction at the sent t.
            t = t_p.to(self.device)
            x_t, target = p, sent_noise.to(self.device, torch.float32)
        else:
            # Treat p as data at level t_p and noise it further on ᾱ'_t = ᾱ_t/ᾱ_{t_p}:
            # x_t then has exactly the marginal q(x_t | x0) (§2.2 step 3).
            u = torch.rand(b, generator=self.generator, dtype=torch.float64)
            t = (t_p + 1 + (u * (T - t_p).double()).floor().long()).clamp(max=T)
            eta = torch.randn(p.shape, generator=self.generator).to(self.device)
            x_t = server_noising(p, t_p.to(self.device), t.to(self.device), eta, self.schedule)
            t, target = t.to(self.device), eta
        loss = (self.model(x_t, t, y) - target).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def server_noising(
    p: torch.Tensor, t_p: torch.Tensor, t: torch.Tensor, eta: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """x_t = √(ᾱ_t/ᾱ_{t_p}) p + √(1 − ᾱ_t/ᾱ_{t_p}) η, per row (§2.2 step 3)."""
    ab = schedule.alpha_bar
    rel = gather(ab, t, p.ndim, torch.float64) / gather(ab, t_p, p.ndim, torch.float64)
    return (rel.sqrt() * p.double() + (1.0 - rel).sqrt() * eta.double()).to(p.dtype)


def server_eps_scale(schedule: NoiseSchedule, t_c: int, payload_kind: str) -> torch.Tensor:
    """Per step t, the factor that turns the server's prediction into the full schedule's ε̂ (shape (T+1,)).

    Whatever the payload kind, the server's x_t has the full marginal q(x_t | x0) = N(a_t x0, s_t² I)
    (§2.2 step 3), so its score is ∇log q(x_t) = −E[ε | x_t]/s_t. The server learns E[η | x_t] for its own
    noise η, and for independent Gaussian noise parts E[η | x_t] = (s'_t/s_t)·E[ε | x_t], where s'_t is η's
    scale in x_t:
    - ``cut``: x_t = √ᾱ'_t p + s'_t η on ᾱ'_t = ᾱ_t/ᾱ_{t_c}, so s'_t = √(1 − ᾱ_t/ᾱ_{t_c});
    - ``naive``: the server is told the full noise, so s'_t = s_t (factor 1);
    - ``trajectory``: p is sent at t_p ~ U{t_c+1..T−1} and the server trains at t ~ U{t_p+1..T}, so it learns
      the average of s'_{t|t_p} over P(t_p | t) ∝ 1/(T − t_p) for t_p < t. At t = t_c + 1, where no payload
      was noised further, the ``cut`` factor stands in.
    Entries t ≤ t_c are 1 (the server never runs there). With t_c = 0 every factor is exactly 1.
    """
    T, ab = schedule.T, schedule.alpha_bar
    s_full = (1.0 - ab).sqrt()
    scale = torch.ones(T + 1, dtype=torch.float64)
    if t_c >= T or payload_kind == "naive":
        return scale
    steps = torch.arange(t_c + 1, T + 1)
    s_cut = (1.0 - ab[steps] / ab[t_c]).sqrt()
    if payload_kind == "cut":
        scale[steps] = s_full[steps] / s_cut
        return scale
    if payload_kind != "trajectory":
        raise ValueError(f"unknown payload kind {payload_kind!r}; valid: cut, trajectory, naive")
    scale[steps] = s_full[steps] / s_cut
    for t in range(t_c + 2, T + 1):
        t_p = torch.arange(t_c + 1, min(t, T))  # payload steps that can be noised further to t
        weight = 1.0 / (T - t_p).double()
        s_rel = (1.0 - ab[t] / ab[t_p]).sqrt()
        scale[t] = s_full[t] / ((weight * s_rel).sum() / weight.sum())
    return scale
