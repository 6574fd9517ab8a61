"""Is leakage still rising when training stops? (issue 25 item 6; DESIGN §7)

Leakage grows with training (the default config's T3 ``sima`` AUC: 0.535 after 60 epochs, 0.765 after 200),
and an audit trains far less than a deployment does. A system that keeps ``training.snapshots`` is attacked on
each snapshot too (``auc_at_epoch`` rows, the same candidates, attacks and noise draws); this module asks of
those rows, per threat whose models were snapshotted (T2 server, T3 clients), whether the worst AUC was still
rising at the last epoch.

The test: per measured epoch (every snapshot and the final one), the threat's worst AUC over its targets and
attacks, with that row's 95 % bootstrap interval. The slope between the last two epochs e₁ < e₂ is
(AUC₂ − AUC₁)/(e₂ − e₁); each AUC's standard error is read off its interval as (high − low)/(2·1.96), and the
slope's 95 % interval is slope ± 1.96·√(se₁² + se₂²)/(e₂ − e₁). Leakage is *still rising at the last epoch*
when that interval lies above 0. The two AUCs are measured on the same candidates, so their errors are
positively correlated and the true spread of the difference is smaller than the sum assumed here: the test
is conservative (it says "rising" only on a clear rise). Only the last segment is tested, since a rise early in
training that has levelled off by the end says nothing about the released model; without two measured epochs
or without intervals (``n_boot`` = 0) there is no test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from scipy.stats import norm

TREND_THREATS = ("T2", "T3")   # the model targets that are attacked on every snapshot
LEVEL = 0.95
_Z = float(norm.ppf(0.5 + LEVEL / 2))


@dataclass(frozen=True)
class EpochWorst:
    """A threat's worst AUC after ``epoch`` epochs: the value, its interval (None: not computed) and who reached it."""

    epoch: int
    value: float
    low: float | None
    high: float | None
    attack: str
    target: str

    @property
    def standard_error(self) -> float | None:
        """The interval's half-width over z (None without an interval)."""
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / (2 * _Z)


@dataclass(frozen=True)
class Trend:
    """The slope of a threat's worst AUC per epoch between its last two measured epochs, with its interval."""

    threat: str
    start: EpochWorst
    end: EpochWorst
    slope: float
    low: float | None
    high: float | None

    @property
    def rising(self) -> bool:
        """Still rising at the last epoch: the slope's interval lies above 0."""
        return self.low is not None and self.low > 0

    def describe(self) -> str:
        """One clause for the report and the verdict."""
        interval = "" if self.low is None else f" [{self.low:+.2g}, {self.high:+.2g}]"
        return (f"worst AUC {self.start.value:.3f} at epoch {self.start.epoch} → {self.end.value:.3f} at epoch "
                f"{self.end.epoch} ({self.end.attack} / {self.end.target}), slope {self.slope:+.2g} per epoch"
                f"{interval}")


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def worst_per_epoch(rows: Iterable[Mapping[str, Any]], threat: str, final_epoch: int) -> list[EpochWorst]:
    """The worst (largest) AUC of ``threat`` at every measured epoch, in epoch order: ``auc_at_epoch`` rows at their
    ``epoch``, ``auc`` rows (the final models) at ``final_epoch``. Ties keep the first row; a snapshot at the final
    epoch is the final model, counted once."""
    best: dict[int, EpochWorst] = {}
    for r in rows:
        if r.get("threat") != threat or r.get("metric") not in ("auc", "auc_at_epoch"):
            continue
        value = _number(r.get("value"))
        if value is None:
            continue
        epoch = final_epoch if r["metric"] == "auc" else int(r["epoch"])
        if epoch not in best or value > best[epoch].value:
            best[epoch] = EpochWorst(epoch, value, _number(r.get("ci_low")), _number(r.get("ci_high")),
                                     str(r.get("attack")), str(r.get("target")))
    return [best[e] for e in sorted(best)]


def last_segment(points: list[EpochWorst], threat: str) -> Trend | None:
    """The trend between the last two of ``points`` (None with fewer than two)."""
    if len(points) < 2:
        return None
    a, b = points[-2], points[-1]
    slope = (b.value - a.value) / (b.epoch - a.epoch)
    se_a, se_b = a.standard_error, b.standard_error
    if se_a is None or se_b is None:
        return Trend(threat, a, b, slope, None, None)
    half = _Z * math.hypot(se_a, se_b) / (b.epoch - a.epoch)
    return Trend(threat, a, b, slope, slope - half, slope + half)


def leakage_trends(rows: Iterable[Mapping[str, Any]], final_epoch: int) -> tuple[Trend, ...]:
    """One :class:`Trend` per threat of :data:`TREND_THREATS` measured at two epochs or more (a cell's rows)."""
    rows = list(rows)
    trends = (last_segment(worst_per_epoch(rows, threat, final_epoch), threat) for threat in TREND_THREATS)
    return tuple(t for t in trends if t is not None)
