"""``multiview`` (T1, DESIGN.md §4.1): link the payloads of one image across epochs, then fuse them.

Fusion. Views p_k = a_k x0 + s_k ε_k of the same x0 combine into the
minimum-variance unbiased estimate x̂ = Σ(a_k p_k/s_k²) / Σ(a_k²/s_k²), whose noise
has per-pixel variance 1/Σ(a_k²/s_k²) (:func:`fuse`). Leakage grows with epochs.

Linking without ids. The server knows the sender of each row, the crossing order
and how many epochs the protocol ran, and the protocol sends every image of a
client exactly once per epoch. So, per client, the rows are cut into E consecutive
blocks (one per epoch); the first block's rows are the anchors, one per image, and
every later block is matched one-to-one to the anchors by a minimum-cost
assignment (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``). The cost
of joining row i (rescaled y_i = p_i/a_i, noise variance v_i = s_i²/a_i²) to group g
(running fused mean m_g, variance V_g) is the negative log-likelihood ratio of
"same image" against "different images" (:func:`link_cost`). With the attacker's
public aux images it uses a Gaussian prior N(μ, Σ) fitted to them (Ledoit–Wolf
shrinkage): in the eigenbasis of Σ (eigenvalues λ_k) each direction contributes
½[((λ+V)a² − 2λab + (λ+v)b²)/D + log D − a²/(λ+v) − b²/(λ+V) − log((λ+v)(λ+V))],
D = λ(v+V) + vV, with a, b the centred coordinates of y_i and m_g — so directions
where images do not vary (λ → 0) contribute nothing and the noise in them is
ignored. Without aux it uses a flat prior: d/2·log(v+V) + ‖y_i − m_g‖²/2(v+V).
After each block the groups are re-fused, so later epochs are matched against
sharper estimates. If a client's row count is not a multiple of E, the blocks have
⌈rows/E⌉ rows and the short last block is matched the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.covariance import ledoit_wolf

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.chunking import row_slices, rows_per_chunk
from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, Reconstruction, ViewArrays, rescaled, require_attack_inputs,
)

NAME = "multiview"
EXACT_VAR = 1e-12  # variance floor for exact observations (noise known, t = 0)
MAX_VARIANCE_PAIRS = 64  # above this many distinct (v, V) pairs, link_cost uses the direct per-pair formula
BYTES_PER_PAIR = 32  # float64 temporaries per (row, group) pair while link_cost builds a chunk


class FusionSums:
    """The sums behind :func:`fuse` for ``groups`` groups of ``d`` values: Σ y_k/v_k and Σ 1/v_k per group.

    Rows are added block by block (:meth:`add`); a group's terms are summed in the order they are
    added, so adding the rows in row order, in any blocks, gives the numbers of one call over every
    row (what lets a streamed evaluation fuse a view it never holds whole, DESIGN §10)."""

    def __init__(self, groups: int, d: int):
        self.num = torch.zeros(groups, d, dtype=torch.float64)
        self.den = torch.zeros(groups, dtype=torch.float64)

    def add(self, slots: torch.Tensor, y: torch.Tensor, var: torch.Tensor) -> None:
        """Rows y (n, ...) = p/a with noise variances var (n,) into the groups ``slots`` (n,) int64."""
        w = 1.0 / var.double().clamp_min(EXACT_VAR)
        self.num.index_add_(0, slots, y.reshape(y.shape[0], -1).double() * w[:, None])
        self.den.index_add_(0, slots, w)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused mean (groups, d) = Σ(y/v)/Σ(1/v), its noise variance (groups,) = 1/Σ(1/v)), float64."""
        return self.num / self.den[:, None], 1.0 / self.den


