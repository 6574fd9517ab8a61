"""What every membership attack is: a pure score over signals, with its threats and its cost (§3, §4.2).

Signals are the model outputs (or payload / sample statistics) an attack needs,
computed once per target by :mod:`collafuse.attacks.membership.signals` and shared
between attacks. An attack module only turns signals into scores, so the math is
testable without any model.

Direction: every ``score`` returns values where HIGHER = MORE LIKELY A MEMBER.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from collafuse.threats import THREATS, check_threats  # noqa: F401  (THREATS: read here by the command)

Signals = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class AttackScores:
    """scores: (N,) float64, higher = more likely member. per_step: (N, S) or None, one column per
    entry of ``steps`` (the leakage-per-timestep curve is the AUC of each column).
    details: what the attack says about how it scored (JSON-ready values; e.g. the peer models a peer
    attack used), kept on its outcome. queries_per_image: the count where it depends on what the signals
    hold (e.g. the number of peer models), else None and the registry's ``queries_per_image`` applies."""

    scores: np.ndarray
    per_step: np.ndarray | None = None
    steps: tuple[int, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    queries_per_image: int | None = None


SCORE_FRACTION = 0.5


def low_noise_mean(per_step: np.ndarray, steps: np.ndarray, t_range: np.ndarray, fraction: float = SCORE_FRACTION) -> np.ndarray:
    """Mean of per-step scores (N, M) over the steps in the low-noise part of the model's range.

    A step counts when t ≤ t_min + fraction·(t_max − t_min) (at least the first step always
    counts). The literature attacks at low-to-middle noise (PIA t = 200, SecMI t = 100 of
    1000); at the noisy end a model's output hardly depends on the candidate and only adds
    variance. The choice is fixed in advance, never tuned on membership labels. (N,)
    """
    t_min, t_max = float(t_range[0]), float(t_range[1])
    steps = np.asarray(steps)
    keep = steps <= t_min + fraction * (t_max - t_min)
    keep[0] = True
    return np.asarray(per_step, dtype=np.float64)[:, keep].mean(axis=1)


def low_noise_scores(per_step: np.ndarray, steps: np.ndarray, t_range: np.ndarray) -> AttackScores:
    """Per-step scores (N, M) at ``steps`` (M,) → :class:`AttackScores`: their :func:`low_noise_mean`
    as the score, the per-step columns kept for the leakage-per-timestep curve."""
    return AttackScores(low_noise_mean(per_step, steps, t_range), per_step, tuple(int(t) for t in steps))


@dataclass(frozen=True)
class SignalSettings:
    """How signals are gathered (shared by every attack on a target).

    n_steps: M query timesteps spread over the model's own range (quadratic spacing, denser
             at low noise, where membership signals are strongest);
    n_noise: K noise draws per timestep for ``loss``;
    batch_size: images per batched denoiser forward;
    references: R reference models per target for the calibrated attacks (``lira``, ``rmia``:
                :mod:`~collafuse.attacks.membership.references`), each one client training; ≥ 2, so
                every candidate has an IN and an OUT reference.
    peer_noise: K for the peer attacks (``lira-peers``, ``rmia-peers``: every client model queried at the
                same draws); None: ``n_noise``, the reference attacks' draws, so ``lira`` and ``lira-peers``
                read the same target losses. A smaller K is what makes them fit a budget (the default audit):
                each peer query costs 1 + (N − 1) model forwards.
    """

    n_steps: int = 8
    n_noise: int = 4
    batch_size: int = 256
    references: int = 4
    peer_noise: int | None = None

    @property
    def peer_draws(self) -> int:
        """The noise draws per step of the peer attacks."""
        return self.n_noise if self.peer_noise is None else self.peer_noise

    def __post_init__(self) -> None:
        if self.n_steps < 1 or self.n_noise < 1 or self.batch_size < 1:
            raise ValueError(f"n_steps, n_noise and batch_size must be >= 1, got {self}")
        if isinstance(self.references, bool) or not isinstance(self.references, int) or self.references < 2:
            raise ValueError(f"references must be an integer >= 2, got {self.references!r}")
        if self.peer_noise is not None and (isinstance(self.peer_noise, bool) or not isinstance(self.peer_noise, int)
                                            or self.peer_noise < 1):
            raise ValueError(f"peer_noise must be None or an integer >= 1, got {self.peer_noise!r}")


@dataclass(frozen=True)
class MembershipAttack:
    """A registered attack.

    name: registry name; threats: subset of T1..T4; signals: names of the signals it reads;
    score: pure function signals → :class:`AttackScores` (higher = member);
    queries_per_image: model forwards per candidate image (0 when it reads no model), as a
    function of the settings and of M, the number of query steps the target's range allows
    (a signal shared with another attack is counted for each attack that reads it).
    """

    name: str
    summary: str
    threats: tuple[str, ...]
    signals: tuple[str, ...]
    score: Callable[[Signals], AttackScores]
    queries_per_image: Callable[[SignalSettings, int], int]
    direction: str = "higher = more likely member"
    reference: str = ""

    def __post_init__(self) -> None:
        check_threats(self.threats, f"attack {self.name!r}")
