"""Signals: every model query of the membership attacks, batched, each computed once (§4.2).

A target hands the attacker one of three sources, and a :class:`SignalCache` turns
it into named arrays on demand (a signal two attacks need is computed once):

- a denoiser (:class:`ModelView`, T2/T3): the model in its OWN coordinates. A client
  model (T3) is a plain DDPM on x0 with schedule ᾱ_t, queried at t ∈ [1, t_c]. The
  server model (T2) is a DDPM whose data is the payload p = a_{t_c} x0 + s_{t_c} ε_c,
  with schedule ᾱ'_t = ᾱ_t/ᾱ_{t_c}, queried at t ∈ (t_c, T] (§2.2 step 3). A candidate
  x0 enters a model's data space as d = a_o·x0, with o = 0 (client) or o = t_c
  (server: the noise-free payload). Candidates "noised to t_c" and then noised further
  on ᾱ' give x_t = √ᾱ'_t (a_o x0 + s_o ε_c) + √(1−ᾱ'_t) η = a_t x0 + s_t ε in law, and
  the server's regression target η has posterior mean E[η | x_t, x0] = (√(1−ᾱ'_t)/s_t)·ε.
  ``loss`` uses that target (the Rao–Blackwellised server loss: same mean as the
  two-draw loss, less variance); for a client the factor is 1 and the target is ε.
- payloads (T1): the server view's tensors with their public (a_t, s_t).
- generated samples (T4).

Signal names and shapes (N candidates, M steps, K noise draws, D = C·H·W):

    steps        (M,)      the query steps (int); t_range (2,): the model's (origin, t_max)
    eps_origin   (N, D)    ε_θ(d, o)                          pia, pian (shared)
    sima_eps     (N, M, D) ε_θ(√ᾱ'_t d, t)                    sima
    pia_eps      (N, M, D) ε_θ(√ᾱ'_t d + √(1−ᾱ'_t) ε0, t)     pia
    pian_eps     (N, M, D) the same with ε0 rescaled to norm √D
    loss_sq      (N, M, K) mean over pixels of (η* − ε_θ(x_t, t))²
    secmi_steps  (M,)      probe steps; secmi_inv / secmi_rec (N, M, D): DDIM-inverted x̃_t
                           and its one-step reconstruction x̂_t from x̃ at the next step
    payload_lr   (N,)      max over payloads of the (centred) log-likelihood, minus the best
                           non-member reference's (:func:`payload_log_ratio`); payload_lr_steps,
                           payload_lr_per_step (N, B) the same per payload step bin
    nn_dist      (N,)      min_j ‖x − g_j‖ over generated samples
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from collafuse.attacks.membership.base import SignalSettings
from collafuse.schedule import NoiseSchedule, ddim_step


def step_grid(t_min: int, t_max: int, n: int) -> list[int]:
    """Up to ``n`` distinct steps in [t_min, t_max], quadratic spacing (dense at low noise), both ends included."""
    if t_max < t_min:
        return []
    u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    steps = np.rint(t_min + (t_max - t_min) * u**2).astype(int)
    return sorted(set(int(s) for s in steps))


def loss_target_scale(alpha_bar_abs: float, alpha_bar_model: float) -> float:
    """√(1−ᾱ'_t)/√(1−ᾱ_t): E[η | x_t, x0] = scale·ε for x_t = a_t x0 + s_t ε (1 for a client model)."""
    return float(np.sqrt((1.0 - alpha_bar_model) / (1.0 - alpha_bar_abs)))


def gaussian_norm_rescale(eps: torch.Tensor) -> torch.Tensor:
    """Rescale each row of (B, …) to L2 norm √D, the typical norm of a N(0, I_D) vector (PIAN)."""
    flat = eps.flatten(1)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat / norm * np.sqrt(flat.shape[1])).reshape(eps.shape)


