from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from r3v.cli.common import (
    console,
    data_options,
    engine_options,
    engine_settings,
    friendly_errors,
    make_backend,
    make_task,
    model_options,
    parse_task_args,
    quiet_libraries,
    report_bad_records,
)


def sampling_options(func):
    options = [
        click.option("--n", default=3, show_default=True, help="Completions per question."),
        click.option("--temperature", default=0.9, show_default=True),
        click.option("--top-p", default=0.95, show_default=True),
        click.option("--top-k", default=50, show_default=True),
        click.option("--max-new-tokens", default=384, show_default=True),
        click.option("--greedy", is_flag=True, help="Greedy decoding (implies one distinct completion)."),
        click.option("--seed", default=0, show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@model_options
@click.option("--task", "task_name", default="clevr-synth", show_default=True)
@click.option("--split", default="test", show_default=True)
@data_options
@click.option("--limit", type=int, default=None, help="Use only the first K questions.")
@click.option("--prompt", "prompt_kind", type=click.Choice(["cot", "qa"]), default="cot", show_default=True)
@sampling_options
@click.option("--shard", default=None, help="i/k: process every k-th question starting at i.")
@click.option("--chunk-size", default=32, show_default=True, help="Questions per generate call (and per resume unit).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Sample store (JSONL).")
@engine_options
@friendly_errors
def generate(
    model, adapter, backend_name, trust_remote_code, task_name, split, data_dir, skip_bad, allow_outside_paths, task_args,
    limit, prompt_kind,
    n, temperature, top_p, top_k, max_new_tokens, greedy, seed, shard, chunk_size, out_path,
    tensor_parallel_size, data_parallel_size, max_model_len, gpu_memory_utilization, max_num_seqs, max_lora_rank,
    max_pixels, engine_batch,
):
    """Sample N completions per question and write one scored Sample per line to --out.

    Rerunning the same command resumes: only missing samples are generated.
    """
    from r3v.metrics import summarize_samples
    from r3v.records import Sampling
    from r3v.store import SampleStore, Shard, sample_examples

    quiet_libraries()
    shard_spec = Shard.parse(shard)
    task = make_task(task_name, parse_task_args(task_args), skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    examples = shard_spec.select(task.load(split, data_dir=data_dir, limit=limit))
    sampling = Sampling(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)
    settings = {
        "task_args": list(task_args),
        "model": model, "adapter": adapter, "backend": backend_name, "task": task_name, "split": split,
        "limit": limit, "prompt": prompt_kind, "sampling": sampling.to_dict(), "seed": seed,
        "shard": f"{shard_spec.index}/{shard_spec.count}", "chunk_size": chunk_size,
    }
    engine = engine_settings(
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs, max_lora_rank=max_lora_rank,
        max_pixels=max_pixels,
    )
    if max_pixels is not None:  # the images the model sees change the samples: pin it with the store
        settings["max_pixels"] = max_pixels
    store = SampleStore(Path(out_path), settings)
    backend = make_backend(backend_name, model, adapter, trust_remote_code, **engine)
    prompt = task.cot_prompt if prompt_kind == "cot" else task.qa_prompt

    bad: list[str] = list(getattr(task, "bad_records", []))
    tokens = 0
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        bar = progress.add_task("sampling", total=len(examples), rate="")

        def on_chunk(done: int, total: int, new: list) -> None:
            nonlocal tokens
            tokens += sum(s.completion_tokens for s in new)
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(bar, completed=done, rate=f"{done / elapsed:.2f} items/s, {tokens / elapsed:.0f} tok/s")

        samples = sample_examples(backend, task, examples, sampling, store, prompt=prompt,
                                  chunk_size=chunk_size, on_chunk=on_chunk, skip_bad=skip_bad, bad=bad,
                                  engine_batch=engine_batch)
    report_bad_records(bad)
    summary = summarize_samples(samples)
    Console().print(
        f"[bold]{summary['examples']}[/] questions, [bold]{summary['samples']}[/] samples -> {out_path}\n"
        f"accuracy (per sample) {summary['accuracy']:.3f}   pass@{n} {summary['pass_at_n']:.3f}"
    )


@click.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@friendly_errors
def merge(shards, out_path):
    """Merge the sample stores written with --shard i/k into one file."""
    from r3v.store import merge_shards

    count = merge_shards(list(shards), out_path)
    Console().print(f"merged {len(shards)} shards: {count} samples -> {out_path}")
