from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from r3v.bench import BenchConfig
from r3v.cli.common import (
    console,
    data_identity,
    data_options,
    engine_options,
    friendly_errors,
    load_examples,
    make_backend,
    make_task,
    model_options,
    progress_bar,
    quiet_libraries,
    report_bad_records,
    run_identity,
    with_pixel_cap,
    with_reference_args,
)
from r3v.cli.generate import sampling_options
from r3v.config import UNPARSEABLE_RULES, SelectConfig, TaskConfig
from r3v.online import OnlineConfig
from r3v.reference import REFERENCE_SELECT
from r3v.selectors.base import BASELINES, FIRST, MAJORITY, METRIC_PREFIX, ORACLE

DEFAULTS = BenchConfig()
#: ``--online``'s defaults (the live MiniWoB++ episodes).
ONLINE_DEFAULTS = OnlineConfig()


@click.command()
@model_options
@click.option("--task", "task_name", default=TaskConfig.name, show_default=True)
@click.option("--selector", "selector_names", multiple=True,
              default=tuple(s for s in DEFAULTS.selectors if s not in BASELINES), show_default=True,
              help="Selector to compare (repeatable; see r3v list). first, majority and oracle always run.")
@click.option("--n-ladder", default=",".join(map(str, DEFAULTS.ladder)), show_default=True,
              help="ks to report, capped at --n (N itself is always reported).")
@click.option("--limit", type=int, default=None, help="Use only the first K questions.")
@click.option("--split", default="test", show_default=True)
@data_options
@sampling_options(DEFAULTS.sampling)
@click.option("--select-max-new-tokens", type=int, default=DEFAULTS.select_max_new_tokens,
              help="Token limit of the self-select call [default: --max-new-tokens].")
@click.option("--skip-when-agree/--always-select", default=None,
              help="Skip the self-select call when all candidates agree "
                   f"[default: {'skip' if DEFAULTS.select.skip_when_agree else 'always select'}; --reference: always].")
@click.option("--unparseable", type=click.Choice(UNPARSEABLE_RULES), default=None,
              help="An unreadable self-select output: the candidates' majority vote decides, or it is wrong "
                   f"[default: {DEFAULTS.select.unparseable}; --reference: wrong].")
@click.option("--chunk-size", default=DEFAULTS.chunk_size, show_default=True,
              help="Questions per generate call (and per resume unit).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/bench-<task>-<model>/<split>-n<N>-<limit>-<settings hash>].")
@click.option("--json", "as_json", is_flag=True, help="Print only the results JSON on stdout (progress goes to stderr).")
@click.option("--plot", is_flag=True, help="Also write OUT/accuracy_vs_n.png (needs matplotlib).")
@click.option("--online", is_flag=True,
              help="miniwob: act in the live MiniWoB++ environment and report episode success rates "
                   "(needs r3v[miniwob] and Chromium; docs/tasks.md).")
@click.option("--tasks", "online_tasks", default=None, metavar="NAME,...",
              help="--online: MiniWoB++ tasks to run [default: SeeClick's list, the keys of "
                   "--data-dir/miniwob_data_train.json, else Synapse's 48].")
