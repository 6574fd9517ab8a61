"""The one registry mechanism: name → item for every kind of named thing (attacks, targets, defenses, …).

A registry refuses a second entry under a name it holds, keeps registration order,
and, asked for a name it does not know, raises :class:`UnknownNameError` (a
:class:`~collafuse.errors.ConfigError`, so the command line prints one line and exits
2) listing the valid names. Items may declare what they need (``needs``: e.g. an attack
that needs the attacker's denoiser); :meth:`Registry.needing` answers "which of these
names need X" so that no caller tests names itself (STYLE.md: no scattered string dispatch).
"""
from __future__ import annotations

from typing import Callable, Generic, Iterable, Iterator, TypeVar

from collafuse.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError):
    """A name that is not in a registry (the message lists the valid ones)."""


class Registry(Generic[T]):
    """Name → item, in registration order. ``kind`` names the things in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._needs: dict[str, frozenset[str]] = {}

    def register(self, name: str, item: T, needs: Iterable[str] = ()) -> T:
        """Add ``item`` under ``name`` with what it needs; a second registration of a name is refused."""
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        self._needs[name] = frozenset(needs)
        return item

    def decorator(self, name: str, make: Callable[[Callable], T], needs: Iterable[str] = ()) -> Callable[[Callable], Callable]:
        """``@registry.decorator(name, make)``: register ``make(fn)`` and give back ``fn`` unchanged."""
        def wrap(fn: Callable) -> Callable:
            self.register(name, make(fn), needs)
            return fn

        return wrap

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def valid(self) -> str:
        return ", ".join(self._items)

    def get(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {self.valid()}")
        return self._items[name]

    def needs(self, name: str) -> frozenset[str]:
        """What the item registered under ``name`` declared it needs."""
        self.get(name)
        return self._needs[name]

    def needing(self, what: str, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """Those of ``names`` (default: all) that are registered here and need ``what``, in the order given."""
        pool = self.names() if names is None else tuple(names)
        return tuple(n for n in pool if n in self._items and what in self._needs[n])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def parse(self, text: str | None) -> tuple[str, ...]:
        """A comma-separated list of names (``None`` = all) → validated names, order kept, repeats dropped.

        An empty list or an empty entry (``""``, ``"a,,b"``) is refused: asking for nothing is a mistake.
        """
        if text is None:
            return self.names()
        parts = [p.strip() for p in str(text).split(",")]
        if not any(parts) or any(not p for p in parts):
            raise UnknownNameError(f"empty {self.kind} name in {text!r}; valid: {self.valid()}")
        for p in parts:
            self.get(p)
        return tuple(dict.fromkeys(parts))
