from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from r3v.cli.common import (
    console,
    engine_options,
    engine_settings,
    friendly_errors,
    make_backend,
    make_task,
    model_options,
    quiet_libraries,
)
from r3v.cli.generate import sampling_options
from r3v.selectors.base import BASELINES, FIRST, MAJORITY, ORACLE, SELF_SELECT


@click.command()
@model_options
@click.option("--task", "task_name", default="clevr-synth", show_default=True)
@click.option("--selector", "selector_names", multiple=True, default=(SELF_SELECT,), show_default=True,
              help="Selector to compare (repeatable; see r3v list). first, majority and oracle always run.")
@click.option("--n-ladder", default="1,3,5,7", show_default=True,
              help="ks to report, capped at --n (N itself is always reported).")
@click.option("--limit", type=int, default=None, help="Use only the first K questions.")
@click.option("--split", default="test", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the task's official files.")
@sampling_options
@click.option("--select-max-new-tokens", type=int, default=None,
              help="Token limit of the self-select call [default: --max-new-tokens].")
@click.option("--chunk-size", default=32, show_default=True, help="Questions per generate call (and per resume unit).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/bench-<task>-<model>/<split>-n<N>-<limit>-<settings hash>].")
@click.option("--json", "as_json", is_flag=True, help="Print only the results JSON on stdout (progress goes to stderr).")
@click.option("--plot", is_flag=True, help="Also write OUT/accuracy_vs_n.png (needs matplotlib).")
@engine_options
@friendly_errors
def bench(
    model, adapter, backend_name, trust_remote_code, task_name, selector_names, n_ladder, limit, split, data_dir,
    n, temperature, top_p, top_k, max_new_tokens, greedy, seed, select_max_new_tokens, chunk_size, out_dir,
    as_json, plot, tensor_parallel_size, data_parallel_size, max_model_len, gpu_memory_utilization, max_num_seqs,
    max_lora_rank, max_pixels, engine_batch,
):
    """Sample N answers per test question once, then compare test-time selectors at each k.

    Samples are stored in OUT/samples.jsonl and reused by a rerun. Reports Test@1 (first sample),
    majority vote, the chosen selector(s) and the unbiased pass@k upper bound for every k of the ladder.
    """
    from r3v.bench import (
        BenchConfig,
        MissingExtraError,
        default_out_dir,
        plot_accuracy,
        run_bench,
    )
    from r3v.metrics import parse_ladder
    from r3v.records import Sampling
    from r3v.registry import selectors

    quiet_libraries()
    for hint, value in (("--n", n), ("--limit", limit), ("--chunk-size", chunk_size),
                        ("--max-new-tokens", max_new_tokens), ("--select-max-new-tokens", select_max_new_tokens)):
        if value is not None and value < 1:
            raise click.BadParameter("must be at least 1", param_hint=hint)
    try:
        ladder = parse_ladder(n_ladder)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--n-ladder") from exc
    for name in selector_names:
        selectors.get(name)  # an unknown name fails here, before any model is loaded
    chosen = list(dict.fromkeys(selector_names))
    names = [FIRST, MAJORITY, *[s for s in chosen if s not in BASELINES], ORACLE]
    names += [s for s in chosen if s not in names]

    sampling = Sampling(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)
    config = BenchConfig(sampling=sampling, ladder=tuple(ladder), selectors=tuple(names),
                         select_max_new_tokens=select_max_new_tokens, chunk_size=chunk_size, engine_batch=engine_batch)
    engine = engine_settings(
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs, max_lora_rank=max_lora_rank,
        max_pixels=max_pixels,
    )
    identity = {
        "model": model, "adapter": adapter, "backend": backend_name, "task": task_name, "split": split,
        "limit": limit, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
    }
    if max_pixels is not None:  # the images the model sees change the samples
        identity["max_pixels"] = max_pixels
    out = Path(out_dir) if out_dir else default_out_dir(identity, config)

    # Libraries may print to stdout while loading, building or training a model (e.g. trainer logs
    # when a built-in model is first built); stdout is reserved for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        task = make_task(task_name)
        examples = task.load(split, data_dir=data_dir, limit=limit)
        console.print(f"bench: {len(examples)} questions x N={n} -> {out}")
        backend = make_backend(backend_name, model, adapter, trust_remote_code, **engine)

        started = time.perf_counter()
        with Progress(
            TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=console,
        ) as progress:
            bar = progress.add_task("sampling", total=len(examples), rate="")
            generated = 0

            def on_chunk(done: int, total: int, new: list) -> None:
                nonlocal generated
                generated += len(new)
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{generated} new samples, {done / elapsed:.2f} items/s")

            results = run_bench(backend, task, examples, config, out, identity, on_chunk=on_chunk,
                                log=lambda line: console.print(f"  {line}"))
        console.print(f"{generated} new samples generated ({results['samples'] - generated} reused)")

        if plot:
            try:
                png = plot_accuracy(results, out / "accuracy_vs_n.png")
            except MissingExtraError as exc:
                raise click.ClickException(str(exc)) from exc
            console.print(f"plot -> {png}")

    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        Console().print(render_table(results, chosen))
        Console().print(summary_line(results, chosen))
    console.print(f"results -> {out / 'results.json'}, per question -> {out / 'items.jsonl'}")


def render_table(results: dict, chosen: list[str]) -> Table:
    from r3v.metrics import metric_name

    shown = ["first", "majority", *[s for s in chosen if s not in ("first", "majority")]]
    title = f"{results['task']} · {results['model']} · {results['examples']} questions x N={results['n']}"
    table = Table(title=title, min_width=len(title) + 2)
    table.add_column("k", justify="right")
    for name in shown:
        table.add_column("Test@1" if name == "first" else metric_name(name, "k"), justify="right")
    table.add_column("pass@k", justify="right")
    for k in results["ks"]:
        row = results["ladder"][str(k)]
        cells = [f"{row[metric_name(name, k)]:.3f}" for name in shown]
        table.add_row(str(k), *cells, f"{row[f'pass@{k}']:.3f}")
    return table


def summary_line(results: dict, chosen: list[str]) -> str:
    from r3v.metrics import metric_name

    n = results["n"]
    acc = results["accuracy"]
    parts = [f"Test@1 {acc['first']:.3f}", f"maj@{n} {acc['majority']:.3f}"]
    parts += [f"{metric_name(s, n)} {acc[s]:.3f}" for s in chosen if s not in ("first", "majority")]
    parts.append(f"pass@{n} {results['pass_at_k'][str(n)]:.3f}")
    lines = [f"At N={n}: " + " · ".join(parts)]
    for name in chosen:
        counts = results["counts"][name]
        if counts["model"] or counts["skipped"] or counts["fallback"]:
            lines.append(f"{name} at N={n}: {counts['model']} model choices, {counts['skipped']} skipped "
                         f"(candidates agreed), {counts['fallback']} fallbacks to majority vote (unparseable output)")
    return "\n".join(lines)
