from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from r3v.cli import common
from r3v.config import TaskConfig
from r3v.probe import BLANK_FILLS, COUNTERFACTUAL, IMAGE_SWAP, ORIGINAL, PROBES, PROMPTS, ProbeConfig

DEFAULTS = ProbeConfig()


@click.command()
@common.model_options
@click.option("--task", "task_name", default=TaskConfig.name, show_default=True)
@click.option("--probe", "probe_names", multiple=True, type=click.Choice(PROBES), default=DEFAULTS.probes,
              show_default=True, help="Probe to run (repeatable). A task without a counterfactual hook skips that one.")
@click.option("--limit", type=int, default=None, help="Use only the first K questions.")
@click.option("--split", default="test", show_default=True)
@common.data_options
@click.option("--prompt", "prompt_kind", type=click.Choice(PROMPTS), default=DEFAULTS.prompt, show_default=True,
              help="The task's chain-of-thought or direct-answer prompt.")
@click.option("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, show_default=True)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Seeds the image-swap pairing and the decoding.")
@click.option("--blank-fill", type=click.Choice(BLANK_FILLS), default=DEFAULTS.blank_fill, show_default=True,
              help="The blank image's colour: mid-grey, or each image's mean colour.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.threshold,
              show_default=True, help="Share of answers kept under the image swap from which the model "
                                      "ignores the image.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/probe-<task>-<model>/<split>-<limit>-<settings hash>].")
@click.option("--json", "as_json", is_flag=True, help="Print only the results JSON on stdout (progress goes to stderr).")
@common.engine_options
@common.friendly_errors
def probe(
    model, adapter, backend_name, trust_remote_code, task_name, probe_names, limit, split, data_dir, skip_bad,
    allow_outside_paths, task_args, prompt_kind, max_new_tokens, seed, blank_fill, threshold, out_dir, as_json,
    engine,
    max_pixels, engine_batch,
):
    """Tell a model that reads the image from one that answers from the prior.

    Asks each question greedily with its own image, with another question's image (image-swap),
    with a uniform image (blank) and, where the task can edit its scenes, with an edit that changes
    the gold answer (counterfactual). Reports accuracy and how often the answer stays the same.
    """
    from r3v.probe import default_out_dir, run_probe

    common.quiet_libraries()
    for hint, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise click.BadParameter("must be at least 1", param_hint=hint)
    config = ProbeConfig(probes=tuple(probe_names), prompt=prompt_kind, max_new_tokens=max_new_tokens, seed=seed,
                         blank_fill=blank_fill, threshold=threshold,
                         chunk_size=engine_batch or DEFAULTS.chunk_size)
    engine = common.with_pixel_cap(engine, max_pixels)
    identity = common.run_identity(model, adapter, backend_name, task_name, task_args, max_pixels,
                            **common.data_identity(split, limit, data_dir))
    out = Path(out_dir) if out_dir else default_out_dir(identity, config)

    # stdout is reserved for the table or the JSON; libraries may print while loading a model
    with contextlib.redirect_stdout(sys.stderr):
        task = common.make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
        examples = common.load_examples(task, split, data_dir, limit)
        common.console.print(f"probe: {len(examples)} questions, {', '.join(config.probes)} -> {out}")
        backend = common.make_backend(backend_name, model, adapter, trust_remote_code, **engine)

        started = time.perf_counter()
        with common.progress_bar("probing") as progress:
            bar = progress.add_task("probing", total=len(examples), rate="")

            def on_chunk(done: int, total: int) -> None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, total=total, rate=f"{done / elapsed:.2f} questions/s")

            unreadable: list[str] = []
            results = run_probe(backend, task, examples, config, out, identity, on_chunk=on_chunk,
                                skip_bad=skip_bad, bad=unreadable)
        common.report_bad_records(unreadable)
        if results["without_image"]:
            common.console.print(f"{len(results['without_image'])} question(s) without an image left out")

    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        Console().print(render_table(results))
        Console().print(verdict_line(results))
    common.console.print(f"results -> {out / 'results.json'}, per question -> {out / 'items.jsonl'}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(results: dict) -> Table:
    """One row per probe (after the unaltered questions): questions asked, accuracy, the share of
    answers kept, that share where the gold answer changes, and what else the probe reports."""
    title = f"{results['task']} · {results['model']} · {results['questions']} questions"
    table = Table(title=title, title_justify="left")
    table.add_column("probe", min_width=len(COUNTERFACTUAL))
    table.add_column("asked", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("answer\nkept", justify="right")
    table.add_column("kept,\ngold\nchanged", justify="right")
    table.add_column("note")
    original = results[ORIGINAL]
    table.add_row(ORIGINAL, str(results["questions"]), _share(original["accuracy"]), "", "", "own image")
    for name in results["config"]["probes"]:
        if name in results["skipped"]:
            table.add_row(name, "-", "-", "-", "-", "skipped: the task cannot edit its images")
            continue
        report = results["probes"][name]
        kept_changed = ""
        if name == IMAGE_SWAP:
            known = report["gold_known"]
            kept_changed = _share(report["gold_changed"]["answer_same"]) if known else "-"
            note = f"gold same {_share(report['gold_same'])}" if known else "gold on swap unknown"
        elif name == COUNTERFACTUAL:
            note = f"accuracy on new gold (was {_share(report['accuracy_original'])})"
        else:
            note = f"{report['fill']} fill"
        table.add_row(name, str(report["questions"]), _share(report["accuracy"]), _share(report["answer_same"]),
                      kept_changed, note)
    return table


def verdict_line(results: dict) -> str:
    verdict = results["verdict"]
    if verdict["ignores_image"] is None:
        return f"No verdict: {verdict['reason']}."
    over = ("questions whose gold answer changes under the swap" if verdict["on"] == "gold changed"
            else "swapped questions")
    finding = "the model IGNORES THE IMAGE" if verdict["ignores_image"] else "the model reads the image"
    return (f"Image swap: answer kept on {verdict['share']:.1%} of the {verdict['questions']} {over} "
            f"(threshold {verdict['threshold']:.0%}): {finding}.")
