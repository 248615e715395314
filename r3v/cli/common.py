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
    """Build a registered task (see ``r3v.tasks.base.build_task``); a bad option is a usage error."""
    from r3v.tasks.base import build_task

    try:
        return build_task(name, task_args, **options)
    except (TypeError, ValueError) as exc:
        if not task_args:
            raise
        raise click.BadParameter(str(exc), param_hint="--task-arg") from exc


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


def engine_options(func):
    """Generation engine options (vLLM's; --max-pixels for every backend) and --engine-batch."""
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


ENGINE_OPTION_NAMES = ("tensor_parallel_size", "data_parallel_size", "max_model_len", "gpu_memory_utilization",
                       "max_num_seqs", "max_lora_rank", "max_pixels")


def engine_settings(**given) -> dict:
    """The engine options that were given (not None), by the backends' parameter names."""
    return {name: value for name, value in given.items() if name in ENGINE_OPTION_NAMES and value is not None}


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
