"""Shared pieces of the CLI: console, error handling, option groups."""

from __future__ import annotations

import functools
import logging
import os

import click
from rich.console import Console

from r3v.errors import BackendError, DataError, ModelOutputError
from r3v.registry import UnknownNameError

console = Console(stderr=True)


def friendly_errors(func):
    """Turn r3v's input errors into a one-line message and exit code 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (DataError, UnknownNameError, ModelOutputError, BackendError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "datasets", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def model_options(func):
    """--model, --adapter, --backend, --trust-remote-code."""
    options = [
        click.option("--model", default="tiny-qwen2-vl", show_default=True, help="Hub id, local folder or built-in name."),
        click.option("--adapter", default=None, help="PEFT adapter folder applied on top of --model."),
        click.option("--backend", "backend_name", default="hf", show_default=True, help="Generation backend (see r3v list)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_task(name: str, task_args: dict | None = None, **options):
    """Build a registered task.

    ``task_args`` (from ``--task-arg KEY=VALUE``) must all be accepted by the task's constructor;
    ``options`` (e.g. skip_bad) are passed only where the constructor takes them.
    """
    import inspect

    from r3v.registry import tasks

    factory = tasks.get(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(task_args or {}) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p not in ("self", "args", "kwargs")) or "none"
        raise click.BadParameter(f"task {name!r} takes no option {', '.join(unknown)}; it takes: {known}",
                                 param_hint="--task-arg")
    kwargs = {k: v for k, v in options.items() if k in accepted}
    kwargs.update(task_args or {})
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        if not task_args:
            raise
        raise click.BadParameter(f"task {name!r}: {exc}", param_hint="--task-arg") from exc


def parse_task_args(items: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values true/false become booleans and numbers become numbers."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--task-arg")
        parsed[key.strip().replace("-", "_")] = _typed(value.strip())
    return parsed


def _typed(value: str):
    lowered = value.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def data_options(func):
    """--data-dir, --skip-bad, --allow-outside-paths, --task-arg."""
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with the task's official files (else the task's hub dataset)."),
        click.option("--skip-bad", is_flag=True,
                     help="Skip bad records and unreadable images (counted and listed) instead of stopping."),
        click.option("--allow-outside-paths", is_flag=True,
                     help="Let image paths in data files point outside the data folder."),
        click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
                     help="Option for the task, repeatable (e.g. relaxed=true for chartqa)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def report_bad_records(bad: list[str]) -> None:
    if not bad:
        return
    console.print(f"[yellow]skipped {len(bad)} bad record(s):[/]")
    for message in bad[:20]:
        console.print(f"  - {message}", markup=False, highlight=False)
    if len(bad) > 20:
        console.print(f"  ... and {len(bad) - 20} more")


def make_backend(name: str, model: str, adapter: str | None, trust_remote_code: bool, **kwargs):
    from r3v.registry import backends

    return backends.get(name)(model=model, adapter=adapter, trust_remote_code=trust_remote_code, **kwargs)
