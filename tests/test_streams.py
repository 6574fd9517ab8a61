"""Every random stream in one table (issue 20): no path named twice, no stream id defined elsewhere."""
import re
from pathlib import Path

import numpy as np

from collafuse.streams import STREAMS, generator_for, stream_seed

ROOT = Path(__file__).resolve().parents[1]


def test_every_stream_path_is_named_once_and_top_level_ids_are_distinct():
    paths = list(STREAMS.values())
    assert len(set(paths)) == len(paths)
    top = [p[0] for p in paths if len(p) == 1]
    assert len(set(top)) == len(top)
    # a longer path extends a named stream (the attacker's denoiser weights live under "init")
    for path in paths:
        if len(path) > 1:
            assert path[:1] in paths


def test_no_stream_id_is_defined_outside_the_table():
    assignment = re.compile(r"^\s*STREAM_[A-Z_]+(\s*,\s*STREAM_[A-Z_]+)*\s*=\s*[\d(]")
    found = []
    for folder in ("collafuse", "attacks", "defenses", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "streams.py" and path.parent.name == "collafuse":
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if assignment.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not found, "\n".join(found)


def test_streams_are_independent_and_reproducible():
    assert stream_seed(0, 3, 1) == stream_seed(0, 3, 1) != stream_seed(0, 3, 2) != stream_seed(1, 3, 1)
    a = generator_for(7, *STREAMS["single-release"], 5)
    b = generator_for(7, *STREAMS["init.attacker-denoiser"])
    assert not np.array_equal(np.random.default_rng(a.initial_seed()).random(4),
                              np.random.default_rng(b.initial_seed()).random(4))
