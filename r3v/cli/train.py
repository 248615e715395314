"""``r3v train``: the R3V self-training loop (warm-up, then N iterations of sample → build → train → evaluate).

The run's settings are ``r3v.config.LoopConfig``: its defaults, then what the base model's folder
recommends, then ``--config FILE.yaml``, then the flags below, then ``KEY=VALUE`` arguments (a
field's dotted path, e.g. ``train.learning_rate=1e-4``). Each flag is a shortcut for one key.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from r3v.cli.common import (
    check_backend_options,
    console,
    data_options,
    engine_options,
    friendly_errors,
    make_task,
    parse_task_args,
    quiet_libraries,
)
from r3v.config import SELECT_TARGETS, LoopConfig, TrainConfig, nested, parse_override
from r3v.models.presets import PRESETS

DEFAULTS = LoopConfig()
TRAIN_DEFAULTS = TrainConfig()


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--select-sizes") from exc
    if not sizes or not all(2 <= s <= 6 for s in sizes):
        raise click.BadParameter("sizes must lie between 2 and 6, e.g. 3 or 2,3,4,5,6", param_hint="--select-sizes")
    return sizes


def method_name(method: str, no_refine: bool, no_select: bool) -> str:
    """The preset a method plus ablation flags amounts to."""
    if method == "star" or (no_refine and no_select):
        return "star"
    if no_refine:
        return "no_refine"
    if no_select:
        return "no_select"
    return "r3v"


#: Flags that set one config key each: (parameter name, dotted key).
FLAG_KEYS = (
    ("iterations", "iterations"), ("model", "model"), ("task_name", "task.name"), ("data_dir", "task.data_dir"),
    ("train_limit", "task.train_limit"), ("test_limit", "task.test_limit"), ("from_base", "from_base"),
    ("warmup_file", "warmup.file"), ("image_root", "warmup.image_root"), ("teacher_count", "warmup.teacher_count"),
    ("seed", "seed"), ("samples_per_iteration", "sampling.n"), ("temperature", "sampling.temperature"),
    ("top_p", "sampling.top_p"), ("top_k", "sampling.top_k"), ("max_new_tokens", "sampling.max_new_tokens"),
    ("eval_samples", "eval.samples"), ("eval_max_new_tokens", "eval.max_new_tokens"),
    ("select_target", "build.select_target"), ("check_equations", "build.check_equations"),
    ("check_steps", "build.check_steps"), ("preset", "train_preset"),
    ("epochs", "train.epochs"), ("learning_rate", "train.learning_rate"), ("global_batch", "train.global_batch"),
    ("batch_size", "train.batch_size"), ("grad_accum", "train.grad_accum"),
    ("gradient_checkpointing", "train.gradient_checkpointing"), ("dataloader_workers", "train.dataloader_workers"),
    ("report_to", "train.report_to"), ("lora", "train.lora"), ("lora_r", "train.lora_r"),
    ("lora_alpha", "train.lora_alpha"), ("max_length", "train.max_length"), ("max_pixels", "train.max_pixels"),
    ("training_process", "launch.process"), ("num_processes", "launch.num_processes"),
    ("accelerate_config", "launch.accelerate_config"), ("chunk_size", "backend.chunk_size"),
    ("engine_batch", "backend.engine_batch"), ("backend_name", "backend.name"),
)


@click.command()
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_file", default=None, metavar="FILE|NAME",
              help="A YAML file of settings, or a config r3v ships (demo, reference/qwen2-vl-7b-geoqa, ...); "
                   "flags and KEY=VALUE arguments override it.")
@click.option("--iterations", default=None, type=click.IntRange(min=0),
              help=f"Self-training iterations after the warm-up; raise it to extend a run [default: {DEFAULTS.iterations}].")
@click.option("--model", default=None, help=f"Base model: hub id, folder or built-in name [default: {DEFAULTS.model}].")
@click.option("--task", "task_name", default=None, help=f"Task (r3v list) [default: {DEFAULTS.task.name}].")
@data_options
@click.option("--method", type=click.Choice(["r3v", "star"]), default=None,
              help="r3v: self-CoT + self-refine + self-select; star: self-CoT only [default: r3v].")
@click.option("--no-refine", is_flag=True, help="Ablation: leave out self-refine.")
@click.option("--no-select", is_flag=True, help="Ablation: leave out self-select.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory [default: runs/<task>-<method>]. Rerun the same command to resume.")
@click.option("--train-limit", type=click.IntRange(min=1), default=None, help="Use only the first K train questions.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Use only the first K test questions.")
@click.option("--from-base/--continue", "from_base", default=None,
              help="Train each iteration from the base model (R3V, default) or from the previous iteration's weights.")
@click.option("--warmup-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Distilled CoT: R3V warm-up JSON or `r3v distill` JSONL [default: the task's teacher, if any].")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Folder of the images an R3V warm-up JSON names [default: the file's folder].")
@click.option("--teacher-count", default=None, type=click.IntRange(min=0),
              help=f"Without --warmup-file: questions the task's teacher writes CoT for [default: {DEFAULTS.warmup.teacher_count}].")
@click.option("--skip-warmup-train", is_flag=True, default=None,
              help="Use the base model as iteration 0 (already able to reason); warm-up data still joins later mixtures.")
@click.option("--seed", default=None, type=int, help=f"Seeds every random choice of the run [default: {DEFAULTS.seed}].")
@click.option("--samples-per-iteration", default=None, type=click.IntRange(min=1),
              help=f"Samples per train question drawn by each iteration's model [default: {DEFAULTS.sampling.n}].")
@click.option("--temperature", default=None, type=float, help=f"[default: {DEFAULTS.sampling.temperature}]")
@click.option("--top-p", default=None, type=float, help=f"[default: {DEFAULTS.sampling.top_p}]")
@click.option("--top-k", default=None, type=int, help=f"[default: {DEFAULTS.sampling.top_k}]")
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help=f"Token limit per sampled rationale [default: the model's own, else {DEFAULTS.sampling.max_new_tokens}].")
@click.option("--eval-samples", default=None, type=click.IntRange(min=0),
              help=f"Candidates per test question for self-select (0: Test@1 only) [default: {DEFAULTS.eval.samples}].")
@click.option("--eval-max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Token limit at evaluation [default: --max-new-tokens].")
@click.option("--select-target", type=click.Choice(SELECT_TARGETS), default=None,
              help="Self-select target: the answer line (default), the bare value, or the chosen solution (paper figure).")
@click.option("--select-sizes", default=None,
              help="Candidates per self-select item, e.g. 3 (R3V) or 2,3,4,5,6 (for test-time scaling) [default: "
                   "what the model folder's r3v.json recommends (the built-in bases: 2,3,4,5,6, one drawn per question), else 3].")
@click.option("--check-equations/--no-check-equations", default=None,
              help="Use a right-answer sample as a positive only if every `a + b = c` step in it holds [default: off].")
@click.option("--check-steps/--no-check-steps", default=None,
              help="Use a right-answer sample as a positive only if the task's step checker accepts every step "
                   f"[default: {'on' if DEFAULTS.build.check_steps else 'off'}].")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default=None,
              help="Trainer preset the training flags override [default: auto: the model folder's r3v.json, else its "
                   "family's; an unknown family gets the default preset].")
@click.option("--epochs", type=float, default=None, help="Training epochs [default: the preset's].")
@click.option("--lr", "learning_rate", type=float, default=None, help="Learning rate [default: the preset's].")
@click.option("--global-batch", type=click.IntRange(min=1), default=None,
              help=f"Items per optimizer step over all devices [default: the preset's; R3V: {TRAIN_DEFAULTS.global_batch}].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Most items per device per micro-batch [default: the preset's; R3V: {TRAIN_DEFAULTS.batch_size}].")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None,
              help="Micro-batches per optimizer step, instead of a global batch.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward [default: on for models over 1B parameters].")
@click.option("--auto-batch-size", is_flag=True, default=None,
              help="On out-of-memory, halve the per-device batch (the global batch stays) and retry.")
@click.option("--dataloader-workers", type=click.IntRange(min=0), default=None,
              help="Processes that load and encode training images [default: 0, in the training process].")
@click.option("--report-to", default=None, metavar="NAMES",
              help="Trackers, comma-separated: tensorboard, wandb, ... (training curves and each iteration's metrics).")
@click.option("--training-process", type=click.Choice(["auto", "separate", "inline", "external"]), default=None,
              help="Train in a process of its own (frees all its memory on exit); auto (default): when a GPU is used "
                   "or --num-processes > 1; external: write each iteration's job and wait for it to be run elsewhere.")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Training processes, e.g. one per GPU (accelerate launch) [default: 1].")
@click.option("--accelerate-config", default=None, metavar="FILE|NAME",
              help="accelerate config for training: a file, or ddp, zero2, zero3, fsdp (r3v/configs/accelerate).")
@click.option("--lora/--full", "lora", default=None, help="LoRA on the language model, or full fine-tuning [default: preset].")
@click.option("--lora-r", type=click.IntRange(min=1), default=None)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=None)
@click.option("--max-length", type=click.IntRange(min=16), default=None, help="Token limit per training item.")
@click.option("--chunk-size", default=None, type=click.IntRange(min=1),
              help=f"Questions per resume unit of the sample stores [default: {DEFAULTS.backend.chunk_size}].")
@click.option("--backend", "backend_name", default=None, help=f"Generation backend (r3v list) [default: {DEFAULTS.backend.name}].")
@click.option("--device", default=None, help="Device for generation, e.g. cuda:0 [default: cuda if available].")
@engine_options
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow model code from the hub (off by default).")
@friendly_errors
def train(overrides, config_file, method, no_refine, no_select, out_dir, select_sizes, task_args, reference, device,
          engine, trust_remote_code, **flags):
    """Run the R3V self-training loop: a warm-up (iteration 0), then N iterations of
    sample → build (self-CoT, self-refine, self-select) → train → evaluate.

    Every phase is resumable: rerun the same command after an interruption to continue.
    Results go to RUN_DIR/metrics.jsonl (one line per iteration) and a summary table.
    """
    from r3v.loop import resolve_config, run_loop

    quiet_libraries()
    # transformers' v6 deprecation notices fire on every model load; users cannot act on them
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    layers = [_read_config_file(config_file)] if config_file else []
    given = [nested(key.split("."), flags[name]) for name, key in FLAG_KEYS if flags.get(name) is not None]
    if flags.get("skip_bad"):
        given.append({"task": {"skip_bad": True}})
    if flags.get("allow_outside_paths"):
        given.append({"task": {"allow_outside_paths": True}})
    if task_args:
        given.append({"task": {"args": parse_task_args(task_args)}})
    if reference:  # the task's reference release, with selection, loss and build settings (r3v.reference)
        given.append({"reference": True})
    if flags.get("skip_warmup_train"):
        given.append({"warmup": {"skip_training": True}})
    if method or no_refine or no_select:
        given.append({"build": {"method": method_name(method or "r3v", no_refine, no_select)}})
    if select_sizes:
        given.append({"build": {"select_sizes": list(parse_sizes(select_sizes))}})
    if flags.get("auto_batch_size"):
        given.append({"train": {"auto_batch_size": True}})
    if trust_remote_code:
        given.append({"backend": {"trust_remote_code": True}, "train": {"trust_remote_code": True}})
    if device:
        engine["device"] = device
    if engine:
        given.append({"backend": {"options": engine}})
    if flags.get("grad_accum") is not None and flags.get("global_batch") is not None:
        raise click.UsageError("give --global-batch or --grad-accum, not both")
    try:
        parsed = [nested(*parse_override(text)) for text in overrides]
        config = resolve_config(*layers, *given, *parsed)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    check_backend_options(config.backend.name, config.backend.options)
    spec = config.task
    task = make_task(spec.name, spec.args, skip_bad=spec.skip_bad, allow_outside_paths=spec.allow_outside_paths)
    out = Path(out_dir) if out_dir else Path("runs") / f"{spec.name}-{config.build.method}"
    console.print(f"[bold]r3v train[/] {config.build.method} on {spec.name} with {config.model}: "
                  f"iterations 0..{config.iterations} -> {out}")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bars:
        handles: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in handles:
                handles[label] = bars.add_task(label, total=total)
            bars.update(handles[label], completed=done, total=total)

        rows = run_loop(config, out, log=console.print, progress=progress, task=task)

    stdout = Console()
    for table in (results_table(rows, config.eval.samples), training_table(rows), pool_table(rows), timing_table(out)):
        if table is not None:
            stdout.print(table)
    stdout.print(f"metrics: {out / 'metrics.jsonl'}\ntiming: {out / 'timing.json'}")


def _read_config_file(name: str) -> dict:
    import yaml

    from r3v.config import config_file

    try:
        path = config_file(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from exc
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path} is not valid YAML: {exc}", param_hint="--config") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of settings", param_hint="--config")
    return data


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_table(rows: list[dict], eval_samples: int) -> Table:
    """Accuracy per iteration (fits 80 columns)."""
    n = eval_samples
    table = Table(title="R3V iterations: accuracy (%)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"sel/maj/pass: self-select, majority vote and any-right over {n} test samples; "
                          "train pass: any of the iteration's train samples right")
    for name in ("iter", "Test@1", f"sel@{n}", f"maj@{n}", f"pass@{n}", "train pass", "sel tok/q", "maj tok/q"):
        table.add_column(name, justify="right")
    for row in rows:
        compute = row.get("selection_compute") or {}
        table.add_row(
            str(row["iteration"]),
            _percent(row["test_accuracy"]),
            _percent(row.get("select_accuracy")),
            _percent(row.get("majority_accuracy")),
            _percent(row.get("pass_at_n")),
            _percent((row.get("train_samples") or {}).get("pass_at_n")),
            *(_tokens(compute.get(name)) for name in ("self-select", "majority")),
        )
    return table


def _tokens(cost: dict | None) -> str:
    return "-" if not cost else f"{cost['tokens_per_question']:.0f}"


def pool_table(rows: list[dict]) -> Table | None:
    """What each iteration's sample pool held (fits 80 columns); None before any pool."""
    pools = [(row["iteration"], row.get("pool")) for row in rows if row.get("pool")]
    if not pools:
        return None
    table = Table(title="R3V iterations: sample pools", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="questions whose pool is all right / mixed / all wrong; neg: mean share of wrong "
                          "samples per question; steps ok: positives whose every step checks out")
    for name in ("iter", "all right", "mixed", "all wrong", "neg %", "steps ok %"):
        table.add_column(name, justify="right")
    for k, pool in pools:
        table.add_row(str(k), str(pool["all_right"]), str(pool["mixed"]), str(pool["all_wrong"]),
                      _percent(pool["negative_share_per_question"]), _percent(pool["positives_steps_ok"]))
    return table


