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

Pure functions; no model, no data. The guess sizes k₊, k₋ must be fixed before looking at the
labels (choosing them with the labels would void the confidence).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

from collafuse.jsonio import encode

BISECTION_STEPS = 60
EPS_CAP = 100.0  # beyond this every p-value underflows; a bound this large reads "no privacy"


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
    r = k_plus + k_minus
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
    """One one-run audit: the bound and what it came from (``to_json`` is the ``one_run`` entry)."""

    epsilon_lb: float
    m: int
    k_plus: int
    k_minus: int
    correct: int
    confidence: float
    delta: float
    formal_epsilon: float | None = None  # the formal ε the bound is set beside (DESIGN §4.3), when known

    def to_json(self) -> dict:
        """The ``one_run`` entry of the membership report (∞ as "inf"; no ``formal_epsilon`` when unknown)."""
        out = asdict(self)
        if self.formal_epsilon is None:
            del out["formal_epsilon"]
        return encode(out)


def one_run_audit(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int,
                  delta: float, beta: float = 0.05) -> OneRunAudit:
    """Guess IN for the k₊ highest ``scores`` (m,), OUT for the k₋ lowest; count against ``included``
    (m,) bool, the canaries' true inclusion; bound ε. Ties are broken by position (stable sort)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be matching 1-D arrays")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    m = int(scores.size)
    _check(0, k_plus, k_minus, m, delta, beta)
    order = np.argsort(-scores, kind="stable")
    guessed_out = order[m - k_minus:] if k_minus else order[:0]
    correct = int(included[order[:k_plus]].sum() + (~included[guessed_out]).sum())
    return OneRunAudit(one_run_epsilon_lb(correct, k_plus, k_minus, m, delta, beta), m, k_plus, k_minus, correct,
                       1.0 - beta, delta)
