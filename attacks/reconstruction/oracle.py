"""``oracle`` (T1, DESIGN.md §4.1): the Bayes-optimal ceiling for a pool that holds the true image.

With candidates x_1..x_M and a uniform prior, the posterior given p = a x0 + s ε is
w_i ∝ exp(−‖p − a x_i‖² / 2s²) = exp(−(a²/2s²) ‖p/a − x_i‖²). The reconstruction is
the posterior mean Σ w_i x_i (minimum MSE for that prior) and re-identification is
argmax_i w_i (minimum top-1 error). Not a realistic attacker: it is what every
other attack is compared to. With the noise known (``naive``) the observation is
exact and the posterior puts all its mass on the nearest candidate.

Several epochs. This attack is the single-payload ceiling the design defines: it
reads one row at a time. The server holds E payloads of every image, and with 10
epochs ``multiview`` (which fuses the views it links itself) beat it on
re-identification (digits, c = 0.3–0.4). The ceiling for that is
:func:`all_views`, reported as ``oracle-all-views``: the same posterior given every
view of the image, log w_i = Σ_k −(a_k²/2s_k²)‖p_k/a_k − x_i‖² over the rows k of one
image. It needs to know which rows show the same image, so a scorer computes it from
the true linking (the audit key) after the attacks ran — an upper bound, like
``multiview-perfect-linking``, not an attack. It holds strictly more than any
attacker (all views and the true linking), so no attack — ``multiview`` with its own
or with perfect linking included — can beat it in expectation over images drawn from
the pool: its posterior mean minimises the expected MSE and its argmax the expected
re-identification error (pointwise, a lucky row can still go either way). (Its argmax is the
candidate nearest to the perfectly linked fused estimate Σ(a_k p_k/s_k²)/Σ(a_k²/s_k²),
since Σ_k prec_k ‖y_k − x‖² = (Σ_k prec_k)‖ȳ − x‖² + const.)
"""
from __future__ import annotations

import torch

from collafuse.schedule import NoiseSchedule

from collafuse.attacks.chunking import memory_budget_bytes, row_slices, rows_per_chunk
from collafuse.attacks.reconstruction.registry import reconstruction_attack
from collafuse.attacks.reconstruction.view import (
    AttackerResources, PoolLogWeights, Reconstruction, ViewArrays, rescaled, require_attack_inputs,
)

NAME = "oracle"
EXACT_PRECISION = 1e12  # a²/s² used when the observation is exact (noise known or t = 0)
# Bytes one (row, candidate) pair holds while a chunk is alive: cdist's float64 product and
# distance, the log weights and their softmax.
BYTES_PER_PAIR = 32


