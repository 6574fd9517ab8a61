"""The dependency rules of docs/ARCHITECTURE.md, for the core and for its wings.

- The core (``collafuse/``) never imports attacks, defenses or benchmarks; only the two front
  doors (``cli.py``, ``api.py``) do.
- Attacks never import defenses or benchmarks: they read what crossed (the server view) and what
  the run declares (its config, run.json, its models); a caller hands in anything else.
- Defenses never import attacks or benchmarks: they reach the core through its hook points.
- Attacks never see the audit key: only the scorer side of the reconstruction engine opens it
  (and the view's guard names it, to refuse it); the attacks themselves receive views and signals,
  never a run folder.
"""
import ast
from pathlib import Path

import collafuse
import collafuse.attacks
import collafuse.benchmarks
import collafuse.defenses

CORE = Path(collafuse.__file__).parent
ATTACKS = Path(collafuse.attacks.__file__).parent
DEFENSES = Path(collafuse.defenses.__file__).parent
BENCHMARKS = Path(collafuse.benchmarks.__file__).parent
WINGS = {"attacks": "collafuse.attacks", "defenses": "collafuse.defenses", "benchmarks": "collafuse.benchmarks"}


def _package(path: Path) -> str:
    """The dotted package a file of the project belongs to (the wings are installed under collafuse.)."""
    for root, name in ((ATTACKS, WINGS["attacks"]), (DEFENSES, WINGS["defenses"]),
                       (BENCHMARKS, WINGS["benchmarks"]), (CORE, "collafuse")):
        try:
            rel = path.parent.relative_to(root)
        except ValueError:
            continue
        return ".".join([name, *rel.parts])
    return ""


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (function-local imports too), as absolute names.

    ``from a import b`` counts as both ``a`` and ``a.b`` (``b`` may be a module); relative imports
    are resolved against ``package`` (default: the file's own package in this project)."""
    package = _package(path) if package is None else package
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            if base:
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _reaches(names: set[str], packages: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in packages)}


