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
    eps_origin   (N, D)    ε0 = ε_θ(d, t_first), t_first = the model's first trained step
                           (1 for a client, t_c + 1 for the server), as PIA queries ε_θ(x0, ·)
                           at the first step of its DDPM                 pia, pian (shared)
    sima_eps     (N, M, D) ε_θ(√ᾱ'_t d, t)                    sima
    pia_eps      (N, M, D) ε_θ(√ᾱ'_t d + √(1−ᾱ'_t) ε0, t)     pia
    pian_eps     (N, M, D) the same with ε0 normalised as PIAN does: ε0 / mean|ε0| · √(2/π)
    loss_sq      (N, M, K) mean over pixels of (η* − ε_θ(x_t, t))²
    secmi_steps  (M,)      probe steps; secmi_inv / secmi_rec (N, M, D): DDIM-inverted x̃_t
                           and its one-step reconstruction x̂_t from x̃ at the next step
    payload_lr_single (N,) max over payloads of the (centred) log-likelihood, minus the best
                           non-member reference's (:func:`payload_log_ratio`, views = 1)
    payload_lr_fused  (N,) log Σ_j of the candidate's posterior weights as the source of each payload
                           (:func:`payload_pool_stats`), minus the best reference's same value
    payload_lr   (N,)      the fused statistic when E > 1, else the single-view one;
                           payload_lr*_per_step (N, B) each per payload step bin (payload_lr_steps)
    nn_dist      (N,)      min_j ‖x − g_j‖ over generated samples
    loss_hf_sq   (N, M, K) as loss_sq, the residual first through FreMIA's filter     loss-hf
    image_shape  (3,)      (C, H, W) of the candidates (the -hf attacks filter flat signals)
    agg_eps      (N, S, D) ε̂ along small-noise aggregation's DDIM walk at agg_steps (S,)  noise-agg
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from collafuse.attacks.membership.base import SignalSettings
from collafuse.attacks.membership.pia import paper_step
from collafuse.schedule import NoiseSchedule, ddim_step
from collafuse.device import CPU, resolve_device
from collafuse.attacks.membership.aggregation import aggregation_steps
from collafuse.attacks.membership.fremia import fremia_filter
from collafuse.streams import stream_seed

AGGREGATION_DRAW = 1  # noise-agg's one draw: sub-index 1 of the target's signal-noise stream (see p_aggregation)


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


PIAN_SCALE = float(np.sqrt(2.0 / np.pi))  # E|z| for z ~ N(0, 1)


def pian_normalise(eps: torch.Tensor) -> torch.Tensor:
    """PIAN's ε0 (Kong et al. 2024; the authors' ``PIAN.ddim_reverse``): each row of (B, …) divided
    by its mean absolute value and multiplied by √(2/π), so that its mean |·| is that of N(0, I)
    noise. Zero rows stay zero (the authors' code would divide by zero)."""
    flat = eps.double().flatten(1)
    mean_abs = flat.abs().mean(dim=1, keepdim=True)
    out = torch.where(mean_abs > 0, flat / mean_abs.clamp_min(1e-300) * PIAN_SCALE, torch.zeros_like(flat))
    return out.to(eps.dtype).reshape(eps.shape)


@dataclass
class QueryCounter:
    """Counts denoiser forwards per image (each row of a batch is one query)."""

    rows: int = 0
    forwards: int = 0

    def add(self, batch: int) -> None:
        self.rows += batch
        self.forwards += 1


