"""One registry per kind of thing (attacks, targets): refuses duplicates, lists valid names (STYLE.md)."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from collafuse.errors import CollafuseError

T = TypeVar("T")


class UnknownNameError(CollafuseError):
    """A name that is not in a registry (the message lists the valid ones)."""


class Registry(Generic[T]):
    """Name → item, in registration order. ``kind`` names the things in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a second registration of the same name is refused."""
        if not name or "," in name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def parse(self, text: str | None) -> tuple[str, ...]:
        """A comma-separated list of names (``None`` = all), validated, duplicates dropped, order kept."""
        if text is None:
            return self.names()
        parts = [p.strip() for p in text.split(",")]
        if not any(parts) or any(not p for p in parts):
            raise UnknownNameError(f"empty {self.kind} name in {text!r}; valid: {', '.join(self._items)}")
        for p in parts:
            self.get(p)
        return tuple(dict.fromkeys(parts))
