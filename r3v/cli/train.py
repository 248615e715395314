"""``r3v train``: the R3V self-training loop (warm-up, then N iterations of sample → build → train → evaluate)."""

from __future__ import annotations

import importlib.util
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
    engine_settings,
    friendly_errors,
    make_task,
    parse_task_args,
    quiet_libraries,
)

FALLBACK_MODEL = "tiny-qwen2-vl"
BUILT_IN_BASE = "r3v-clevr-base"
BUILT_IN_MODELS = (BUILT_IN_BASE, "tiny-qwen2-vl", "tiny-llava")


def default_model() -> str:
    """The built-in clevr-synth base model when this install has it, else the tiny test model."""
    return BUILT_IN_BASE if importlib.util.find_spec("r3v.models.base_model") is not None else FALLBACK_MODEL


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


@click.command()
@click.option("--iterations", default=3, show_default=True, type=click.IntRange(min=0),
              help="Self-training iterations after the warm-up (iteration 0). Raise it to extend a finished run.")
@click.option("--model", default=None, help=f"Base model: hub id, folder or built-in name [default: {BUILT_IN_BASE} "
              f"when installed, else {FALLBACK_MODEL}].")
@click.option("--task", "task_name", default="clevr-synth", show_default=True)
@data_options
@click.option("--method", type=click.Choice(["r3v", "star"]), default="r3v", show_default=True,
              help="r3v: self-CoT + self-refine + self-select; star: self-CoT only.")
@click.option("--no-refine", is_flag=True, help="Ablation: leave out self-refine.")
@click.option("--no-select", is_flag=True, help="Ablation: leave out self-select.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory [default: runs/<task>-<method>]. Rerun the same command to resume.")
@click.option("--train-limit", type=click.IntRange(min=1), default=None, help="Use only the first K train questions.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Use only the first K test questions.")
@click.option("--from-base/--continue", "from_base", default=True, show_default=True,
              help="Train each iteration from the base model (R3V) or from the previous iteration's weights.")