@dataclass
class QueryCounter:
    """Counts denoiser forwards per image (each row of a batch is one query)."""

    rows: int = 0
    forwards: int = 0

    def add(self, batch: int) -> None:
        self.rows += batch
        self.forwards += 1


@dataclass(frozen=True)
class ModelView:
    """A denoiser as the attacker queries it (see the module docstring).

    origin: the step its data sits at (0 for a client model, t_c for the server);
    t_min..t_max: the steps it was trained on; schedule: the public absolute schedule.
    """

    model: nn.Module
    schedule: NoiseSchedule
    origin: int
    t_min: int
    t_max: int
    conditional: bool
    device: torch.device = torch.device("cpu")
    counter: QueryCounter = field(default_factory=QueryCounter, compare=False)

    @classmethod
    def client(cls, model: nn.Module, schedule: NoiseSchedule, t_c: int, conditional: bool, device=None) -> "ModelView":
        """T3: a client model, plain ε-prediction on ᾱ_t, trained at t ∈ [1, t_c]."""
        if t_c < 1:
            raise ValueError("a client model view needs t_c >= 1")
        return cls(model, schedule, 0, 1, t_c, conditional, torch.device(device or "cpu"))

    @classmethod
    def server(cls, model: nn.Module, schedule: NoiseSchedule, t_c: int, conditional: bool, device=None) -> "ModelView":
        """T2: the server model, ε-prediction of η on ᾱ'_t = ᾱ_t/ᾱ_{t_c}, trained at t ∈ (t_c, T]."""
        if t_c >= schedule.T:
            raise ValueError("a server model view needs t_c < T")
        return cls(model, schedule, t_c, t_c + 1, schedule.T, conditional, torch.device(device or "cpu"))

    @property
    def alpha_bar_model(self) -> torch.Tensor:
        """ᾱ' (T+1,) float64: the model's own schedule (ᾱ itself when origin = 0)."""
        return self.schedule.relative(self.origin)

    @property
    def data_scale(self) -> float:
        """a_o: a candidate x0 is the model's data point a_o·x0."""
        return self.schedule.a(self.origin)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int, y: torch.Tensor | None) -> torch.Tensor:
        """One batched query ε_θ(x, t, y); x (B,C,H,W) on any device, returned float32 on CPU."""
        self.counter.add(x.shape[0])
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=self.device)
        yy = y.to(self.device) if (y is not None and self.conditional) else None
        return self.model(x.to(self.device, torch.float32), tt, yy).float().cpu()


