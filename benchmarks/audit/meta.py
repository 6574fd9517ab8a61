"""``audit.json`` as typed values: what the audit command writes and the report reads back (DESIGN §7).

:class:`AuditMeta` holds the run of the audit (versions, timings, sweep counts), the exact grid and
policy, every cell (:class:`CellEntry`, with the paths of its artifacts), every policy evaluation and the
verdict (:mod:`~.verdict`), and the coverage map. ``to_json`` is the file; :meth:`AuditMeta.from_json`
validates a file once — a field of the wrong type is one :class:`~collafuse.errors.RunError` line naming
it — so the report reads attributes and never tests types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from collafuse.errors import RunError
from collafuse.jsonio import decode_number, encode

from collafuse.benchmarks.audit.verdict import CellEvaluation, Verdict

AUDIT_JSON = "audit.json"


def _corrupt(what: str) -> RunError:
    return RunError(f"{AUDIT_JSON} is corrupt: {what}")


def _mapping(raw: Any, what: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _corrupt(f"{what} must be an object")
    return raw


def _list(raw: Any, what: str) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _corrupt(f"{what} must be a list")
    return raw


@dataclass(frozen=True)
class CellArtifacts:
    """Paths (relative to the audit folder) of a cell's pictures and curves; None where it has none."""

    reconstructions: str | None = None
    reconstruction_rows: tuple[str, ...] = ()
    roc: str | None = None
    samples: str | None = None
    scores: str | None = None        # the cell's membership scores (Parquet), merged into the audit's scores.parquet

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reconstructions is not None:
            out.update(reconstructions=self.reconstructions, reconstruction_rows=list(self.reconstruction_rows))
        if self.roc is not None:
            out["roc"] = self.roc
        if self.samples is not None:
            out["samples"] = self.samples
        if self.scores is not None:
            out["scores"] = self.scores
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "CellArtifacts":
        d = _mapping(raw, "a cell's artifacts")

        def path(key: str) -> str | None:
            value = d.get(key)
            return str(value) if value else None

        return cls(path("reconstructions"), tuple(str(r) for r in _list(d.get("reconstruction_rows"), "reconstruction_rows")),
                   path("roc"), path("samples"), path("scores"))


