"""What the server saw (the *server view*) and, apart from it, the *audit key* (§2.5).

On disk (inside a run folder)::

    transcript/index.json          shards in the order they were written, rows, bytes, sha256
    transcript/c{k}_{j:05d}.safetensors   rows of client k: seq, step, t, tensor[, label][, noise], wire_bytes
    audit_key.safetensors          seq → member index (into the source data) and client id

``seq`` is the global order in which rows crossed. Attacks get a :class:`ServerView`,
which cannot reach the audit key; scorers open :class:`AuditKey` themselves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from collafuse.errors import RunError
from collafuse.protocol import Payload

TRANSCRIPT_DIR = "transcript"
AUDIT_KEY_FILE = "audit_key.safetensors"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    def record(self, payload: Payload, member_ids: torch.Tensor, client: int | None = None) -> None:
        """Record one message (server view) and which members it came from (audit key).

        ``client`` is the true sender for the audit key when the payload does not name
        it (an id-free release); by default the payload's own ``client_id``.
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
        save_file(merged, str(path))
        self._shards.append(
            {
                "file": name,
                "client": client,
                "rows": int(merged["seq"].numel()),
                "first_seq": int(merged["seq"][0]),
                "wire_bytes": int(merged["wire_bytes"].sum()),
                "file_bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )

    def close(self) -> None:
        """Flush every buffer and write the index and the audit key."""
        for client in sorted(self._buffers):
            self._flush(client)
        index = {
            "format": FORMAT_VERSION,
            "payload_kind": self.payload_kind,
            "rows": self._seq,
            "wire_bytes": sum(s["wire_bytes"] for s in self._shards),
            "shards": self._shards,
        }
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
        empty = torch.empty(0, dtype=torch.int64)
        save_file(
            {
                "seq": torch.cat(self._key_seq) if self._key_seq else empty,
                "member_index": torch.cat(self._key_member) if self._key_member else empty,
                "client": torch.cat(self._key_client) if self._key_client else empty,
            },
            str(self.run_dir / AUDIT_KEY_FILE),
        )


@dataclass(frozen=True)
class ShardInfo:
    file: str
    client: int
    rows: int
    first_seq: int
    wire_bytes: int
    sha256: str


class ServerView:
    """Lazy, read-only access to everything that crossed to the server. No audit key in here."""

    def __init__(self, transcript_dir: Path):
        self.dir = Path(transcript_dir)
        index_path = self.dir / INDEX_FILE
        if not index_path.is_file():
            raise RunError(f"{self.dir}: no transcript index ({INDEX_FILE}); is this a collafuse run?")
        try:
            index = json.loads(index_path.read_text())
            self.payload_kind: str = index["payload_kind"]
            self.rows: int = int(index["rows"])
            self.wire_bytes: int = int(index["wire_bytes"])
            self.shards: tuple[ShardInfo, ...] = tuple(
                ShardInfo(**{k: s[k] for k in ShardInfo.__dataclass_fields__}) for s in index["shards"]
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunError(f"{index_path}: corrupt transcript index ({exc})") from None
        if int(index.get("format", -1)) != FORMAT_VERSION:
            raise RunError(f"{index_path}: unsupported transcript format {index.get('format')}")

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
        if _sha256(path) != shard.sha256:
            raise RunError(f"transcript shard corrupt or truncated (hash mismatch): {path}")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise RunError(f"transcript shard unreadable: {path} ({exc})") from None

    def load(self, client: int | None = None) -> dict[str, torch.Tensor]:
        """All rows (of one client, or all), concatenated and sorted by ``seq``."""
        parts = [self.load_shard(s) for s in self.shards if client is None or s.client == client]
        if not parts:
            return {}
        merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        if client is None:
            merged["client"] = torch.cat(
                [torch.full((s.rows,), s.client, dtype=torch.int64) for s in self.shards]
            )
        order = torch.argsort(merged["seq"])
        return {name: value[order] for name, value in merged.items()}


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
            raise RunError(f"audit key missing: {path}")
        try:
            d = load_file(str(path))
            return cls(d["seq"], d["member_index"], d["client"])
        except (SafetensorError, OSError, KeyError) as exc:
            raise RunError(f"audit key unreadable: {path} ({exc})") from None
