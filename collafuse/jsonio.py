"""The one JSON codec and the one atomic JSON writer of the project.

JSON has no infinity and no NaN. Everywhere a number is written (run.json, attack reports, cell files,
``results.json``, ``audit.json``) it goes through :func:`encode`: a float ±∞ is spelled ``"inf"`` /
``"-inf"`` and a NaN is ``null``; :func:`decode_number` is the inverse. Files are written by
:func:`write_json_atomic`: a temporary file in the same folder, then a rename, so a reader never sees half
a file and an old file is replaced only by a complete new one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

# What decode_number reads as ±∞ (case-insensitive): the spelling encode writes, and a few a person might.
_INFINITIES = {"inf": math.inf, "+inf": math.inf, "infinity": math.inf, "+infinity": math.inf, "∞": math.inf,
               "-inf": -math.inf, "-infinity": -math.inf, "-∞": -math.inf}


def encode_number(x: Any) -> Any:
    """A number ready for JSON: ±∞ → "inf" / "-inf", NaN → None, numpy scalars → Python; anything else as it is."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x


def decode_number(x: Any) -> float:
    """A number as JSON holds it, back as a float: null → NaN, "inf" / "-inf" (also "∞", "infinity") → ±∞,
    a numeric string → its value; anything that is not a number (a bool, another string, a list) → NaN."""
    if x is None or isinstance(x, bool):
        return math.nan
    if isinstance(x, str):
        inf = _INFINITIES.get(x.strip().lower())
        if inf is not None:
            return inf
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def encode(obj: Any) -> Any:
    """``obj`` with every number encoded (:func:`encode_number`), mappings, lists, tuples and numpy arrays walked."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [encode(v) for v in obj.tolist()]
    return encode_number(obj)


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """JSON text of ``obj`` through :func:`encode` (so ``allow_nan=False`` can never fail on a float)."""
    return json.dumps(encode(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)


def write_json_atomic(path: Path | str, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path``: a temporary sibling first, then a rename (never half a file)."""
    path = Path(path)
    text = dumps(obj, indent=indent, sort_keys=sort_keys)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
