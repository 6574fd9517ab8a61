"""The one-run privacy audit of Steinke, Nasr & Jagielski (2023, "Privacy auditing with one (1) training
run", arXiv 2305.08846; DESIGN.md §4.3).

m canaries are each included in the training set independently with probability ½. The auditor
scores every canary, guesses "IN" for its k₊ highest scores and "OUT" for its k₋ lowest, and abstains
on the rest; v of its r = k₊ + k₋ guesses are correct. If the training is (ε, δ)-DP, v is dominated
by Binomial(r, q), q = e^ε/(1 + e^ε), up to a δ term (the paper's Theorem 5.2 / Corollary 5.4):

    p-value(ε) = P[Binomial(r, q) ≥ v] + 2mδ · max_{i = 1..v} P[v − i ≤ Binomial(r, q) < v] / i

(the paper's Appendix D, ``p_value_DP_audit``). ε_LB at confidence 1 − β is the largest ε whose
p-value is still below β (bisection, as the paper's ``get_eps_audit``): with probability ≥ 1 − β
over the canaries' inclusion, a mechanism with ε < ε_LB could not have produced v correct guesses.

Pure functions; no model, no data. Two rules keep the bound honest (DESIGN §4.3):

- **Ties are never right guesses.** Where the k₊-th highest score ties with canaries outside the top
  k₊, the auditor abstains on the whole tied value (likewise at the bottom), so the guesses, and the
  bound, depend on the scores' values only, never on the order the canaries are listed in: constant
  scores give no guess and ε_LB = 0.
- **Guess sizes are fixed in advance.** The audit tries a small set of sizes (:data:`GUESS_FRACTIONS` of
  m per side) and splits the confidence between them (a union bound: each at β/|sizes|); the
  reported bound is the largest. The sizes never depend on the labels.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.stats import binom

from collafuse.jsonio import encode

BISECTION_STEPS = 60
EPS_CAP = 100.0  # beyond this every p-value underflows; a bound this large reads "no privacy"
GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)  # k₊ = k₋ = ⌊f·m⌋ per side, fixed in advance


def p_value(correct: int, guesses: int, m: int, epsilon: float, delta: float) -> float:
    """The probability, under (ε, δ)-DP, of ≥ ``correct`` right guesses out of ``guesses`` (Corollary 5.4)."""
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    i = np.arange(1, correct + 1)
    # P[v − i ≤ Binomial < v] = P[B ≥ v − i] − P[B ≥ v]
    window = binom.sf(correct - i - 1, guesses, q) - tail
    alpha = float(np.max(window / i))
    return min(tail + alpha * delta * 2 * m, 1.0)


def _check(correct: int, k_plus: int, k_minus: int, m: int, delta: float, beta: float) -> None:
    for name, v in (("correct", correct), ("k_plus", k_plus), ("k_minus", k_minus), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} guesses exceed the m = {m} canaries")
    if correct > k_plus + k_minus:
        raise ValueError(f"correct = {correct} exceeds the {k_plus + k_minus} guesses")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must lie in (0, 1), got {beta!r}")


def one_run_epsilon_lb(correct: int, k_plus: int, k_minus: int, m: int, delta: float, beta: float) -> float:
    """ε lower bound at confidence 1 − β from ``correct`` right guesses among k₊ + k₋ (m canaries, δ).

    0 when even ε = 0 explains the guesses (p-value ≥ β). Monotone: more correct guesses never lower it.
    """
    _check(correct, k_plus, k_minus, m, delta, beta)
    return _epsilon_lb(int(correct), int(k_plus) + int(k_minus), int(m), float(delta), float(beta))


@functools.lru_cache(maxsize=65536)
def _epsilon_lb(correct: int, r: int, m: int, delta: float, beta: float) -> float:
    """The bisection of :func:`one_run_epsilon_lb` (cached: audits of many runs share few (v, r) pairs)."""
    if r == 0 or p_value(correct, r, m, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p_value(lo) < beta <= p_value(hi)
    while p_value(correct, r, m, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > EPS_CAP:
            return math.inf
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(correct, r, m, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    """One one-run audit: the bound and what it came from (``to_json`` is the ``one_run`` entry).

    ``k_plus`` / ``k_minus``: the guess size per side that gave the bound (from ``sizes``, fixed in
    advance); ``guesses``: the guesses actually made at that size, after abstaining on ties;
    ``confidence``: of the reported bound, the union over every size tried."""

    epsilon_lb: float
    m: int
    k_plus: int
    k_minus: int
    correct: int
    guesses: int
    confidence: float
    delta: float
    sizes: tuple[int, ...] = ()
    formal_epsilon: float | None = None  # the formal ε the bound is set beside (DESIGN §4.3), when known

    def to_json(self) -> dict:
        """The ``one_run`` entry of the membership report (∞ as "inf"; no ``formal_epsilon`` when unknown)."""
        out = asdict(self)
        out["sizes"] = list(self.sizes)
        if self.formal_epsilon is None:
            del out["formal_epsilon"]
        return encode(out)


def guess_sets(scores: np.ndarray, k_plus: int, k_minus: int) -> tuple[np.ndarray, np.ndarray]:
    """(IN guesses, OUT guesses) as boolean masks: the k₊ highest and k₋ lowest ``scores``, abstaining on a
    value tied across either cut (so the sets depend on the values, never on the canaries' order)."""
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    guess_in, guess_out = np.zeros(m, bool), np.zeros(m, bool)
    if k_plus:
        cut = np.sort(scores)[m - k_plus]             # the k₊-th highest value
        at_or_above = scores >= cut
        guess_in = at_or_above if at_or_above.sum() == k_plus else scores > cut
    if k_minus:
        cut = np.sort(scores)[k_minus - 1]            # the k₋-th lowest value
        at_or_below = scores <= cut
        guess_out = at_or_below if at_or_below.sum() == k_minus else scores < cut
    return guess_in, guess_out & ~guess_in


def one_run_audit(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int,
                  delta: float, beta: float = 0.05) -> OneRunAudit:
    """Guess IN for the k₊ highest ``scores`` (m,), OUT for the k₋ lowest, abstaining on ties across a cut
    (:func:`guess_sets`); count against ``included`` (m,) bool, the canaries' true inclusion; bound ε at
    confidence 1 − β."""
    scores, included = _validated(scores, included)
    m = int(scores.size)
    _check(0, k_plus, k_minus, m, delta, beta)
    return _audit_at(scores, included, k_plus, k_minus, delta, beta, (k_plus,))


def one_run_audit_sizes(scores: np.ndarray, included: np.ndarray, delta: float, beta: float = 0.05,
                        fractions: tuple[float, ...] = GUESS_FRACTIONS) -> OneRunAudit:
    """The one-run audit over guess sizes fixed in advance: k₊ = k₋ = max(1, ⌊f·m⌋) for each fraction f, each
    bounded at β/|sizes| (a union bound), the largest bound reported (DESIGN §4.3)."""
    scores, included = _validated(scores, included)
    m = int(scores.size)
    if m < 2:
        raise ValueError(f"a one-run audit needs at least 2 canaries, got {m}")
    sizes = tuple(sorted({min(m // 2, max(1, int(f * m))) for f in fractions}))
    if not sizes or any(not 0 < f <= 0.5 for f in fractions):
        raise ValueError(f"guess fractions must lie in (0, 0.5], got {fractions!r}")
    audits = [_audit_at(scores, included, k, k, delta, beta / len(sizes), sizes) for k in sizes]
    best = max(audits, key=lambda a: (a.epsilon_lb, -a.k_plus))
    return replace(best, confidence=1.0 - beta)


def _validated(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be matching 1-D arrays")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, included


def _audit_at(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int, delta: float, beta: float,
              sizes: tuple[int, ...]) -> OneRunAudit:
    guess_in, guess_out = guess_sets(scores, k_plus, k_minus)
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    r_in, r_out = int(guess_in.sum()), int(guess_out.sum())
    m = int(scores.size)
    return OneRunAudit(one_run_epsilon_lb(correct, r_in, r_out, m, delta, beta), m, k_plus, k_minus, correct,
                       r_in + r_out, 1.0 - beta, delta, tuple(sizes))
