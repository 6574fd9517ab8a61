"""The tidy results table (DESIGN.md §7; issue 6 item 4).

One row per (cell, threat, target, attack, metric) with the value, its 95 % interval,
the seed and the config hash, in grid order. Two optional columns place the rows of a curve:
``t``, the diffusion step of an ``auc_at_t`` row (membership leakage per query step), and
``epoch``, the training epoch of a ``*_at_epoch`` row (a ``training.snapshots`` model); both are
empty on every other row, so every other metric name means one measurement of the final models.
Written as CSV and JSON (atomically: temporary file, then rename), read back by
:func:`read_results` (the report's reader). Numbers go through the project's one JSON codec
(:mod:`collafuse.jsonio`): ±∞ (ε with no bound) is "inf" / "-inf", NaN is null.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collafuse.errors import RunError
from collafuse.jsonio import decode_number, encode_number, write_json_atomic

from collafuse.benchmarks.audit.grid import Cell

CELL_COLUMNS = ["cell", "config_hash", "kind", "dataset", "cut_ratio", "t_c", "defense", "payload_kind", "epochs", "seed"]
CURVE_COLUMNS = ["t", "epoch"]  # the abscissa of auc_at_t / *_at_epoch rows (empty elsewhere)
ROW_COLUMNS = ["threat", "target", "attack", "metric", "value", "ci_low", "ci_high", *CURVE_COLUMNS]
COLUMNS = CELL_COLUMNS + ROW_COLUMNS
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
SCORES_PARQUET = "scores.parquet"  # every membership score of every cell (DESIGN §4.2 "Per-record evidence")
SCORE_FILE_COLUMNS = ("cell", "threat", "target", "attack", "candidate", "client", "class", "member", "score")
# What read_results needs in every row; the other columns of COLUMNS get these defaults when absent.
REQUIRED_COLUMNS = ("cell", "kind", "cut_ratio", "defense", "threat", "target", "attack", "metric", "value")
OPTIONAL_COLUMNS = {"config_hash": "", "dataset": "", "t_c": np.nan, "payload_kind": "", "epochs": np.nan,
                    "seed": np.nan, "ci_low": np.nan, "ci_high": np.nan, "t": np.nan, "epoch": np.nan}
FLOAT_COLUMNS = ("value", "ci_low", "ci_high", "cut_ratio", "seed", "t", "epoch")
TEXT_COLUMNS = ("cell", "kind", "defense", "threat", "target", "attack", "metric", "dataset", "payload_kind")


# ----------------------------------------------------------------------------- writing

def cell_columns(cell: Cell) -> dict[str, Any]:
    return {"cell": cell.cell_id, "config_hash": cell.config_hash, "kind": cell.kind, "dataset": cell.dataset,
            "cut_ratio": cell.cut_ratio, "t_c": cell.t_c, "defense": cell.defense, "payload_kind": cell.payload_kind,
            "epochs": cell.epochs, "seed": cell.seed}


def collect(cells: list[Cell], audit_dir: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The table for exactly these cells (every one must be finished) and each cell's record."""
    # The runner owns the cell files (and loads the attack engines): imported here, not for a report's reads.
    from collafuse.benchmarks.audit.runner import read_cell

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
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("value", "ci_low", "ci_high", "cut_ratio"):
        df[col] = _floats(df[col])
    for col in CURVE_COLUMNS:  # whole numbers or empty, in the CSV too (not 10.0)
        df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
    return df, records


def _floats(column: pd.Series) -> pd.Series:
    return column.map(decode_number).astype(float)


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The table's rows as JSON objects: NaN → null, ±inf → "inf" / "-inf"."""
    return [{k: encode_number(v) for k, v in row.items()} for row in df.astype(object).where(df.notna(), None).to_dict("records")]


