"""Shared pieces of the CLI: console, error handling, option groups."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from r3v.errors import BackendError, DataError, ModelOutputError
from r3v.reference import REFERENCE_TASK_ARGS
from r3v.registry import UnknownNameError

if TYPE_CHECKING:  # the task toolkit loads PIL; a command imports it only when it builds a task
    from r3v.tasks.base import Task

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


def make_task(name: str, task_args: Sequence[str] | Mapping[str, Any] | None = None, **common: Any) -> Task:
    """Build a registered task (``r3v.tasks.base.build_task``); a bad option is a usage error.

    ``task_args`` are ``--task-arg`` items (``KEY=VALUE`` text, typed by the task's options) or a
    mapping of already parsed ones (a config's ``task.args``); ``common`` are the data flags.
    """
    from r3v.tasks.base import OptionError, build_task

    args = task_args if isinstance(task_args, Mapping) else split_task_args(task_args or ())
    try:
        return build_task(name, args, **common)
    except OptionError as exc:
        raise click.BadParameter(str(exc), param_hint="--task-arg") from exc


def split_task_args(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as text; the task's options dataclass gives each its type."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--task-arg")
        parsed[key.strip().replace("-", "_")] = value.strip()
    return parsed


def parse_task_args(items: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs typed the way a YAML config types them (true/false to booleans, numbers to
    numbers), for ``r3v train``'s config, where a flag and a config file must give a run the same
    settings. The task converts them to its options' types either way."""
    return {key: _typed(value) for key, value in split_task_args(items).items()}


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


def task_options(func):
    """--skip-bad, --allow-outside-paths, --task-arg, --reference: how a task reads its input and
    scores, the same in every command. ``--reference`` adds the reference's task options
    (``with_reference_args``), unless the command takes a ``reference`` parameter and applies the
    flag itself (``r3v bench``, ``r3v train``: it also changes how they select and train)."""
    if "reference" not in inspect.signature(func).parameters:
        inner = func

        @functools.wraps(inner)
        def func(*args, reference: bool = False, task_args: tuple[str, ...] = (), **kwargs):
            return inner(*args, task_args=with_reference_args(task_args) if reference else task_args, **kwargs)

    options = [
        click.option("--reference", is_flag=True,
                     help="Behave as the task's reference code where r3v differs on purpose "
                          "(docs/reference.md): official scoring (seeded draws) and prompt wording; in bench "
                          "and train also its selection, in train its loss mean and training targets."),
        click.option("--skip-bad", is_flag=True,
                     help="Skip bad records (malformed records or input lines, unreadable images): counted and "
                          "listed instead of stopping."),
        click.option("--allow-outside-paths", is_flag=True,
                     help="Let image paths in data files point outside the data folder."),
        click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
                     help="Option for the task, repeatable (e.g. relaxed=true for chartqa; r3v list shows them)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def with_reference_args(task_args: Sequence[str]) -> tuple[str, ...]:
    """``--task-arg`` items with the reference's task options first (the given ones still win)."""
    return (*(f"{key}={value}" for key, value in REFERENCE_TASK_ARGS.items()), *task_args)


def data_options(func):
    """--data-dir, then ``task_options``."""
    func = task_options(func)
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="Folder with the task's official files (else the task's hub dataset).")(func)


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of a dataclass, for a command's option defaults: the dataclass
    stays the one place a default is written."""
    defaults = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


def report_bad_records(bad: list[str]) -> None:
    if not bad:
        return
    console.print(f"[yellow]skipped {len(bad)} bad record(s):[/]")
    for message in bad[:20]:
        console.print(f"  - {message}", markup=False, highlight=False)
    if len(bad) > 20:
        console.print(f"  ... and {len(bad) - 20} more")


def engine_options(func):
    """Generation engine options (vLLM's; --max-pixels for every backend) and --engine-batch. The
    command gets vLLM's as one ``engine`` mapping of the options given, by the backends' parameter
    names; ``max_pixels`` and ``engine_batch`` as they are."""
    inner = func

    @functools.wraps(inner)
    def func(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in ENGINE_OPTION_NAMES}
        return inner(*args, engine={name: value for name, value in given.items() if value is not None}, **kwargs)

    options = [
        click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=None,
                     help="vllm: GPUs one engine spans (tensor parallel)."),
        click.option("--data-parallel-size", type=click.IntRange(min=1), default=None,
                     help="vllm: engine replicas, each on --tensor-parallel-size GPUs (vLLM's own data-parallel engine)."),
        click.option("--max-model-len", type=click.IntRange(min=16), default=None,
                     help="vllm: longest prompt + completion in tokens [default: the model's]."),
        click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="vllm: share of each GPU the engine may take [vLLM's default]."),
        click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
                     help="vllm: sequences decoded at once [vLLM's default]."),
        click.option("--max-lora-rank", type=click.IntRange(min=1), default=None,
                     help="vllm: largest LoRA rank the engine serves [default: the adapter's, rounded up]."),
        click.option("--max-pixels", type=click.IntRange(min=28 * 28), default=None,
                     help="Pixel cap per image (Qwen2-VL family) [default: the model family's; train: also for training]."),
        click.option("--engine-batch", type=click.IntRange(min=1), default=None,
                     help="Questions per backend call; several resume chunks go at once [default: 512 for vllm, "
                          "one chunk otherwise]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: vLLM's engine options, as the backend's parameters: the ``engine`` mapping ``engine_options`` gives.
ENGINE_OPTION_NAMES = ("tensor_parallel_size", "data_parallel_size", "max_model_len", "gpu_memory_utilization",
                       "max_num_seqs", "max_lora_rank")


def with_pixel_cap(engine: dict[str, Any], max_pixels: int | None) -> dict[str, Any]:
    """The backend options: the engine's, plus the pixel cap when one is given."""
    return {**engine, "max_pixels": max_pixels} if max_pixels is not None else dict(engine)


def check_backend_options(name: str, options: dict) -> None:
    """Refuse, before any model loads, options the chosen backend does not take."""
    import inspect

    from r3v.registry import backends

    accepted = inspect.signature(backends.get(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return  # the backend checks its own options (openai: OpenAIOptions)
    unknown = sorted(key for key in options if key not in accepted)
    if unknown:
        flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
        raise click.UsageError(f"the {name} backend takes no {flags}")


def make_backend(name: str, model: str, adapter: str | None, trust_remote_code: bool, **kwargs):
    from r3v.registry import backends

    options = {key: value for key, value in kwargs.items() if value is not None}
    check_backend_options(name, options)
    return backends.get(name)(model=model, adapter=adapter, trust_remote_code=trust_remote_code, **options)


def run_identity(model: str, adapter: str | None, backend: str, task: str, task_args: Sequence[str],
                 max_pixels: int | None = None, reference: bool = False, **fields: Any) -> dict[str, Any]:
    """What a bench, probe or online run measures, for its manifest and its default folder: the
    model, backend and task, and only when given the options that change the outputs (task options,
    ``--reference``, the pixel cap), so runs without them keep their earlier identity."""
    identity: dict[str, Any] = {"model": model, "adapter": adapter, "backend": backend, "task": task, **fields}
    if task_args:
        identity["task_args"] = list(task_args)
    if reference:
        identity["reference"] = True
    if max_pixels is not None:
        identity["max_pixels"] = max_pixels
    return identity


def data_identity(split: str, limit: int | None, data_dir: str | None) -> dict[str, Any]:
    """The split, question limit and data folder (resolved) of a run's identity."""
    return {"split": split, "limit": limit, "data_dir": str(Path(data_dir).resolve()) if data_dir else None}


def load_examples(task: Task, split: str, data_dir: str | None, limit: int | None) -> list:
    """The task's questions, with the bad records it skipped reported."""
    examples = task.load(split, data_dir=data_dir, limit=limit)
    report_bad_records(task.bad_records)
    return examples


def progress_bar(label: str, field: str = "rate") -> Progress:
    """The progress display of a long command: a bar, done/total, one free text field, time left."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(f"{{task.fields[{field}]}}"),
                    TimeRemainingColumn(), console=console)
