from __future__ import annotations

import dataclasses

import click
from rich.console import Console
from rich.table import Table

from r3v.models.tiny import built_in_models
from r3v.registry import backends, selectors, tasks

#: Options every data task takes as flags of their own; ``r3v list`` shows only the others.
FLAG_OPTIONS = ("skip_bad", "allow_outside_paths")


@click.command("list")
def list_command() -> None:
    """Show registered backends, selectors and tasks (with their splits, options and data sources),
    and the built-in models."""
    Console().print(registry_table())


def registry_table() -> Table:
    """Every registered name with one line of detail (fits 80 columns: the details wrap)."""
    table = Table(title="r3v registry")
    table.add_column("kind")
    table.add_column("name", overflow="fold")
    table.add_column("details", overflow="fold")  # a source's file pattern can be one long word
    for name, factory in backends.items():
        table.add_row("backend", name, _first_line(factory.__doc__))
    for name, factory in selectors.items():
        table.add_row("selector", name, _first_line(factory.__doc__))
    for name, factory in tasks.items():
        table.add_row("task", name, task_details(factory))
    for name, text in built_in_models().items():
        table.add_row("model", name, text)
    return table


def task_details(factory: type) -> str:
    """Splits, ``--task-arg`` options and sources, read from the task class without building it."""
    parts = [f"splits: {', '.join(factory.splits)}"]
    options = [f.name for f in dataclasses.fields(factory.Options) if f.name not in FLAG_OPTIONS]
    if options:
        parts.append(f"options: {', '.join(options)}")
    parts.append(f"sources: {factory.sources}")
    return "; ".join(parts)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""