class SignalCache:
    """Named signals for one target's candidates, computed on first use and kept.

    ``producers`` maps a signal name to a function ``cache → {name: array}`` (a producer
    may fill several names at once); producers may ask the cache for other signals.
    """

    def __init__(self, producers: dict[str, Callable[["SignalCache"], dict[str, np.ndarray]]]):
        self._producers = producers
        self._values: dict[str, np.ndarray] = {}

    def available(self) -> tuple[str, ...]:
        return tuple(self._producers)

    def get(self, name: str) -> np.ndarray:
        if name not in self._values:
            if name not in self._producers:
                raise KeyError(f"signal {name!r} is not available here; available: {', '.join(self._producers)}")
            self._values.update(self._producers[name](self))
        return self._values[name]

    def require(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {n: self.get(n) for n in names}


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def model_signal_cache(
    view: ModelView,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    settings: SignalSettings,
    generator: torch.Generator,
) -> SignalCache:
    """Signals of a denoiser on candidates ``images`` (N,C,H,W) with ``labels`` (N,) or None.

    Noise is drawn for all N candidates at once per (step, draw), so results do not
    depend on ``settings.batch_size``.
    """
    n = images.shape[0]
    x0 = images.float()
    ab = view.schedule.alpha_bar
    abm = view.alpha_bar_model
    d = view.data_scale * x0  # the candidate in the model's data space
    steps = step_grid(view.t_min, view.t_max, settings.n_steps)
    parts = _chunks(n, settings.batch_size)

    def lab(sl: slice) -> torch.Tensor | None:
        return labels[sl] if labels is not None else None

    def flat(x: torch.Tensor) -> np.ndarray:
        return x.reshape(x.shape[0], -1).numpy()

    def p_steps(cache):
        return {"steps": np.asarray(steps, dtype=np.int64), "t_range": np.asarray([view.origin, view.t_max], dtype=np.int64)}

    def p_eps_origin(cache):
        out = torch.cat([view.eps(d[sl], view.origin, lab(sl)) for sl in parts])
        return {"eps_origin": flat(out)}

    def p_sima(cache):
        out = np.empty((n, len(steps), d[0].numel()), dtype=np.float32)
        for j, t in enumerate(steps):
            x = float(abm[t].sqrt()) * d
            for sl in parts:
                out[sl, j] = flat(view.eps(x[sl], t, lab(sl)))
        return {"sima_eps": out}

    def pia_like(eps0: torch.Tensor, name: str):
        out = np.empty((n, len(steps), d[0].numel()), dtype=np.float32)
        for j, t in enumerate(steps):
            x = float(abm[t].sqrt()) * d + float((1.0 - abm[t]).sqrt()) * eps0
            for sl in parts:
                out[sl, j] = flat(view.eps(x[sl], t, lab(sl)))
        return {name: out}

    def p_pia(cache):
        eps0 = torch.from_numpy(cache.get("eps_origin")).reshape(x0.shape)
        return pia_like(eps0, "pia_eps")

    def p_pian(cache):
        eps0 = gaussian_norm_rescale(torch.from_numpy(cache.get("eps_origin")).reshape(x0.shape))
        return pia_like(eps0, "pian_eps")

    def p_loss(cache):
        out = np.empty((n, len(steps), settings.n_noise), dtype=np.float64)
        for j, t in enumerate(steps):
            a_t, s_t = float(ab[t].sqrt()), float((1.0 - ab[t]).sqrt())
            scale = loss_target_scale(float(ab[t]), float(abm[t]))
            for k in range(settings.n_noise):
                noise = torch.randn(x0.shape, generator=generator)
                x_t = a_t * x0 + s_t * noise
                target = scale * noise
                for sl in parts:
                    err = (view.eps(x_t[sl], t, lab(sl)) - target[sl]).pow(2).flatten(1).mean(1)
                    out[sl, j, k] = err.double().numpy()
        return {"loss_sq": out}

    def p_secmi(cache):
        # Deterministic DDIM inversion on the model's schedule along origin → steps[0] → …
        # → steps[-1]; the probe at each point but the last reconstructs x̃_t from x̃ at
        # the next point with one reverse DDIM step (SecMI's t → t+k → t, with k the grid
        # spacing). The forward half of each probe is the inversion step itself, and the
        # reverse half reuses the next inversion query: M + 1 queries in all.
        grid = [view.origin] + steps
        probes = grid[:-1]
        inv = np.empty((n, len(probes), d[0].numel()), dtype=np.float32)
        rec = np.empty_like(inv)
        for sl in parts:
            x = d[sl].double()
            eps = view.eps(x, grid[0], lab(sl)).double()
            for i in range(len(grid) - 1):
                t, t_next = grid[i], grid[i + 1]
                inv[sl, i] = flat(x.float())
                x_next = ddim_step(x, eps, float(abm[t]), float(abm[t_next]))
                eps_next = view.eps(x_next, t_next, lab(sl)).double()
                rec[sl, i] = flat(ddim_step(x_next, eps_next, float(abm[t_next]), float(abm[t])).float())
                x, eps = x_next, eps_next
        return {"secmi_inv": inv, "secmi_rec": rec, "secmi_steps": np.asarray(probes, dtype=np.int64)}

    return SignalCache(
        {
            "steps": p_steps,
            "t_range": p_steps,
            "eps_origin": p_eps_origin,
            "sima_eps": p_sima,
            "pia_eps": p_pia,
            "pian_eps": p_pian,
            "loss_sq": p_loss,
            "secmi_inv": p_secmi,
            "secmi_rec": p_secmi,
            "secmi_steps": p_secmi,
        }
    )


# ---------------------------------------------------------------------------------------
# T1: payloads


def step_bins(t: np.ndarray, max_bins: int) -> tuple[np.ndarray, list[int]]:
    """Group payload steps into at most ``max_bins`` bins: (bin index per row, representative step per bin).

    One bin per distinct step when there are few (``cut``: a single bin at t_c).
    """
    distinct = np.unique(t)
    if distinct.size <= max_bins:
        return np.searchsorted(distinct, t), [int(v) for v in distinct]
    edges = np.unique(np.quantile(t, np.linspace(0, 1, max_bins + 1)))
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, edges.size - 2)
    reps = [int(np.median(t[idx == b])) if np.any(idx == b) else int(edges[b]) for b in range(edges.size - 1)]
    return idx, reps