@dataclass(frozen=True)
class CellEntry:
    """One cell as audit.json describes it: its identity, configuration, timing and artifacts."""

    cell: str
    config_hash: str
    kind: str
    dataset: str
    cut_ratio: float
    t_c: int | None
    defense: str
    payload_kind: str
    epochs: int | None
    seed: int | None
    baseline: str | None
    seconds: float | None
    artifacts: CellArtifacts
    extra: Mapping[str, Any] = field(default_factory=dict)   # the rest of the cell's description (run_config, attacks…)

    def to_json(self) -> dict[str, Any]:
        return encode({**self.extra, "kind": self.kind, "dataset": self.dataset, "cut_ratio": self.cut_ratio,
                       "defense": self.defense, "payload_kind": self.payload_kind, "seed": self.seed,
                       "epochs": self.epochs, "cell": self.cell, "config_hash": self.config_hash, "t_c": self.t_c,
                       "baseline": self.baseline, "seconds": self.seconds, "artifacts": self.artifacts.to_json()})

    @classmethod
    def from_json(cls, raw: Any) -> "CellEntry":
        d = _mapping(raw, "a cell entry")
        known = {"cell", "config_hash", "kind", "dataset", "cut_ratio", "t_c", "defense", "payload_kind", "epochs",
                 "seed", "baseline", "seconds", "artifacts"}

        def integer(key: str) -> int | None:
            value = d.get(key)
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        seconds = d.get("seconds")
        return cls(
            cell=str(d.get("cell") or ""), config_hash=str(d.get("config_hash") or ""), kind=str(d.get("kind") or ""),
            dataset=str(d.get("dataset") or ""), cut_ratio=decode_number(d.get("cut_ratio")), t_c=integer("t_c"),
            defense=str(d.get("defense") or ""), payload_kind=str(d.get("payload_kind") or ""),
            epochs=integer("epochs"), seed=integer("seed"),
            baseline=str(d["baseline"]) if d.get("baseline") else None,
            seconds=None if seconds is None else decode_number(seconds),
            artifacts=CellArtifacts.from_json(d.get("artifacts")),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class SweepCounts:
    cells: int | None = None
    computed: int | None = None
    reused: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cells": self.cells, "computed": self.computed, "reused": self.reused}

    @classmethod
    def from_json(cls, raw: Any) -> "SweepCounts":
        d = _mapping(raw, "sweep")
        return cls(*(int(d[k]) if isinstance(d.get(k), int) else None for k in ("cells", "computed", "reused")))


@dataclass(frozen=True)
class AuditMeta:
    """Everything audit.json holds besides the results table."""

    collafuse_version: str = "?"
    versions: Mapping[str, str] = field(default_factory=dict)
    started: str = "?"
    wall_seconds: float | None = None
    quick: bool = False
    grid_source: str = ""
    grid_yaml: str = ""
    policy_yaml: str = ""
    policy: Mapping[str, Any] = field(default_factory=dict)
    backend: str = ""
    jobs: int | None = None
    devices: tuple[str, ...] = ()
    cache: str = ""
    sweep: SweepCounts = field(default_factory=SweepCounts)
    compute_seconds: float | None = None
    cells: tuple[CellEntry, ...] = ()
    evaluations: tuple[CellEvaluation, ...] = ()
    verdict: Verdict = field(default_factory=lambda: Verdict("unknown", "", None, ()))
    coverage: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    scores_sha256: str | None = None   # of the audit's scores.parquet (None: no membership scores)

    @property
    def cost_metric(self) -> str:
        """The cost the recommendation minimises (the policy's ``minimize``)."""
        return str(self.policy.get("minimize") or "client_gflops_sample")

    def cell_entry(self, cell_id: str) -> CellEntry | None:
        return next((c for c in self.cells if c.cell == cell_id), None)

    def evaluation(self, cell_id: str) -> CellEvaluation | None:
        return next((e for e in self.evaluations if e.cell == cell_id), None)

    def to_json(self) -> dict[str, Any]:
        return encode({
            "collafuse_version": self.collafuse_version, "versions": dict(self.versions), "started": self.started,
            "wall_seconds": self.wall_seconds, "quick": self.quick, "grid_source": self.grid_source,
            "grid_yaml": self.grid_yaml, "policy_yaml": self.policy_yaml, "policy": dict(self.policy),
            "backend": self.backend, "jobs": self.jobs, "devices": list(self.devices), "cache": self.cache,
            "sweep": self.sweep.to_json(), "compute_seconds": self.compute_seconds,
            "cells": [c.to_json() for c in self.cells], "evaluations": [e.to_json() for e in self.evaluations],
            "verdict": self.verdict.to_json(),
            "coverage": {d: {t: list(labels) for t, labels in m.items()} for d, m in self.coverage.items()},
            "scores_sha256": self.scores_sha256,
        })

    @classmethod
    def from_json(cls, raw: Any) -> "AuditMeta":
        d = _mapping(raw, "the file")
        coverage = {}
        raw_coverage = _mapping(d.get("coverage"), "coverage")
        if raw_coverage and all(isinstance(v, list) for v in raw_coverage.values()):
            # The bare shape of collafuse.defenses.coverage.coverage_map (threat → the defenses that address
            # it), as a hand-written audit.json may hold it: one row per defense named anywhere.
            labels = list(dict.fromkeys(str(x) for v in raw_coverage.values() for x in v))
            raw_coverage = {label: {t: [label] if label in map(str, v) else [] for t, v in raw_coverage.items()}
                            for label in labels}
        for defense, by_threat in raw_coverage.items():
            coverage[str(defense)] = {str(t): tuple(str(x) for x in _list(labels, f"coverage of {defense}"))
                                      for t, labels in _mapping(by_threat, f"coverage of {defense}").items()}
        wall, compute = d.get("wall_seconds"), d.get("compute_seconds")
        return cls(
            collafuse_version=str(d.get("collafuse_version", "?")),
            versions={str(k): str(v) for k, v in _mapping(d.get("versions"), "versions").items()},
            started=str(d.get("started", "?")),
            wall_seconds=None if wall is None else decode_number(wall), quick=d.get("quick") is True,
            grid_source=str(d.get("grid_source") or ""), grid_yaml=str(d.get("grid_yaml") or ""),
            policy_yaml=str(d.get("policy_yaml") or ""), policy=_mapping(d.get("policy"), "policy"),
            backend=str(d.get("backend") or ""), jobs=d.get("jobs") if isinstance(d.get("jobs"), int) else None,
            devices=tuple(str(x) for x in _list(d.get("devices"), "devices")), cache=str(d.get("cache") or ""),
            sweep=SweepCounts.from_json(d.get("sweep")),
            compute_seconds=None if compute is None else decode_number(compute),
            cells=tuple(CellEntry.from_json(c) for c in _list(d.get("cells"), "cells")),
            evaluations=tuple(CellEvaluation.from_json(_mapping(e, "an evaluation"))
                              for e in _list(d.get("evaluations"), "evaluations")),
            verdict=Verdict.from_json(_mapping(d.get("verdict"), "verdict")),
            coverage=coverage,
            scores_sha256=str(d["scores_sha256"]) if isinstance(d.get("scores_sha256"), str) else None,
        )