@click.option("--episodes", type=click.IntRange(min=1), default=None,
              help=f"--online: seeded episodes per task and selector [default: {ONLINE_DEFAULTS.episodes}, SeeClick's].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="--online: step limit of every episode [default: SeeClick's, 10; 30 for guess-number, use-slider, "
                   "choose-date].")
@click.option("--wait-ms", type=click.FloatRange(min=0), default=None,
              help=f"--online: pause after each action before the next screenshot [default: {ONLINE_DEFAULTS.wait_ms:g}].")
@engine_options
@friendly_errors
def bench(
    model, adapter, backend_name, trust_remote_code, task_name, selector_names, n_ladder, limit, split, data_dir,
    skip_bad, allow_outside_paths, task_args, reference, n, temperature, top_p, top_k, max_new_tokens, greedy, seed,
    repetition_penalty, select_max_new_tokens, skip_when_agree, unparseable,
    chunk_size, out_dir, as_json, plot, online, online_tasks, episodes, max_steps, wait_ms,
    engine, max_pixels, engine_batch,
):
    """Sample N answers per test question once, then compare test-time selectors at each k.

    Samples are stored in OUT/samples.jsonl and reused by a rerun. Reports Test@1 (first sample),
    majority vote, the chosen selector(s) and the unbiased pass@k upper bound for every k of the ladder.

    With --online (miniwob), each selector at each N instead acts in seeded live episodes, logged in
    OUT/episodes.jsonl and resumed by a rerun; it reports the success rate per task and overall.
    """
    from r3v.bench import (
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
                        max_new_tokens=max_new_tokens, seed=seed, greedy=greedy, repetition_penalty=repetition_penalty)
    select = {**(REFERENCE_SELECT if reference else {}),
              **{key: value for key, value in (("skip_when_agree", skip_when_agree), ("unparseable", unparseable))
                 if value is not None}}
    if reference:
        task_args = with_reference_args(task_args)
    config = BenchConfig(sampling=sampling, ladder=tuple(ladder), selectors=tuple(names),
                         select_max_new_tokens=select_max_new_tokens, select=SelectConfig(**select),
                         chunk_size=chunk_size, engine_batch=engine_batch)
    engine = with_pixel_cap(engine, max_pixels)
    online_options = {"tasks": online_tasks, "episodes": episodes, "max_steps": max_steps, "wait_ms": wait_ms}
    if online:
        if task_name != "miniwob":
            raise click.BadParameter(f"only the miniwob task has a live environment, not {task_name!r}",
                                     param_hint="--online")
        return _bench_online(model, adapter, backend_name, trust_remote_code, task_name, task_args, reference,
                             skip_bad, allow_outside_paths, data_dir, config, chosen, engine, max_pixels,
                             online_options, out_dir, as_json)
    given = [f"--{key.replace('_', '-')}" for key, value in online_options.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --online")
    identity = run_identity(model, adapter, backend_name, task_name, task_args, max_pixels, reference,
                            **data_identity(split, limit, data_dir))
    out = Path(out_dir) if out_dir else default_out_dir(identity, config)

    # Libraries may print to stdout while loading, building or training a model (e.g. trainer logs
    # when a built-in model is first built); stdout is reserved for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        task = make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
        examples = load_examples(task, split, data_dir, limit)
        console.print(f"bench: {len(examples)} questions x N={n} -> {out}")
        backend = make_backend(backend_name, model, adapter, trust_remote_code, **engine)

        started = time.perf_counter()
        with progress_bar("sampling") as progress:
            bar = progress.add_task("sampling", total=len(examples), rate="")
            generated = 0

            def on_chunk(done: int, total: int, new: list) -> None:
                nonlocal generated
                generated += len(new)
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{generated} new samples, {done / elapsed:.2f} items/s")

            unreadable: list[str] = []
            results = run_bench(backend, task, examples, config, out, identity, on_chunk=on_chunk,
                                log=lambda line: console.print(f"  {line}"), skip_bad=skip_bad, bad=unreadable)
        report_bad_records(unreadable)
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
        Console().print(diagnostics_table(results, chosen))
        Console().print(summary_line(results, chosen))
    console.print(f"results -> {out / 'results.json'}, per question -> {out / 'items.jsonl'}")


def _bench_online(model, adapter, backend_name, trust_remote_code, task_name, task_args, reference, skip_bad,
                  allow_outside_paths, data_dir, config: BenchConfig, chosen: list[str], engine: dict,
                  max_pixels: int | None, options: dict, out_dir: str | None, as_json: bool) -> None:
    """``r3v bench --online``: the selectors act in live MiniWoB++ episodes (r3v.online)."""
    import dataclasses

    from r3v.bench import MissingExtraError
    from r3v.online import (
        browser_paths,
        check_tasks,
        default_online_out_dir,
        online_arms,
        run_model_online,
        task_list,
    )

    names = [name.strip() for name in (options["tasks"] or "").split(",") if name.strip()]
    online = dataclasses.replace(ONLINE_DEFAULTS, tasks=tuple(names),
                                 **{key: options[key] for key in ("episodes", "max_steps", "wait_ms")
                                    if options[key] is not None})
    identity = run_identity(model, adapter, backend_name, task_name, task_args, max_pixels, reference, online=True)
    out = Path(out_dir) if out_dir else default_online_out_dir(identity, config, online)
    arms = online_arms(config.selectors, config.sampling.n, config.ladder)
    if ORACLE in chosen:
        console.print("[yellow]oracle needs gold answers; live steps have none, so it does not run online[/]")

    with contextlib.redirect_stdout(sys.stderr):
        tasks_run, source = task_list(online.tasks, data_dir)
        try:
            check_tasks(tasks_run)
            browser_paths(online)  # a missing browser fails here, before any model is loaded
        except MissingExtraError as exc:
            raise click.ClickException(str(exc)) from exc
        task = make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
        console.print(f"bench --online: {len(tasks_run)} MiniWoB++ tasks ({source}) x {online.episodes} episodes x "
                      f"{', '.join(arm.name for arm in arms)} -> {out}")
        backend = make_backend(backend_name, model, adapter, trust_remote_code, **engine)
        with progress_bar("episodes", field="last") as progress:
            bar = progress.add_task("episodes", total=len(tasks_run) * online.episodes * len(arms), last="")
            counts = {"run": 0, "reused": 0}

            def on_episode(record: dict, reused: bool) -> None:
                counts["reused" if reused else "run"] += 1
                verdict = "solved" if record["success"] else "failed"
                progress.update(bar, advance=1, last=f"{record['arm']} {record['task']} #{record['episode']}: {verdict}")

            try:
                results = run_model_online(backend, task, config, online, out, identity, tasks_run,
                                           on_episode=on_episode)
            except MissingExtraError as exc:  # the browser would not start
                raise click.ClickException(str(exc)) from exc
        console.print(f"{counts['run']} episodes run ({counts['reused']} reused from {out / 'episodes.jsonl'})")

    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        Console().print(render_online_table(results))
        Console().print(online_summary(results))
    console.print(f"results -> {out / 'results.json'}, per episode -> {out / 'episodes.jsonl'}")


def render_online_table(results: dict) -> Table:
    """Success rate per task (rows) and arm (columns), the overall score last."""
    arms = results["arms"]
    title = (f"{results['task']} online · {results['model']} · {len(results['tasks'])} tasks x "
             f"{results['episodes']} episodes: success rate")
    table = Table(title=title, min_width=len(title) + 2)
    table.add_column("task")
    for arm in arms:
        table.add_column(arm, justify="right")
    for name in results["tasks"]:
        table.add_row(name, *[f"{results['by_arm'][arm]['tasks'][name]['success_rate']:.3f}" for arm in arms])
    table.add_row("mean over tasks", *[f"{results['success_rate'][arm]:.3f}" for arm in arms], style="bold")
    return table


def online_summary(results: dict) -> str:
    threshold = results["protocol"]["success_threshold"]
    lines = [f"success: final reward > {threshold:g}; score: mean over tasks of the per-task success rate"]
    for arm in results["arms"]:
        stats = results["by_arm"][arm]
        line = (f"{arm}: success {stats['success_rate']:.3f} (all episodes {stats['success_rate_episodes']:.3f}) · "
                f"mean reward {stats['mean_reward']:.3f} · mean steps {stats['mean_steps']:.2f} · bad actions: "
                + ", ".join(f"{count} {kind}" for kind, count in stats["bad_actions"].items()))
        if set(stats["how"]) - {"rule"}:  # a selector that calls the model: how its steps were chosen
            line += " · steps chosen: " + ", ".join(f"{count} {how}" for how, count in stats["how"].items())
        lines.append(line)
    return "\n".join(lines)


def render_table(results: dict, chosen: list[str]) -> Table:
    from r3v.metrics import metric_name

    shown = ["first", "majority", *[s for s in chosen if s not in ("first", "majority")]]
    costed = [name for name in shown if name not in (FIRST, ORACLE)]  # the oracle reads the gold: no cost to show
    title = f"{results['task']} · {results['model']} · {results['examples']} questions x N={results['n']}"
    table = Table(title=title, title_justify="left")
    table.add_column("k", justify="right")
    for name in shown:
        table.add_column("Test@1" if name == "first" else metric_name(name, "k"), justify="right")
    table.add_column("pass@k", justify="right")
    for name in costed:  # what each answer cost, the selector's own call included
        table.add_column(f"tok/q {METRIC_PREFIX.get(name, name)}", justify="right")
    for k in results["ks"]:
        row = results["ladder"][str(k)]
        cells = [f"{row[metric_name(name, k)]:.3f}" for name in shown]
        tokens = [f"{results['compute'][str(k)][name]['tokens_per_question']:.0f}" for name in costed]
        table.add_row(str(k), *cells, f"{row[f'pass@{k}']:.3f}", *tokens)
    return table


def diagnostics_table(results: dict, chosen: list[str]) -> Table:
    """How each selector chose at N: right when it could be, agreement with majority vote, the
    positions it picked (unique answers only), and what it said when no candidate was right."""
    shown = [MAJORITY, *[s for s in chosen if s not in (FIRST, MAJORITY)]]
    table = Table(title=f"selection at N={results['n']}", title_justify="left", caption_justify="left",
                  caption="picks right: when a candidate is right · positions: shown position of the pick "
                          "(unique answers) · none right: abstained / a candidate's answer / a new one")
    for header in ("selector", "picks right", "= maj", "positions", "none right"):
        table.add_column(header, justify="left" if header in ("selector", "positions") else "right", overflow="fold")
    for name in shown:
        d = results["diagnostics"][name]
        right = "-" if d["right_when_possible"] is None else f"{d['right_when_possible']:.3f}"
        agree = "-" if d.get("agreement_with_majority") is None else f"{d['agreement_with_majority']:.3f}"
        positions = " ".join(f"{p}:{n}" for p, n in d["positions"].items())
        none = d["when_none_right"]
        outcomes = "/".join(str(none[key]) for key in ("abstained", "a candidate's answer", "a new answer"))
        table.add_row(name, right, agree, positions, outcomes)
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
        if counts["model"] or counts["skipped"] or counts["fallback"] or counts["unparseable"]:
            lines.append(f"{name} at N={n}: {counts['model']} model choices, {counts['skipped']} skipped "
                         f"(candidates agreed), {counts['fallback']} fallbacks to majority vote (unparseable output), "
                         f"{counts['unparseable']} unparseable (scored wrong)")
    return "\n".join(lines)
