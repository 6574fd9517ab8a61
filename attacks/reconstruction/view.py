"""What a T1 attacker holds (DESIGN.md §2.5, §3, §4.1), as typed values.

- :class:`ViewArrays`: the server view, as arrays — exactly the fields that crossed
  the wire (tensor, t, label, noise for the ``naive`` kind) plus what the server
  observes anyway (which client sent a row, the training step, the order ``seq``).
  It has no field for a member index, and it refuses to be built from anything
  that carries one: the audit key cannot get in.
- :class:`AttackerResources`: what the attacker owns besides the view — its public
  auxiliary images, the denoiser it trained on them, a candidate pool (the
  oracle), the number of epochs it knows the protocol ran, a seed.
- :class:`Reconstruction`: what every attack returns.

:func:`require_attack_inputs` is the first line of every attack entry point.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from collafuse.data import ImageSet
from collafuse.schedule import NoiseSchedule, gather
from collafuse.device import CPU, resolve_device
from collafuse.transcript import AuditKey, ServerView

# Every key ServerView.load() may return. Anything else (e.g. "member_index") is refused.
VIEW_KEYS: frozenset[str] = frozenset({"seq", "step", "t", "tensor", "wire_bytes", "label", "noise", "client"})


class AuditKeyLeak(TypeError):
    """An attack was handed the audit key (or something derived from it): a bug, never user input."""


def _refuse_key(value: object, where: str) -> None:
    if isinstance(value, AuditKey):
        raise AuditKeyLeak(f"{where}: attacks never receive the audit key (DESIGN.md §2.5)")


@dataclass(frozen=True)
class ViewArrays:
    """The server view as tensors. N rows, sorted by ``seq`` (crossing order).

    tensor: (N, C, H, W) float32 payloads; t: (N,) int64 step of each row;
    client: (N,) int64 sender as the server sees it (−1: hidden, an id-free release); step: (N,)
    int64 training step (the round, for an id-free release); seq: (N,) int64;
    label: (N,) int64 or None (not sent); noise: (N, C, H, W) or None (only ``naive``);
    wire_bytes: (N,) int64 bytes each row took on the wire (its real dtype), or None (not given).
    Rows of one message share a step: the order of arrival and the batches are in seq and step.
    """

    tensor: torch.Tensor
    t: torch.Tensor
    client: torch.Tensor
    step: torch.Tensor
    seq: torch.Tensor
    label: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    wire_bytes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _refuse_key(value, f"ViewArrays.{f.name}")
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"ViewArrays.{f.name} must be a tensor, got {type(value).__name__}")
        n = self.tensor.shape[0]
        if self.tensor.ndim != 4:
            raise ValueError(f"ViewArrays.tensor must be (N, C, H, W), got {tuple(self.tensor.shape)}")
        for name in ("t", "client", "step", "seq", "label", "wire_bytes"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"ViewArrays.{name} must have shape ({n},), got {tuple(value.shape)}")
        if self.noise is not None and self.noise.shape != self.tensor.shape:
            raise ValueError("ViewArrays.noise must have the shape of the tensor")

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.tensor.shape[1:])  # type: ignore[return-value]

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor]) -> "ViewArrays":
        """Build from the dict :meth:`ServerView.load` returns; unknown keys are refused."""
        _refuse_key(rows, "ViewArrays.from_rows")
        if not isinstance(rows, dict):
            raise TypeError(f"expected the dict ServerView.load() returns, got {type(rows).__name__}")
        extra = set(rows) - VIEW_KEYS
        if extra:
            raise AuditKeyLeak(f"server-view rows carry fields the server never sees: {', '.join(sorted(extra))}")
        n = rows["tensor"].shape[0]
        client = rows.get("client")
        return cls(
            tensor=rows["tensor"].float(),
            t=rows["t"].long(),
            client=client.long() if client is not None else torch.zeros(n, dtype=torch.long),
            step=rows["step"].long(),
            seq=rows["seq"].long(),
            label=rows["label"].long() if "label" in rows else None,
            noise=rows["noise"].float() if "noise" in rows else None,
            wire_bytes=rows["wire_bytes"].long() if "wire_bytes" in rows else None,
        )

    @classmethod
    def from_server_view(cls, view: ServerView) -> "ViewArrays":
        """All rows of a :class:`ServerView` (hash-checked shards), in crossing order."""
        _refuse_key(view, "ViewArrays.from_server_view")
        if not isinstance(view, ServerView):
            raise TypeError(f"expected a ServerView, got {type(view).__name__}")
        return cls.from_rows(view.load())

    def subset(self, index: torch.Tensor) -> "ViewArrays":
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return ViewArrays(
            self.tensor[index], self.t[index], self.client[index], self.step[index], self.seq[index],
            pick(self.label), pick(self.noise), pick(self.wire_bytes),
        )


@dataclass(frozen=True)
class AttackerResources:
    """The attacker's own means (DESIGN.md §4.1). None = the attacker does not have it.

    aux: public auxiliary images (never the clients' data); denoiser: an
    :class:`~collafuse.attacks.reconstruction.denoiser.AttackerDenoiser` trained on aux over
    all t; candidates: (M, C, H, W) a candidate pool that contains the true images (only the
    ``oracle`` uses it; it is the ceiling, not a realistic attacker); epochs: how many epochs
    the protocol ran (public protocol knowledge the server has; ``multiview`` links with it);
    ddim_steps: steps of the ``ddim`` attack; inversion_steps: optimiser steps of the
    ``inversion`` network; seed: every random draw of an attack derives from it; device: where the
    attacker's networks (denoiser, inversion net) train and run (resolved: ``auto`` → CUDA if available).
    """

    aux: ImageSet | None = None
    denoiser: torch.nn.Module | None = None
    candidates: torch.Tensor | None = None
    epochs: int | None = None
    ddim_steps: int = 4
    inversion_steps: int = 300
    seed: int = 0
    device: torch.device = CPU

    def __post_init__(self) -> None:
        for f in fields(self):
            _refuse_key(getattr(self, f.name), f"AttackerResources.{f.name}")
        if self.aux is not None and not isinstance(self.aux, ImageSet):
            raise TypeError(f"AttackerResources.aux must be an ImageSet, got {type(self.aux).__name__}")
        if self.candidates is not None and (not isinstance(self.candidates, torch.Tensor) or self.candidates.ndim != 4):
            raise TypeError("AttackerResources.candidates must be a (M, C, H, W) tensor")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"AttackerResources.epochs must be >= 1, got {self.epochs}")
        if self.ddim_steps < 1:
            raise ValueError(f"AttackerResources.ddim_steps must be >= 1, got {self.ddim_steps}")
        object.__setattr__(self, "device", resolve_device(self.device))  # "auto"/"cuda"/a torch.device → one device


class PoolLogWeights:
    """An (N, M) matrix of log posterior weights over a candidate pool, never held whole (DESIGN §10).

    ``block(rows)`` computes the float32 rows ``rows`` (an int64 index tensor) on demand; readers
    go through :meth:`blocks`, ``chunk`` rows at a time, so scoring N rows against M candidates
    holds one (chunk, M) block at once. Indexing (``w[rows]``, ``w.dense()``) materialises rows
    and is meant for small inputs and tests. :meth:`of` wraps a tensor already in memory.
    """

    def __init__(self, shape: tuple[int, int], block, chunk: int):
        self.shape = (int(shape[0]), int(shape[1]))
        self._block = block
        self.chunk = max(1, int(chunk))

    @classmethod
    def of(cls, matrix: torch.Tensor, chunk: int | None = None) -> "PoolLogWeights":
        """A matrix held in memory, read ``chunk`` rows at a time (default: all at once)."""
        if matrix.ndim != 2:
            raise ValueError(f"pool log weights must be (N, M), got {tuple(matrix.shape)}")
        return cls(tuple(matrix.shape), lambda rows: matrix[rows], chunk or max(1, matrix.shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, rows: torch.Tensor | None = None):
        """(positions into ``rows``, block (len, M) float32) over ``rows`` (default all), ``chunk`` rows at a time."""
        rows = torch.arange(self.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long).flatten()
        for start in range(0, rows.numel(), self.chunk):
            pos = torch.arange(start, min(rows.numel(), start + self.chunk))
            yield pos, self._block(rows[pos])

    def __getitem__(self, index) -> torch.Tensor:
        rows = torch.arange(self.shape[0])[index]
        single = rows.ndim == 0
        out = torch.cat([b for _, b in self.blocks(rows.reshape(-1))]) if rows.numel() else torch.empty(0, self.shape[1])
        return out[0] if single else out

    def dense(self) -> torch.Tensor:
        return self[:]

    def argmax(self, dim: int = 1) -> torch.Tensor:
        """Per-row argmax (N,), block by block."""
        if dim not in (1, -1):
            raise ValueError("PoolLogWeights.argmax works along the candidates (dim 1)")
        parts = [b.argmax(1) for _, b in self.blocks()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def double(self) -> torch.Tensor:
        return self.dense().double()

    def float(self) -> torch.Tensor:
        return self.dense()


@dataclass(frozen=True)
class Reconstruction:
    """What an attack returns. ``images``: (N, C, H, W) float32 estimates of x0 in [-1, 1]
    space, one per view row (not clipped: scoring clips to the valid range).

    ``pool_log_weights``: (N, M) unnormalised log posterior over
    ``AttackerResources.candidates`` (the ``oracle``; re-identification = argmax), or None; a
    :class:`PoolLogWeights` computed block by block (a tensor given here is wrapped in one).
    ``groups``: (N,) int64, the row index of the anchor each row was linked to
    (``multiview``), or None. ``noise_var``: (N,) per-pixel variance of the estimate's
    Gaussian noise when it has a closed form (``multiview``: 1/Σ a_k²/s_k²), or None.
    """

    attack: str
    images: torch.Tensor
    pool_log_weights: PoolLogWeights | None = None
    groups: torch.Tensor | None = None
    noise_var: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pool_log_weights, torch.Tensor):
            object.__setattr__(self, "pool_log_weights", PoolLogWeights.of(self.pool_log_weights))


def require_attack_inputs(view: object, schedule: object, resources: object) -> None:
    """First line of every attack: the three inputs have the allowed types — never the audit key."""
    for name, value in (("view", view), ("schedule", schedule), ("resources", resources)):
        _refuse_key(value, f"attack argument {name!r}")
    if not isinstance(view, ViewArrays):
        raise TypeError(f"attack argument 'view' must be ViewArrays, got {type(view).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"attack argument 'schedule' must be a NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(resources, AttackerResources):
        raise TypeError(f"attack argument 'resources' must be AttackerResources, got {type(resources).__name__}")
    if len(view) and (int(view.t.min()) < 0 or int(view.t.max()) > schedule.T):
        raise ValueError(f"view steps must lie in 0..T={schedule.T}, got {int(view.t.min())}..{int(view.t.max())}")


def signal_noise(t: torch.Tensor, schedule: NoiseSchedule, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row a_t = √ᾱ_t and s_t = √(1-ᾱ_t) (§2.1), float64, shaped (N, 1, 1, 1) for ``ndim`` = 4."""
    ab = gather(schedule.alpha_bar, t.long(), ndim, torch.float64)
    return ab.sqrt(), (1.0 - ab).sqrt()


def known_noise_x0(view: ViewArrays, schedule: NoiseSchedule) -> torch.Tensor | None:
    """x0 = (p − s ε)/a when the view carries the noise (``naive`` payloads, §2.2): exact. Else None."""
    if view.noise is None:
        return None
    a, s = signal_noise(view.t, schedule)
    return ((view.tensor.double() - s * view.noise.double()) / a).float()


def rescaled(view: ViewArrays, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row in x0 units: y = p/a (or the exact x0 when the noise is known), float64, and its
    per-pixel noise variance v = s²/a² (0 when exact), shape (N,)."""
    exact = known_noise_x0(view, schedule)
    if exact is not None:
        return exact.double(), torch.zeros(len(view), dtype=torch.float64)
    a, s = signal_noise(view.t, schedule)
    return view.tensor.double() / a, (s * s / (a * a)).flatten()