EXACT_VARIANCE = 1e-12  # s² floor for payloads at t = 0


def payload_match_loglik(images: np.ndarray, payloads: np.ndarray, a: np.ndarray, s: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """max_j [log N(p_j; a_j x, s_j² I) − ℓ̄_j] for every image x, with ℓ̄_j = E log N(p_j; a_j x0, s_j² I)
    the expected log-density of p_j under its true source x0.

    = max_j (D − ‖p_j − a_j x‖²/s_j²)/2: how much better (> 0) or worse x explains p_j than
    p_j's own source is expected to. Subtracting ℓ̄_j removes the −D log s_j term, which
    would otherwise let low-noise payloads win the max whatever x is (trajectory payloads
    mix noise levels); for one noise level (``cut``) the ranking is the likelihood's.
    images (N, D), payloads (P, D), a and s (P,) → (N,) float64.
    """
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    dim = x.shape[1]
    x_sq = x.pow(2).sum(1)
    best = torch.full((x.shape[0],), -torch.inf, dtype=torch.float64)
    for i in range(0, payloads.shape[0], chunk):
        p = torch.from_numpy(np.ascontiguousarray(payloads[i : i + chunk], dtype=np.float32))
        aj = torch.from_numpy(np.asarray(a[i : i + chunk], dtype=np.float32))[:, None]
        sj = torch.from_numpy(np.asarray(s[i : i + chunk], dtype=np.float64))[:, None]
        # ‖p − a x‖² = ‖p‖² − 2a p·x + a²‖x‖², for all (payload, candidate) pairs at once.
        d_x = (p.pow(2).sum(1, keepdim=True) - 2.0 * aj * (p @ x.T) + aj.pow(2) * x_sq[None]).clamp_min(0.0)
        # s = 0 (t = 0: c = 0 sends the raw image) is an exact observation: a variance floor keeps
        # the score finite and ranks an exact match above every other candidate.
        ll = 0.5 * (dim - d_x.double() / sj.pow(2).clamp_min(EXACT_VARIANCE))
        best = torch.maximum(best, ll.max(0).values)
    return best.numpy()


def payload_log_ratio(
    candidates: np.ndarray, payloads: np.ndarray, a: np.ndarray, s: np.ndarray, references: np.ndarray
) -> np.ndarray:
    """:func:`payload_match_loglik` of each candidate minus the best of the references', (N,) float64.

    candidates (N, D), payloads (P, D), a and s (P,), references (R, D): images the attacker
    knows are non-members (with none, the reference term is 0). > 0 means x explains some
    payload better than any known non-member explains any payload.

    Why the reference is taken per candidate and not per payload: subtracting
    max_r log N(p_j; a_j r) inside the max over j adds the cross term 2 a s ε_j·(x − r),
    whose maximum over many payloads swamps the signal (measured on digits at c = 0.2:
    AUC 0.84–0.95 against 1.0). The per-candidate form keeps the likelihood's ranking,
    which is Bayes-optimal for the Gaussian payload channel, and its calibration.
    """
    ll = payload_match_loglik(candidates, payloads, a, s)
    ref = payload_match_loglik(references, payloads, a, s).max() if len(references) else 0.0
    return ll - ref


def exact_recovery_max(candidates: np.ndarray, recovered: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """−min_j ‖x − x̂0_j‖² for payloads that carry their noise (``naive``): x̂0 is exact, the
    likelihood ratio degenerates and its s → 0 limit is this distance. (N,)"""
    x = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    best = torch.full((x.shape[0],), -torch.inf, dtype=torch.float64)
    for i in range(0, recovered.shape[0], chunk):
        g = torch.from_numpy(np.ascontiguousarray(recovered[i : i + chunk], dtype=np.float32))
        best = torch.maximum(best, -torch.cdist(x, g).pow(2).min(1).values.double())
    return best.numpy()


def payload_signal_cache(
    candidates: torch.Tensor,
    view: dict[str, torch.Tensor],
    schedule: NoiseSchedule,
    references: torch.Tensor,
    max_bins: int = 8,
) -> SignalCache:
    """T1 signals of candidates (N,C,H,W) against a server view (``ServerView.load()``).

    ``references`` (R,C,H,W): images the attacker knows are non-members (the public
    auxiliary split). Uses only the payload tensors, their steps and (``naive``) their noise.
    """
    cand = candidates.reshape(candidates.shape[0], -1).numpy()
    refs = references.reshape(references.shape[0], -1).numpy()
    p = view["tensor"].float().reshape(view["tensor"].shape[0], -1).numpy()
    t = view["t"].numpy().astype(np.int64)
    ab = schedule.alpha_bar.numpy()
    a, s = np.sqrt(ab[t]), np.sqrt(1.0 - ab[t])
    noise = view.get("noise")
    if noise is not None:
        noise = noise.float().reshape(noise.shape[0], -1).numpy()

    def p_lr(cache):
        bins, reps = step_bins(t, max_bins)
        per = np.empty((cand.shape[0], len(reps)), dtype=np.float64)
        for b in range(len(reps)):
            rows = np.flatnonzero(bins == b)
            if noise is not None:
                rec = (p[rows] - s[rows, None] * noise[rows]) / a[rows, None]
                per[:, b] = exact_recovery_max(cand, rec)
            else:
                per[:, b] = payload_log_ratio(cand, p[rows], a[rows], s[rows], refs)
        return {
            "payload_lr": per.max(1),
            "payload_lr_per_step": per,
            "payload_lr_steps": np.asarray(reps, dtype=np.int64),
        }

    return SignalCache({"payload_lr": p_lr, "payload_lr_per_step": p_lr, "payload_lr_steps": p_lr})


# ---------------------------------------------------------------------------------------
# T4: generated samples


def nearest_distance(candidates: np.ndarray, samples: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """min_j ‖x − g_j‖ for candidates (N, D) against samples (S, D); returns (N,)."""
    x = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    best = torch.full((x.shape[0],), torch.inf)
    for i in range(0, samples.shape[0], chunk):
        g = torch.from_numpy(np.ascontiguousarray(samples[i : i + chunk], dtype=np.float32))
        best = torch.minimum(best, torch.cdist(x, g).min(1).values)
    return best.double().numpy()


def sample_signal_cache(candidates: torch.Tensor, samples: torch.Tensor) -> SignalCache:
    """T4 signals of candidates (N,C,H,W) against generated samples (S,C,H,W)."""
    if samples.shape[1:] != candidates.shape[1:]:
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])}, candidates {tuple(candidates.shape[1:])}")
    cand = candidates.reshape(candidates.shape[0], -1).numpy()
    gen = samples.float().reshape(samples.shape[0], -1).numpy()
    return SignalCache({"nn_dist": lambda cache: {"nn_dist": nearest_distance(cand, gen)}})
