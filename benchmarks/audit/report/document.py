"""The report's document model: sections of blocks (tables, paragraphs, figures, …) that both renderers read."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from collafuse.benchmarks.audit.results import to_float

from .analysis import NOT_MEASURED, format_value


@dataclass
class Cell:
    text: str
    value: float | None = None   # unrounded number, written as data-value in HTML
    cls: str = ""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
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


@dataclass
class Verdict:
    status: str          # "pass" | "fail" | "unknown"
    text: str
    passing: list[str]
    total: int
    recommendation: dict | None


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def num(x: Any, *, formal: bool = False) -> Cell:
    v = to_float(x)
    text = format_value(v, formal=formal)
    cls = "nm" if text == NOT_MEASURED else "num"
    return Cell(text, None if math.isnan(v) else v, cls)


def txt(x: Any, cls: str = "") -> Cell:
    return Cell("" if x is None else str(x), None, cls)


def verdict_cell(passed: Any) -> Cell:
    if passed is True:
        return Cell("pass", None, "pass")
    if passed is False:
        return Cell("fail", None, "fail")
    return Cell(NOT_MEASURED, None, "nm")
