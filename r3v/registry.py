"""One small generic registry for backends, selectors and tasks.

Third-party packages add entries through the ``r3v.plugins`` entry-point group: each entry point
names a module (or a callable) that registers its objects on import.
"""

from __future__ import annotations

import difflib
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
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        load_builtins()
        if name not in self._entries:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or 'none'}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        load_builtins()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        load_builtins()
        return name in self._entries


backends: Registry[Callable] = Registry("backend")
selectors: Registry[Callable] = Registry("selector")
tasks: Registry[Callable] = Registry("task")


def load_builtins() -> None:
    """Import the built-in implementations, then any plugins, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import r3v.backends  # noqa: F401
    import r3v.selectors  # noqa: F401
    import r3v.tasks  # noqa: F401

    for entry_point in metadata.entry_points(group=PLUGIN_GROUP):
        loaded = entry_point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()
