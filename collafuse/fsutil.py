"""File-system helpers shared by every command: nothing half-written, nothing clobbered (issue 11 item 6).

- :func:`sweep_stale_partials`: a process that writes ``X`` atomically first writes
  ``.X.partial-<pid>`` (a file or a folder) and renames it into place. A process killed
  with SIGKILL (or a power cut) leaves that temporary behind; a later start removes
  the ones whose writer is dead (:func:`pid_alive`) and keeps those of live processes.
- :func:`folder_lock`: an exclusive lock on a folder (``<folder>/.lock`` created with
  ``O_CREAT | O_EXCL``, holding ``"<pid> <host> <process start>"``). A lock whose process
  is dead (or whose pid now belongs to a later process) is stale and taken over with a
  warning; a live one is refused with one line.
- :func:`probe_writable`: create a temporary file in a folder, write a byte and remove it
  (creating the folder's missing parents and removing them again), so that a read-only
  or full output or cache folder is refused before any work starts.
- :func:`check_output`: every check of an output path (``--out``, a cache, a report file)
  before any work: an ancestor that is a file, a symbolic link (a folder's is followed
  deliberately, a file's refused), a folder where a file belongs, an existing file, and
  then :func:`probe_writable` on the folder it will be written in.
- :func:`sigterm_raises`: SIGTERM becomes a :class:`Terminated` exception, so that the
  ``except BaseException`` clean-ups of atomic writers run (the default action of
  SIGTERM kills the process without them).
- :func:`publish_no_clobber`: rename a finished temporary file into place unless the
  destination exists (hard link + unlink: no race with a file created meanwhile).

This module is part of the core: it imports nothing but the standard library and
:mod:`collafuse.errors`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from collafuse.errors import CollafuseError, ConfigError

LOCK_NAME = ".lock"
# ".<name>.partial-<pid>" with an optional extension after the pid (".partial-<pid>.png").
PARTIAL_RE = re.compile(r"^\..+\.partial-(\d{1,10})(?:\.[A-Za-z0-9]{1,8})?$")
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived (raised by the handler :func:`sigterm_raises` installs).

    A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception`` does not swallow it
    while ``except BaseException`` clean-ups (temporary folders, locks) still run."""


class LockedError(CollafuseError):
    """Another live process holds the folder's lock."""


# ----------------------------------------------------------------------------- processes

def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as dead).

    ``os.kill(pid, 0)``: ProcessLookupError → dead; PermissionError → alive (another
    user's). Ids that cannot be a process (≤ 0, beyond the kernel's range) are dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError, ValueError):
        return False
    try:  # Linux: an exited child nobody has reaped yet is a zombie, not a writer
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or None.

    Recorded in a lock file, it tells a live lock holder from an unrelated process that got its pid later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def partial_pid(name: str) -> int | None:
    """The writer's pid of a temporary name ``.<name>.partial-<pid>[.<ext>]``, or None."""
    m = PARTIAL_RE.match(name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- stale partials

def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return True  # removed by someone else meanwhile
    except OSError:
        return False  # not ours to fight over (permissions, read-only): leave it


def sweep_stale_partials(folder: Path | str, depth: int = 0) -> list[Path]:
    """Remove the ``.X.partial-<pid>`` files and folders under ``folder`` whose writer is dead.

    ``depth`` is how many folder levels below ``folder`` are searched too (0: ``folder``
    only); partial folders themselves are not descended into. Temporaries of live
    processes, and of this one, are kept. Returns what was removed. Never raises for a
    folder that is missing or unreadable.

    Process ids are those of this machine: a cache folder shared by several machines
    must not be swept while a process on another machine writes into it.
    """
    removed: list[Path] = []
    own = os.getpid()

    def walk(current: Path, level: int) -> None:
        try:
            entries = list(os.scandir(current))
        except OSError:
            return
        for entry in entries:
            pid = partial_pid(entry.name)
            if pid is not None:
                if pid != own and not pid_alive(pid) and _remove(Path(entry.path)):
                    removed.append(Path(entry.path))
                continue
            if level < depth:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    walk(Path(entry.path), level + 1)

    walk(Path(folder), 0)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path | str) -> Iterator[Path]:
    """Build a folder in a hidden sibling (``.<name>.partial-<pid>``) and rename it to ``out`` only when the
    ``with`` block finishes: a failed or interrupted writer leaves ``out`` as it was (absent or empty).
    Stale partials of dead writers beside it are swept first. The caller checks ``out`` is free."""
    out = Path(out)
    sweep_stale_partials(out.parent)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
        yield staging
        if out.exists():
            out.rmdir()  # empty: the caller checked
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- writability

