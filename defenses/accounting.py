"""Formal privacy accounting, as pure functions (DESIGN.md §5).

The payload channel. One release of a client image x0 is p = a·x0 + s·ε with
ε ~ N(0, I): a Gaussian mechanism whose noise standard deviation is s and whose
L2 sensitivity (replace one image by another) is

    Δ = a · ‖x0 − x0'‖ ≤ 2a√d     (pixels in [-1, 1]^d, no clipping)
    Δ = a · ‖x0 − x0'‖ ≤ 2aC      (every image clipped to L2 norm ≤ C, see ``payload-clip``)

so its privacy is a function of μ = Δ/s alone (Gaussian differential privacy,
Dong, Roth & Su 2019). The tight (ε, δ) of one release is the analytic Gaussian
mechanism of Balle & Wang (2018, Theorem 8):

    δ(ε; μ) = Φ(μ/2 − ε/μ) − e^ε · Φ(−μ/2 − ε/μ),

and ε(δ) is its inverse, found here by bracketing in log space (e^ε overflows
for the ε ≈ 5e3 that a low cut point gives). k releases of the same image with
fresh noise compose EXACTLY to one Gaussian mechanism with μ√k (μ-GDP composes
as √Σμ_i², Dong et al. 2019, Corollary 2). When DP-SGD's Poisson loader picks the
batches, the number of releases of an image is random; since the sampling does
not depend on the image's value, δ(ε) is the expectation of the Gaussian δ over
that count (joint convexity), see :func:`poisson_release_epsilon`. (Opacus'
accountants are for add/remove adjacency of a SUM, DP-SGD's gradient; a payload
row that appears or not is not a bounded change of a sum, so they do not apply
to the payload channel.)

DP-SGD. ε of a model trained with Opacus comes from Opacus' own accountants;
:func:`dpsgd_epsilon` is the direct call on a history of
(noise multiplier, sample rate, steps) and :func:`calibrate_noise_multiplier`
is the inverse (σ for a target ε).

Everything here is a function of numbers: no model, no config, no state.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from collafuse.jsonio import decode_number, encode_number

INF = float("inf")
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
FLOOR_SIGMA = 1000.0  # a target ε that needs more noise than this is reported unreachable


def l2_sensitivity(a: float, d: int, clip_norm: float | None = None) -> float:
    """Δ of one release p = a·x0 + s·ε, for x0 in [-1, 1]^d (optionally clipped to ‖x0‖ ≤ C).

    Two images in [-1, 1]^d differ by at most 2√d in L2; two clipped images by at
    most 2C. Both bounds hold at once, so the smaller one applies (DESIGN §5).
    """
    if a < 0 or d < 1:
        raise ValueError(f"need a >= 0 and d >= 1, got a={a}, d={d}")
    radius = math.sqrt(d)
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        radius = min(radius, float(clip_norm))
    return 2.0 * a * radius


def gaussian_mu(sensitivity: float, noise_std: float) -> float:
    """μ = Δ/σ of a Gaussian mechanism (∞ when there is no noise and Δ > 0; 0 when Δ = 0)."""
    if sensitivity < 0 or noise_std < 0:
        raise ValueError(f"sensitivity and noise_std must be >= 0, got {sensitivity}, {noise_std}")
    if sensitivity == 0:
        return 0.0
    if noise_std == 0:
        return INF
    return sensitivity / noise_std


def gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of a μ-GDP (Gaussian) mechanism; Balle & Wang (2018), Theorem 8.

    δ = Φ(μ/2 − ε/μ) − exp(ε + log Φ(−μ/2 − ε/μ)), computed in log space.
    """
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    hi = ndtr(mu / 2.0 - epsilon / mu)
    lo = math.exp(epsilon + float(log_ndtr(-mu / 2.0 - epsilon / mu)))
    return max(0.0, float(hi - lo))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε; μ) ≤ δ: the tight (ε, δ) of one Gaussian mechanism (Balle & Wang 2018).

    μ = Δ/σ; μ = ∞ (no noise) gives ε = ∞; μ = 0 gives 0.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu < 0 or math.isnan(mu):
        raise ValueError(f"mu must be >= 0, got {mu}")
    if math.isinf(mu):
        return INF
    if mu == 0 or gaussian_delta(0.0, mu) <= delta:
        return 0.0
    # δ(ε) decreases in ε; for ε ≥ μ²/2 + μ·z with Φ(−z) = δ the first term alone is ≤ δ.
    upper = mu * mu / 2.0 + mu * (abs(float(_norm_ppf(delta))) + 1.0) + 1.0
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, upper, xtol=1e-12, rtol=1e-12, maxiter=500))


