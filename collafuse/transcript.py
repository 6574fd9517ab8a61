"""What the server saw (the *server view*) and, apart from it, the *audit key* (§2.5).

On disk (inside a run folder)::

    transcript/index.json          shards in the order they were written, rows, bytes, sha256
    transcript/c{k}_{j:05d}.safetensors   rows of client k: seq, step, t, tensor[, label][, noise], wire_bytes
    audit_key.safetensors          seq → member index (into the source data) and client id

``seq`` is the global order in which rows crossed. Attacks get a :class:`ServerView`,
which cannot reach the audit key; scorers open :class:`AuditKey` themselves.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from collafuse.errors import RunError
from collafuse.fsutil import file_sha256
from collafuse.jsonio import dumps
from collafuse.safeio import parse_json, read_bytes, short_repr
from collafuse.payload import Payload

TRANSCRIPT_DIR = "transcript"
AUDIT_KEY_FILE = "audit_key.safetensors"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
MAX_INDEX_BYTES = 64 << 20
SHARD_FIELDS = ("seq", "step", "t", "tensor", "wire_bytes")  # every shard holds these (label, noise optional)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors bytes written by Python, so a full or read-only disk is a plain OSError (with errno)."""
    data = save(tensors)
    with open(path, "wb") as f:
        f.write(data)