def _offenders(root: Path, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        bad = _reaches(_imports(path), forbidden)
        if bad:
            out[rel] = bad
    return out


# The two front doors that join the core and its wings: the command line and the Python API
# (DESIGN §8: the API applies a config exactly as the CLI does, so both must see the defenses).
# Nothing else in collafuse/ may import them.
FRONT_DOORS = ("cli.py", "api.py")
# Top-level names the wings would have if imported without the collafuse. prefix.
BARE = ("attacks", "defenses", "benchmarks")


def test_core_does_not_import_attacks_defenses_or_benchmarks():
    offenders = {}
    for path in CORE.glob("*.py"):
        if path.name in FRONT_DOORS:  # only the command line and the API see everything
            continue
        bad = _reaches(_imports(path), (*WINGS.values(), *BARE))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_attacks_never_import_defenses_or_benchmarks():
    # What a defense did reaches an attack through the run (run.json's hook records, read by the caller).
    assert _offenders(ATTACKS, (WINGS["defenses"], WINGS["benchmarks"], "defenses", "benchmarks")) == {}


def test_defenses_never_import_attacks_or_benchmarks():
    assert _offenders(DEFENSES, (WINGS["attacks"], WINGS["benchmarks"], "attacks", "benchmarks")) == {}


# The scorer side: the one module that opens the audit key to score attacks (reconstruction's engine)
# and the guard that refuses it wherever a view is built (reconstruction/view.py's AuditKeyLeak).
AUDIT_KEY_READERS = ("reconstruction/engine.py", "reconstruction/view.py")
AUDIT_KEY_NAMES = ("collafuse.transcript.AuditKey", "collafuse.transcript.MissingAuditKey",
                   "collafuse.transcript.AUDIT_KEY_FILE")
# The attacks themselves: pure functions of views, signals and the attacker's own resources.
ATTACK_MODULES = (
    "reconstruction/rescale.py", "reconstruction/tweedie.py", "reconstruction/ddim.py", "reconstruction/inversion.py",
    "reconstruction/multiview.py", "reconstruction/oracle.py",
    "membership/loss.py", "membership/sima.py", "membership/pia.py", "membership/pian.py", "membership/secmi.py",
    "membership/payload_lr.py", "membership/nn_distance.py", "membership/lira.py", "membership/rmia.py",
    "membership/fremia.py", "membership/aggregation.py", "membership/lira_peers.py", "membership/rmia_peers.py",
)


def test_only_the_scorer_side_opens_the_audit_key():
    offenders = _offenders(ATTACKS, AUDIT_KEY_NAMES, skip=AUDIT_KEY_READERS)
    by_name = {path.relative_to(ATTACKS).as_posix() for path in ATTACKS.rglob("*.py")
               if "audit_key.safetensors" in path.read_text()} - set(AUDIT_KEY_READERS)
    assert offenders == {} and by_name == set()


def test_attacks_see_views_and_signals_never_a_run_folder():
    for rel in ATTACK_MODULES:
        assert (ATTACKS / rel).is_file(), rel
    reads_runs = ("collafuse.transcript", "collafuse.runs", "collafuse.deployment", "safetensors")
    offenders = {rel: bad for rel in ATTACK_MODULES if (bad := _reaches(_imports(ATTACKS / rel), reads_runs))}
    assert offenders == {}


def test_checker_would_catch_an_offender(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("from collafuse.attacks.reconstruction import oracle\nimport collafuse.defenses\n"
                    "def f():\n    from collafuse import benchmarks\n    from ...defenses import build_hooks\n"
                    "    from collafuse.transcript import AuditKey\n")
    found = _imports(fake, package="collafuse.attacks.membership")
    assert {"collafuse.attacks.reconstruction", "collafuse.defenses", "collafuse.benchmarks",
            "collafuse.defenses.build_hooks"} <= found
    assert _reaches(found, (WINGS["benchmarks"],)) == {"collafuse.benchmarks"}
    assert _reaches(found, AUDIT_KEY_NAMES) == {"collafuse.transcript.AuditKey"}


def test_checkpoints_load_without_pickle():
    # Every checkpoint read goes through safetensors; torch.load must not appear in the core.
    for path in CORE.glob("*.py"):
        assert "torch.load(" not in path.read_text(), path.name


def test_core_modules_import_each_other_without_cycles():
    # The message (payload.py) and the hook points (hooks.py) sit below the roles (protocol.py),
    # the roles below the round (rounds.py), the round below training.
    modules = {p.stem for p in CORE.glob("*.py")}
    graph = {
        p.stem: {n.split(".")[1] for n in _imports(p) if n.startswith("collafuse.") and n.split(".")[1] in modules}
        for p in CORE.glob("*.py")
    }
    assert "protocol" not in graph["payload"] | graph["hooks"]
    assert "training" not in graph["rounds"] and "rounds" in graph["training"]
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
    offenders = {
        path.name: bad
        for path in CORE.glob("*.py")
        if path.name not in (*FRONT_DOORS, "__main__.py")
        and (bad := _reaches(_imports(path), ("collafuse.api", "collafuse.cli")))
    }
    assert offenders == {}


def test_the_protocol_round_is_played_in_one_place():
    # Training, the payload simulation and the reference trainings all call collafuse.rounds; none of
    # them builds its own loader or relays a round itself.
    players = {"training": CORE / "training.py", "curve": ATTACKS / "reconstruction" / "curve.py",
               "references": ATTACKS / "membership" / "references.py"}
    for name, path in players.items():
        text = path.read_text()
        assert "collafuse.rounds" in _imports(path), name
        assert "DataLoader(" not in text and "deliver_round(" not in text and "randperm(idx" not in text, name


def test_hooks_for_a_config_are_built_in_one_place():
    # collafuse.defenses.build_hooks is registered into the core and reached only through hooks_for.
    from collafuse.hooks import HOOK_BUILDERS

    assert "defenses" in HOOK_BUILDERS and HOOK_BUILDERS.get("defenses") is collafuse.defenses.build_hooks
    def calls_build_hooks(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) == "build_hooks":
                    return True
        return False

    callers = {path.relative_to(root.parent).as_posix() for root in (CORE, ATTACKS) for path in root.rglob("*.py")
               if calls_build_hooks(path)}
    assert callers == set(), sorted(callers)