def _device_of(model: nn.Module, device) -> torch.device:
    """``device`` resolved (``auto``, ``cpu``, ``cuda``, a torch.device), or where the model's weights are."""
    if device is not None:
        return resolve_device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else CPU


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
    device: torch.device = CPU  # where the model is queried (ModelView.client/server: the model's own device)
    counter: QueryCounter = field(default_factory=QueryCounter, compare=False)

    @classmethod
    def client(cls, model: nn.Module, schedule: NoiseSchedule, t_c: int, conditional: bool, device=None) -> "ModelView":
        """T3: a client model, plain ε-prediction on ᾱ_t, trained at t ∈ [1, t_c]."""
        if t_c < 1:
            raise ValueError("a client model view needs t_c >= 1")
        return cls(model, schedule, 0, 1, t_c, conditional, _device_of(model, device))

    @classmethod
    def server(cls, model: nn.Module, schedule: NoiseSchedule, t_c: int, conditional: bool, device=None) -> "ModelView":
        """T2: the server model, ε-prediction of η on ᾱ'_t = ᾱ_t/ᾱ_{t_c}, trained at t ∈ (t_c, T]."""
        if t_c >= schedule.T:
            raise ValueError("a server model view needs t_c < T")
        return cls(model, schedule, t_c, t_c + 1, schedule.T, conditional, _device_of(model, device))

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

    def with_producers(self, extra: dict[str, Callable[["SignalCache"], dict[str, np.ndarray]]]) -> "SignalCache":
        """A cache with ``extra`` producers added (e.g. reference-model signals); values already computed are kept."""
        out = SignalCache({**self._producers, **extra})
        out._values.update(self._values)
        return out

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
        # PIA's ε0 = ε_θ(x0, first step): the first step the model was trained on (t_min: 1 for a
        # client, t_c + 1 for the server), not its origin, where it never saw a training pair.
        out = torch.cat([view.eps(d[sl], view.t_min, lab(sl)) for sl in parts])
        return {"eps_origin": flat(out)}

    def p_sima(cache):
        out = np.empty((n, len(steps), d[0].numel()), dtype=np.float32)
        for j, t in enumerate(steps):
            x = float(abm[t].sqrt()) * d
            for sl in parts:
                out[sl, j] = flat(view.eps(x[sl], t, lab(sl)))
        return {"sima_eps": out}

    def pia_like(eps0: torch.Tensor, name: str, at: list[int]):
        out = np.empty((n, len(at), d[0].numel()), dtype=np.float32)
        for j, t in enumerate(at):
            x = float(abm[t].sqrt()) * d + float((1.0 - abm[t]).sqrt()) * eps0
            for sl in parts:
                out[sl, j] = flat(view.eps(x[sl], t, lab(sl)))
        return {name: out}

    head = paper_step(view.origin, view.t_min, view.t_max, view.schedule.T)  # PIA's one attack step

    def eps0_of(cache, normalised: bool) -> torch.Tensor:
        eps0 = torch.from_numpy(cache.get("eps_origin")).reshape(x0.shape)
        return pian_normalise(eps0) if normalised else eps0

    def p_pia(cache):
        return pia_like(eps0_of(cache, False), "pia_eps", steps)

    def p_pian(cache):
        return pia_like(eps0_of(cache, True), "pian_eps", steps)

    def p_pia_head(cache):
        return {"pia_head_eps": pia_like(eps0_of(cache, False), "x", [head])["x"][:, 0]}

    def p_pian_head(cache):
        return {"pian_head_eps": pia_like(eps0_of(cache, True), "x", [head])["x"][:, 0]}

    def p_loss(cache):
        # loss_hf_sq: the same residuals through FreMIA's filter (loss-hf; no extra query, same draws)
        out = np.empty((n, len(steps), settings.n_noise), dtype=np.float64)
        out_hf = np.empty_like(out)
        for j, t in enumerate(steps):
            a_t, s_t = float(ab[t].sqrt()), float((1.0 - ab[t]).sqrt())
            scale = loss_target_scale(float(ab[t]), float(abm[t]))
            for k in range(settings.n_noise):
                noise = torch.randn(x0.shape, generator=generator)
                x_t = a_t * x0 + s_t * noise
                target = scale * noise
                for sl in parts:
                    residual = view.eps(x_t[sl], t, lab(sl)) - target[sl]
                    out[sl, j, k] = residual.pow(2).flatten(1).mean(1).double().numpy()
                    out_hf[sl, j, k] = (fremia_filter(residual.numpy()) ** 2).reshape(residual.shape[0], -1).mean(1)
        return {"loss_sq": out, "loss_hf_sq": out_hf}

    def p_image_shape(cache):
        return {"image_shape": np.asarray(x0.shape[1:], dtype=np.int64)}

    def p_aggregation(cache):
        # Small-noise aggregation (aggregation.py): one noise draw at the start step, then a DDIM walk down the
        # model's own schedule, one query per step. Its draw comes from a child of this cache's noise stream
        # (the generator's seed, sub-index AGGREGATION_DRAW), so it shifts no draw of the loss signal
        # whichever signal is computed first.
        at = aggregation_steps(view.origin, view.t_min, view.t_max, view.schedule.T)
        g = torch.Generator().manual_seed(stream_seed(generator.initial_seed(), AGGREGATION_DRAW))
        noise = torch.randn(x0.shape, generator=g)
        out = np.empty((n, len(at), d[0].numel()), dtype=np.float32)
        for sl in parts:
            x = (float(abm[at[0]].sqrt()) * d[sl] + float((1.0 - abm[at[0]]).sqrt()) * noise[sl]).double()
            for i, t in enumerate(at):
                eps = view.eps(x, t, lab(sl)).double()
                out[sl, i] = flat(eps.float())
                if i + 1 < len(at):
                    x = ddim_step(x, eps, float(abm[t]), float(abm[at[i + 1]]))
        return {"agg_eps": out, "agg_steps": np.asarray(at, dtype=np.int64)}

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
            "pia_head_eps": p_pia_head,
            "pian_head_eps": p_pian_head,
            "loss_sq": p_loss,
            "secmi_inv": p_secmi,
            "secmi_rec": p_secmi,
            "secmi_steps": p_secmi,
            "loss_hf_sq": p_loss,
            "image_shape": p_image_shape,
            "agg_eps": p_aggregation,
            "agg_steps": p_aggregation,
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
PAYLOAD_MEMORY_BUDGET = 256 * 2**20  # bytes the (pool × payload) blocks of payload_pool_stats may use
CANDIDATE_CHUNK = 1024               # pool rows per matrix product inside a block
_BYTES_PER_PAIR = 4 * 8              # float64 log-likelihoods, weights, exponentials, product per pair