def posterior_log_weights(y: torch.Tensor, precision: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """log w (N, M) up to a per-row constant: −(precision/2) ‖y_n − x_m‖², with y = p/a (N,C,H,W),
    precision = a²/s² (N,), candidates (M,C,H,W). float64."""
    d2 = torch.cdist(y.reshape(y.shape[0], -1).double(), candidates.reshape(candidates.shape[0], -1).double()).pow(2)
    return -0.5 * precision.double()[:, None] * d2


def _precision(var: torch.Tensor) -> torch.Tensor:
    """a²/s² per row from the rescaled variance s²/a² (N,); :data:`EXACT_PRECISION` where the observation is exact."""
    return torch.where(var > 0, 1.0 / var.clamp_min(1e-300), torch.full_like(var, EXACT_PRECISION))


def posterior_mean(log_w: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Σ_m softmax(log w)_nm x_m, shape (N,C,H,W)."""
    w = torch.softmax(log_w, dim=1)
    return (w @ candidates.reshape(candidates.shape[0], -1).double()).reshape(-1, *candidates.shape[1:]).float()


def _fits(n: int, m: int, chunk: int | None) -> bool:
    """Keep the (n, m) float32 log weights whole? Only when no chunk was asked for and they fit the budget."""
    return chunk is None and n * m * 4 <= memory_budget_bytes()


def observations(view: ViewArrays, schedule: NoiseSchedule, rows: "slice | torch.Tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(y = p/a (n,C,H,W) float64, precision a²/s² (n,)) of the view's rows ``rows``: per-row formulas,
    so a chunk's values are those of the whole view's."""
    y, var = rescaled(view.subset(rows), schedule)
    return y, _precision(var)


def block_log_weights(view: ViewArrays, schedule: NoiseSchedule, candidates: torch.Tensor, rows) -> torch.Tensor:
    """log w (n, M) of the rows ``rows`` against ``candidates`` (float64)."""
    return posterior_log_weights(*observations(view, schedule, rows), candidates)


@reconstruction_attack(NAME, threat="T1", needs=("candidates",), summary="Bayes posterior over a pool holding the truth")
def attack(view: ViewArrays, schedule: NoiseSchedule, resources: AttackerResources, chunk: int | None = None) -> Reconstruction:
    """Rows (N,C,H,W) → posterior means (N,C,H,W) and log weights (N, M) over ``resources.candidates``.

    In bounded memory (DESIGN §10): ``chunk`` rows at a time (default: the memory budget of
    :mod:`collafuse.attacks.chunking` over M candidates); the (N, M) log weights are a
    :class:`PoolLogWeights` that scorers read block by block: kept whole (float32) when they fit the
    budget, else recomputed block by block from the view (the same values: per-row formulas)."""
    require_attack_inputs(view, schedule, resources)
    cand = resources.candidates.double()
    m = cand.shape[0]
    size = rows_per_chunk(m, BYTES_PER_PAIR, chunk)
    keep = _fits(len(view), m, chunk)  # small enough to keep: scorers then read it without recomputing
    images, kept = [], []
    for sl in row_slices(len(view), size):
        lw = block_log_weights(view, schedule, cand, sl)
        images.append(posterior_mean(lw, cand))
        if keep:
            kept.append(lw.float())
    if keep:
        weights = PoolLogWeights.of(torch.cat(kept) if kept else torch.empty(0, m), size)
    else:
        weights = PoolLogWeights((len(view), m), lambda rows: block_log_weights(view, schedule, cand, rows).float(), size)
    return Reconstruction(
        NAME,
        torch.cat(images) if images else torch.empty(0, *view.image_shape),
        pool_log_weights=weights,
    )


def all_views(view: ViewArrays, schedule: NoiseSchedule, candidates: torch.Tensor, true_groups: torch.Tensor,
              chunk: int | None = None) -> Reconstruction:
    """The upper bound ``oracle-all-views``: each row's image's posterior over ``candidates`` (M,C,H,W)
    given every row of its group, with the true grouping (N,) supplied by a scorer from the audit key,
    never by an attacker (module docstring). Rows (N,C,H,W) → posterior means (N,C,H,W) (equal within
    a group) and log weights (N, M), each row shifted so that its maximum is 0.

    Memory: ``chunk`` rows (default: from the memory budget) against the pool at a time, plus the
    (groups, M) sums; the groups are the distinct images, at most the pool's size, whatever N is."""
    require_attack_inputs(view, schedule, AttackerResources())
    if true_groups.shape != (len(view),):
        raise ValueError(f"true_groups must have shape ({len(view)},), got {tuple(true_groups.shape)}")
    cand = candidates.double()
    _, g = torch.unique(true_groups, return_inverse=True)
    sums = AllViewsSums(cand, int(g.max()) + 1 if g.numel() else 0, chunk)
    sums.add(view, schedule, g, 0)
    group_w, means = sums.result()
    if _fits(len(view), cand.shape[0], chunk):
        weights = PoolLogWeights.of(group_w[g], sums.size)
    else:
        weights = PoolLogWeights((len(view), cand.shape[0]), lambda rows: group_w[g[rows]], sums.size)
    return Reconstruction(NAME + "-all-views", means[g] if g.numel() else means, pool_log_weights=weights)


class AllViewsSums:
    """The (groups, M) sums of log weights behind :func:`all_views`, filled a view (or shard) at a time.

    :meth:`add` takes rows in row order, ``size`` rows against the pool at a time, the chunks laid
    from row 0 of the whole view (``first_row``), so a view fed shard by shard, each shard starting
    on a chunk boundary, gives the numbers of one call over every row (DESIGN §10)."""

    def __init__(self, candidates: torch.Tensor, groups: int, chunk: int | None = None):
        self.cand = candidates.double()
        self.size = rows_per_chunk(self.cand.shape[0], BYTES_PER_PAIR, chunk)
        self.group_lw = torch.zeros(groups, self.cand.shape[0], dtype=torch.float64)

    def add(self, view: ViewArrays, schedule: NoiseSchedule, slots: torch.Tensor, first_row: int) -> None:
        """The rows of ``view`` (rows ``first_row``.. of the whole view) into the groups ``slots`` (len(view),)."""
        if first_row % self.size:
            raise ValueError(f"a shard must start on a chunk boundary ({self.size} rows), got row {first_row}")
        for sl in row_slices(len(view), self.size):  # Σ_k log w over the views of each image, rows in order
            self.group_lw.index_add_(0, slots[sl], block_log_weights(view, schedule, self.cand, sl))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(each group's log weights (groups, M) float32, shifted so that each row's maximum is 0; its
        posterior mean (groups, C, H, W) float32). The sums are consumed."""
        group_lw, k = self.group_lw, self.group_lw.shape[0]
        if k:
            group_lw -= group_lw.max(1, keepdim=True).values  # a per-row constant: keeps the differences exact in float32
        means = (torch.cat([posterior_mean(group_lw[sl], self.cand) for sl in row_slices(k, self.size)]) if k
                 else torch.empty(0, *self.cand.shape[1:]))
        group_w = group_lw.float()
        self.group_lw = torch.empty(0, self.cand.shape[0], dtype=torch.float64)
        return group_w, means