def write_results(df: pd.DataFrame, audit_dir: Path) -> tuple[Path, Path]:
    """results.csv and results.json, each via a temporary file and a rename."""
    csv = audit_dir / RESULTS_CSV
    tmp = audit_dir / f".{RESULTS_CSV}.partial-{os.getpid()}"
    try:
        tmp.write_text(df.to_csv(index=False))
        os.replace(tmp, csv)
    finally:
        tmp.unlink(missing_ok=True)
    return csv, write_json_atomic(audit_dir / RESULTS_JSON, to_records(df), indent=0)


def write_scores(cells: list[Cell], records: dict[str, dict], audit_dir: Path) -> str | None:
    """The audit's ``scores.parquet``: every cell's membership scores (its verified ``scores.parquet`` artifact)
    with the cell's id in front, in grid order, written atomically. Returns its sha256 (kept in audit.json so
    a changed file is detected), or None (and no file) when no cell scored membership."""
    from collafuse.fsutil import file_sha256

    frames, seen = [], set()
    for cell in cells:
        if cell.config_hash in seen:
            continue
        seen.add(cell.config_hash)
        rel = records[cell.config_hash]["artifacts"].get(SCORES_PARQUET)
        if rel:
            frame = pd.read_parquet(audit_dir / rel, engine="pyarrow")
            frame.insert(0, "cell", cell.cell_id)
            frames.append(frame)
    path = audit_dir / SCORES_PARQUET
    if not frames:
        path.unlink(missing_ok=True)
        return None
    tmp = audit_dir / f".{SCORES_PARQUET}.partial-{os.getpid()}"
    try:
        pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False, engine="pyarrow")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def read_scores(audit_dir: Path, sha256: str | None) -> pd.DataFrame | None:
    """The audit's ``scores.parquet`` (None when the audit has none); :class:`RunError` (one line) when the
    file is missing, unreadable or not the one audit.json recorded (changed after it was written)."""
    from collafuse.fsutil import file_sha256

    if sha256 is None:
        return None
    path = Path(audit_dir) / SCORES_PARQUET
    if not path.is_file():
        raise RunError(f"{path} is missing (audit.json records one); run the audit again to rewrite it")
    if file_sha256(path) != sha256:
        raise RunError(f"{path} was changed after the audit wrote it; run the audit again to rewrite it")
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise RunError(f"{path} is unreadable: {type(err).__name__}") from None
    missing = [c for c in SCORE_FILE_COLUMNS if c not in frame.columns]
    if missing:
        raise RunError(f"{path} lacks the column(s) {', '.join(missing)}")
    return frame


# ----------------------------------------------------------------------------- reading

def read_audit_file(audit_dir: Path, name: str) -> Any:
    """The parsed JSON of ``audit_dir/name``; :class:`RunError` (one line) if it is missing or corrupt."""
    audit_dir = Path(audit_dir)
    path = audit_dir / name
    if not path.is_file():
        raise RunError(f"{audit_dir} is not an audit folder: {name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RunError(f"{path} is corrupt: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def read_results(audit_dir: Path) -> pd.DataFrame:
    """``results.json`` of an audit folder as the table: one row per JSON row, index 0..n-1.

    Every column of :data:`COLUMNS` is present (absent optional ones get their default; extra
    columns are kept);
    value, ci_low, ci_high, cut_ratio and seed are floats (null → NaN, "inf" → inf); the
    text columns are strings ("" for null). :class:`RunError` (one line) if the folder or
    the file is missing, the file is not JSON, not a list of objects, or lacks a
    :data:`REQUIRED_COLUMNS` column.
    """
    audit_dir = Path(audit_dir)
    if not audit_dir.is_dir():
        raise RunError(f"{audit_dir} is not an audit folder: it does not exist")
    path = audit_dir / RESULTS_JSON
    rows = read_audit_file(audit_dir, RESULTS_JSON)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RunError(f"{path} is corrupt: expected a JSON list of row objects")
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise RunError(f"{path} is corrupt: rows lack the column(s) {', '.join(missing)}")
    for column, default in OPTIONAL_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = default
    for column in FLOAT_COLUMNS:
        frame[column] = _floats(frame[column])
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].fillna("").astype(str)
    return frame.reset_index(drop=True)
