"""Exact-name registries for pluggable parts (encoders, projectors, LLM families, templates, tasks).

Why exact names: substring matching (``"clip" in name``) silently picks the wrong part when names
overlap (``eva_clip`` contains ``clip``). An unknown name is an error that lists every known one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A mapping from exact names to objects, filled by ``@REGISTRY.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        """Remove and return ``name`` (tests register throwaway parts and take them out again)."""
        self.get(name)  # unknown -> the usual error
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_parts(package: str, path, skip: frozenset[str] | set[str] = frozenset({"base"})) -> list[str]:
    """Import every module of ``package`` (its ``__path__``) but ``skip``: the parts register
    themselves on import, so adding one is adding its file. Returns the imported names."""
    import importlib
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(path) if m.name not in skip and not m.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
