"""The core never imports attacks, defenses or benchmarks (docs/ARCHITECTURE.md); only cli.py and api.py do."""
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


# The two front doors that join the core and its wings: the command line and the Python API
# (DESIGN §8: the API applies a config exactly as the CLI does, so both must see the defenses).
# Nothing else in collafuse/ may import them.
FRONT_DOORS = ("cli.py", "api.py")


def test_core_does_not_import_attacks_defenses_or_benchmarks():
    core = Path(collafuse.__file__).parent
    offenders = {}
    for path in core.glob("*.py"):
        if path.name in FRONT_DOORS:  # only the command line and the API see everything
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


def test_core_modules_import_each_other_without_cycles():
    # The message (payload.py) and the hook points (hooks.py) sit below the roles (protocol.py).
    core = Path(collafuse.__file__).parent
    modules = {p.stem for p in core.glob("*.py")}
    graph = {
        p.stem: {n.split(".")[1] for n in _imports(p) if n.startswith("collafuse.") and n.split(".")[1] in modules}
        for p in core.glob("*.py")
    }
    assert "protocol" not in graph["payload"] | graph["hooks"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " → ".join(path + (name,))
        if name not in done:
            for dep in graph[name]:
                visit(dep, path + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_no_core_module_imports_the_front_doors():
    # The core must not reach the wings through the API or the CLI either (`python -m collafuse` may).
    core = Path(collafuse.__file__).parent
    offenders = {
        path.name: bad
        for path in core.glob("*.py")
        if path.name not in (*FRONT_DOORS, "__main__.py")
        and (bad := {n for n in _imports(path) if n in ("collafuse.api", "collafuse.cli")})
    }
    assert offenders == {}
