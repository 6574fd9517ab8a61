"""Bounded memory for the T1 scorers that compare every row with every candidate (DESIGN.md §10).

The oracle (and oracle-all-views), multiview linking and nn-distance each build a
(rows × pool) block of float64 numbers. They do so a chunk of rows at a time, the chunk
sized so that one block fits a memory budget: ``$COLLAFUSE_MEMORY_MB`` megabytes
(default :data:`DEFAULT_MEMORY_MB`), so their memory does not grow with the number of
rows and their time grows as rows × pool. Every function that chunks also takes the
chunk size as an argument (tests, tuning); a chunk only changes how much is held at once,
never the numbers (each row's values are computed by the same formula in any chunk).
"""
from __future__ import annotations

import os
from typing import Iterator

from collafuse.errors import ConfigError

MEMORY_ENV = "COLLAFUSE_MEMORY_MB"
DEFAULT_MEMORY_MB = 512


def memory_budget_bytes() -> int:
    """The working-memory budget of one (rows × pool) block, in bytes (``$COLLAFUSE_MEMORY_MB``, default 512)."""
    raw = os.environ.get(MEMORY_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MEMORY_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ConfigError(f"${MEMORY_ENV} must be a number of megabytes, got {raw!r}") from None
    if not mb > 0 or mb != mb or mb == float("inf"):
        raise ConfigError(f"${MEMORY_ENV} must be a positive number of megabytes, got {raw!r}")
    return int(mb * (1 << 20))


def rows_per_chunk(pool: int, bytes_per_pair: int = 8, chunk: int | None = None) -> int:
    """Rows per chunk: ``chunk`` when given (≥ 1), else budget / (pool × bytes_per_pair), at least 1.

    ``bytes_per_pair``: what one (row, candidate) pair costs while a block is alive, all its
    temporaries counted (e.g. 4 float64 arrays of the block's shape: 32)."""
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1 row, got {chunk}")
        return int(chunk)
    return max(1, memory_budget_bytes() // max(1, int(pool) * int(bytes_per_pair)))


def row_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` rows covering 0..n."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