def training_table(rows: list[dict]) -> Table:
    """What each iteration trained on (fits 80 columns)."""
    table = Table(title="R3V iterations: training", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="too long: items over max_length, skipped / cut")
    for name in ("iter", "cot", "refine", "select", "loss sft", "loss ref", "loss sel", "steps", "too long"):
        table.add_column(name, justify="right")
    for row in rows:
        items, losses = row["items"], row.get("train_losses") or {}
        over = row.get("over_length") or {}
        table.add_row(
            str(row["iteration"]),
            *(str(items.get(kind, 0)) for kind in ("cot", "refine", "select")),
            *("-" if losses.get(o) is None else f"{losses[o]:.3f}" for o in ("sft", "refine", "select")),
            str(row.get("train_steps", 0)),
            "/".join(str(sum(over.get(what, {}).values())) for what in ("skipped", "truncated")),
        )
    return table


def timing_table(out: Path) -> Table | None:
    path = out / "timing.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    phases = list(summary["total"])
    table = Table(title="time per phase (s)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("iter")
    for phase in phases:
        table.add_column(phase, justify="right")
    table.add_column("all", justify="right")
    for k, timing in summary["iterations"].items():
        table.add_row(k, *(f"{timing[p]:.1f}" for p in phases), f"{sum(timing.values()):.1f}")
    table.add_row("total", *(f"{summary['total'][p]:.1f}" for p in phases), f"{summary['seconds']:.1f}", style="bold")
    return table