def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return list(reversed(missing))


def _blocking_ancestor(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder (a file, a
    dangling link, a special file): nothing can be created below it. None when it is a folder."""
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            return None if os.path.isdir(p) else p
    return None


def _kind(path: Path) -> str:
    """What stands at ``path``, in words, for a message ("a folder", "a file", "a symbolic link", ...)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "nothing"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link" if os.path.exists(path) else "a dangling symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    if stat.S_ISFIFO(st.st_mode):
        return "a named pipe"
    return "a special file"


def probe_writable(folder: Path | str, what: str) -> None:
    """Refuse (:class:`ConfigError`, one line) a folder this process cannot create files in.

    Creates the missing folders, creates a temporary file, writes one byte to it (a full disk refuses
    even that) and removes it, and removes the folders it created again: the probe leaves nothing behind."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ConfigError(f"{what} {folder} exists and is not a folder ({_kind(folder)})")
    blocker = _blocking_ancestor(folder)
    if blocker is not None:
        raise ConfigError(f"{what} {folder} is not writable: {blocker} is {_kind(blocker)}, not a folder; "
                          "choose another folder")
    created = _missing_parents(folder)
    probe = folder / f".collafuse-write-probe-{os.getpid()}"
    try:
        for p in created:
            os.mkdir(p)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        raise ConfigError(f"{what} {folder} is not writable ({reason}); choose another folder") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(p)


def check_output(path: Path | str, what: str = "--out", *, folder: bool = False) -> Path:
    """Check an output path before any work; return the path to write (one :class:`ConfigError` line
    otherwise). Nothing is left behind.

    ``folder`` False (a file to create): the name must be free (a file, a folder or a symbolic link
    there, dangling or not, is refused: a file is never overwritten and a link never written through).
    ``folder`` True (a folder to create, or an empty one to fill): a symbolic link is followed
    deliberately: the returned path is its target (which must be an empty folder or free); a link
    that loops is refused; an existing non-empty folder, or a file, is refused. In both cases the
    nearest existing ancestor must be a folder (not a file), and the folder the output is written in
    must take a file (:func:`probe_writable`: read-only, full or forbidden is refused)."""
    path = Path(path)
    if folder and os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{what} {path} is a symbolic link that loops; name a folder") from None
        path = Path(os.path.realpath(path))  # dangling: the folder it names is created
    if os.path.lexists(path):
        kind = _kind(path)
        if not folder:
            raise ConfigError(f"{what} {path} already exists ({kind}); choose a new file")
        if kind != "a folder":
            raise ConfigError(f"{what} {path} exists and is not a folder ({kind}); choose a new folder")
        try:
            with os.scandir(path) as entries:
                occupied = any(True for _ in entries)
        except OSError as exc:
            raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc}); choose another folder") from None
        if occupied:
            raise ConfigError(f"{what} {path} already exists and is not empty; choose a new folder")
    blocker = _blocking_ancestor(path.parent)
    if blocker is not None:
        raise ConfigError(f"{what} {path}: {blocker} is {_kind(blocker)}, not a folder; choose another place")
    probe_writable(path.parent, what)
    return path


# ----------------------------------------------------------------------------- the folder lock

def _lock_fields(path: Path) -> tuple[int | None, str | None, str | None]:
    """(pid, host, process start) written in a lock file (``"<pid> [<host> [<start>]]"``); pid None when it
    holds no pid."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:200]
    except OSError:
        return None, None, None
    parts = text.split()
    if not parts or not parts[0].isdigit() or len(parts[0]) > 10:
        return None, None, None
    start = parts[2] if len(parts) > 2 and parts[2] != "-" else None
    return int(parts[0]), (parts[1] if len(parts) > 1 else None), start


def _lock_owner(path: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file; (None, None) when it holds no pid."""
    pid, host, _ = _lock_fields(path)
    return pid, host


def _holder_alive(pid: int, start: str | None) -> bool:
    """The lock's process still runs: its pid is alive and, when its start time was recorded, it is the
    same process (not a later one that reused the pid)."""
    if not pid_alive(pid):
        return False
    now = process_start(pid)
    return start is None or now is None or now == start


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a lock file written by :func:`folder_lock` (it names a pid)."""
    return path.is_file() and _lock_owner(path)[0] is not None


@contextlib.contextmanager
def _serialized(folder: Path) -> Iterator[None]:
    """An flock on the folder itself, held only while the lock file is checked and written, so that
    two processes taking over the same stale lock cannot both win (no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def acquire_lock(folder: Path | str, what: str = "folder") -> Path:
    """Create ``<folder>/.lock`` for this process; take over a stale one (warning on stderr).

    Raises :class:`LockedError` when a live process holds it (or a process on another host,
    whose liveness cannot be checked from here)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    host = socket.gethostname().split()[0] if socket.gethostname().strip() else "localhost"
    me = os.getpid()
    with _serialized(folder):
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not path.is_file():
                    raise LockedError(f"{path} is not a lock file (a folder or a special file); remove it") from None
                pid, owner_host, start = _lock_fields(path)
                if pid == me and owner_host in (None, host):
                    return path  # already ours (re-entered)
                if pid is not None and owner_host not in (None, host):
                    raise LockedError(
                        f"{what} {folder} is locked by process {pid} on host {owner_host}; if no collafuse runs there "
                        f"any more, delete {path}") from None
                if pid is not None and _holder_alive(pid, start):
                    raise LockedError(
                        f"{what} {folder} is in use by another collafuse process (pid {pid}); wait for it to finish "
                        f"or use another folder") from None
                if pid is None:
                    why = "holds no process id"
                elif pid_alive(pid):
                    why = f"process {pid} is no longer running; its pid now belongs to another process"
                else:
                    why = f"process {pid} is no longer running"
                print(f"collafuse: warning: taking over the stale lock {path} ({why})", file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            try:
                os.write(fd, f"{me} {host} {process_start(me) or '-'}\n".encode())
            finally:
                os.close(fd)
            return path
    raise LockedError(f"{what} {folder}: could not take its lock {path}")


def release_lock(folder: Path | str) -> None:
    """Remove ``<folder>/.lock`` if this process holds it (never another's)."""
    path = Path(folder) / LOCK_NAME
    pid, _ = _lock_owner(path)
    if pid == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def folder_lock(folder: Path | str, what: str = "folder") -> Iterator[Path]:
    """Hold ``<folder>/.lock`` for the duration of the block; released on exit, error or Ctrl-C."""
    path = acquire_lock(folder, what)
    try:
        yield path
    finally:
        release_lock(folder)


# ----------------------------------------------------------------------------- signals and publishing

@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (else: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def publish_no_clobber(tmp: Path, dest: Path) -> None:
    """Move the finished file ``tmp`` to ``dest`` unless ``dest`` exists (then ``tmp`` is removed and
    :class:`CollafuseError` raised). A hard link makes the check and the move one step; where the file
    system has no hard links, an existence check and a rename."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise CollafuseError(f"{dest} already exists; choose a new --out") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dest):
            tmp.unlink(missing_ok=True)
            raise CollafuseError(f"{dest} already exists; choose a new --out") from None
        os.replace(tmp, dest)
        return
    tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read a MiB at a time (a large shard never has to fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
