"""The tidy results table (DESIGN.md §7; issue 6 item 4).

One row per (cell, threat, target, attack, metric) with the value, its 95 % interval,
the seed and the config hash, in grid order. Written as CSV and JSON (atomically:
temporary file, then rename), read back by the policy and the report.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from collafuse.errors import RunError

from collafuse.benchmarks.audit.grid import Cell
from collafuse.benchmarks.audit.runner import read_cell

CELL_COLUMNS = ["cell", "config_hash", "kind", "dataset", "cut_ratio", "t_c", "defense", "payload_kind", "epochs", "seed"]
ROW_COLUMNS = ["threat", "target", "attack", "metric", "value", "ci_low", "ci_high"]
COLUMNS = CELL_COLUMNS + ROW_COLUMNS
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"


def cell_columns(cell: Cell) -> dict[str, Any]:
    return {"cell": cell.cell_id, "config_hash": cell.config_hash, "kind": cell.kind, "dataset": cell.dataset,
            "cut_ratio": cell.cut_ratio, "t_c": cell.t_c, "defense": cell.defense, "payload_kind": cell.payload_kind,
            "epochs": cell.epochs, "seed": cell.seed}


def collect(cells: list[Cell], audit_dir: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The table for exactly these cells (every one must be finished) and each cell's record."""
    rows, records = [], {}
    for cell in cells:
        if cell.config_hash in records:
            continue
        record = read_cell(audit_dir, cell.config_hash)
        if record is None:
            raise RunError(f"cell {cell.cell_id} is not finished in {audit_dir}")
        records[cell.config_hash] = record
        base = cell_columns(cell)
        rows.extend({**base, **{k: r.get(k) for k in ROW_COLUMNS}} for r in record["rows"])
    return _numeric(pd.DataFrame(rows, columns=COLUMNS)), records


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Value columns as floats ("inf" strings → inf, null → NaN)."""
    for col in ("value", "ci_low", "ci_high", "cut_ratio"):
        df[col] = pd.to_numeric(df[col].replace({"inf": math.inf, "-inf": -math.inf}), errors="coerce").astype(float)
    return df


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _json_value(v) for k, v in row.items()} for row in df.astype(object).where(df.notna(), None).to_dict("records")]


def write_results(df: pd.DataFrame, audit_dir: Path) -> tuple[Path, Path]:
    """results.csv and results.json, each via a temporary file and a rename."""
    pid = os.getpid()
    paths = []
    for name, render in ((RESULTS_CSV, lambda: df.to_csv(index=False)),
                         (RESULTS_JSON, lambda: json.dumps(to_records(df), indent=0, allow_nan=False))):
        path = audit_dir / name
        tmp = audit_dir / f".{name}.partial-{pid}"
        try:
            tmp.write_text(render())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths[0], paths[1]


def read_results(audit_dir: Path) -> pd.DataFrame:
    """results.json back as a DataFrame ("inf" strings → float inf)."""
    path = Path(audit_dir) / RESULTS_JSON
    try:
        records = json.loads(path.read_text())
        df = pd.DataFrame(records, columns=COLUMNS)
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: not a readable audit results table ({str(exc).splitlines()[0]})") from None
    return _numeric(df)
