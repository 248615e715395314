"""One small generic registry for backends, selectors and tasks.

Third-party packages add entries through the ``r3v.plugins`` entry-point group: each entry point
names a module (or a callable) that registers its objects on import.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")

PLUGIN_GROUP = "r3v.plugins"
_plugins_loaded = False


class UnknownNameError(KeyError):
    """Raised when a name is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin_module: str | None = None) -> None:
        self.kind = kind
        self.builtin_module = builtin_module
        self._entries: dict[str, T] = {}

    def _load(self) -> None:
        # Only this registry's own package is imported: scoring needs tasks, not torch-heavy backends.
        if self.builtin_module:
            importlib.import_module(self.builtin_module)
        load_plugins()

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or 'none'}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


backends: Registry[Callable] = Registry("backend", "r3v.backends")
selectors: Registry[Callable] = Registry("selector", "r3v.selectors")
tasks: Registry[Callable] = Registry("task", "r3v.tasks")


def load_plugins() -> None:
    """Import the plugins of the ``r3v.plugins`` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in metadata.entry_points(group=PLUGIN_GROUP):
        loaded = entry_point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()
