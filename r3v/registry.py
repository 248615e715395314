"""One small generic registry for backends, selectors and tasks.

Implementations are found three ways:

- **built in**: one module per implementation in the registry's package, named after it
  (``r3v/selectors/self_select.py`` is the selector ``self-select``). A module is imported only
  when its name is asked for, so looking up a task never loads a backend's torch;
- **decorated**: ``@registry.register("name")`` on a class or factory, in any module imported;
- **plugins**: the ``r3v.plugins`` entry-point group. Each entry point names a module that
  registers its objects on import, or a callable that does.

An unknown name raises ``UnknownNameError``, which lists the known names and the closest one.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")

PLUGIN_GROUP = "r3v.plugins"
#: Modules of a plug-in package that are not implementations.
NOT_IMPLEMENTATIONS = {"base", "__init__", "__main__"}
_plugins_loaded = False


class UnknownNameError(KeyError):
    """Raised when a name is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Names to implementations of one kind (``kind`` is used in messages)."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def builtin_names(self) -> list[str]:
        """The names of the package's own implementations, from its module names (nothing imported)."""
        if self.package is None:
            return []
        spec = importlib.util.find_spec(self.package)
        paths = spec.submodule_search_locations if spec else None
        return sorted(info.name.replace("_", "-") for info in pkgutil.iter_modules(paths or [])
                      if info.name not in NOT_IMPLEMENTATIONS and not info.name.startswith("_"))

    def _import_builtin(self, name: str) -> None:
        if self.package is not None and name in self.builtin_names():
            importlib.import_module(f"{self.package}.{name.replace('-', '_')}")

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._import_builtin(name)
        if name not in self._entries:
            load_plugins()
        if name not in self._entries:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or 'none'}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(set(self.builtin_names()) | set(self._entries))

    def items(self) -> Iterator[tuple[str, T]]:
        """Every implementation, built-in ones imported (``r3v list``)."""
        for name in self.builtin_names():
            self._import_builtin(name)
        load_plugins()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        return name in self.names()


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
