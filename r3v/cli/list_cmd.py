from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from r3v.registry import backends, selectors, tasks


@click.command("list")
def list_command() -> None:
    """Show registered backends, selectors and tasks (with their splits and data sources)."""
    console = Console()
    table = Table(title="r3v registry")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("details")
    for name, factory in backends.items():
        table.add_row("backend", name, _first_line(factory.__doc__))
    for name, factory in selectors.items():
        table.add_row("selector", name, _first_line(factory.__doc__))
    for name, factory in tasks.items():
        splits = ", ".join(getattr(factory, "splits", ()))
        table.add_row("task", name, f"splits: {splits}; sources: {getattr(factory, 'sources', '?')}")
    console.print(table)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""
