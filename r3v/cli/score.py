from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from r3v.cli.common import console, friendly_errors, make_task, task_options


@click.command()
@click.option("--task", "task_name", required=True, help="Registered task whose rules score the file (see r3v list).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help='Print {"task", "n", "accuracy", "breakdown"} as JSON on stdout.')
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write one verdict per input line (JSONL, input order).")
@task_options
@friendly_errors
def score(
    task_name: str, file: str, as_json: bool, out_path: str | None, skip_bad: bool, allow_outside_paths: bool,
    task_args: tuple[str, ...],
) -> None:
    """Score the model outputs in FILE (JSON lines) with a task's official rules.

    Each line is one record in the benchmark's own field names plus "prediction", the raw model
    output. Accuracy is printed overall and broken down the way the benchmark reports it.
    """
    from r3v.io import atomic_write_text
    from r3v.scoring import score_file

    # --skip-bad here skips the bad lines of FILE (score_file); the task loads no data of its own
    task = make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    report = score_file(task, file, skip_bad=skip_bad, task_name=task_name)

    if out_path:
        atomic_write_text(out_path, "".join(json.dumps(v.to_dict(), ensure_ascii=False) + "\n" for v in report.verdicts))
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} bad line(s):[/yellow]")
        for message in report.skipped:
            console.print(f"  {message}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(report.summary(), ensure_ascii=False))
        return
    Console().print(_table(report))


def _table(report) -> Table:
    table = Table(title=f"{report.task}: {report.correct}/{report.n} correct")
    # a breakdown value can be one long word (a topic, a MiniWob task name): fold it, never cut it
    table.add_column("group", overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_row("all", "", str(report.n), f"{100 * report.accuracy:.2f}%")
    for key, groups in report.breakdown.items():
        for value, cell in groups.items():
            table.add_row(key, value, str(cell["n"]), f"{100 * cell['accuracy']:.2f}%")
    return table
