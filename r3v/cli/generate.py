from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console

from r3v.bench import BenchConfig
from r3v.cli import common
from r3v.config import TaskConfig
from r3v.records import Sampling


def sampling_options(defaults: Sampling):
    """--n, --temperature, --top-p, --top-k, --max-new-tokens, --greedy, --seed, --repetition-penalty,
    defaulting to ``defaults``."""
    options = [
        click.option("--n", default=defaults.n, show_default=True, help="Completions per question."),
        click.option("--temperature", default=defaults.temperature, show_default=True),
        click.option("--top-p", default=defaults.top_p, show_default=True),
        click.option("--top-k", default=defaults.top_k, show_default=True),
        click.option("--max-new-tokens", default=defaults.max_new_tokens, show_default=True),
        click.option("--greedy", is_flag=True, default=defaults.greedy,
                     help="Greedy decoding (implies one distinct completion)."),
        click.option("--seed", default=defaults.seed, show_default=True),
        click.option("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                     help="Penalty on tokens already seen [default: the model's generation config's, else none]."),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


#: ``r3v generate`` samples what ``r3v bench`` samples unless told otherwise.
DEFAULTS = BenchConfig()


@click.command()
@common.model_options
@click.option("--task", "task_name", default=TaskConfig.name, show_default=True)
@click.option("--split", default="test", show_default=True)
@common.data_options
@click.option("--limit", type=int, default=None, help="Use only the first K questions.")
@click.option("--prompt", "prompt_kind", type=click.Choice(["cot", "qa"]), default="cot", show_default=True)
@sampling_options(DEFAULTS.sampling)
@click.option("--shard", default=None, help="i/k: process every k-th question starting at i.")
@click.option("--chunk-size", default=DEFAULTS.chunk_size, show_default=True,
              help="Questions per generate call (and per resume unit).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Sample store (JSONL).")
@common.engine_options
@common.friendly_errors
def generate(
    model, adapter, backend_name, trust_remote_code, task_name, split, data_dir, skip_bad, allow_outside_paths, task_args,
    limit, prompt_kind,
    n, temperature, top_p, top_k, max_new_tokens, greedy, seed, repetition_penalty, shard, chunk_size, out_path,
    engine,
    max_pixels, engine_batch,
):
    """Sample N completions per question and write one scored Sample per line to --out.

    Rerunning the same command resumes: only missing samples are generated.
    """
    from r3v.metrics import summarize_samples
    from r3v.store import SampleStore, Shard, sample_examples

    common.quiet_libraries()
    shard_spec = Shard.parse(shard)
    task = common.make_task(task_name, task_args, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    examples = shard_spec.select(task.load(split, data_dir=data_dir, limit=limit))
    sampling = Sampling(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, seed=seed, greedy=greedy, repetition_penalty=repetition_penalty)
    settings = {
        "task_args": list(task_args),
        "model": model, "adapter": adapter, "backend": backend_name, "task": task_name, "split": split,
        "limit": limit, "prompt": prompt_kind, "sampling": sampling.to_dict(), "seed": seed,
        "shard": f"{shard_spec.index}/{shard_spec.count}", "chunk_size": chunk_size,
    }
    engine = common.with_pixel_cap(engine, max_pixels)
    if max_pixels is not None:  # the images the model sees change the samples: pin it with the store
        settings["max_pixels"] = max_pixels
    store = SampleStore(Path(out_path), settings)
    backend = common.make_backend(backend_name, model, adapter, trust_remote_code, **engine)
    prompt = task.cot_prompt if prompt_kind == "cot" else task.qa_prompt

    bad: list[str] = list(task.bad_records)
    tokens = 0
    started = time.perf_counter()
    with common.progress_bar("sampling") as progress:
        bar = progress.add_task("sampling", total=len(examples), rate="")

        def on_chunk(done: int, total: int, new: list) -> None:
            nonlocal tokens
            tokens += sum(s.completion_tokens for s in new)
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(bar, completed=done, rate=f"{done / elapsed:.2f} items/s, {tokens / elapsed:.0f} tok/s")

        samples = sample_examples(backend, task, examples, sampling, store, prompt=prompt,
                                  chunk_size=chunk_size, on_chunk=on_chunk, skip_bad=skip_bad, bad=bad,
                                  engine_batch=engine_batch)
    common.report_bad_records(bad)
    summary = summarize_samples(samples)
    Console().print(
        f"[bold]{summary['examples']}[/] questions, [bold]{summary['samples']}[/] samples -> {out_path}\n"
        f"accuracy (per sample) {summary['accuracy']:.3f}   pass@{n} {summary['pass_at_n']:.3f}"
    )


@click.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@common.friendly_errors
def merge(shards, out_path):
    """Merge the sample stores written with --shard i/k into one file."""
    from r3v.store import merge_shards

    count = merge_shards(list(shards), out_path)
    Console().print(f"merged {len(shards)} shards: {count} samples -> {out_path}")
