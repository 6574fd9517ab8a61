"""The report's document model: sections of blocks (tables, paragraphs, figures, …) that both renderers read."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collafuse.jsonio import decode_number as to_float

from collafuse.benchmarks.audit.verdict import Recommendation

from .analysis import NOT_MEASURED, format_value


@dataclass
class TableCell:
    """One cell of a report table (not an audit cell): its text, the unrounded number, a CSS class."""

    text: str
    value: float | None = None   # unrounded number, written as data-value in HTML
    cls: str = ""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[TableCell]]
    id: str | None = None
    caption: str = ""


@dataclass
class Para:
    text: str
    cls: str = ""


@dataclass
class Figure:
    name: str            # file name under figures/ in the Markdown version
    png: bytes
    caption: str


@dataclass
class Artifact:
    relpath: str         # relative to the audit folder
    png: bytes
    caption: str
    wide: bool = False   # shown wider (a sample grid: 16 images a row)


@dataclass
class Gallery:
    items: list          # Figures (no caption of their own) and Artifacts, side by side
    caption: str = ""


@dataclass
class Pre:
    text: str
    lang: str = ""


STATUS_LABELS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}  # anything else: NO VERDICT


@dataclass
class VerdictBox:
    status: str          # "pass" | "fail" | "inconclusive" | "unknown"
    text: str
    passing: list[str]
    total: int
    recommendation: Recommendation | None


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(audit_dir: Path, rel: str | None) -> bytes | None:
    """The PNG artifact at ``rel`` (relative to the audit folder), or None when there is none, it cannot be
    read or it is not a PNG (a report never fails on a damaged picture: it shows what it can)."""
    if not rel:
        return None
    try:
        png = (Path(audit_dir) / rel).read_bytes()
    except OSError:
        return None
    return png if png.startswith(PNG_MAGIC) else None


def num(x: Any, *, formal: bool = False) -> TableCell:
    v = to_float(x)
    text = format_value(v, formal=formal)
    cls = "nm" if text == NOT_MEASURED else "num"
    return TableCell(text, None if math.isnan(v) else v, cls)


def count(x: Any) -> TableCell:
    """A whole number (images, hand-offs, members needed) without decimals; ``num`` where not measured."""
    v = to_float(x)
    if math.isnan(v) or not math.isfinite(v) or v != round(v):
        return num(x)
    return TableCell(str(int(v)), v, "num")


def txt(x: Any, cls: str = "") -> TableCell:
    return TableCell("" if x is None else str(x), None, cls)


def status_cell(status: str) -> TableCell:
    """A check's or a threat's status: pass, fail, inconclusive, or not measured."""
    if status == "inconclusive":
        return TableCell("inconclusive", None, "warn")
    return verdict_cell({"pass": True, "fail": False}.get(status))


def verdict_cell(passed: Any) -> TableCell:
    if passed is True:
        return TableCell("pass", None, "pass")
    if passed is False:
        return TableCell("fail", None, "fail")
    return TableCell(NOT_MEASURED, None, "nm")
