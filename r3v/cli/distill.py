"""``r3v distill``: collect warm-up rationales from a teacher model (library: r3v/distill.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from r3v.cli.common import (
    console,
    data_options,
    dataclass_defaults,
    friendly_errors,
    make_backend,
    make_task,
    quiet_libraries,
    report_bad_records,
    split_task_args,
)
from r3v.config import TaskConfig
from r3v.distill import DistillConfig
from r3v.tasks.base import given_options

#: The defaults of every option below that is a DistillConfig field.
DEFAULTS = dataclass_defaults(DistillConfig)

#: Options that only the openai backend takes, as (CLI parameter, backend option).
HTTP_OPTIONS = (
    ("base_url", "base_url"),
    ("api_key_env", "api_key_env"),
    ("max_concurrency", "max_concurrency"),
    ("timeout", "timeout_s"),
    ("max_retries", "max_retries"),
)


@click.command()
@click.option(
    "--teacher", required=True, help="Teacher: API model name (openai), or hub id / folder (hf, vllm)."
)
@click.option("--backend", "backend_name", default=DEFAULTS["backend"], show_default=True, help="openai, hf or vllm.")
@click.option("--task", "task_name", default=TaskConfig.name, show_default=True)
@click.option("--split", default=DEFAULTS["split"], show_default=True)
@data_options
@click.option("--limit", type=int, default=DEFAULTS["limit"], show_default=True, help="Ask the first K questions.")
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Warm-up file (JSONL)."
)
@click.option("--tries", default=DEFAULTS["tries"], show_default=True,
              help="Rounds; each asks only the unsolved questions.")
@click.option("--n", default=DEFAULTS["n"], show_default=True, help="Rationales asked per question per round.")
@click.option("--keep-per-question", default=DEFAULTS["keep_per_question"], show_default=True,
              help="Distinct correct rationales kept.")
@click.option("--temperature", default=DEFAULTS["temperature"], show_default=True)
@click.option("--top-p", default=DEFAULTS["top_p"], show_default=True)
@click.option("--top-k", default=DEFAULTS["top_k"], show_default=True, help="Used by hf and vllm; openai sends none.")
@click.option("--max-new-tokens", default=DEFAULTS["max_new_tokens"], show_default=True)
@click.option("--seed", default=DEFAULTS["seed"], show_default=True)
@click.option("--chunk-size", default=DEFAULTS["chunk_size"], show_default=True,
              help="Questions per call and per resume unit.")
@click.option("--answer-hint", is_flag=True, default=DEFAULTS["answer_hint"], help="Tell the teacher to end with the task's answer line.")
@click.option("--base-url", default=None, help="openai: API root [default: $R3V_OPENAI_BASE_URL, OpenAI].")
@click.option(
    "--api-key-env", default=None, help="openai: environment variable with the key [OPENAI_API_KEY]."
)
@click.option("--max-concurrency", type=int, default=None, help="openai: requests in flight [8].")
@click.option("--timeout", type=float, default=None, help="openai: seconds to wait for a reply [120].")
@click.option("--max-retries", type=int, default=None, help="openai: retries on 429/5xx/timeouts [5].")
@click.option(
    "--price-prompt", type=float, default=None, help="USD per 1M prompt tokens, for the cost report."
)
@click.option("--price-completion", type=float, default=None, help="USD per 1M completion tokens.")
@click.option("--trust-remote-code", is_flag=True, help="hf/vllm: allow model code from the hub.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@friendly_errors
def distill(
    teacher, backend_name, task_name, split, data_dir, skip_bad, allow_outside_paths, task_args, limit, out_path, tries, n, keep_per_question,
    temperature, top_p, top_k, max_new_tokens, seed, chunk_size, answer_hint, base_url, api_key_env,
    max_concurrency, timeout, max_retries, price_prompt, price_completion, trust_remote_code, as_json,
):  # fmt: skip
    """Ask a teacher for a rationale per question; keep those with the right answer.

    Writes JSONL lines {example_id, task, prompt, target, teacher} for `r3v train --warmup-file`,
    and a manifest beside it. Rerunning the same command resumes: stored answers are not asked again.
    """
    from r3v.backends.openai import BackendError
    from r3v.distill import Prices
    from r3v.distill import distill as run_distill

    given = {"base_url": base_url, "api_key_env": api_key_env, "max_concurrency": max_concurrency,
             "timeout": timeout, "max_retries": max_retries}  # fmt: skip
    backend_options = {option: given[param] for param, option in HTTP_OPTIONS if given[param] is not None}
    if backend_options and backend_name != "openai":
        flags = ", ".join("--" + p.replace("_", "-") for p, _ in HTTP_OPTIONS if given[p] is not None)
        raise click.UsageError(f"only --backend openai takes {flags}")
    if (price_prompt is None) != (price_completion is None):
        raise click.UsageError("give both --price-prompt and --price-completion, or neither")
    prices = Prices(price_prompt, price_completion) if price_prompt is not None else None

    quiet_libraries()
    try:
        config = DistillConfig(
            teacher=teacher, task=task_name, backend=backend_name, split=split, limit=limit, data_dir=data_dir,
            tries=tries, n=n, keep_per_question=keep_per_question, temperature=temperature, top_p=top_p,
            top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, chunk_size=chunk_size, answer_hint=answer_hint,
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    task = make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    config = replace(config, task_args=given_options(task, split_task_args(task_args)))
    examples = task.load(split, data_dir=data_dir, limit=limit)
    if not as_json:
        report_bad_records(task.bad_records)
    try:
        backend = make_backend(backend_name, teacher, None, trust_remote_code, **backend_options)
    except ValueError as exc:  # a missing key, a bad URL: say so in one line
        raise click.ClickException(str(exc)) from exc

    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=as_json,
        ) as progress:  # fmt: skip
            bars: dict[int, int] = {}

            def on_chunk(try_number: int, done: int, total: int, new: list) -> None:
                if try_number not in bars:
                    bars[try_number] = progress.add_task(f"try {try_number}", total=total)
                progress.update(bars[try_number], completed=done)

            report = run_distill(
                backend, task, examples, config, Path(out_path), prices=prices, on_chunk=on_chunk
            )
    except BackendError as exc:
        raise click.ClickException(
            f"{exc}\nRerun the same command to resume; stored answers are kept."
        ) from exc

    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(report_table(report))


def report_table(report) -> Table:
    table = Table(title=f"distillation: {report.teacher} on {report.task}/{report.split}", show_header=False)
    table.add_column("what")
    # long values (the output path) fold onto more lines rather than being cut at 80 columns
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("questions asked", str(report.questions))
    table.add_row("questions kept (yield)", f"{report.kept_questions} ({report.yield_rate:.1%})")
    table.add_row("rationales written", f"{report.rationales} -> {report.out}")
    for t in report.tries:
        table.add_row(
            f"try {t.try_number}", f"asked {t.asked}, solved {t.solved}, {t.correct}/{t.samples} correct"
        )
    table.add_row(
        "tokens, all tries (prompt / completion)", f"{report.prompt_tokens:,} / {report.completion_tokens:,}"
    )
    if report.cost_usd is not None:
        table.add_row("cost, all tries", f"${report.cost_usd:,.4f}")
    if report.this_run is not None:
        run = report.this_run
        table.add_row("this run: requests (retries)", f"{run['requests']} ({run['retries']})")
        table.add_row(
            "this run: tokens (prompt / completion)",
            f"{run['prompt_tokens']:,} / {run['completion_tokens']:,}",
        )
        if report.this_run_cost_usd is not None:
            table.add_row("this run: cost", f"${report.this_run_cost_usd:,.4f}")
    return table