class TranscriptWriter:
    """Records payloads in crossing order; flushes one shard per client every ``shard_rows`` rows."""

    def __init__(self, run_dir: Path, payload_kind: str, shard_rows: int = 4096):
        self.dir = Path(run_dir) / TRANSCRIPT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(run_dir)
        self.payload_kind = payload_kind
        self.shard_rows = shard_rows
        self._buffers: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._buffered_rows: dict[int, int] = {}
        self._shard_counter: dict[int, int] = {}
        self._shards: list[dict] = []
        self._seq = 0
        self._key_seq: list[torch.Tensor] = []
        self._key_member: list[torch.Tensor] = []
        self._key_client: list[torch.Tensor] = []

    def record(self, payload: Payload, member_ids: torch.Tensor, client: int | torch.Tensor | None = None) -> None:
        """Record one message (server view) and which members it came from (audit key).

        ``client`` is the true sender for the audit key when the payload does not name
        it (an id-free release): one client, or (B,) one per row when a relay mixed the
        payloads of several clients into this message; by default the payload's own ``client_id``.
        """
        n = len(payload)
        seq = torch.arange(self._seq, self._seq + n, dtype=torch.int64)
        self._seq += n
        row = {
            "seq": seq,
            "step": torch.full((n,), payload.step, dtype=torch.int64),
            "t": payload.t.to(torch.int64),
            "tensor": payload.values(),  # a quantised payload is stored decoded; wire_bytes is its real size
            "wire_bytes": payload.row_wire_bytes(),
        }
        if payload.label is not None:
            row["label"] = payload.label.to(torch.int64)
        if payload.noise is not None:
            row["noise"] = payload.noise
        k = payload.client_id
        self._buffers.setdefault(k, []).append(row)
        self._buffered_rows[k] = self._buffered_rows.get(k, 0) + n
        self._key_seq.append(seq)
        self._key_member.append(member_ids.to(torch.int64).cpu())
        if isinstance(client, torch.Tensor):
            if client.shape != (n,):
                raise ValueError(f"per-row senders must have shape ({n},), got {tuple(client.shape)}")
            self._key_client.append(client.to(torch.int64).cpu())
        else:
            self._key_client.append(torch.full((n,), k if client is None else client, dtype=torch.int64))
        if self._buffered_rows[k] >= self.shard_rows:
            self._flush(k)

    def _flush(self, client: int) -> None:
        rows = self._buffers.pop(client, [])
        self._buffered_rows[client] = 0
        if not rows:
            return
        keys = rows[0].keys()
        if any(r.keys() != keys for r in rows):
            raise ValueError("payloads of one client changed fields mid-transcript")
        merged = {name: torch.cat([r[name] for r in rows]).contiguous() for name in keys}
        j = self._shard_counter.get(client, 0)
        self._shard_counter[client] = j + 1
        name = f"c{client}_{j:05d}.safetensors"
        path = self.dir / name
        _write_tensors(merged, path)
        self._shards.append(
            {
                "file": name,
                "client": client,
                "rows": int(merged["seq"].numel()),
                "first_seq": int(merged["seq"][0]),
                "wire_bytes": int(merged["wire_bytes"].sum()),
                "file_bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )

    def close(self, write_audit_key: bool = True) -> None:
        """Flush every buffer and write the index and (unless told not to: an imported deployment without
        one) the audit key."""
        for client in sorted(self._buffers):
            self._flush(client)
        index = {
            "format": FORMAT_VERSION,
            "payload_kind": self.payload_kind,
            "rows": self._seq,
            "wire_bytes": sum(s["wire_bytes"] for s in self._shards),
            "shards": self._shards,
        }
        (self.dir / INDEX_FILE).write_text(dumps(index, indent=1))
        if not write_audit_key:
            return
        empty = torch.empty(0, dtype=torch.int64)
        _write_tensors(
            {
                "seq": torch.cat(self._key_seq) if self._key_seq else empty,
                "member_index": torch.cat(self._key_member) if self._key_member else empty,
                "client": torch.cat(self._key_client) if self._key_client else empty,
            },
            self.run_dir / AUDIT_KEY_FILE,
        )


@dataclass(frozen=True)
class ShardInfo:
    file: str
    client: int
    rows: int
    first_seq: int
    wire_bytes: int
    sha256: str


def _index_int(value, where: str, index_path: Path, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise RunError(f"{index_path}: corrupt transcript index ({where} must be an integer{bound}, got {short_repr(value, 60)})")
    return value


def _parse_index(index_path: Path) -> tuple[str, int, int, tuple[ShardInfo, ...]]:
    """(payload kind, rows, wire bytes, shards) of a transcript index, every field checked."""
    index = parse_json(read_bytes(index_path, "transcript index", RunError, MAX_INDEX_BYTES), str(index_path), RunError)
    if not isinstance(index, dict):
        raise RunError(f"{index_path}: corrupt transcript index (not a JSON object)")
    if index.get("format") != FORMAT_VERSION or isinstance(index.get("format"), bool):
        raise RunError(f"{index_path}: unsupported transcript format {short_repr(index.get('format'), 60)}")
    missing = [k for k in ("payload_kind", "rows", "wire_bytes", "shards") if k not in index]
    if missing:
        raise RunError(f"{index_path}: corrupt transcript index (no {missing[0]!r})")
    kind = index["payload_kind"]
    if not isinstance(kind, str):
        raise RunError(f"{index_path}: corrupt transcript index (payload_kind must be a string)")
    rows = _index_int(index["rows"], "rows", index_path)
    wire = _index_int(index["wire_bytes"], "wire_bytes", index_path)
    if not isinstance(index["shards"], list):
        raise RunError(f"{index_path}: corrupt transcript index (shards must be a list)")
    shards = []
    for i, s in enumerate(index["shards"]):
        where = f"shards[{i}]"
        if not isinstance(s, dict):
            raise RunError(f"{index_path}: corrupt transcript index ({where} must be an object)")
        absent = [k for k in ShardInfo.__dataclass_fields__ if k not in s]
        if absent:
            raise RunError(f"{index_path}: corrupt transcript index ({where} has no {absent[0]!r})")
        name = s["file"]
        if (not isinstance(name, str) or not name.endswith(".safetensors") or name.startswith(".")
                or "/" in name or "\\" in name):
            raise RunError(f"{index_path}: corrupt transcript index ({where}.file must be a shard file name "
                           f"in the transcript folder, got {short_repr(name, 60)})")
        if not isinstance(s["sha256"], str) or not _SHA256.fullmatch(s["sha256"]):
            raise RunError(f"{index_path}: corrupt transcript index ({where}.sha256 must be 64 hex digits)")
        shards.append(ShardInfo(
            file=name, client=_index_int(s["client"], f"{where}.client", index_path, None),
            rows=_index_int(s["rows"], f"{where}.rows", index_path),
            first_seq=_index_int(s["first_seq"], f"{where}.first_seq", index_path),
            wire_bytes=_index_int(s["wire_bytes"], f"{where}.wire_bytes", index_path), sha256=s["sha256"],
        ))
    if sum(s.rows for s in shards) != rows:
        raise RunError(f"{index_path}: corrupt transcript index (its shards hold {sum(s.rows for s in shards)} rows, "
                       f"the index says {rows})")
    return kind, rows, wire, tuple(shards)


def _check_shard(path: Path, shard: ShardInfo, data: dict[str, torch.Tensor]) -> None:
    """A shard's tensors: the fields every shard has, one row each per ``shard.rows``, finite values."""
    missing = [k for k in SHARD_FIELDS if k not in data]
    if missing:
        raise RunError(f"transcript shard {path} has no {missing[0]!r} field; the transcript is corrupt")
    for name, value in data.items():
        if value.ndim == 0 or value.shape[0] != shard.rows:
            raise RunError(f"transcript shard {path}: field {name!r} has shape {tuple(value.shape)}, "
                           f"expected {shard.rows} rows; the transcript is corrupt")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RunError(f"transcript shard {path}: field {name!r} holds NaN or infinite values; "
                           "the transcript is corrupt")


class ServerView:
    """Lazy, read-only access to everything that crossed to the server. No audit key in here."""

    def __init__(self, transcript_dir: Path):
        self.dir = Path(transcript_dir)
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise RunError(f"{self.dir}: no transcript index ({INDEX_FILE}); is this a collafuse run?")
        kind, rows, wire_bytes, shards = _parse_index(index_path)
        self.payload_kind: str = kind
        self.rows: int = rows
        self.wire_bytes: int = wire_bytes
        self.shards: tuple[ShardInfo, ...] = shards

    @classmethod
    def open(cls, run_dir: Path) -> "ServerView":
        return cls(Path(run_dir) / TRANSCRIPT_DIR)

    def __len__(self) -> int:
        return self.rows

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(sorted({s.client for s in self.shards}))

    def load_shard(self, shard: ShardInfo) -> dict[str, torch.Tensor]:
        """Read one shard, checking its hash so a truncated or altered file is refused."""
        path = self.dir / shard.file
        if not path.is_file():
            raise RunError(f"transcript shard missing: {path}")
        if file_sha256(path) != shard.sha256:
            raise RunError(f"transcript shard corrupt or truncated (hash mismatch): {path}")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise RunError(f"transcript shard unreadable: {path} ({exc})") from None
        _check_shard(path, shard, data)
        return data

    def load(self, client: int | None = None) -> dict[str, torch.Tensor]:
        """All rows (of one client, or all), concatenated and sorted by ``seq``."""
        parts = [self.load_shard(s) for s in self.shards if client is None or s.client == client]
        if not parts:
            return {}
        if any(p.keys() != parts[0].keys() for p in parts):
            raise RunError(f"{self.dir}: transcript shards hold different fields; the transcript is corrupt")
        try:
            merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        except RuntimeError as exc:  # shapes or dtypes that do not line up between shards
            raise RunError(f"{self.dir}: transcript shards do not fit together ({str(exc).splitlines()[0]})") from None
        if client is None:
            merged["client"] = torch.cat(
                [torch.full((s.rows,), s.client, dtype=torch.int64) for s in self.shards]
            )
        order = torch.argsort(merged["seq"])
        return {name: value[order] for name, value in merged.items()}


class MissingAuditKey(RunError):
    """The run has no audit key by design (imported without one): per-row scoring is impossible, not broken."""


@dataclass(frozen=True)
class AuditKey:
    """Ground truth for scoring: for each transcript row (by ``seq``), its member index and client."""

    seq: torch.Tensor
    member_index: torch.Tensor
    client: torch.Tensor

    @classmethod
    def open(cls, run_dir: Path) -> "AuditKey":
        path = Path(run_dir) / AUDIT_KEY_FILE
        if not path.is_file():
            marker = Path(run_dir) / "run.json"
            try:
                imported_without = json.loads(marker.read_text()).get("has_audit_key") is False
            except (OSError, ValueError, AttributeError):
                imported_without = False
            if imported_without:
                raise MissingAuditKey("the deployment was imported without an audit key: attacks that need the "
                                      "truth of each payload row cannot be scored")
            raise RunError(f"audit key missing: {path}")
        try:
            d = load_file(str(path))
            return cls(d["seq"], d["member_index"], d["client"])
        except (SafetensorError, OSError, KeyError) as exc:
            raise RunError(f"audit key unreadable: {path} ({exc})") from None
