"""Reading user files safely: one bounded reader for text, YAML and JSON.

Every file a user hands to collafuse (a config, a grid, a policy; a run folder's or an
audit folder's JSON) is read through here, so that bad input always ends as one
:class:`~collafuse.errors.CollafuseError` line and never as a traceback, a hang on
memory or a multi-megabyte error message:

- any readable file works, a pipe included (``--config <(...)``); size is bounded
  (:data:`MAX_TEXT_BYTES`) and the text must be UTF-8;
- data a command finds in a folder (images, ``.npz`` files) is opened by :func:`open_regular`,
  which refuses a named pipe, a socket or a device in one line instead of waiting on it;
- YAML is parsed by :class:`BoundedLoader`, a ``yaml.SafeLoader`` that refuses
  duplicate keys (instead of silently keeping the last), nesting deeper than
  :data:`MAX_DEPTH`, more than :data:`MAX_ALIASES` aliases, recursive aliases and a
  document that expands (aliases followed) to more than :data:`MAX_NODES` nodes — a
  558-byte "billion laughs" bomb is refused in milliseconds;
- JSON nesting is bounded too (a RecursionError is one line);
- :func:`short_repr` bounds what an error message echoes of a user's value.
"""
from __future__ import annotations

import json
import os
import reprlib
import stat
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from collafuse.errors import CollafuseError, ConfigError

MAX_TEXT_BYTES = 1 << 20     # configs, grids, policies: 1 MiB is far more than any real one
MAX_DEPTH = 64               # nesting levels (a real config has 3)
MAX_ALIASES = 100            # YAML aliases (*name) in one document
MAX_NODES = 20_000           # YAML nodes (values, keys) once every alias is expanded
MAX_ECHO = 200               # characters of a user's value an error message repeats

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 3, 8, 8, 8, 8
_repr.maxstring, _repr.maxother, _repr.maxlong = MAX_ECHO, MAX_ECHO, 60


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, at most ``limit`` characters (cheap even for a huge nested value)."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 — a value whose repr fails must not turn an error message into a traceback
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_text(text: str, limit: int = 1000) -> str:
    """One line of at most ``limit`` characters (newlines become spaces)."""
    text = " ".join(str(text).splitlines())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path | str, what: str, error: type[CollafuseError] = ConfigError) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (a symbolic link to one is fine); a named
    pipe, a socket, a device or a folder is refused with one ``error`` line. Never blocks: the file is opened
    non-blocking and checked with ``fstat`` on the open descriptor (no race with a rename), so a FIFO that
    nobody writes to (``mkfifo a.png`` in an image folder) is refused at once instead of hanging."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_kind(mode)}, not a regular file; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, what: str, error: type[CollafuseError] = ConfigError,
               max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of any readable file (a pipe too), refusing more than ``max_bytes``."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise error(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} file is larger than {max_bytes // 1024} KiB; is it the right file?")
    return data


def read_text(path: Path | str, what: str, error: type[CollafuseError] = ConfigError,
              max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of any readable file of at most ``max_bytes``."""
    data = read_bytes(path, what, error, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} file is not UTF-8 text (undecodable byte at offset {exc.start}); "
                    "is it the right file?") from None


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with bounds on depth, aliases and expanded size, and no duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark)
        else:
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise ComposerError(None, None, f"more than {MAX_NODES} values", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: the base class refuses it with its own message
                    continue
                if repeated:
                    raise ConstructorError(None, None, f"duplicate key {short_repr(key, 60)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root) -> None:
    """Refuse a node graph that is cyclic, or that expands (aliases followed) past the bounds."""
    done: dict[int, tuple[int, int]] = {}   # id → (expanded node count, height)
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [done[id(c)] for c in _children(node)]
            size, height = 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)
            if size > MAX_NODES:
                raise ComposerError(None, None, f"expands to more than {MAX_NODES} values once its aliases are expanded",
                                    node.start_mark)
            if height > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
            done[key] = (size, height)
            continue
        if key in done:
            continue
        if key in on_path:
            raise ComposerError(None, None, "an alias refers to a node that contains it", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in done)


def _yaml_problem(exc: Exception) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{short_text(problem, 200)}{where}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return short_text(text, 200)


def parse_yaml(text: str, source: str, error: type[CollafuseError] = ConfigError) -> Any:
    """Parse one YAML document with :class:`BoundedLoader`; an empty document is ``None``."""
    loader = None
    try:
        loader = BoundedLoader(text)  # the reader refuses control characters right here
        return loader.get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # ValueError: e.g. an integer of more than 4,300 digits or an impossible date
        raise error(f"{source}: not valid YAML ({_yaml_problem(exc)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path | str, what: str, error: type[CollafuseError] = ConfigError) -> tuple[Any, str]:
    """(parsed YAML, its text) of the file at ``path``: bounded, UTF-8, one document."""
    text = read_text(path, what, error)
    return parse_yaml(text, str(path), error), text


def parse_json(text: str | bytes, source: str, error: type[CollafuseError]) -> Any:
    """``json.loads`` whose every failure (syntax, encoding, nesting) is one ``error`` line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{source}: not valid JSON ({short_text(str(exc).splitlines()[0] if str(exc) else exc, 200)})") from None


def read_json(path: Path | str, what: str, error: type[CollafuseError], max_bytes: int = 64 << 20) -> Any:
    """Parsed JSON of the file at ``path`` (bounded; missing, unreadable or corrupt: one ``error`` line)."""
    return parse_json(read_bytes(path, what, error, max_bytes), str(path), error)