@click.option("--warmup-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Distilled CoT: R3V warm-up JSON or `r3v distill` JSONL [default: the task's teacher, if any].")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Folder of the images an R3V warm-up JSON names [default: the file's folder].")
@click.option("--teacher-count", default=200, show_default=True, type=click.IntRange(min=0),
              help="Without --warmup-file: questions the task's programmatic teacher writes CoT for.")
@click.option("--skip-warmup-train", is_flag=True,
              help="Use the base model as iteration 0 (already able to reason); warm-up data still joins later mixtures.")
@click.option("--seed", default=0, show_default=True, help="Seeds every random choice of the run.")
@click.option("--samples-per-iteration", default=3, show_default=True, type=click.IntRange(min=1),
              help="Samples per train question drawn by each iteration's model.")
@click.option("--temperature", default=0.9, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--top-k", default=50, show_default=True)
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help="Token limit per sampled rationale [default: 384, R3V's; 64 for the built-in tiny models].")
@click.option("--eval-samples", default=3, show_default=True, type=click.IntRange(min=0),
              help="Candidates per test question for self-select (0: Test@1 only).")
@click.option("--eval-max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Token limit at evaluation [default: --max-new-tokens].")
@click.option("--select-target", type=click.Choice(["answer", "solution"]), default="answer", show_default=True,
              help="Self-select target: the answer line (official code) or the chosen solution (paper figure).")
@click.option("--select-sizes", default="3", show_default=True,
              help="Candidates per self-select item, e.g. 3 (R3V) or 2,3,4,5,6 (for test-time scaling).")
@click.option("--check-equations/--no-check-equations", default=False, show_default=True,
              help="Use a right-answer sample as a positive only if every `a + b = c` step in it holds.")
@click.option("--epochs", type=float, default=None, help="Training epochs [default: the trainer preset].")
@click.option("--lr", "learning_rate", type=float, default=None, help="Learning rate [default: the trainer preset].")
@click.option("--global-batch", type=click.IntRange(min=1), default=None,
              help="Items per optimizer step over all devices [default: the preset's; R3V: 64].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Most items per device per micro-batch [default: the preset's; R3V: 2].")
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
@click.option("--training-process", type=click.Choice(["auto", "separate", "inline", "external"]), default="auto",
              show_default=True,
              help="Train in a process of its own (frees all its memory on exit); auto: when a GPU is used or "
                   "--num-processes > 1; external: write each iteration's job and wait for it to be run elsewhere "
                   "(several nodes).")
@click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training processes, e.g. one per GPU (accelerate launch).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="accelerate config for training: configs/accelerate/{ddp,zero2,zero3,fsdp}.yaml.")
@click.option("--lora/--full", "lora", default=None, help="LoRA on the language model, or full fine-tuning [default: preset].")
@click.option("--lora-r", type=click.IntRange(min=1), default=None)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=None)
@click.option("--max-length", type=click.IntRange(min=16), default=None, help="Token limit per training item.")
@click.option("--chunk-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Questions per generate call (and per resume unit).")
@click.option("--backend", "backend_name", default="hf", show_default=True, help="Generation backend (see r3v list).")
@click.option("--device", default=None, help="Device for generation, e.g. cuda:0 [default: cuda if available].")
@engine_options
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@friendly_errors
def train(
    iterations, model, task_name, data_dir, skip_bad, allow_outside_paths, task_args, method, no_refine, no_select,
    out_dir, train_limit, test_limit, from_base, warmup_file, image_root, teacher_count, skip_warmup_train, seed, samples_per_iteration,
    temperature, top_p, top_k, max_new_tokens, eval_samples, eval_max_new_tokens, select_target, select_sizes,
    check_equations, epochs, learning_rate, global_batch, batch_size, grad_accum, gradient_checkpointing, auto_batch_size,
    dataloader_workers, report_to, training_process, num_processes, accelerate_config, lora, lora_r, lora_alpha,
    max_length, chunk_size, backend_name, device, tensor_parallel_size, data_parallel_size, max_model_len,
    gpu_memory_utilization, max_num_seqs, max_lora_rank, max_pixels, engine_batch, trust_remote_code,
):
    """Run the R3V self-training loop: a warm-up (iteration 0), then N iterations of
    sample → build (self-CoT, self-refine, self-select) → train → evaluate.

    Every phase is resumable: rerun the same command after an interruption to continue.
    Results go to RUN_DIR/metrics.jsonl (one line per iteration) and a summary table.
    """
    from dataclasses import replace

    from r3v.backends.base import Sampling
    from r3v.builders import BuildConfig
    from r3v.loop import LoopConfig, run_loop
    from r3v.train import TrainConfig

    quiet_libraries()
    # transformers' v6 deprecation notices fire on every model load; users cannot act on them
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    model = model or default_model()
    parsed_task_args = parse_task_args(task_args)
    task = make_task(task_name, parsed_task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    sizes = parse_sizes(select_sizes)
    preset = method_name(method, no_refine, no_select)
    build = BuildConfig.preset(preset, select_sizes=sizes, select_target=select_target, check_equations=check_equations,
                               seed=seed)
    overrides = {
        "epochs": epochs, "learning_rate": learning_rate, "global_batch": global_batch, "batch_size": batch_size,
        "grad_accum": grad_accum, "gradient_checkpointing": gradient_checkpointing, "auto_batch_size": auto_batch_size,
        "dataloader_workers": dataloader_workers, "report_to": report_to, "max_pixels": max_pixels,
        "lora": lora, "lora_r": lora_r, "lora_alpha": lora_alpha, "max_length": max_length,
        "trust_remote_code": trust_remote_code or None,
    }
    if grad_accum is not None and global_batch is not None:
        raise click.UsageError("give --global-batch or --grad-accum, not both")
    train_config = TrainConfig.for_model(model)
    if grad_accum is not None:  # an explicit accumulation replaces the preset's global batch
        train_config = replace(train_config, global_batch=None)
    train_config = TrainConfig.from_dict({**train_config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    backend_options = engine_settings(
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs, max_lora_rank=max_lora_rank,
        max_pixels=max_pixels,
    )
    if device:
        backend_options["device"] = device
    check_backend_options(backend_name, backend_options)
    if max_new_tokens is None:
        # clevr-synth rationales are about 30 tokens; a tiny model's 384-token rambles only cost time
        max_new_tokens = 64 if model in BUILT_IN_MODELS else 384
    sampling = Sampling(n=samples_per_iteration, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed)
    config = LoopConfig(
        model=model, task=task_name, iterations=iterations, build=build, train=train_config, from_base=from_base,
        train_limit=train_limit, test_limit=test_limit, data_dir=data_dir, task_args=parsed_task_args,
        skip_bad=skip_bad, warmup_file=warmup_file,
        image_root=image_root, allow_outside_paths=allow_outside_paths, teacher_count=teacher_count,
        skip_warmup_train=skip_warmup_train, sampling=sampling, eval_samples=eval_samples,
        eval_max_new_tokens=eval_max_new_tokens, chunk_size=chunk_size, engine_batch=engine_batch, seed=seed,
        backend=backend_name, backend_options=backend_options, trust_remote_code=trust_remote_code,
        training_process=training_process, num_processes=num_processes, accelerate_config=accelerate_config,
    )
    out = Path(out_dir) if out_dir else Path("runs") / f"{task_name}-{preset}"
    console.print(f"[bold]r3v train[/] {preset} on {task_name} with {model}: iterations 0..{iterations} -> {out}")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bars:
        handles: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in handles:
                handles[label] = bars.add_task(label, total=total)
            bars.update(handles[label], completed=done, total=total)

        rows = run_loop(config, out, log=console.print, progress=progress, task=task)

    stdout = Console()
    stdout.print(results_table(rows, eval_samples))
    timing = timing_table(out)
    if timing is not None:
        stdout.print(timing)
    stdout.print(f"metrics: {out / 'metrics.jsonl'}   timing: {out / 'timing.json'}")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_table(rows: list[dict], eval_samples: int) -> Table:
    n = eval_samples
    table = Table(title="R3V iterations (accuracy %)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"sel/maj: self-select/majority over {n} test samples; train pass: of the iteration's samples; "
                          "too long: items over max_length, skipped/cut")
    for name in ("iter", "Test@1", f"sel@{n}", f"maj@{n}", f"pass@{n}", "train\npass", "items\ncot/ref/sel",
                 "loss\nsft/ref/sel", "too\nlong"):
        table.add_column(name, justify="right")
    for row in rows:
        items = row["items"]
        losses = row.get("train_losses") or {}
        table.add_row(
            str(row["iteration"]),
            _percent(row["test_accuracy"]),
            _percent(row.get("select_accuracy")),
            _percent(row.get("majority_accuracy")),
            _percent(row.get("pass_at_n")),
            _percent((row.get("train_samples") or {}).get("pass_at_n")),
            "/".join(str(items.get(kind, 0)) for kind in ("cot", "refine", "select")),
            "/".join("-" if losses.get(o) is None else f"{losses[o]:.2f}" for o in ("sft", "refine", "select")),
            "/".join(str(sum((row.get("over_length") or {}).get(what, {}).values())) for what in ("skipped", "truncated")),
        )
    return table


def timing_table(out: Path) -> Table | None:
    import json

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