def _norm_ppf(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def release_mu(a: float, s: float, d: int, clip_norm: float | None = None) -> float:
    """μ of one payload release p = a·x0 + s·ε of a d-pixel image (DESIGN §5)."""
    return gaussian_mu(l2_sensitivity(a, d, clip_norm), s)


def release_epsilon(a: float, s: float, d: int, delta: float, clip_norm: float | None = None) -> float:
    """ε of ONE payload release (analytic Gaussian mechanism), sensitivity 2a√d or 2aC."""
    return gaussian_epsilon(release_mu(a, s, d, clip_norm), delta)


def compose_gaussian_mu(mus: Iterable[float]) -> float:
    """μ of the adaptive composition of Gaussian mechanisms μ_1, μ_2, …: √Σμ_i² (exact; Dong et al. 2019)."""
    total = 0.0
    for mu in mus:
        if math.isinf(mu):
            return INF
        total += mu * mu
    return math.sqrt(total)


def composed_release_epsilon(mu: float, releases: int, delta: float) -> float:
    """ε of ``releases`` releases of one image, each with fresh noise and the same μ (DESIGN §5).

    The composition of k Gaussian mechanisms with μ is exactly one with μ√k (GDP,
    Dong et al. 2019), so this is tight, not a bound. One release per epoch with a
    shuffled loader gives ``releases`` = epochs.
    """
    if releases < 0:
        raise ValueError(f"releases must be >= 0, got {releases}")
    if releases == 0 or mu == 0:
        return 0.0
    if math.isinf(mu):
        return INF
    return gaussian_epsilon(mu * math.sqrt(releases), delta)


def mixture_delta(epsilon: float, mu: float, release_pmf: Sequence[float], single_release: bool = False) -> float:
    """δ(ε) when the image is released r times with probability ``release_pmf[r]`` (r = 0, 1, …).

    The sampling pattern does not depend on the image's value, so under replace-one
    adjacency the two worlds are mixtures with the same weights, and by joint
    convexity of the hockey-stick divergence δ(ε) ≤ Σ_r P(r)·δ_G(ε; μ√r). With a
    single release (one fixed noise draw, repeats identical) r releases reveal what
    one does: μ√min(r, 1).
    """
    total = 0.0
    for r, p in enumerate(release_pmf):
        if p <= 0 or r == 0:
            continue
        k = 1 if single_release else r
        total += p * gaussian_delta(epsilon, mu * math.sqrt(k))
    return total


def poisson_release_epsilon(mu: float, rounds: int, sample_rate: float, delta: float, single_release: bool = False) -> float:
    """ε of an image that takes part in each of ``rounds`` rounds with probability q (Poisson sampling).

    This is the payload channel when DP-SGD's Poisson loader picks the client's
    batches: the number of releases is Binomial(rounds, q). The bound assumes the
    attacker links every release of the image (the worst case) and claims no
    amplification beyond the randomness of the count; see :func:`mixture_delta`.
    """
    from scipy.stats import binom

    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds <= 0 or mu == 0:
        return 0.0
    if math.isinf(mu):
        return INF
    pmf = binom.pmf(np.arange(rounds + 1), rounds, sample_rate)
    if mixture_delta(0.0, mu, pmf, single_release) <= delta:
        return 0.0
    k_max = 1 if single_release else rounds
    upper = gaussian_epsilon(mu * math.sqrt(k_max), delta) + 1.0  # the r = rounds case dominates every term
    return float(
        brentq(lambda e: mixture_delta(e, mu, pmf, single_release) - delta, 0.0, upper, xtol=1e-10, rtol=1e-12, maxiter=500)
    )


def dpsgd_epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """ε after DP-SGD with this history of (noise multiplier, sample rate, steps); Opacus' accountant.

    This is exactly the call Opacus makes for its own ``get_epsilon``, so a model's
    logged ε can be checked against it.
    """
    from opacus.accountants import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    with quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def quiet_accountant():
    """Opacus' accountants warn on every call at the edges of their search ("Optimal order is the largest
    alpha", log(0) in the RDP conversion): expected there, and the ε they return is still the bound. Silenced
    so an audit's output holds its verdict, not pages of them; any other warning still shows."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        yield


@functools.lru_cache(maxsize=256)  # a pure function of numbers, and Opacus' search is slow
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The noise multiplier σ that spends ``target_epsilon`` at ``delta`` in ``steps`` Poisson steps (Opacus).

    Raises ``ValueError`` (with Opacus' reason) when no σ up to Opacus' maximum reaches it.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    if target_epsilon < 1.0:
        # Below ε ≈ 0.1 (RDP) or 0.03 (PRV) an accountant's numerical floor is reached at any
        # σ; one evaluation at σ = 1000 (already a gradient drowned in noise) says so at once
        # instead of after Opacus' whole search up to MAX_SIGMA.
        floor = dpsgd_epsilon([(FLOOR_SIGMA, sample_rate, steps)], delta, accountant)
        if floor > target_epsilon:
            raise ValueError(f"the {accountant} accountant reports epsilon {floor:.3g} even at noise multiplier {FLOOR_SIGMA:g}")
    with quiet_accountant():
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant,
        )
    return float(sigma)


def as_json_number(value: float) -> float | str:
    """ε for run.json, rounded to 6 decimals (a record of an accountant, not a measurement) and encoded by
    the project's one JSON codec (:func:`collafuse.jsonio.encode_number`: ∞ → "inf").

    Read it back with :func:`from_json_number`."""
    return encode_number(value if math.isinf(value) else float(np.round(value, 6)))


def from_json_number(value: float | int | str | None) -> float:
    """ε read back from run.json: :func:`collafuse.jsonio.decode_number`, except that ``None`` (no bound
    recorded) reads as ∞, the conservative reading. Anything that is not a number or "inf" is refused."""
    if value is None:
        return INF
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
            isinstance(value, str) and decode_number(value) != INF):
        raise ValueError(f"not an epsilon as run.json writes it (a number or \"inf\"): {value!r}")
    return decode_number(value)
