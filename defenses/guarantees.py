"""Formal ε per client image for the payload channel, for a whole defense setting (DESIGN.md §5).

One release of an image at step t is a Gaussian mechanism with μ = Δ/s_t,
Δ = 2·a_t·min(C, √d) (``accounting.release_mu``). A defense setting changes:

- the step the release sits at (payload noise moves it to t'),
- the sensitivity (clipping: C),
- how many releases compose: ``epochs`` with the core's shuffled loader, one
  with ``single-release``, Binomial(rounds, q) with DP-SGD's Poisson loader;
- whether anything is unbounded: the ``naive`` payload sends its noise (ε = ∞),
  c = 0 without payload noise sends the image itself (ε = ∞), labels sent in
  the clear make the label's ε = ∞ (reported apart from the image's).

The worst case is assumed throughout: the attacker links every release of an
image (no credit for id-free or shuffled release), ``trajectory`` payloads are
counted at their lowest step t_c + 1 (later steps are post-processing of it),
and quantisation is post-processing (no credit).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

from collafuse.schedule import NoiseSchedule

from .accounting import (
    INF, as_json_number, composed_release_epsilon, from_json_number, gaussian_epsilon, l2_sensitivity,
    poisson_release_epsilon, release_mu,
)
from .payload_noise import noised_step

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PayloadGuarantee:
    """The payload channel's formal privacy per client image (replace-one-image adjacency)."""

    epsilon: float                 # the image, over the whole training
    delta: float
    per_release_epsilon: float     # one release alone
    mu_per_release: float          # Δ/s of one release
    t_release: int | None          # step the payload sits at (None: nothing crosses)
    a: float
    s: float
    sensitivity: float
    releases: str                  # how many releases compose, in words
    label_epsilon: float           # ∞ when labels are sent, 0 when they stay on the client
    note: str = ""
    # The whole training as one Gaussian mechanism: μ of one release × √(releases) (GDP composition, exact);
    # None where the count of releases is random (Poisson loader: no GDP form is claimed).
    mu: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in _UNBOUNDED:
            out[key] = as_json_number(out[key])
        if out["mu"] is not None:
            out["mu"] = as_json_number(out["mu"])
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PayloadGuarantee":
        """The value :meth:`to_json` wrote (run.json's ``payload_channel``); ε as rounded there."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in obj and n not in ("note", "mu")]
        if missing:
            raise ValueError(f"a payload guarantee record lacks {', '.join(missing)}")
        values = {n: obj[n] for n in names if n in obj}
        for key in _UNBOUNDED:
            values[key] = from_json_number(values[key])
        if values.get("mu") is not None:
            values["mu"] = from_json_number(values["mu"])
        return cls(**values)


_UNBOUNDED = ("epsilon", "per_release_epsilon", "mu_per_release", "label_epsilon")  # may be ∞: "inf" in JSON


@dataclass(frozen=True)
class PayloadTerms:
    """What a defense setting changes in the payload channel's guarantee (the keywords of
    :func:`payload_guarantee`). Each spec folds its own share in (``spec.payload_terms``): clipping
    its C, payload noise its σ, ``minimize`` single release and labels kept, DP-SGD its δ and its
    Poisson loader's rounds."""

    delta: float = DEFAULT_DELTA
    clip_norm: float | None = None
    noise_sigma: float = 0.0
    single_release: bool = False
    poisson_rounds: tuple[tuple[int, float], ...] | None = None  # (rounds, q) per client; None: shuffled loader
    labels_sent: bool = False

    def fold(self, specs: Iterable[Any], config) -> "PayloadTerms":
        """These terms with every spec's share folded in, in order."""
        terms = self
        for spec in specs:
            terms = spec.payload_terms(terms, config)
        return terms

    def keywords(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def payload_guarantee(
    schedule: NoiseSchedule,
    t_c: int,
    payload_kind: str,
    d: int,
    epochs: int,
    *,
    delta: float = DEFAULT_DELTA,
    clip_norm: float | None = None,
    noise_sigma: float = 0.0,
    single_release: bool = False,
    poisson_rounds: Sequence[tuple[int, float]] | None = None,
    labels_sent: bool = False,
) -> PayloadGuarantee:
    """ε of the payload channel for one client image. ``poisson_rounds``: (rounds, q) per client, or None
    for the core's shuffled loader (each image once per epoch); the worst client is reported."""
    T = schedule.T
    label_eps = INF if labels_sent else 0.0
    if t_c >= T:
        return PayloadGuarantee(0.0, delta, 0.0, 0.0, None, 0.0, 0.0, 0.0, "0 (cut_ratio 1: nothing crosses)", 0.0,
                                mu=0.0)
    if payload_kind == "naive":
        return PayloadGuarantee(
            INF, delta, INF, INF, None, 0.0, 0.0, 0.0, f"{epochs}", label_eps,
            "the naive payload sends its noise: x0 is exactly recoverable", mu=INF,
        )
    t = t_c if payload_kind == "cut" else t_c + 1
    t = noised_step(schedule.alpha_bar, t, noise_sigma) if noise_sigma > 0 else t
    a, s = schedule.a(t), schedule.s(t)
    mu = release_mu(a, s, d, clip_norm)
    sens = l2_sensitivity(a, d, clip_norm)
    per_release = gaussian_epsilon(mu, delta)
    total_mu: float | None
    if poisson_rounds:
        total_mu = None
        eps = max(poisson_release_epsilon(mu, rounds, q, delta, single_release) for rounds, q in poisson_rounds)
        rounds, q = max(poisson_rounds, key=lambda rq: rq[0] * rq[1])
        releases = f"Binomial({rounds}, {q:.4g}) (Poisson loader)" + (", single release" if single_release else "")
    elif single_release:
        eps, releases, total_mu = per_release, "1 (single-release)", mu
    else:
        eps, releases = composed_release_epsilon(mu, epochs, delta), f"{epochs} (one per epoch)"
        total_mu = mu * math.sqrt(epochs)
    note = "" if math.isfinite(eps) else "no noise on the payload (c = 0): the image itself crosses"
    return PayloadGuarantee(eps, delta, per_release, mu, t, a, s, sens, releases, label_eps, note, total_mu)