def fuse(y: torch.Tensor, var: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision-weighted fusion per group. y (N,C,H,W) = p/a, var (N,) = s²/a², groups (N,) any labels.

    Returns (x̂ (N,C,H,W): each row gets its group's Σ(y_k/v_k)/Σ(1/v_k) = Σ(a_k p_k/s_k²)/Σ(a_k²/s_k²),
    noise variance (N,) = 1/Σ(a_k²/s_k²)). float64.
    """
    _, g = torch.unique(groups, return_inverse=True)
    k = int(g.max()) + 1 if g.numel() else 0
    sums = FusionSums(k, y[0].numel() if y.shape[0] else 0)
    sums.add(g, y, var)
    mean, noise_var = sums.result()
    return mean[g].reshape(y.shape), noise_var[g]


@dataclass(frozen=True)
class GaussianPrior:
    """x ~ N(mean, U diag(eigenvalues) Uᵀ), kept in its top ``K`` directions: mean (d,), basis (d, K), eigenvalues (K,)."""

    mean: torch.Tensor
    basis: torch.Tensor
    eigenvalues: torch.Tensor

    @classmethod
    def fit(cls, images: torch.Tensor, energy: float = 0.995, max_dims: int = 128) -> "GaussianPrior":
        """From public images (N,C,H,W): Ledoit–Wolf covariance, the directions holding ``energy`` of its variance."""
        x = images.reshape(images.shape[0], -1).double().numpy()
        cov, _ = ledoit_wolf(x)
        lam, vec = np.linalg.eigh(cov)
        lam, vec = lam[::-1].clip(min=0.0), vec[:, ::-1]
        k = int(min(max_dims, np.searchsorted(np.cumsum(lam) / lam.sum(), energy) + 1))
        return cls(torch.from_numpy(x.mean(0)), torch.from_numpy(vec[:, :k].copy()), torch.from_numpy(lam[:k].copy()))


def _prior_terms(lam: torch.Tensor, v: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-direction coefficients of the log-likelihood ratio for noise variances v, V (broadcastable with λ):
    cost = ½ Σ_k [α a² + β b² − 2 γ a b + δ]."""
    det = lam * (v + V) + v * V
    alpha = (lam + V) / det - 1.0 / (lam + v)
    beta = (lam + v) / det - 1.0 / (lam + V)
    gamma = lam / det
    delta = det.log() - ((lam + v) * (lam + V)).log()
    return alpha, beta, gamma, delta


def _dense_prior_cost(a: torch.Tensor, v: torch.Tensor, b: torch.Tensor, V: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The per-pair formula directly: a (n,K), v (n,), b (G,K), V (G,), λ (K,) → (n, G)."""
    alpha, beta, gamma, delta = _prior_terms(lam[None, None, :], v[:, None, None], V[None, :, None])
    A, B = a[:, None, :], b[None, :, :]
    return 0.5 * (alpha * A * A + beta * B * B - 2.0 * gamma * A * B + delta).sum(-1)


def link_cost(y: torch.Tensor, v: torch.Tensor, m: torch.Tensor, V: torch.Tensor, prior: GaussianPrior | None = None,
              chunk: int | None = None) -> torch.Tensor:
    """Negative log-likelihood ratio (n, G) of "row i (y (n,d), v (n,)) and group g (m (G,d), V (G,)) show
    the same image" against "different images", under ``prior`` (or a flat prior when None).

    Rows and groups that share a noise variance are handled together with matrix products (the
    common case: one variance per epoch block for ``cut`` payloads); the result equals the
    direct per-pair formula of the module docstring. The (n, G) result is what the assignment
    needs; the temporaries beside it are built ``chunk`` rows at a time (default: from the memory
    budget of :mod:`collafuse.attacks.chunking`), so they stay bounded however many rows there are.
    """
    v, V = v.double(), V.double()
    n, G = y.shape[0], m.shape[0]
    cost = torch.empty(n, G, dtype=torch.float64)
    if prior is None:
        size = rows_per_chunk(G, BYTES_PER_PAIR, chunk)
        md = m.double()
        for sl in row_slices(n, size):
            total = v[sl, None] + V[None, :]
            d2 = torch.cdist(y[sl].double(), md).pow(2)
            cost[sl] = 0.5 * y.shape[1] * total.log() + d2 / (2.0 * total)
        return cost
    a = (y.double() - prior.mean) @ prior.basis  # (n, K)
    b = (m.double() - prior.mean) @ prior.basis  # (G, K)
    lam = prior.eigenvalues
    uv, iv = torch.unique(v, return_inverse=True)
    uV, iV = torch.unique(V, return_inverse=True)
    if uv.numel() * uV.numel() > MAX_VARIANCE_PAIRS:  # e.g. trajectory payloads: every row its own t
        # (rows, G, K) float64 temporaries, about six of them
        size = min(32, rows_per_chunk(G * max(1, lam.numel()), 6 * 8, chunk))
        for sl in row_slices(n, size):
            cost[sl] = _dense_prior_cost(a[sl], v[sl], b, V, lam)
        return cost
    size = rows_per_chunk(G, BYTES_PER_PAIR, chunk)
    for p, vp in enumerate(uv):
        rows_all = torch.nonzero(iv == p).flatten()
        for q, Vq in enumerate(uV):
            cols = torch.nonzero(iV == q).flatten()
            alpha, beta, gamma, delta = _prior_terms(lam, vp, Vq)
            col_term = (b[cols].pow(2) @ beta)[None, :]
            for sl in row_slices(rows_all.numel(), size):
                rows = rows_all[sl]
                block = (a[rows].pow(2) @ alpha)[:, None] + col_term - 2.0 * (a[rows] * gamma) @ b[cols].T + delta.sum()
                cost[rows[:, None], cols[None, :]] = 0.5 * block
    return cost


def link(y: torch.Tensor, var: torch.Tensor, client: torch.Tensor, epochs: int, prior: GaussianPrior | None = None,
         chunk: int | None = None) -> torch.Tensor:
    """Anchor row index (N,) for every row, found without ids (see the module docstring).

    y (N,C,H,W) rescaled rows in crossing order, var (N,) their noise variances, client (N,).
    """
    n = y.shape[0]
    groups = torch.arange(n)
    flat = y.reshape(n, -1).double()
    v = var.double().clamp_min(EXACT_VAR)
    for k in torch.unique(client):
        rows = torch.nonzero(client == k).flatten()
        size = math.ceil(rows.numel() / epochs)
        anchors = rows[:size]
        prec = 1.0 / v[anchors]
        mean = flat[anchors].clone()
        for start in range(size, rows.numel(), size):
            block = rows[start : start + size]
            r, c = assign_block(flat[block], v[block], mean, prec, prior, chunk)
            groups[block[r]] = anchors[c]
    return groups


def link_blocks(client: torch.Tensor, epochs: int) -> dict[int, list[torch.Tensor]]:
    """The blocks :func:`link` cuts each client's rows into (client (N,) of every row, in crossing
    order): client → [anchor rows, epoch block 2, ...], row indices. Metadata only."""
    out = {}
    for k in torch.unique(client):
        rows = torch.nonzero(client == k).flatten()
        size = math.ceil(rows.numel() / epochs)
        out[int(k)] = list(torch.split(rows, size))
    return out


class StreamedLinking:
    """:func:`link` and :func:`fuse` over a view fed a shard at a time, in crossing order (DESIGN §10).

    ``client`` (N,) and ``epochs`` fix the blocks (:func:`link_blocks`); :meth:`feed` takes the rescaled
    rows of the next shard. A client's block is matched as soon as all its rows have arrived, with the
    very inputs :func:`link` gives :func:`assign_block` (blocks of different clients never share
    state), and each matched row joins its group's :class:`FusionSums` then, in row order. So
    :attr:`groups` and :meth:`fused` equal :func:`link` and :func:`fuse` on the whole view, while the
    memory held is the groups' means and sums and at most one pending block per client — bounded by
    the number of images, not the number of rows."""

    def __init__(self, client: torch.Tensor, epochs: int, d: int, prior: GaussianPrior | None = None,
                 chunk: int | None = None):
        self.blocks = link_blocks(client, epochs)
        self.prior, self.chunk = prior, chunk
        self.groups = torch.arange(client.numel())
        anchors = torch.sort(torch.cat([b[0] for b in self.blocks.values()])).values if self.blocks else torch.empty(0, dtype=torch.long)
        self.slot = torch.full((client.numel(),), -1, dtype=torch.long)  # anchor row → its group's place in the sums
        self.slot[anchors] = torch.arange(anchors.numel())
        self.sums = FusionSums(anchors.numel(), d)
        self._next = {k: 0 for k in self.blocks}  # the next block of each client
        self._pending: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {k: [] for k in self.blocks}
        self._held = {k: 0 for k in self.blocks}
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client → (group means, precisions)

    def feed(self, rows: torch.Tensor, y: torch.Tensor, var: torch.Tensor, client: torch.Tensor) -> None:
        """The next rows (indices ``rows`` (n,), in crossing order) with y (n, ...) = p/a, var (n,), client (n,)."""
        flat = y.reshape(y.shape[0], -1).double()
        v = var.double().clamp_min(EXACT_VAR)
        for k in torch.unique(client).tolist():
            mine = client == k
            self._pending[k].append((rows[mine], flat[mine], v[mine]))
            self._held[k] += int(mine.sum())
            self._match_ready(k)

    def _match_ready(self, k: int) -> None:
        blocks = self.blocks[k]
        while self._next[k] < len(blocks) and self._held[k] >= blocks[self._next[k]].numel():
            n = blocks[self._next[k]].numel()
            rows, flat, v = (torch.cat(parts) for parts in zip(*self._pending[k]))
            self._pending[k] = [(rows[n:], flat[n:], v[n:])] if rows.numel() > n else []
            self._held[k] -= n
            rows, flat, v = rows[:n], flat[:n], v[:n]
            if self._next[k] == 0:  # the anchors: one group each
                self._state[k] = (flat.clone(), 1.0 / v)
                self.sums.add(self.slot[rows], flat, v)
            else:
                mean, prec = self._state[k]
                r, c = assign_block(flat, v, mean, prec, self.prior, self.chunk)
                anchors = blocks[0][c]
                self.groups[rows[r]] = anchors
                self.sums.add(self.slot[anchors], flat[r], v[r])
            self._next[k] += 1

    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After the last shard: (fused mean of every group (G, d), its noise variance (G,), each row's
        group slot (N,)), float64 — row i's x̂ is mean[slot[i]]."""
        if any(self._next[k] < len(b) for k, b in self.blocks.items()):
            raise RuntimeError("StreamedLinking.fused: not every row was fed")
        slots = self.slot[self.groups]
        if bool((slots < 0).any()):
            raise RuntimeError("StreamedLinking.fused: a row was left unmatched")
        mean, noise_var = self.sums.result()
        return mean, noise_var, slots


def assign_block(y: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor,
                 prior: GaussianPrior | None = None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch block of :func:`link`: match rows y (n, d), noise variances v (n,) one-to-one to the groups
    (running fused means ``mean`` (G, d) and precisions ``prec`` (G,), updated in place with the matched
    rows). Returns (block row r_i, group c_i) of every match. Memory: the (n, G) cost matrix, plus
    temporaries bounded by ``chunk`` (:func:`link_cost`)."""
    cost = link_cost(y, v, mean, 1.0 / prec, prior, chunk)
    r, c = linear_sum_assignment(cost.numpy())
    r, c = torch.as_tensor(r), torch.as_tensor(c)
    w = 1.0 / v[r]
    mean[c] = (mean[c] * prec[c, None] + y[r] * w[:, None]) / (prec[c] + w)[:, None]
    prec[c] = prec[c] + w
    return r, c


@reconstruction_attack(NAME, threat="T1", needs=("epochs",), summary="link payloads across epochs, fuse them")
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources, chunk: int | None = None) -> Reconstruction:
    """Rows (N,C,H,W) → fused x̂ (N,C,H,W) of each row's linked group, the groups (N,) and the noise variance (N,).

    Uses ``resources.aux`` (when given) only for the linking prior; ``chunk``: rows per block of
    :func:`link_cost`'s temporaries (default: from the memory budget).
    """
    require_attack_inputs(view, schedule, resources)
    y, var = rescaled(view, schedule)
    prior = GaussianPrior.fit(resources.aux.images) if resources.aux is not None and len(resources.aux) > 1 else None
    groups = link(y, var, view.client, resources.epochs, prior, chunk)
    x, noise_var = fuse(y, var, groups)
    return Reconstruction(NAME, x.float(), groups=groups, noise_var=noise_var)


def perfect_linking(view: ViewArrays, schedule: NoiseSchedule, true_groups: torch.Tensor) -> Reconstruction:
    """The upper bound: fusion with the true grouping (N,) — supplied by a scorer from the audit key,
    never by an attacker. Reported beside the attacker's own linking."""
    require_attack_inputs(view, schedule, AttackerResources())
    y, var = rescaled(view, schedule)
    x, noise_var = fuse(y, var, true_groups)
    return Reconstruction(NAME + "-perfect-linking", x.float(), groups=true_groups, noise_var=noise_var)
