"""The core never imports attacks, defenses or benchmarks (docs/ARCHITECTURE.md)."""
import ast
from pathlib import Path

import collafuse

FORBIDDEN = ("collafuse.attacks", "collafuse.defenses", "collafuse.benchmarks", "attacks", "defenses", "benchmarks")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_does_not_import_attacks_defenses_or_benchmarks():
    core = Path(collafuse.__file__).parent
    offenders = {}
    for path in core.glob("*.py"):
        if path.name == "cli.py":  # only the command line sees everything
            continue
        bad = {n for n in _imports(path) if n.split(".")[0] in FORBIDDEN or n.startswith(FORBIDDEN[:3])}
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_checker_would_catch_an_offender(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("from collafuse.attacks.reconstruction import oracle\nimport collafuse.defenses\n")
    assert {"collafuse.attacks.reconstruction", "collafuse.defenses"} <= _imports(fake)


def test_checkpoints_load_without_pickle():
    # Every checkpoint read goes through safetensors; torch.load must not appear in the core.
    core = Path(collafuse.__file__).parent
    for path in core.glob("*.py"):
        assert "torch.load(" not in path.read_text(), path.name