def payload_chunk_size(n_pool: int, n_payloads: int, memory_budget: int = PAYLOAD_MEMORY_BUDGET) -> int:
    """Payloads per block of :func:`payload_pool_stats`: a block holds about 32 bytes per
    (pool image, payload) pair, so ``memory_budget`` bytes allow budget / (32·M) payloads (≥ 1)."""
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    return int(min(max(1, n_payloads), max(1, memory_budget // (_BYTES_PER_PAIR * max(1, n_pool)))))


def centred_loglik(images: torch.Tensor, payloads: torch.Tensor, a: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """ℓ_j(x) = log N(p_j; a_j x, s_j² I) − E log N(p_j; a_j x0, s_j² I) = (D − ‖p_j − a_j x‖²/s_j²)/2.

    images (N, D), payloads (P, D), a and var = s² (P,), all float64 → (N, P). Centring on what
    p_j's true source achieves removes the −D log s_j term, which would otherwise let low-noise
    payloads win whatever x is (trajectory payloads mix noise levels); for one noise level
    (``cut``) the ranking is the likelihood's.
    """
    # ‖p − a x‖² = ‖p‖² − 2a p·x + a²‖x‖², for all (image, payload) pairs at once.
    dist = (payloads.pow(2).sum(1)[None] - 2.0 * a[None] * (images @ payloads.T)
            + a.pow(2)[None] * images.pow(2).sum(1, keepdim=True)).clamp_min(0.0)
    return 0.5 * (images.shape[1] - dist / var[None])


def payload_pool_stats(
    pool: np.ndarray, payloads: np.ndarray, a: np.ndarray, s: np.ndarray, n_references: int = 0,
    sources: float | None = None, memory_budget: int = PAYLOAD_MEMORY_BUDGET, payload_chunk: int | None = None,
    candidate_chunk: int = CANDIDATE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """The single-view and the fused payload statistic of every image of a pool.

    pool (M, D): every image the attacker scores (candidates) followed by its ``n_references``
    known non-members (population samples); payloads (P, D) with their public a, s (P,);
    ``sources``: K, how many distinct images the payloads come from (P / E: public protocol
    knowledge; default P). Returns, per pool image y, (M,) float64 each:

    - single(y) = max_j ℓ_j(y) (:func:`centred_loglik`);
    - fused(y)  = log Σ_j w_j(y), w_j(y) = exp ℓ_j(y) / Z_j, the posterior weight of y as the
      source of payload j (DESIGN §4.2's log Σ_j N(p_j; a_j x, s_j² I), each payload normalised by
      how well anything explains it): Z_j = Σ_{y' ∈ pool} exp ℓ_j(y') + 1 + K · mean_r exp ℓ_j(r).
      The pool term lets an image that produced p_j claim it from the others ("explaining away");
      the background 1 + K · mean_r is what the K sources the attacker does not hold add: p_j's
      own source, if outside the pool, fits it like a true source (centred ℓ ≈ 0, so e^0 = 1),
      the others like population samples (the references' mean). Without the background, a
      payload whose source is missing from the pool would hand its whole weight to its best
      wrong match. Σ_j w_j(y) is the expected number of payloads the posterior attributes to y.

    Computed in float64 in blocks of ``payload_chunk`` payloads (default: from ``memory_budget``,
    :func:`payload_chunk_size`) with a running maximum and a running log-sum-exp, so memory is
    bounded whatever P; the values do not depend on the blocking (up to float64 rounding, ~1e-15).
    s = 0 (t = 0: c = 0 sends the raw image) is an exact observation: a variance floor keeps the
    statistics finite and ranks an exact match above every other image.
    """
    m, P = pool.shape[0], payloads.shape[0]
    if P == 0 or m == 0:
        raise ValueError(f"payload_pool_stats needs payloads and pool images, got {P} and {m}")
    if not 0 <= n_references <= m:
        raise ValueError(f"n_references must be in [0, {m}], got {n_references}")
    if candidate_chunk < 1 or (payload_chunk is not None and payload_chunk < 1):
        raise ValueError(f"chunk sizes must be >= 1, got payload_chunk={payload_chunk}, candidate_chunk={candidate_chunk}")
    k = float(P if sources is None else sources)
    if not k > 0:
        raise ValueError(f"sources must be > 0, got {sources}")
    pc = payload_chunk or payload_chunk_size(m, P, memory_budget)
    x = torch.from_numpy(np.asarray(pool, dtype=np.float64))
    a_all = torch.from_numpy(np.asarray(a, dtype=np.float64))
    var_all = torch.from_numpy(np.maximum(np.asarray(s, dtype=np.float64) ** 2, EXACT_VARIANCE))
    best = torch.full((m,), -torch.inf, dtype=torch.float64)
    run_max = torch.full((m,), -torch.inf, dtype=torch.float64)
    run_sum = torch.zeros(m, dtype=torch.float64)
    for j in range(0, P, pc):
        p = torch.from_numpy(np.asarray(payloads[j : j + pc], dtype=np.float64))
        aj, vj = a_all[j : j + pc], var_all[j : j + pc]
        ll = torch.cat([centred_loglik(x[i : i + candidate_chunk], p, aj, vj) for i in range(0, m, candidate_chunk)])
        best = torch.maximum(best, ll.max(1).values)
        # log Z_j = log(Σ_pool e^ℓ + 1 + K·mean_refs e^ℓ), all in log space.
        background = torch.zeros(ll.shape[1], dtype=torch.float64)
        if n_references:
            refs_mean = torch.logsumexp(ll[m - n_references :], dim=0) - float(np.log(n_references))
            background = torch.logaddexp(background, float(np.log(k)) + refs_mean)
        log_z = torch.logaddexp(torch.logsumexp(ll, dim=0), background)
        w = ll - log_z[None]  # log posterior weight of each pool image per payload
        new_max = torch.maximum(run_max, w.max(1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(w - new_max[:, None]).sum(1)
        run_max = new_max
    return best.numpy(), (run_max + torch.log(run_sum)).numpy()


def payload_log_ratio(
    candidates: np.ndarray, payloads: np.ndarray, a: np.ndarray, s: np.ndarray, references: np.ndarray,
    fused: bool = False, views: int = 1, **chunking,
) -> np.ndarray:
    """The single-view (or ``fused``) payload statistic of each candidate minus the best of the references'
    same statistic, (N,) float64 (:func:`payload_pool_stats`, pool = candidates then references,
    K = P / ``views`` sources).

    candidates (N, D), payloads (P, D), a and s (P,), references (R, D): images the attacker
    knows are non-members (with none, the reference term is 0). > 0 means x explains the
    payloads better than any known non-member does.

    Why the single-view reference is taken per candidate and not per payload: subtracting
    max_r log N(p_j; a_j r) inside the max over j adds the cross term 2 a s ε_j·(x − r),
    whose maximum over many payloads swamps the signal (measured on digits at c = 0.2:
    AUC 0.84–0.95 against 1.0). The fused statistic instead normalises each payload by a
    smooth sum (the pool's and the population's density), not by the noisy max over references.
    """
    n = candidates.shape[0]
    single, fused_stat = payload_pool_stats(np.concatenate([candidates, references]), payloads, a, s,
                                            n_references=len(references), sources=payloads.shape[0] / views, **chunking)
    stat = fused_stat if fused else single
    return stat[:n] - (stat[n:].max() if len(references) else 0.0)


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
    views_per_image: int = 1,
    memory_budget: int = PAYLOAD_MEMORY_BUDGET,
) -> SignalCache:
    """T1 signals of candidates (N,C,H,W) against a server view (``ServerView.load()``).

    ``references`` (R,C,H,W): images the attacker knows are non-members (the public
    auxiliary split). ``views_per_image``: E, how many payloads each member sends (the number
    of epochs: public protocol knowledge); ``payload_lr`` is the fused statistic when E > 1.
    ``memory_budget``: bytes one block of the pool × payload computation may use.
    Uses only the payload tensors, their steps and (``naive``) their noise.
    """
    if views_per_image < 1:
        raise ValueError(f"views_per_image must be >= 1, got {views_per_image}")
    cand = candidates.reshape(candidates.shape[0], -1).numpy()
    refs = references.reshape(references.shape[0], -1).numpy()
    p = view["tensor"].float().reshape(view["tensor"].shape[0], -1).numpy()
    t = view["t"].numpy().astype(np.int64)
    ab = schedule.alpha_bar.numpy()
    a, s = np.sqrt(ab[t]), np.sqrt(1.0 - ab[t])
    noise = view.get("noise")
    if noise is not None:
        noise = noise.float().reshape(noise.shape[0], -1).numpy()
    n = cand.shape[0]
    pool = np.concatenate([cand, refs]).astype(np.float64)

    def calibrated(stat: np.ndarray) -> np.ndarray:
        return stat[:n] - (stat[n:].max() if len(refs) else 0.0)

    def p_lr(cache):
        bins, reps = step_bins(t, max_bins)
        single, fused = np.empty((n, len(reps))), np.empty((n, len(reps)))
        fused_pool = []
        for b in range(len(reps)):
            rows = np.flatnonzero(bins == b)
            if noise is not None:
                # Payloads that carry their noise: x0 is exact and the statistic is the s → 0 limit
                # of the likelihood, −min_j ‖x − x̂0_j‖²; fusing views adds nothing to an exact match.
                rec = (p[rows] - s[rows, None] * noise[rows]) / a[rows, None]
                single[:, b] = fused[:, b] = exact_recovery_max(cand, rec)
                continue
            best, lse = payload_pool_stats(pool, p[rows], a[rows], s[rows], len(refs), t.size / views_per_image,
                                           memory_budget)
            single[:, b], fused[:, b] = calibrated(best), calibrated(lse)
            fused_pool.append(lse)
        single_all = single.max(1)
        # Over ALL payloads (a member's views may sit in different step bins): the log-sum-exp of the bins'.
        fused_all = single_all if noise is not None else calibrated(np.logaddexp.reduce(np.stack(fused_pool), axis=0))
        use_fused = views_per_image > 1
        return {
            "payload_lr": fused_all if use_fused else single_all,
            "payload_lr_per_step": fused if use_fused else single,
            "payload_lr_single": single_all,
            "payload_lr_single_per_step": single,
            "payload_lr_fused": fused_all,
            "payload_lr_fused_per_step": fused,
            "payload_lr_steps": np.asarray(reps, dtype=np.int64),
            "payload_views": np.asarray([views_per_image], dtype=np.int64),
        }

    names = ("payload_lr", "payload_lr_per_step", "payload_lr_single", "payload_lr_single_per_step",
             "payload_lr_fused", "payload_lr_fused_per_step", "payload_lr_steps", "payload_views")
    return SignalCache({name: p_lr for name in names})


# ---------------------------------------------------------------------------------------
# T4: generated samples


def nearest_distance(candidates: np.ndarray, samples: np.ndarray, chunk: int = 4096, rows: int | None = None) -> np.ndarray:
    """min_j ‖x − g_j‖ for candidates (N, D) against samples (S, D); returns (N,).

    In bounded memory (DESIGN §10): ``chunk`` samples × ``rows`` candidates per block (``rows``
    default: the memory budget of :mod:`collafuse.attacks.chunking`); each distance is computed
    by the same formula in any block."""
    from collafuse.attacks.chunking import row_slices, rows_per_chunk

    x = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    best = torch.full((x.shape[0],), torch.inf)
    size = rows_per_chunk(min(max(1, samples.shape[0]), chunk), 12, rows)  # float32 products, norms, distances
    for i in range(0, samples.shape[0], chunk):
        g = torch.from_numpy(np.ascontiguousarray(samples[i : i + chunk], dtype=np.float32))
        for sl in row_slices(x.shape[0], size):
            best[sl] = torch.minimum(best[sl], torch.cdist(x[sl], g).min(1).values)
    return best.double().numpy()


def sample_signal_cache(candidates: torch.Tensor, samples: torch.Tensor) -> SignalCache:
    """T4 signals of candidates (N,C,H,W) against generated samples (S,C,H,W)."""
    if samples.shape[1:] != candidates.shape[1:]:
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])}, candidates {tuple(candidates.shape[1:])}")
    cand = candidates.reshape(candidates.shape[0], -1).numpy()
    gen = samples.float().reshape(samples.shape[0], -1).numpy()
    return SignalCache({"nn_dist": lambda cache: {"nn_dist": nearest_distance(cand, gen)}})
