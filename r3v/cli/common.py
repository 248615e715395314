"""Shared pieces of the CLI: console, error handling, option groups."""

from __future__ import annotations

import functools
import logging
import os

import click
from rich.console import Console

from r3v.errors import DataError, ModelOutputError
from r3v.registry import UnknownNameError

console = Console(stderr=True)


def friendly_errors(func):
    """Turn r3v's input errors into a one-line message and exit code 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (DataError, UnknownNameError, ModelOutputError) as exc:
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


def make_task(name: str, **kwargs):
    from r3v.registry import tasks

    return tasks.get(name)(**kwargs)


def make_backend(name: str, model: str, adapter: str | None, trust_remote_code: bool, **kwargs):
    from r3v.registry import backends

    return backends.get(name)(model=model, adapter=adapter, trust_remote_code=trust_remote_code, **kwargs)
